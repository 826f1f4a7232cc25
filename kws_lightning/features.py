"""Feature front ends: raw 16 kHz waves (B, N) -> features (B, 1, T, F), time x frequency.

Each front end is an ``nn.Module`` so it lives inside the model (``KWSModel = frontend + net``): checkpoints
take raw audio, and train / eval / export can never disagree on features (beyond float32's resolution:
training steps run float32 DFTs, below). Everything is batched tensor code
(``torch.stft`` / ``torch.fft``), so it runs on whatever device the waves are on. Filter banks and windows are
non-persistent buffers: ``.to(device)`` moves them, and they are rebuilt from the hyper-parameters rather
than stored in checkpoints.

Numbers match the seeds' librosa / scipy recipes; ``tests/test_features.py`` states and checks the tolerances.
The DFTs (STFT, and the log-spectrogram's resampling FFT) run in float64 and the power spectrum is then
rounded to the compute dtype: float32 (float64 after ``.double()``; still float32 after ``.half()``), with
autocast disabled, because power spectra overflow float16. A float32 DFT's rounding error is ~1e-7 of the
frame's strongest bin, so a band 80+ dB below it (a tone's or chirp's far bands; 0.05% of real speech's)
had no correct digits: its log was noise, different in every FFT implementation, which a trained network
or per-utterance normalisation amplified (an ONNX export 0.04..1.0 off PyTorch in the logits on test
tones, issue 29). In float64 every band is right to float32 rounding and the two DFT paths below round to
the same float32 power spectrum. Cost, one CPU thread: the front end ~3-5x (batch 128: MFCC 6,000 ->
~1,000 clips/s), a TC-ResNet14 forward at batch 64 1.6x; so training steps keep float32 DFTs
(`float32_dfts`), and their features differ only in those far bands.

``export_friendly(model)`` switches the front ends to DFTs written as matrix products (no ``torch.stft`` /
``torch.fft``) for ONNX export: ONNX Runtime's own DFT is float32-accurate to only ~1e-5 of the peak bin
(and ~3e-3 for a 16000-point resampling FFT), which the log features amplify (MFCC off by up to 0.09).
The matmul DFTs are the FFT path's arithmetic up to float64 rounding (tests/test_export.py: < 1e-9 after
``.double()``; in float32 the features agree with the FFT path's to float32 rounding).

Every front end ends in a `FeatureNorm` (kws_lightning/feature_norm.py; ``normalize``: ``none``, the default
of the classes and the seeds' exact numbers; ``per_utterance``; ``dataset``). The conf/feature configs set
the default a run gets and say why. The numbers and tolerances above are those of ``normalize="none"``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Literal, get_args

import librosa
import numpy as np
import scipy.fft
import torch
from torch import nn

from kws_lightning.feature_norm import NORMALIZE_MODES, FeatureNorm, NormalizeMode

# STFT edge padding (librosa >= 0.10: constant; honk-era librosa: reflect). A Literal, so the config check
# refuses a typo before anything runs.
PadMode = Literal["constant", "reflect"]
PAD_MODES: tuple[str, ...] = get_args(PadMode)
# Training-only hook: (filter bank (M, F), batch size, sample_rate) -> one bank per clip (B, M, F), e.g. a
# frequency warp (kws_lightning/vtlp.py). None everywhere else.
FilterBankWarp = Callable[[torch.Tensor, int, int], torch.Tensor]

__all__ = [
    "MFCC",
    "NORMALIZE_MODES",
    "FeatureNorm",
    "LogMel",
    "LogSpectrogram",
    "MelPowerSpectrogram",
    "export_friendly",
    "float32_dfts",
    "output_shape",
    "takes_bank_warp",
]


def _check_waves(waves: torch.Tensor, name: str, min_samples: int) -> None:
    """Reject anything but a batch of float waves, naming what was expected."""
    if not isinstance(waves, torch.Tensor) or waves.dim() != 2 or not waves.is_floating_point():
        got = (
            f"shape {tuple(waves.shape)} dtype {waves.dtype}"
            if isinstance(waves, torch.Tensor)
            else type(waves).__name__
        )
        raise ValueError(
            f"{name} expects waves of shape (B, N) float (a batch of mono 16 kHz clips), got {got}; "
            "add a batch dimension with waves.unsqueeze(0) / convert int16 audio with waves.float() / 32768"
        )
    if waves.shape[-1] < min_samples:
        raise ValueError(
            f"{name} needs at least {min_samples} samples per clip, got N={waves.shape[-1]}; pad the clips"
        )


def _exact(buffer: torch.Tensor, exact64: torch.Tensor) -> torch.Tensor:
    """A constant in the compute dtype: float32, or float64 once the module was converted with .double().

    ``.double()`` / ``.half()`` only recast the stored float32 values, so other dtypes take the exact copy
    (kept on the CPU in float64); half precision modules still compute in float32, since power spectra
    overflow float16.
    """
    if buffer.dtype == torch.float32:
        return buffer
    return exact64.to(device=buffer.device, dtype=_compute_dtype(buffer))


def _compute_dtype(buffer: torch.Tensor) -> torch.dtype:
    """float64 for a module converted with .double(), else float32 (.half() too: see `_exact`)."""
    return torch.float64 if buffer.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off for this device (power spectra overflow float16); no-op where it does not exist."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# ---- DFTs as matrix products (the export path) ---------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _cis64(rows: int, cols: int, n: int, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sign * sin) of 2 pi r c / n for r < rows, c < cols, in float64.

    The angle is reduced modulo n in integers, so every entry is correctly rounded; a float32 angle for
    large r * c would not be. Cached as numpy, not tensors: a tensor made while an exporter traces is a
    fake one, and a cache would hand it to later eager calls.
    """
    angle = 2.0 * np.pi * ((np.outer(np.arange(rows), np.arange(cols)) % n) / n)
    return np.cos(angle), sign * np.sin(angle)


