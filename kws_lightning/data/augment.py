"""Batched waveform augmentation on the device: pad/crop, time shift, background-noise mix, white noise,
silence.

Everything here takes whole batches of tensors already on the training device; no per-clip Python.
Batches arrive as int16 ``(B, L)`` left-aligned clips with their true lengths (``L`` = longest clip).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

INT16_SCALE = 32768.0


@dataclass
class TimeShift:
    enabled: bool = True
    max_fraction: float = 0.2  # of the clip length, either direction
    p: float = 0.5


@dataclass
class NoiseMix:
    enabled: bool = True
    max_gain: float = 0.2
    p: float = 0.5


@dataclass
class WhiteNoise:
    """Gaussian noise at a level drawn per clip, U[min_db, max_db] dB re full scale (standard deviation
    10 ** (level / 20)); MatchboxNet's NeMo recipe: -90..-46 dB with p 1.0 (NeMo's WhiteNoisePerturbation,
    nemo/collections/asr/parts/preprocessing/perturb.py)."""

    enabled: bool = False
    min_db: float = -90.0
    max_db: float = -46.0
    p: float = 1.0


@dataclass
class SilenceSynth:
    max_gain: float = 1.0  # silence = noise slice x U[0, max_gain]
    p_zero: float = 0.1  # ... or digital zero


@dataclass
class AugmentConfig:
    """Mirrors ``conf/augment/*.yaml``; `random_crop=False` centres clips in training too."""

    random_crop: bool = True
    time_shift: TimeShift = field(default_factory=TimeShift)
    noise: NoiseMix = field(default_factory=NoiseMix)
    white_noise: WhiteNoise = field(default_factory=WhiteNoise)
    silence: SilenceSynth = field(default_factory=SilenceSynth)

    def __post_init__(self) -> None:
        white = self.white_noise
        if not white.min_db <= white.max_db:
            raise ValueError(
                f"augment.white_noise.min_db ({white.min_db}) must not exceed max_db ({white.max_db})"
            )
        if not 0.0 <= white.p <= 1.0:
            raise ValueError(f"augment.white_noise.p must be a probability in [0, 1], got {white.p}")

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> AugmentConfig:
        """Build from a (Hydra) mapping; unknown keys are an error listing the valid ones."""
        values = dict(values or {})
        nested = {
            "time_shift": TimeShift,
            "noise": NoiseMix,
            "white_noise": WhiteNoise,
            "silence": SilenceSynth,
        }
        _check_keys("augment", values, [f.name for f in fields(cls)])
        kwargs = {}
        for key, value in values.items():
            if key in nested:
                sub = dict(value or {})
                _check_keys(f"augment.{key}", sub, [f.name for f in fields(nested[key])])
                kwargs[key] = nested[key](**sub)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _check_keys(where: str, values: Mapping, valid: list[str]) -> None:
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; valid keys: {valid}")


def _uniform(size: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.rand(size, device=device) * (high - low) + low


def _randint_inclusive(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """One integer per element, uniform in [low, high] (tensors of the same shape)."""
    span = (high - low + 1).to(torch.float32)
    return low + (torch.rand(low.shape, device=low.device) * span).long().clamp_max(high - low)


def window(waves: torch.Tensor, starts: torch.Tensor, out_len: int) -> torch.Tensor:
    """``out[b, t] = waves[b, starts[b] + t]``, zero outside the row: pad, crop and shift in one copy.

    Rows must be zero past their clip's length (ClipBatches builds them so). A negative start pads on
    the left, a start past ``length - out_len`` pads on the right. Zero-padding both ends and indexing an
    `unfold` view copies whole rows, ~5x faster than a gather with a (B, out_len) int64 index tensor.
    """
    padded = torch.nn.functional.pad(waves, (out_len, out_len))
    rows = padded.unfold(1, out_len, 1)
    first = (starts + out_len).clamp(0, rows.shape[1] - 1)
    return rows[torch.arange(len(waves), device=waves.device), first]


def center_starts(lengths: torch.Tensor, out_len: int) -> torch.Tensor:
    """Starts that centre each clip in `out_len` samples (pad both sides, or crop the middle)."""
    return torch.div(lengths - out_len, 2, rounding_mode="floor")


def random_starts(lengths: torch.Tensor, out_len: int) -> torch.Tensor:
    """Uniform random placement: a short clip lands anywhere inside, a long one is cropped anywhere."""
    excess = lengths - out_len
    return _randint_inclusive(torch.minimum(excess, torch.zeros_like(excess)), excess.clamp_min(0))


def shift_amounts(batch: int, max_shift: int, p: float, device: torch.device) -> torch.Tensor:
    """Per-row shift in samples: U{-max_shift..max_shift} with probability p, else 0."""
    if max_shift <= 0 or p <= 0:
        return torch.zeros(batch, dtype=torch.long, device=device)
    low = torch.full((batch,), -max_shift, device=device)
    shifts = _randint_inclusive(low, -low)
    return torch.where(torch.rand(batch, device=device) < p, shifts, torch.zeros_like(shifts))


class NoiseBank:
    """Background-noise recordings (int16, end to end) from which random `slice_length` slices are cut.

    Recordings shorter than a slice are zero padded once here, so a slice never spans two recordings.
    """

    def __init__(self, recordings: list[torch.Tensor], slice_length: int = 16000) -> None:
        recordings = [r for r in recordings if r.numel() > 0]
        self.slice_length = slice_length
        padded = [torch.nn.functional.pad(r, (0, max(slice_length - len(r), 0))) for r in recordings]
        self.lengths = torch.tensor([len(r) for r in padded], dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)[:-1]])
        self.samples = torch.cat(padded) if padded else torch.zeros(0, dtype=torch.int16)

    def __bool__(self) -> bool:
        return len(self.lengths) > 0

    def to(self, device: torch.device) -> NoiseBank:
        if self.samples.device != device:
            self.samples, self.lengths, self.offsets = (
                t.to(device) for t in (self.samples, self.lengths, self.offsets)
            )
        return self

    def slices(self, count: int) -> torch.Tensor:
        """`count` float slices in [-1, 1) of `slice_length` samples: random recording, random offset."""
        device = self.samples.device
        files = torch.randint(len(self.lengths), (count,), device=device)
        room = self.lengths[files] - self.slice_length
        starts = (torch.rand(count, device=device) * (room + 1)).long().clamp_max(room)
        rows = self.samples.unfold(0, self.slice_length, 1)
        return rows[self.offsets[files] + starts].float().div_(INT16_SCALE)


def mix_noise(x: torch.Tensor, bank: NoiseBank, max_gain: float, p: float) -> torch.Tensor:
    """With probability p per clip add a noise slice at gain U[0, max_gain]; clip to [-1, 1]."""
    if not bank or p <= 0 or max_gain <= 0:
        return x
    batch = len(x)
    gains = _uniform(batch, 0.0, max_gain, x.device) * (torch.rand(batch, device=x.device) < p)
    # In place in the fresh noise buffer (x is left as it is): same values as (x + g * noise).clamp().
    noise = bank.slices(batch).mul_(gains[:, None])
    return noise.add_(x).clamp_(-1.0, 1.0)


def add_white_noise(x: torch.Tensor, min_db: float, max_db: float, p: float) -> torch.Tensor:
    """With probability p per clip add Gaussian noise of standard deviation 10 ** (U[min_db, max_db] / 20);
    clip to [-1, 1]."""
    if p <= 0:
        return x
    batch = len(x)
    levels_db = _uniform(batch, min_db, max_db, x.device)
    scales = torch.pow(10.0, levels_db / 20.0) * (torch.rand(batch, device=x.device) < p)
    return torch.randn_like(x).mul_(scales[:, None]).add_(x).clamp_(-1.0, 1.0)


def synthesize_silence(count: int, bank: NoiseBank, cfg: SilenceSynth) -> torch.Tensor:
    """Silence items: a noise slice at gain U[0, max_gain], or digital zero with probability p_zero."""
    device = bank.samples.device
    if not bank:
        return torch.zeros(count, bank.slice_length, device=device)
    gains = _uniform(count, 0.0, cfg.max_gain, device) * (torch.rand(count, device=device) >= cfg.p_zero)
    return bank.slices(count).mul_(gains[:, None]).clamp_(-1.0, 1.0)


def prepare_batch(
    waves: torch.Tensor,
    lengths: torch.Tensor,
    synth_silence: torch.Tensor,
    bank: NoiseBank,
    cfg: AugmentConfig,
    train: bool,
) -> torch.Tensor:
    """int16 batch → float (B, bank.slice_length) in [-1, 1]: the whole device-side input path.

    Train: random pad/crop and time shift (one window copy: for clips no longer than the output the
    shift's zero fill is exact; a longer clip shows its own neighbouring audio instead), then noise mix,
    white noise and fresh silence (silence items get no white noise). Eval: centred pad/crop only.
    """
    out_len = bank.slice_length
    if not train:
        return window(waves, center_starts(lengths, out_len), out_len).float().div_(INT16_SCALE)
    starts = random_starts(lengths, out_len) if cfg.random_crop else center_starts(lengths, out_len)
    if cfg.time_shift.enabled:
        max_shift = int(cfg.time_shift.max_fraction * out_len)
        starts = starts - shift_amounts(len(waves), max_shift, cfg.time_shift.p, waves.device)
    x = window(waves, starts, out_len).float().div_(INT16_SCALE)
    if cfg.noise.enabled:
        x = mix_noise(x, bank, cfg.noise.max_gain, cfg.noise.p)
    if cfg.white_noise.enabled:
        x = add_white_noise(x, cfg.white_noise.min_db, cfg.white_noise.max_db, cfg.white_noise.p)
    if synth_silence.any():
        rows = synth_silence.nonzero().squeeze(1)
        x[rows] = synthesize_silence(len(rows), bank, cfg.silence)
    return x
