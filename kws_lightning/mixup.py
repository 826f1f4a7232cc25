"""mixup (Zhang et al., ICLR 2018) on raw waves within a batch: x = lam x_a + (1 - lam) x_b, and the loss
lam L(y_a) + (1 - lam) L(y_b), for any loss that is linear in the target distribution (cross-entropy, with
or without label smoothing)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class MixedBatch:
    """A batch after mixup: its waves, both target sets and the weight `lam` of `targets_a`."""

    waves: torch.Tensor
    targets_a: torch.Tensor
    targets_b: torch.Tensor
    lam: float

    @property
    def dominant_targets(self) -> torch.Tensor:
        """The label with the larger share in each mixed clip (what training accuracy is measured against)."""
        return self.targets_a if self.lam >= 0.5 else self.targets_b

    def loss(
        self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor
    ) -> torch.Tensor:
        """lam criterion(logits, y_a) + (1 - lam) criterion(logits, y_b); one term when nothing was mixed."""
        if self.lam >= 1.0:
            return criterion(logits, self.targets_a)
        return self.lam * criterion(logits, self.targets_a) + (1.0 - self.lam) * criterion(
            logits, self.targets_b
        )


class Mixup:
    """With probability `p` per batch, mix every clip with another of the same batch (a random permutation)
    at one weight lam ~ Beta(alpha, alpha) for the whole batch, as in the paper.

    Waves are mixed before the front end: adding two recordings is a physical mixture, whereas a mix of log
    features is not. Batches left unmixed (probability 1 - p) come back with lam = 1.
    """

    def __init__(self, alpha: float = 0.2, p: float = 1.0) -> None:
        if not alpha > 0:
            raise ValueError(f"mixup.alpha must be > 0 (Beta(alpha, alpha)), got {alpha!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mixup.p must be a probability in [0, 1], got {p!r}")
        self.alpha = float(alpha)
        self.p = float(p)

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha}, p={self.p})"

    def __call__(self, waves: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        # lam and the coin are host-side draws from Python's RNG (seeded by seed_everything): no device sync.
        if self.p == 0.0 or random.random() >= self.p:
            return MixedBatch(waves, targets, targets, 1.0)
        lam = random.betavariate(self.alpha, self.alpha)
        return self.mix(waves, targets, lam, torch.randperm(len(targets), device=targets.device))

    @staticmethod
    def mix(waves: torch.Tensor, targets: torch.Tensor, lam: float, permutation: torch.Tensor) -> MixedBatch:
        """Mix each clip i with clip permutation[i] at weight `lam`."""
        mixed = lam * waves + (1.0 - lam) * waves[permutation]
        return MixedBatch(mixed, targets, targets[permutation], float(lam))
