"""TF-style epoch composition: every known-keyword clip + silence and unknown items at fixed proportions.

With proportions ``ps`` (silence) and ``pu`` (unknown), an epoch of ``K`` known clips gets
``round(K / (1 - ps - pu) * ps)`` silence items and likewise for unknown, so that silence and unknown
make up ``ps`` and ``pu`` of the epoch. Unknown clips and silence are redrawn every epoch, reproducibly
from ``(seed, epoch)``. Validation and test use one fixed draw.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

# Item id for "synthesise silence here"; clip ids are >= 0.
SILENCE_ITEM = -1


def composition_sizes(num_known: int, silence_fraction: float, unknown_fraction: float) -> tuple[int, int]:
    """(silence_num, unknown_num) for an epoch with `num_known` keyword clips."""
    if not 0 <= silence_fraction < 1 or not 0 <= unknown_fraction < 1:
        raise ValueError("silence and unknown percentages must each be in [0, 100)")
    rest = 1.0 - silence_fraction - unknown_fraction
    if rest <= 0:
        raise ValueError(
            f"silence ({silence_fraction:.0%}) + unknown ({unknown_fraction:.0%}) leave no room for keywords"
        )
    return round(num_known / rest * silence_fraction), round(num_known / rest * unknown_fraction)


def draw_cycled(ids: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` items of `ids` in whole shuffled passes, so none repeats before all are used."""
    if count == 0:
        return np.zeros(0, np.int64)
    passes = -(-count // len(ids))
    return np.concatenate([rng.permutation(ids) for _ in range(passes)])[:count].astype(np.int64)


def draw_unknown(unknown_ids: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` unknown clips, cycling through the pool."""
    if count and len(unknown_ids) == 0:
        raise ValueError(
            "the unknown class is empty (no non-keyword word folders in this split): add other words, "
            "or set data.unknown_percentage=0"
        )
    return draw_cycled(unknown_ids, count, rng)


def balanced_keywords(
    known_ids: np.ndarray, known_targets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Every keyword as often as the most frequent one: a scarce class (on/off in the dev set) cycles
    through all of its clips, repeating some, instead of being seen 3x less often."""
    classes, counts = np.unique(known_targets, return_counts=True)
    return np.concatenate(
        [draw_cycled(known_ids[known_targets == c], int(counts.max()), rng) for c in classes]
    )


def draw_epoch(
    known_ids: np.ndarray,
    unknown_ids: np.ndarray,
    silence_fraction: float,
    unknown_fraction: float,
    rng: np.random.Generator,
    known_targets: np.ndarray | None = None,
) -> np.ndarray:
    """One epoch's items (clip ids, SILENCE_ITEM for silence), shuffled.

    With `known_targets` (the class of each known clip) the keywords are balanced (`balanced_keywords`).
    """
    if known_targets is not None:
        known_ids = balanced_keywords(np.asarray(known_ids, np.int64), np.asarray(known_targets), rng)
    silence_num, unknown_num = composition_sizes(len(known_ids), silence_fraction, unknown_fraction)
    items = np.concatenate(
        [
            np.asarray(known_ids, np.int64),
            draw_unknown(np.asarray(unknown_ids, np.int64), unknown_num, rng),
            np.full(silence_num, SILENCE_ITEM, np.int64),
        ]
    )
    return rng.permutation(items)


class TFStyleSampler(Sampler[int]):
    """Yields one epoch's items; `set_epoch` (called by Lightning each epoch) redraws unknown and silence.

    With `num_replicas` > 1 each rank takes a disjoint, equal-sized shard of the same epoch draw
    (padded by wrapping around, as DistributedSampler does), so proportions hold overall.
    With `balance_keywords` (and `known_targets`, the class of each known clip) every keyword appears
    as often as the most frequent one.
    """

    def __init__(
        self,
        known_ids: np.ndarray,
        unknown_ids: np.ndarray,
        silence_fraction: float = 0.1,
        unknown_fraction: float = 0.1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        known_targets: np.ndarray | None = None,
        balance_keywords: bool = False,
    ) -> None:
        if balance_keywords and known_targets is None:
            raise ValueError("balance_keywords needs known_targets (the class of each known clip)")
        self.known_ids = np.asarray(known_ids, np.int64)
        self.known_targets = np.asarray(known_targets) if balance_keywords else None
        self.unknown_ids = np.asarray(unknown_ids, np.int64)
        self.silence_fraction = silence_fraction
        self.unknown_fraction = unknown_fraction
        self.seed = seed
        self.epoch = 0
        self.skip_next = 0  # items of the current epoch already consumed before a resume
        num_known = len(self.known_ids)
        if self.known_targets is not None:
            counts = np.unique(self.known_targets, return_counts=True)[1]
            num_known = int(counts.max()) * len(counts)
        silence_num, unknown_num = composition_sizes(num_known, silence_fraction, unknown_fraction)
        self.epoch_size = num_known + silence_num + unknown_num
        self.set_world(num_replicas, rank)

    def set_world(self, num_replicas: int, rank: int) -> None:
        """Shard the epoch over `num_replicas` processes; this one is `rank`."""
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_replicas, self.rank = num_replicas, rank
        self.shard_size = -(-self.epoch_size // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_items(self, epoch: int | None = None) -> np.ndarray:
        """All ranks' items for `epoch` (default: the current one), before sharding."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        return draw_epoch(
            self.known_ids,
            self.unknown_ids,
            self.silence_fraction,
            self.unknown_fraction,
            rng,
            self.known_targets,
        )

    def shard(self, items: np.ndarray) -> np.ndarray:
        padded = np.resize(items, self.shard_size * self.num_replicas)
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip_next = self.skip_next, 0
        return iter(self.shard(self.epoch_items())[skip:].tolist())

    def __len__(self) -> int:
        return self.shard_size


def fixed_selection(
    known_ids: np.ndarray,
    unknown_ids: np.ndarray,
    silence_fraction: float,
    unknown_fraction: float,
    seed: int,
) -> np.ndarray:
    """Validation / test items drawn once (same proportions), in a stable order."""
    rng = np.random.default_rng([seed, 2**31 - 1])
    silence_num, unknown_num = composition_sizes(len(known_ids), silence_fraction, unknown_fraction)
    unknown = np.sort(draw_unknown(np.asarray(unknown_ids, np.int64), unknown_num, rng))
    return np.concatenate([np.asarray(known_ids, np.int64), unknown, np.full(silence_num, SILENCE_ITEM)])
