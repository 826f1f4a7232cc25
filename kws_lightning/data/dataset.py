"""Map item ids to batches of raw int16 clips: the only work DataLoader workers do is slicing arrays."""

from __future__ import annotations

import warnings

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


class DeviceClipBatches:
    """`ClipBatches.__getitems__` as tensor ops on one device (the wave cache held there as int16), so a
    batch needs no CPU work beyond its ids; it gives the same batch, row for row (tests/test_device_cache.py).
    """

    def __init__(
        self,
        cache: WaveCache,
        clip_targets: np.ndarray,
        device: torch.device | str,
    ) -> None:
        self.device = torch.device(device)
        with warnings.catch_warnings():  # a read-only memmap: shared as is on the CPU, never written to
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.samples = torch.from_numpy(np.ascontiguousarray(cache.samples)).to(self.device)
        self.offsets = torch.from_numpy(np.asarray(cache.offsets, np.int64)).to(self.device)
        self.lengths = torch.from_numpy(np.asarray(cache.lengths, np.int64)).to(self.device)
        self.clip_targets = torch.as_tensor(np.asarray(clip_targets, np.int64), device=self.device)

    def __call__(self, ids: torch.Tensor, fixed_silence: torch.Tensor | None = None) -> Batch:
        """The batch of `ids`; `fixed_silence` (on this device) as in ClipBatches: validation / test."""
        if fixed_silence is not None and len(fixed_silence) == 0:
            fixed_silence = None
        ids = ids.to(self.device, torch.int64)
        silence = ids < 0
        clip_ids = torch.where(silence, torch.zeros_like(ids), ids)
        lengths = torch.where(silence, torch.zeros_like(ids), self.lengths[clip_ids])
        if fixed_silence is not None:
            lengths = torch.where(silence, fixed_silence.shape[1], lengths)
        width = max(int(lengths.max()) if len(ids) else 0, 1)
        column = torch.arange(width, device=self.device)
        inside = column < lengths[:, None]
        # Clamp so the masked-out positions index inside the cache; they are zeroed below.
        flat = (self.offsets[clip_ids][:, None] + column).clamp(max=max(len(self.samples) - 1, 0))
        waves = torch.where(inside & ~silence[:, None], self.samples[flat], 0).to(torch.int16)
        if fixed_silence is not None and bool(silence.any()):
            rows = torch.nonzero(silence).squeeze(1)
            which = (-1 - ids[rows]) % len(fixed_silence)
            waves[rows, : fixed_silence.shape[1]] = fixed_silence[which]
        targets = torch.where(silence, SILENCE_INDEX, self.clip_targets[clip_ids])
        synth = silence & (fixed_silence is None)
        return {"waves": waves, "lengths": lengths, "targets": targets, "synth_silence": synth}


class ClipIds(Dataset):
    """The loader's dataset when the cache lives on the device: a batch is its ids only."""

    def __init__(self, fixed_silence: np.ndarray | None = None) -> None:
        fixed_silence = fixed_silence

    def __getitems__(self, items: list[int]) -> Batch:
        return {"ids": torch.as_tensor(items, dtype=torch.int64)}
