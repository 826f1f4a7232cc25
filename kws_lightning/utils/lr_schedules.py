"""Learning-rate schedules counted in optimiser steps (the LightningModule steps them every step)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


class PiecewiseConstantLR(LRScheduler):
    """The seed's `StepLR([(0, 0.01), (200, 0.001)])`: absolute rates that start at given steps.

    `schedule` is a list of ``(start_step, lr)`` pairs; the first must start at step 0. The optimiser's
    own `lr` is ignored: the schedule says every rate (times a group's `lr_scale`, where a fine-tuned front
    end has one: KWSLightningModule._param_groups).
    """

    def __init__(
        self, optimizer: Optimizer, schedule: Sequence[Sequence[float]], last_epoch: int = -1
    ) -> None:
        self.schedule = _validate_schedule(schedule)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        lr = self.schedule[0][1]
        for start, value in self.schedule:
            if step >= start:
                lr = value
        return lr

    def get_lr(self) -> list[float]:
        lr = self.lr_at(self.last_epoch)
        return [lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]


def _validate_schedule(schedule: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    try:
        pairs = [(int(start), float(lr)) for start, lr in schedule]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"scheduler.schedule={list(schedule)!r} is not a list of (start_step, lr) pairs, "
            "e.g. [[0, 0.01], [200, 0.001]]"
        ) from err
    if not pairs or pairs[0][0] != 0:
        raise ValueError(f"scheduler.schedule={pairs!r} must start at step 0, e.g. [[0, 0.01], [200, 0.001]]")
    starts = [start for start, _ in pairs]
    if starts != sorted(set(starts)):
        raise ValueError(f"scheduler.schedule={pairs!r}: start steps must strictly increase")
    return pairs


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    warmup_fraction: float | None = None,
) -> LambdaLR:
    """Linear warm-up from 0 to the optimiser's lr over `warmup_steps`, then a half cosine down to
    ``min_lr_ratio * lr`` at `total_steps`.

    `warmup_fraction` gives the warm-up as a share of the run instead (papers state it in epochs, e.g.
    BC-ResNet's 5 of 200 = 0.025): round(warmup_fraction * total_steps) steps; set warmup_steps to 0 then.
    """
    if warmup_fraction is not None:
        if warmup_steps:
            raise ValueError(
                f"cosine schedule got warmup_steps={warmup_steps} and warmup_fraction={warmup_fraction}: "
                "set one of them (scheduler.warmup_steps=0 to use the fraction)"
            )
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"scheduler.warmup_fraction must be in [0, 1), got {warmup_fraction}")
        warmup_steps = round(warmup_fraction * total_steps)
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"cosine schedule needs 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps}); "
            "lower scheduler.warmup_steps or train longer"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_hold_poly(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    hold_fraction: float = 0.45,
    power: float = 2.0,
    min_lr: float = 0.0,
) -> LambdaLR:
    """NeMo's `PolynomialHoldDecayAnnealing` (nemo/core/optim/lr_scheduler.py, with `WarmupHoldPolicy` and
    `_poly_decay`), MatchboxNet's schedule, for each param group's lr (its peak):

    * warm-up, W = int(warmup_fraction * total_steps) steps: lr * (step + 1) / (W + 1), reaching lr at step W;
    * hold at lr until step H = W + int(hold_fraction * total_steps);
    * then ``min_lr + (lr - min_lr) * (1 - p) ** power``, p = (step - H) / (total_steps - H), so the rate
      lands on `min_lr` (absolute, not a share of lr) at step total_steps and stays there.

    Steps truncate as NeMo's `int()` does; MatchboxNet: warmup 0.05, hold 0.45, power 2, min_lr 0.001.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(
            f"scheduler.total_steps must be a positive integer (null: the run's length), got {total_steps!r}"
        )
    for name, value in (("warmup_fraction", warmup_fraction), ("hold_fraction", hold_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"scheduler.{name} must be in [0, 1), got {value}")
    if warmup_fraction + hold_fraction >= 1.0:
        raise ValueError(
            f"scheduler.warmup_fraction + scheduler.hold_fraction = {warmup_fraction + hold_fraction} leaves "
            "no steps to decay: keep their sum below 1"
        )
    if not power > 0.0:
        raise ValueError(f"scheduler.power must be > 0, got {power}")
    peaks = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    if min_lr < 0.0 or any(min_lr > peak for peak in peaks):
        raise ValueError(
            f"scheduler.min_lr={min_lr} must lie in [0, optimizer.lr] (optimizer.lr: {peaks}); "
            "lower scheduler.min_lr"
        )
    warmup_steps = int(warmup_fraction * total_steps)
    hold_end = warmup_steps + int(hold_fraction * total_steps)
    decay_steps = total_steps - hold_end  # >= 1: the fractions sum to less than 1

    def factor_for(peak: float) -> Callable[[int], float]:
        floor = min_lr / peak if peak > 0 else 0.0

        def factor(step: int) -> float:
            if 0 < warmup_steps and step <= warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            if step < hold_end:
                return 1.0
            progress = min(step - hold_end, decay_steps) / decay_steps
            return floor + (1.0 - floor) * (1.0 - progress) ** power

        return factor

    return LambdaLR(optimizer, [factor_for(peak) for peak in peaks])
