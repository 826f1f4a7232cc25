"""Map item ids to batches of raw int16 clips: the only work DataLoader workers do is slicing arrays."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from kws_lightning.data.wave_cache import WaveCache
from kws_lightning.labels import SILENCE_INDEX

Batch = dict[str, torch.Tensor]


class ClipBatches(Dataset):
    """Item id ``i >= 0`` is clip ``i`` of the wave cache; ``i < 0`` is silence number ``-1 - i``.

    Silence comes from `fixed_silence` (int16 rows, drawn once: validation / test) when given, else it
    is flagged ``synth_silence`` for the device to synthesise fresh each time (training).
    `__getitems__` builds a whole batch at once (torch's DataLoader calls it instead of `__getitem__`).
    """

    def __init__(
        self, cache: WaveCache, clip_targets: np.ndarray, fixed_silence: np.ndarray | None = None
    ) -> None:
        self.cache = cache
        self.clip_targets = np.asarray(clip_targets, np.int64)
        self.fixed_silence = fixed_silence

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item: int) -> Batch:
        return self.__getitems__([item])

    def __getitems__(self, items: list[int]) -> Batch:
        ids = np.asarray(items, np.int64)
        silence = ids < 0
        clip_ids = np.where(silence, 0, ids)
        lengths = np.where(silence, 0, self.cache.lengths[clip_ids])
        fixed = self.fixed_silence is not None and len(self.fixed_silence) > 0
        if fixed:
            lengths[silence] = self.fixed_silence.shape[1]
        waves = np.zeros((len(ids), max(int(lengths.max(initial=0)), 1)), np.int16)
        offsets = self.cache.offsets
        for row in np.flatnonzero(~silence):
            start = offsets[ids[row]]
            waves[row, : lengths[row]] = self.cache.samples[start : start + lengths[row]]
        if fixed:
            for row in np.flatnonzero(silence):
                waves[row, : lengths[row]] = self.fixed_silence[(-1 - ids[row]) % len(self.fixed_silence)]
        targets = np.where(silence, SILENCE_INDEX, self.clip_targets[clip_ids])
        return {
            "waves": torch.from_numpy(waves),
            "lengths": torch.from_numpy(lengths),
            "targets": torch.from_numpy(targets),
            "synth_silence": torch.from_numpy(silence & (not fixed)),
        }


def keep_batch(batch: Batch) -> Batch:
    """collate_fn for ClipBatches: the batch is already built (module-level so workers can pickle it)."""
    return batch
