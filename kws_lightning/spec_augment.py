"""SpecAugment (Park et al., Interspeech 2019): time and frequency masks on the features, training only.

Applied by the LightningModule between the front end and the network (frontend -> SpecAugment -> net), so
`KWSModel`, its checkpoints and its exports stay frontend + net: masking can never leak into inference.
Time warping, the paper's third policy, is left out: it costs a resampling per clip and adds little on
1 s keyword clips. Optional cut-out rectangles (DeVries & Taylor 2017, "Cutout") follow NVIDIA NeMo's
`SpecCutout` (nemo/collections/asr/parts/submodules/spectr_augment.py), which MatchboxNet trains with.
"""

from __future__ import annotations

import torch
from torch import nn

MEAN = "mean"


class SpecAugment(nn.Module):
    """Per example: `freq_masks` bands of 0..`freq_width` bins and `time_masks` bands of 0..`time_width`
    frames, each width and start drawn independently (a width of 0 masks nothing), and `rect_masks`
    rectangles of 0..`rect_time` frames x 0..`rect_freq` bins (NeMo's SpecCutout: each side's start uniform
    in 0..size - max side, so a rectangle always fits, and its sides uniform in 0..max), all set to
    `mask_value`. `rect_masks=0` (the default) draws no rectangles and no random numbers for them.

    Input and output are features (B, C, T, F). In eval mode (validation, test, export) it is the
    identity. All masks of a batch are drawn at once on the features' device (no loop over examples).

    `mask_value`:
      * ``"mean"`` (default): each example's own mean over time, per channel and per bin, i.e. the clip's
        average spectrum (or cepstrum). Neither 0 nor one global mean is neutral for every front end:
        MFCC's first coefficient sits near -70 while the others are within about +-20, and log-mel in dB
        runs from about -80 to 0, so a constant fill (0 for SpecAugment on normalised features) paints
        values a bin never takes. The per-bin time mean is in range for every bin of every front end; a
        time mask then looks like steady background, and a frequency mask removes the band's time course,
        which is what carries the word.
      * a number: that constant (0.0 reproduces the common "zero" fill).
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 7,
        time_masks: int = 2,
        time_width: int = 10,
        mask_value: str | float = MEAN,
        rect_masks: int = 0,
        rect_time: int = 0,
        rect_freq: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("freq_masks", freq_masks),
            ("freq_width", freq_width),
            ("time_masks", time_masks),
            ("time_width", time_width),
            ("rect_masks", rect_masks),
            ("rect_time", rect_time),
            ("rect_freq", rect_freq),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"spec_augment.{name} must be an integer >= 0, got {value!r}")
        if mask_value != MEAN and (isinstance(mask_value, bool) or not isinstance(mask_value, int | float)):
            raise ValueError(f"spec_augment.mask_value must be 'mean' or a number, got {mask_value!r}")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.mask_value = mask_value
        self.rect_masks, self.rect_time, self.rect_freq = rect_masks, rect_time, rect_freq

    def extra_repr(self) -> str:
        return (
            f"freq_masks={self.freq_masks}, freq_width={self.freq_width}, time_masks={self.time_masks}, "
            f"time_width={self.time_width}, rect_masks={self.rect_masks}, rect_time={self.rect_time}, "
            f"rect_freq={self.rect_freq}, mask_value={self.mask_value!r}"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4:
            raise ValueError(
                "SpecAugment expects features (batch, channels, time, frequency), "
                f"got shape {tuple(features.shape)}"
            )
        if not self.training:
            return features
        batch, _, frames, bins = features.shape
        time_mask = band_mask(batch, frames, self.time_masks, self.time_width, features.device)
        freq_mask = band_mask(batch, bins, self.freq_masks, self.freq_width, features.device)
        mask = time_mask[:, None, :, None] | freq_mask[:, None, None, :]  # (B, 1, T, F)
        if self.rect_masks and self.rect_time and self.rect_freq:
            rects = rect_mask(
                batch, frames, bins, self.rect_masks, self.rect_time, self.rect_freq, features.device
            )
            mask = mask | rects[:, None]
        if self.mask_value == MEAN:
            fill = features.mean(dim=2, keepdim=True)  # (B, C, 1, F): each clip's average per bin
        else:
            fill = torch.tensor(float(self.mask_value), dtype=features.dtype, device=features.device)
        return torch.where(mask, fill, features)


def band_mask(batch: int, size: int, count: int, max_width: int, device: torch.device) -> torch.Tensor:
    """(batch, size) bool: the union of `count` bands per row, each of width U{0..max_width} (capped at
    `size`) starting uniformly where it fits."""
    positions = torch.arange(size, device=device)
    if count == 0 or max_width == 0 or size == 0:
        return torch.zeros(batch, size, dtype=torch.bool, device=device)
    widths = torch.randint(0, min(max_width, size) + 1, (batch, count, 1), device=device)
    starts = (torch.rand(batch, count, 1, device=device) * (size - widths + 1)).long()
    return ((positions >= starts) & (positions < starts + widths)).any(dim=1)


def rect_mask(
    batch: int, frames: int, bins: int, count: int, max_time: int, max_freq: int, device: torch.device
) -> torch.Tensor:
    """(batch, frames, bins) bool: the union of `count` rectangles per example, NeMo's SpecCutout drawn for
    the whole batch at once. Per side: start U{0..size - max_side}, length U{0..max_side}, the maximum
    capped at the axis length (NeMo requires it to fit)."""
    if count == 0 or max_time == 0 or max_freq == 0 or frames == 0 or bins == 0:
        return torch.zeros(batch, frames, bins, dtype=torch.bool, device=device)
    sides = []
    for size, max_side in ((frames, max_time), (bins, max_freq)):
        max_side = min(max_side, size)
        starts = torch.randint(0, size - max_side + 1, (batch, count, 1), device=device)
        lengths = torch.randint(0, max_side + 1, (batch, count, 1), device=device)
        positions = torch.arange(size, device=device)
        sides.append((positions >= starts) & (positions < starts + lengths))  # (batch, count, size)
    in_time, in_freq = sides
    return (in_time[:, :, :, None] & in_freq[:, :, None, :]).any(dim=1)