def _cis(rows: int, cols: int, n: int, sign: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_cis64` as constants of `like`'s dtype and device."""
    # Cast in numpy, so an exported graph stores float32 constants rather than float64 ones and a cast.
    np_dtype = np.float64 if like.dtype == torch.float64 else np.float32
    cos, sin = (torch.from_numpy(a.astype(np_dtype)).to(like.device) for a in _cis64(rows, cols, n, sign))
    return cos, sin


def _rdft_direct(frames: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bins 0..n_bins-1 of the DFT of real short frames (..., n) as one matmul each for re and im."""
    cos, sin = _cis(frames.shape[-1], n_bins, frames.shape[-1], -1, frames)
    return frames @ cos, frames @ sin


def _dft_two_stage(re: torch.Tensor, im: torch.Tensor | None, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex DFT (sign -1) or unscaled inverse (sign +1) along the last axis, n = n1 * n2 (Cooley-Tukey,
    one step): n1-point DFTs, twiddles, n2-point DFTs, all matmuls. ~n * (n1 + n2) products instead of n^2,
    so a 16000-point transform takes a few MB of constants rather than 2 GB."""
    n = re.shape[-1]
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    n2 = n // n1
    lead = re.shape[:-1]
    c1, s1 = _cis(n1, n1, n1, sign, re)
    tc, ts = _cis(n1, n2, n, sign, re)
    c2, s2 = _cis(n2, n2, n2, sign, re)
    # Sample n = n2 * a + b sits at [a, b]; the stage-1 transform runs over a, the stage-2 over b.
    xr = re.reshape(*lead, n1, n2)
    ar, ai = c1 @ xr, s1 @ xr
    if im is not None:
        xi = im.reshape(*lead, n1, n2)
        ar, ai = ar - s1 @ xi, ai + c1 @ xi
    br, bi = ar * tc - ai * ts, ar * ts + ai * tc
    yr, yi = br @ c2 - bi @ s2, br @ s2 + bi @ c2
    # Bin k = k1 + n1 * k2 sits at [k1, k2]: transpose so the flattening runs over k1 fastest.
    return yr.transpose(-1, -2).reshape(*lead, n), yi.transpose(-1, -2).reshape(*lead, n)


def _irfft_two_stage(re: torch.Tensor, im: torch.Tensor, n: int) -> torch.Tensor:
    """``torch.fft.irfft(re + i im, n)``: zero-pad / truncate to n // 2 + 1 bins, drop the imaginary part of
    DC (and of Nyquist for even n), extend Hermitian-symmetrically, inverse DFT, real part / n."""
    half = n // 2 + 1
    if re.shape[-1] < half:
        pad = half - re.shape[-1]
        re, im = nn.functional.pad(re, (0, pad)), nn.functional.pad(im, (0, pad))
    re, im = re[..., :half], im[..., :half]
    keep_imag = torch.ones(half, dtype=im.dtype, device=im.device)
    keep_imag[0] = 0.0
    if n % 2 == 0:
        keep_imag[-1] = 0.0
    im = im * keep_imag
    mirror = torch.arange(n - half, 0, -1, device=re.device)  # bins n-1 .. half mirror bins 1 .. n-half
    full_re = torch.cat([re, re.index_select(-1, mirror)], dim=-1)
    full_im = torch.cat([im, -im.index_select(-1, mirror)], dim=-1)
    return _dft_two_stage(full_re, full_im, +1)[0] / n


def export_friendly(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every front end inside `module` to the matmul DFTs (for ONNX export) or back; returns it."""
    for sub in module.modules():
        if hasattr(sub, "matmul_dft"):
            sub.matmul_dft = enabled
    return module


def _dft_precision(frontend: nn.Module, waves: torch.Tensor) -> tuple[torch.dtype, torch.dtype, torch.Tensor]:
    """(compute dtype, DFT dtype, window) for a front end with `window`, `_window64` and `float32_dft`: the
    DFTs run in float64 (module docstring) on the exact window, unless `float32_dfts` asks for float32;
    `window` sets device and dtype."""
    dtype = _compute_dtype(frontend.window)
    if frontend.float32_dft:
        return dtype, dtype, _exact(frontend.window, frontend._window64)
    return dtype, torch.float64, frontend._window64.to(waves.device)


@contextlib.contextmanager
def float32_dfts(module: nn.Module) -> Iterator[None]:
    """Inside the block, the front ends in `module` run their DFTs in float32: training steps
    (kws_lightning/module.py), where a float64 STFT made a TC-ResNet14 step (batch 100) 1.6-1.8x slower on
    the CPU, and the noise float32 leaves in bands 80+ dB below a frame's peak teaches nothing (0.05% of
    bands in 600 dev clips are that far down). Everything a user runs (validation, test, eval, predict,
    listen, serve, streaming, exports) keeps the float64 DFTs of the module docstring."""
    fronts = [sub for sub in module.modules() if hasattr(sub, "float32_dft")]
    for sub in fronts:
        sub.float32_dft = True
    try:
        yield
    finally:
        for sub in fronts:
            sub.float32_dft = False


class MelPowerSpectrogram(nn.Module):
    """Mel power spectrogram (B, N) -> (B, T, n_mels), equal to ``librosa.feature.melspectrogram``.

    Same STFT as librosa: periodic Hann window of ``n_fft`` samples, ``center=True`` padding ``n_fft // 2``
    on both sides with ``pad_mode`` (librosa >= 0.10 default ``"constant"``; honk-era librosa used
    ``"reflect"``), power 2, and the Slaney-normalised Slaney-scale filter bank of ``librosa.filters.mel``.
    T = 1 + N // hop_length.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 480,
        hop_length: int = 160,
        n_mels: int = 40,
        fmin: float = 20.0,
        fmax: float = 4000.0,
        pad_mode: PadMode = "constant",
    ) -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.pad_mode = pad_mode
        # reflect padding needs N > n_fft // 2; constant padding takes any non-empty clip.
        self.min_samples = n_fft // 2 + 1 if pad_mode == "reflect" else 1
        # librosa's own basis (float32 by default), so the only difference left is STFT arithmetic.
        mel_basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        self._mel_basis64 = torch.from_numpy(mel_basis).double()
        self.register_buffer("mel_basis", self._mel_basis64.float(), persistent=False)
        self._window64 = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        self.register_buffer("window", self._window64.float(), persistent=False)
        self.matmul_dft = False  # export_friendly() sets it
        self.float32_dft = False  # float32_dfts() sets it

    def _power_matmul(self, waves: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """|STFT|^2 (B, n_fft // 2 + 1, T) as torch.stft(center=True) computes it, with matmul DFTs (in the
        dtype of `waves` and `window`)."""
        pad = self.n_fft // 2
        padded = nn.functional.pad(waves.unsqueeze(1), (pad, pad), mode=self.pad_mode).squeeze(1)
        frames = padded.unfold(-1, self.n_fft, self.hop_length) * window  # (B, T, n_fft)
        re, im = _rdft_direct(frames, self.n_fft // 2 + 1)
        return (re.square() + im.square()).transpose(1, 2)

    def forward(self, waves: torch.Tensor, bank_warp: FilterBankWarp | None = None) -> torch.Tensor:
        _check_waves(waves, type(self).__name__, self.min_samples)
        dtype, dft_dtype, window = _dft_precision(self, waves)
        with _no_autocast(waves.device):
            if self.matmul_dft:
                power = self._power_matmul(waves.to(dft_dtype), window)
            else:
                spec = torch.stft(
                    waves.to(dft_dtype),
                    n_fft=self.n_fft,
                    hop_length=self.hop_length,
                    win_length=self.n_fft,
                    window=window,
                    center=True,
                    pad_mode=self.pad_mode,
                    return_complex=True,
                )  # (B, n_fft // 2 + 1, T)
                # re^2 + im^2 rather than abs()**2: smooth at 0, so no NaN gradient from |0|. Added in place
                # into the first square (same values bit for bit, one (B, F, T) buffer less: 1.35x faster on
                # the CPU).
                power = spec.real.square().add_(spec.imag.square())
            # Rounded once, after the squares: a sum of non-negative terms (the mel bands) is accurate
            # to its own rounding in float32, whatever its dynamic range.
            power = power.to(dtype)
            basis = _exact(self.mel_basis, self._mel_basis64)
            if bank_warp is not None:
                basis = bank_warp(basis, waves.shape[0], self.sample_rate)
            mel = torch.matmul(basis, power)
            return mel.transpose(1, 2)  # (B, T, n_mels)

    def extra_repr(self) -> str:
        return f"n_fft={self.n_fft}, hop={self.hop_length}, n_mels={self.n_mels}, pad_mode={self.pad_mode}"


class MFCC(nn.Module):
    """honk-style MFCC (the seed recipe): (B, N) -> (B, 1, T, n_mfcc), (B, 1, 101, 40) for 1 s at 16 kHz.

    ``librosa.feature.melspectrogram(y, sr=16000, n_fft=480, hop_length=160, n_mels=40, fmin=20, fmax=4000)``,
    then the natural log where the power is > 0 (honk's ``data[data > 0] = np.log(data[data > 0])``: zero
    power stays 0, so digital silence gives finite features), then the orthonormal DCT-II over the mel bands
    (librosa's old ``filters.dct(n_mfcc, n_mels)`` = ``scipy.fft.dct(type=2, norm='ortho')``), per frame.

    Tolerance (tests/test_features.py, vs librosa in float64): max |diff| <= 1e-3 over every coefficient on
    real speech, noise, clicks, a clipped sine, a pure chirp (mel bands 150 dB below its peak) and digital
    silence (measured <= 5.2e-5; values span about -100..+20): the float64 STFT (module docstring) gets
    every band right, however far below the frame's peak. After ``.double()`` it matches to < 1e-9.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 480,
        hop_length: int = 160,
        n_mels: int = 40,
        n_mfcc: int = 40,
        fmin: float = 20.0,
        fmax: float = 4000.0,
        pad_mode: PadMode = "constant",
        normalize: NormalizeMode = "none",
    ) -> None:
        super().__init__()
        if not 1 <= n_mfcc <= n_mels:
            raise ValueError(f"n_mfcc must be in [1, n_mels={n_mels}], got {n_mfcc}")
        self.mel = MelPowerSpectrogram(sample_rate, n_fft, hop_length, n_mels, fmin, fmax, pad_mode)
        # Row k of the orthonormal DCT-II matrix is coefficient k (dct of the identity's columns).
        dct = scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho", axis=0)[:n_mfcc]
        self._dct64 = torch.from_numpy(dct)
        self.register_buffer("dct_matrix", self._dct64.float(), persistent=False)
        self.norm = FeatureNorm(normalize, n_mfcc)

    def extra_repr(self) -> str:
        return f"n_mfcc={self._dct64.shape[0]}"

    def forward(self, waves: torch.Tensor, bank_warp: FilterBankWarp | None = None) -> torch.Tensor:
        """`bank_warp`: training-only (kws_lightning/vtlp.py), applied to the mel filter bank."""
        _check_waves(waves, type(self).__name__, self.mel.min_samples)
        mel = self.mel(waves, bank_warp)
        with _no_autocast(waves.device):
            return self.window_features(self.frame_features(mel))

    def frame_features(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel power (B, T, n_mels) -> MFCCs (B, T, n_mfcc): each frame's from its own values only (the
        streaming path, kws_lightning/streaming_state.py, computes new frames alone)."""
        # log(1) = 0 exactly, so power <= 0 gives 0 (honk's rule) and log never sees 0: no -inf, and the
        # gradient of those entries goes to the constant, never NaN. One where, no ones_like buffer.
        log_mel = torch.log(torch.where(mel > 0, mel, 1.0))
        return torch.matmul(log_mel, _exact(self.dct_matrix, self._dct64).T)

    def window_features(self, frames: torch.Tensor) -> torch.Tensor:
        """The steps that see the whole window: (B, T, F) frames -> normalised (B, 1, T, F) features."""
        return self.norm(frames.unsqueeze(1))


class LogMel(nn.Module):
    """Log-mel power in dB: (B, N) -> (B, 1, T, n_mels), (B, 1, 101, 40) for 1 s at 16 kHz.

    The same mel power spectrogram as :class:`MFCC`, then ``librosa.power_to_db(S, ref=1.0, amin=1e-10,
    top_db=80.0)`` applied per clip (the floor ``max - top_db`` is each clip's own max; ``top_db=None``
    disables it).

    Tolerance (vs librosa in float64): max |diff| <= 2e-3 dB where the reference is within 60 dB of the
    clip's max, and <= 1e-2 dB everywhere (measured <= 7e-6 dB on speech and synthetic signals, a pure
    chirp included). After ``.double()``: < 1e-9.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 480,
        hop_length: int = 160,
        n_mels: int = 40,
        fmin: float = 20.0,
        fmax: float = 4000.0,
        pad_mode: PadMode = "constant",
        amin: float = 1e-10,
        top_db: float | None = 80.0,
        normalize: NormalizeMode = "none",
    ) -> None:
        super().__init__()
        if amin <= 0:
            raise ValueError(f"amin must be > 0, got {amin}")
        if top_db is not None and top_db < 0:
            raise ValueError(f"top_db must be >= 0 or None, got {top_db}")
        self.mel = MelPowerSpectrogram(sample_rate, n_fft, hop_length, n_mels, fmin, fmax, pad_mode)
        self.amin = amin
        self.top_db = top_db
        self.norm = FeatureNorm(normalize, n_mels)

    def extra_repr(self) -> str:
        return f"amin={self.amin}, top_db={self.top_db}"

    def forward(self, waves: torch.Tensor, bank_warp: FilterBankWarp | None = None) -> torch.Tensor:
        """`bank_warp`: training-only (kws_lightning/vtlp.py), applied to the mel filter bank."""
        _check_waves(waves, type(self).__name__, self.mel.min_samples)
        mel = self.mel(waves, bank_warp)
        with _no_autocast(waves.device):
            return self.window_features(self.frame_features(mel))

    def frame_features(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel power (B, T, n_mels) -> dB before the `top_db` floor: each frame's from its own values."""
        return 10.0 * torch.log10(torch.clamp(mel, min=self.amin))  # ref=1.0: nothing to subtract

    def window_features(self, db: torch.Tensor) -> torch.Tensor:
        """The steps that see the whole window: the `top_db` floor under each clip's peak, normalisation."""
        if self.top_db is not None:
            peak = db.amax(dim=(1, 2), keepdim=True)  # per clip, as librosa does on one clip
            db = torch.maximum(db, peak - self.top_db)
        return self.norm(db.unsqueeze(1))


class LogSpectrogram(nn.Module):
    """Log power spectrogram at 8 kHz (the Kaggle "speech representation" seed): (B, N) -> (B, 1, T, F).

    ``scipy.signal.resample(x, int(target_sample_rate / 16000 * N))`` (FFT method: rfft, keep the first
    ``m // 2 + 1`` bins, double (down) / halve (up) the unpaired bin at ``m // 2`` when ``m`` is even,
    irfft, scale by num / N), then ``scipy.signal.spectrogram(x, fs=target_sample_rate, window='hann',
    nperseg=window, noverlap=window - step, detrend=False)`` (density scaling 1 / (fs * sum(w^2)),
    one-sided bins doubled except DC and Nyquist), transposed to time x frequency, then
    ``log(spec + eps)``. Window and step are ``round(ms * target_sample_rate / 1000)`` samples; the seed's
    20 ms / 10 ms give 160 / 80 samples, so (B, 1, 99, 81) for 1 s (no padding: T = 1 + (M - 160) // 80).

    Tolerance (vs scipy in float64): max |diff| <= 2e-3 where the spectrum is within 80 dB of the clip's
    max, and <= 5e-3 everywhere (measured <= 1.1e-6 on speech and synthetic signals; the FFTs, whole-clip
    resampling then per frame, run in float64). After ``.double()``: < 1e-9.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        target_sample_rate: int = 8000,
        window_ms: float = 20.0,
        step_ms: float = 10.0,
        eps: float = 1e-10,
        normalize: NormalizeMode = "none",
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.target_sample_rate = target_sample_rate
        self.nperseg = int(round(window_ms * target_sample_rate / 1e3))
        self.step = int(round(step_ms * target_sample_rate / 1e3))
        if not 0 < self.step <= self.nperseg:
            raise ValueError(
                f"need 0 < step <= window, got window_ms={window_ms} ({self.nperseg} samples), "
                f"step_ms={step_ms} ({self.step} samples) at {target_sample_rate} Hz"
            )
        self.eps = eps
        self._window64 = torch.hann_window(self.nperseg, periodic=True, dtype=torch.float64)
        self.density_scale = 1.0 / (target_sample_rate * float(self._window64.pow(2).sum()))
        self.register_buffer("window", self._window64.float(), persistent=False)
        self.matmul_dft = False  # export_friendly() sets it
        self.float32_dft = False  # float32_dfts() sets it
        # Shortest clip whose resampled length holds one window (searched, as the length rounds down).
        self.min_samples = int(np.ceil(self.nperseg * sample_rate / target_sample_rate))
        while self.resampled_length(self.min_samples) < self.nperseg:
            self.min_samples += 1
        self.norm = FeatureNorm(normalize, self.nperseg // 2 + 1)

    def extra_repr(self) -> str:
        return (
            f"target_sample_rate={self.target_sample_rate}, nperseg={self.nperseg}, step={self.step}, "
            f"eps={self.eps}"
        )

    def resampled_length(self, num_samples: int) -> int:
        # Same float expression as the seed, so lengths agree for any rate pair.
        return int(self.target_sample_rate / self.sample_rate * num_samples)

    def resample(self, waves: torch.Tensor) -> torch.Tensor:
        """``scipy.signal.resample`` along the last axis (real input, no window), batched."""
        n_in = waves.shape[-1]
        n_out = self.resampled_length(n_in)
        if n_out == n_in:
            return waves
        m = min(n_out, n_in)
        if self.matmul_dft:
            return self._resample_matmul(waves, m, n_out)
        spec = torch.fft.rfft(waves)[..., : m // 2 + 1]
        if m % 2 == 0:
            # The unpaired bin at m // 2: downsampling folds its mirror image in, upsampling splits it.
            gain = torch.ones(spec.shape[-1], dtype=waves.dtype, device=waves.device)
            gain[m // 2] = 2.0 if n_out < n_in else 0.5
            spec = spec * gain
        return torch.fft.irfft(spec * (n_out / n_in), n=n_out)

    def _resample_matmul(self, waves: torch.Tensor, m: int, n_out: int) -> torch.Tensor:
        """`resample` with the two-stage matmul DFTs (the export path): same bins, gains and scale."""
        n_in = waves.shape[-1]
        re, im = _dft_two_stage(waves, None, -1)
        re, im = re[..., : m // 2 + 1], im[..., : m // 2 + 1]
        if m % 2 == 0:
            gain = torch.ones(m // 2 + 1, dtype=waves.dtype, device=waves.device)
            gain[m // 2] = 2.0 if n_out < n_in else 0.5
            re, im = re * gain, im * gain
        return _irfft_two_stage(re * (n_out / n_in), im * (n_out / n_in), n_out)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        _check_waves(waves, type(self).__name__, self.min_samples)
        dtype, dft_dtype, window = _dft_precision(self, waves)
        with _no_autocast(waves.device):
            x = self.resample(waves.to(dft_dtype))
            frames = x.unfold(-1, self.nperseg, self.step) * window  # (B, T, nperseg)
            if self.matmul_dft:
                re, im = _rdft_direct(frames, self.nperseg // 2 + 1)
            else:
                spec = torch.fft.rfft(frames)
                re, im = spec.real, spec.imag
            power = ((re.square() + im.square()) * self.density_scale).to(dtype)
            one_sided = torch.full((power.shape[-1],), 2.0, dtype=power.dtype, device=power.device)
            one_sided[0] = 1.0
            if self.nperseg % 2 == 0:
                one_sided[-1] = 1.0  # the Nyquist bin has no mirror image
            if self.matmul_dft:
                # log(p + eps) written as log(p / eps + 1) + log(eps): the ONNX exporter's optimiser drops an
                # Add of a constant below 1e-8 as a no-op (x + 1e-10 -> x, so log(0) = -inf).
                return self.norm(
                    (torch.log(power * one_sided / self.eps + 1.0) + math.log(self.eps)).unsqueeze(1)
                )
            return self.norm(torch.log(power * one_sided + self.eps).unsqueeze(1))


def takes_bank_warp(frontend: object) -> bool:
    """Whether `frontend` computes a mel filter bank that a `bank_warp` (kws_lightning/vtlp.py) can warp:
    MFCC and LogMel do; LogSpectrogram (no filter bank) does not."""
    return isinstance(getattr(frontend, "mel", None), MelPowerSpectrogram)


@torch.no_grad()
def output_shape(frontend: nn.Module, num_samples: int = 16000) -> tuple[int, int, int]:
    """(1, T, F) that ``frontend`` produces for one clip of ``num_samples`` samples (runs it on zeros)."""
    buffer = next(iter(frontend.buffers()), None)
    device = buffer.device if buffer is not None else torch.device("cpu")
    dtype = buffer.dtype if buffer is not None and buffer.is_floating_point() else torch.float32
    out = frontend(torch.zeros(1, num_samples, device=device, dtype=dtype))
    if out.dim() != 4 or out.shape[0] != 1:
        raise ValueError(
            f"{type(frontend).__name__} returned shape {tuple(out.shape)}, expected (1, 1, T, F)"
        )
    return tuple(int(d) for d in out.shape[1:])  # type: ignore[return-value]
