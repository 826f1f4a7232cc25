"""Batched waveform augmentation on the device: pad/crop, time shift, background-noise mix, white noise,
silence, room reverberation (kws_lightning/data/reverb.py), and training for streams (speech anywhere in the
window, noise at an SNR, keyword halves as unknown).

Everything here takes whole batches of tensors already on the training device; no per-clip Python.
Batches arrive as int16 ``(B, L)`` left-aligned clips with their true lengths (``L`` = longest clip).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

from kws_lightning.data.reverb import add_reverb

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
    # [lo, hi]: mix at an SNR U[lo, hi] dB below the clip's active-speech RMS instead of gain U[0, max_gain]
    snr_db: list[float] | None = None


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
    # [lo, hi] (training only): the slice's RMS U[lo, hi] dB below the batch's median speech level, as a
    # stream's noise sits below its clips; validation / test silence keeps max_gain (a fixed draw).
    snr_db: list[float] | None = None
    # With snr_db: the share of silence items drawn at an SNR; the rest keep gain U[0, max_gain], the loud
    # noise that held-out silence is made of (silence recall fell to 0.91 on unseen speakers without it).
    snr_p: float = 1.0


@dataclass
class SpeedPerturb:
    """Speed perturbation (Ko et al. 2015, Kaldi's 0.9/1.0/1.1): with probability p a clip is resampled by a
    factor U[min_factor, max_factor] (> 1: shorter and higher), tempo and pitch together, as another
    speaker's rate and vocal tract would change them. Linear interpolation: at factors near 1 its aliasing
    and roll-off sit near 8 kHz, far above the MFCC band (<= 4 kHz)."""

    p: float = 0.0
    min_factor: float = 0.9
    max_factor: float = 1.1


@dataclass
class Reverb:
    """Room reverberation (kws_lightning/data/reverb.py): with probability `p` per clip, convolve with a
    synthetic impulse response of RT60 U[rt60_s] seconds and DRR U[drr_db] dB. Small rooms and offices have
    RT60 0.2-0.8 s; a speaker 0.5-2 m from a laptop or phone microphone gives a DRR of about 0-15 dB (lower
    is more reverberant)."""

    p: float = 0.0
    rt60_s: list[float] = field(default_factory=lambda: [0.2, 0.8])
    drr_db: list[float] = field(default_factory=lambda: [0.0, 15.0])


@dataclass
class StreamTraining:
    """Training for streams (issue 14): a detector slides a 1 s window over speech, so words arrive at any
    offset and cut by the window's edges. `offset_p`: per clip, place its speech (the frames within
    ACTIVE_DB of its loudest) anywhere that keeps at least `min_speech_kept` of it inside the window,
    instead of the random crop / time shift. `half_keyword_unknown`: per keyword clip, keep only the first
    or the second half of its speech (split at its energy midpoint, the rest zeroed) and label it unknown
    (`cut_keyword_halves`, applied by the data module before `prepare_batch`: it changes targets)."""

    offset_p: float = 0.0
    min_speech_kept: float = 0.8
    half_keyword_unknown: float = 0.0


@dataclass
class AugmentConfig:
    """Mirrors ``conf/augment/*.yaml``; `random_crop=False` centres clips in training too."""

    random_crop: bool = True
    time_shift: TimeShift = field(default_factory=TimeShift)
    noise: NoiseMix = field(default_factory=NoiseMix)
    white_noise: WhiteNoise = field(default_factory=WhiteNoise)
    silence: SilenceSynth = field(default_factory=SilenceSynth)
    stream: StreamTraining = field(default_factory=StreamTraining)
    speed: SpeedPerturb = field(default_factory=SpeedPerturb)
    reverb: Reverb = field(default_factory=Reverb)

    def __post_init__(self) -> None:
        for part, where in ((self.noise, "noise"), (self.silence, "silence")):
            if part.snr_db is not None:
                part.snr_db = _low_high(f"{where}.snr_db", part.snr_db, "dB")
        reverb = self.reverb
        reverb.rt60_s = _low_high("reverb.rt60_s", reverb.rt60_s, "s")
        reverb.drr_db = _low_high("reverb.drr_db", reverb.drr_db, "dB")
        if reverb.rt60_s[0] <= 0:
            raise ValueError(f"augment.reverb.rt60_s must be positive seconds [lo, hi], got {reverb.rt60_s}")
        stream, white = self.stream, self.white_noise
        probabilities = (
            ("silence.snr_p", self.silence.snr_p),
            ("speed.p", self.speed.p),
            ("reverb.p", reverb.p),
            ("stream.offset_p", stream.offset_p),
            ("stream.half_keyword_unknown", stream.half_keyword_unknown),
            ("white_noise.p", white.p),
        )
        for where, value in probabilities:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{where} must be a probability in [0, 1], got {value}")
        speed = self.speed
        if not 0.0 < speed.min_factor <= speed.max_factor:
            raise ValueError(
                "augment.speed: need 0 < min_factor <= max_factor, got "
                f"{speed.min_factor} and {speed.max_factor}"
            )
        if not 0.0 < stream.min_speech_kept <= 1.0:
            raise ValueError(
                f"augment.stream.min_speech_kept must be in (0, 1], got {stream.min_speech_kept}"
            )
        if not white.min_db <= white.max_db:
            raise ValueError(
                f"augment.white_noise.min_db ({white.min_db}) must not exceed max_db ({white.max_db})"
            )

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> AugmentConfig:
        """Build from a (Hydra) mapping; unknown keys are an error listing the valid ones."""
        values = dict(values or {})
        nested = {
            "time_shift": TimeShift,
            "noise": NoiseMix,
            "white_noise": WhiteNoise,
            "silence": SilenceSynth,
            "stream": StreamTraining,
            "speed": SpeedPerturb,
            "reverb": Reverb,
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


def _low_high(where: str, values: list[float], unit: str) -> list[float]:
    """A drawn range [lo, hi] as plain floats (from a Hydra ListConfig), or an error naming the key."""
    values = [float(v) for v in values]
    if len(values) != 2 or not values[0] <= values[1]:
        raise ValueError(f"augment.{where} must be [lo, hi] with lo <= hi ({unit}), got {values}")
    return values


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


def speed_perturb(
    waves: torch.Tensor, lengths: torch.Tensor, cfg: SpeedPerturb
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row resampled by its factor (1 with probability 1 - p) by linear interpolation: out[t] =
    wave(t * factor), zero past the new length ceil(length / factor); dtype kept, width never below the
    input's. -> (waves, lengths)."""
    batch, width = waves.shape
    device = waves.device
    factors = _uniform(batch, cfg.min_factor, cfg.max_factor, device)
    factors = torch.where(torch.rand(batch, device=device) < cfg.p, factors, torch.ones_like(factors))
    new_lengths = torch.ceil(lengths.float() / factors).long().clamp_max(int(width / cfg.min_factor) + 1)
    out_width = max(int(new_lengths.max()), width) if batch else width  # never narrower than the input
    positions = torch.arange(out_width, device=device, dtype=torch.float64)[None, :] * factors[:, None]
    left = positions.floor().long()
    frac = (positions - left).float()
    left = left.clamp_max(width - 1)
    right = (left + 1).clamp_max(width - 1)
    x = waves.float()
    out = x.gather(1, left).mul_(1.0 - frac).add_(x.gather(1, right).mul_(frac))
    inside = torch.arange(out_width, device=device)[None, :] < new_lengths[:, None]
    out = out.mul_(inside)
    if not waves.dtype.is_floating_point:
        out = out.round_()
    return out.to(waves.dtype), new_lengths.to(lengths.dtype)


FRAME_SAMPLES = 160  # 10 ms at 16 kHz: the energy envelope's frame, as stream_bench.streams uses
ACTIVE_DB = 25.0  # a frame is speech when within this many dB of the clip's loudest frame (same as streams)


@dataclass
class SpeechStats:
    """Per row: the first and last sample of its speech, and its active RMS (float scale; 0: no speech)."""

    first: torch.Tensor
    last: torch.Tensor
    rms: torch.Tensor


def _active_frames(waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(power, active) per 10 ms frame (B, frames): mean square (float scale) of whole frames inside the
    row's length, and whether the frame is within ACTIVE_DB of the row's loudest."""
    batch, width = waves.shape
    count = max(width // FRAME_SAMPLES, 1)
    x = torch.nn.functional.pad(waves.float().div(INT16_SCALE), (0, max(count * FRAME_SAMPLES - width, 0)))
    power = x[:, : count * FRAME_SAMPLES].reshape(batch, count, FRAME_SAMPLES).pow(2).mean(dim=2)
    frame_ends = (torch.arange(count, device=waves.device) + 1) * FRAME_SAMPLES
    power = power * (frame_ends[None, :] <= lengths[:, None])
    loudest = power.max(dim=1, keepdim=True).values
    return power, (power > 0) & (power >= loudest * 10.0 ** (-ACTIVE_DB / 10.0))


def speech_stats(waves: torch.Tensor, lengths: torch.Tensor) -> SpeechStats:
    """Batched `stream_bench.streams.speech_extent`: 10 ms frames within ACTIVE_DB of the row's loudest
    frame are speech (whole frames inside the row's length only), so a clip's SNR here is the stream's."""
    power, active = _active_frames(waves, lengths)
    batch, count = power.shape
    has = active.any(dim=1)
    index = torch.arange(count, device=waves.device).expand(batch, count)
    first = torch.where(active, index, count).min(dim=1).values * FRAME_SAMPLES
    last = torch.minimum((torch.where(active, index, -1).max(dim=1).values + 1) * FRAME_SAMPLES, lengths)
    rms = ((power * active).sum(dim=1) / active.sum(dim=1).clamp_min(1)).sqrt()
    first = torch.where(has, first, torch.zeros_like(first))
    last = torch.where(has, last, lengths)
    return SpeechStats(first, last, rms)


def speech_offset_starts(stats: SpeechStats, out_len: int, min_kept: float) -> torch.Tensor:
    """Window starts uniform over every placement that keeps >= `min_kept` of each row's speech inside:
    s in [last - out_len - (1 - min_kept) * D, first + (1 - min_kept) * D], D = last - first. Speech
    longer than the window (the bounds cross) gets a start between them: the window inside the speech."""
    duration = stats.last - stats.first
    spare = ((1.0 - min_kept) * duration.float()).long()
    low = stats.last - out_len - spare
    high = stats.first + spare
    low, high = torch.minimum(low, high), torch.maximum(low, high)
    return _randint_inclusive(low, high)


def mix_noise_snr(
    x: torch.Tensor, speech_rms: torch.Tensor, bank: NoiseBank, snr_db: list[float], p: float
) -> torch.Tensor:
    """With probability p per clip add a noise slice whose RMS is U[lo, hi] dB below `speech_rms` (rows
    with no speech get none); clip to [-1, 1]."""
    if not bank or p <= 0:
        return x
    batch = len(x)
    snr = _uniform(batch, snr_db[0], snr_db[1], x.device)
    noise = bank.slices(batch)
    noise_rms = noise.pow(2).mean(dim=1).sqrt()
    gains = speech_rms * torch.pow(10.0, -snr / 20.0) / noise_rms.clamp_min(1e-9)
    gains = gains * (noise_rms > 0) * (torch.rand(batch, device=x.device) < p)
    return noise.mul_(gains[:, None]).add_(x).clamp_(-1.0, 1.0)


def silence_at_snr(count: int, bank: NoiseBank, speech_level: float, cfg: SilenceSynth) -> torch.Tensor:
    """Silence items as a stream's noise: a slice at RMS U[lo, hi] dB below `speech_level`, or digital
    zero with probability p_zero."""
    device = bank.samples.device
    if not bank or speech_level <= 0:
        return synthesize_silence(count, bank, cfg)
    snr = _uniform(count, cfg.snr_db[0], cfg.snr_db[1], device)
    noise = bank.slices(count)
    noise_rms = noise.pow(2).mean(dim=1).sqrt()
    gains = speech_level * torch.pow(10.0, -snr / 20.0) / noise_rms.clamp_min(1e-9)
    gains = gains * (noise_rms > 0) * (torch.rand(count, device=device) >= cfg.p_zero)
    return noise.mul_(gains[:, None]).clamp_(-1.0, 1.0)


def energy_midpoints(waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per row, the sample where half of its speech's energy (the frames `speech_stats` counts as speech)
    lies before and half after: the middle of a word by its energy envelope, inside its loud vowel, where
    the extent's time midpoint can fall outside the word (a clip with a click or breath after it)."""
    power, active = _active_frames(waves, lengths)
    energy = (power * active).cumsum(dim=1)
    half = energy[:, -1:] / 2
    frame = (energy < half).sum(dim=1).clamp_max(power.shape[1] - 1)
    return frame * FRAME_SAMPLES + FRAME_SAMPLES // 2


def cut_keyword_halves(
    waves: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    p: float,
    unknown_index: int,
    first_keyword: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives: with probability p per keyword row (target >= `first_keyword`), keep only the first
    or the second half (a coin flip) of its speech, split where half its speech energy is on either side
    (`energy_midpoints`), zero the rest (a 10 ms ramp across the cut, no click) and relabel it
    `unknown_index`. Returns new (waves, targets); the inputs are left as they are."""
    candidates = (targets >= first_keyword) & (lengths > 0)
    chosen = candidates & (torch.rand(len(targets), device=targets.device) < p)
    if p <= 0 or not chosen.any():
        return waves, targets
    rows = chosen.nonzero().squeeze(1)
    middle = energy_midpoints(waves[rows], lengths[rows]).float()
    first_half = torch.rand(len(rows), device=waves.device) < 0.5
    t = torch.arange(waves.shape[1], device=waves.device)[None, :].float()
    fade = float(FRAME_SAMPLES)
    # Gain 1 on the kept side, 0 on the other, a linear ramp over `fade` samples centred on the cut.
    before = ((middle[:, None] + fade / 2 - t) / fade).clamp(0.0, 1.0)
    gain = torch.where(first_half[:, None], before, 1.0 - before)
    out = waves.clone()
    out[rows] = (waves[rows].float() * gain).round().to(waves.dtype)
    new_targets = targets.clone()
    new_targets[rows] = unknown_index
    return out, new_targets


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
    shift's zero fill is exact; a longer clip shows its own neighbouring audio instead), or with
    `stream.offset_p` the speech anywhere in the window; then reverberation, noise mix (a gain, or
    `noise.snr_db` re the clip's speech), white noise and fresh silence (silence items get no white noise
    and no reverberation). Eval: centred pad/crop only.
    """
    out_len = bank.slice_length
    if not train:
        return window(waves, center_starts(lengths, out_len), out_len).float().div_(INT16_SCALE)
    if cfg.speed.p > 0:  # first: the window, the shift and the speech measures see the new rate
        waves, lengths = speed_perturb(waves, lengths, cfg.speed)
    starts = random_starts(lengths, out_len) if cfg.random_crop else center_starts(lengths, out_len)
    if cfg.time_shift.enabled:
        max_shift = int(cfg.time_shift.max_fraction * out_len)
        starts = starts - shift_amounts(len(waves), max_shift, cfg.time_shift.p, waves.device)
    # The stream options draw their random numbers only when on: off, batches are bit-identical to before.
    stream = cfg.stream
    needs_stats = stream.offset_p > 0 or cfg.noise.snr_db is not None or cfg.silence.snr_db is not None
    stats = speech_stats(waves, lengths) if needs_stats else None
    if stream.offset_p > 0:
        moved = (torch.rand(len(waves), device=waves.device) < stream.offset_p) & (stats.rms > 0)
        starts = torch.where(moved, speech_offset_starts(stats, out_len, stream.min_speech_kept), starts)
    x = window(waves, starts, out_len).float().div_(INT16_SCALE)
    # The room first, then the noise that is not in it.
    x = add_reverb(x, cfg.reverb.p, cfg.reverb.rt60_s, cfg.reverb.drr_db)
    if cfg.noise.enabled:
        if cfg.noise.snr_db is not None:
            x = mix_noise_snr(x, stats.rms, bank, cfg.noise.snr_db, cfg.noise.p)
        else:
            x = mix_noise(x, bank, cfg.noise.max_gain, cfg.noise.p)
    if cfg.white_noise.enabled:
        x = add_white_noise(x, cfg.white_noise.min_db, cfg.white_noise.max_db, cfg.white_noise.p)
    if synth_silence.any():
        rows = synth_silence.nonzero().squeeze(1)
        if cfg.silence.snr_db is not None:
            speaking = stats.rms[(stats.rms > 0) & ~synth_silence]
            level = float(speaking.median()) if len(speaking) else 0.0
            quiet = silence_at_snr(len(rows), bank, level, cfg.silence)
            if cfg.silence.snr_p < 1.0:  # draws nothing more at 1: batches stay as they were
                loud = synthesize_silence(len(rows), bank, cfg.silence)
                at_snr = torch.rand(len(rows), device=x.device) < cfg.silence.snr_p
                quiet = torch.where(at_snr[:, None], quiet, loud)
            x[rows] = quiet
        else:
            x[rows] = synthesize_silence(len(rows), bank, cfg.silence)
    return x
