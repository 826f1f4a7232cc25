"""Decode one audio file to 16 kHz mono int16: the only place a WAV is read."""

from __future__ import annotations

import logging
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

log = logging.getLogger(__name__)
_warned_rates: set[int] = set()


class AudioReadError(RuntimeError):
    """A clip that cannot be decoded; carries the path so batch jobs can report and skip it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read audio file {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_audio_int16(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Read `path` as mono int16 at `sample_rate`.

    Stereo is mixed down to mono; other sample rates are resampled (polyphase, warned once per rate).
    Raises AudioReadError (never a library-specific exception) for missing, empty or corrupt files.
    """
    try:
        # float32, not int16: libsndfile reads float WAVs as int16 without scaling (all zeros).
        # For PCM16 the float32 values are exactly s / 32768, so the round trip below is lossless.
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        raise AudioReadError(path, str(error).strip() or type(error).__name__) from None
    if data.shape[0] == 0:
        raise AudioReadError(path, "the file holds no samples")
    mono = data.mean(axis=1, dtype=np.float64) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate:
        if file_rate not in _warned_rates:
            _warned_rates.add(file_rate)
            log.warning("resampling clips at %d Hz to %d Hz (first: %s)", file_rate, sample_rate, path)
        common = gcd(int(file_rate), int(sample_rate))
        mono = resample_poly(mono.astype(np.float64), sample_rate // common, file_rate // common)
    return np.clip(np.rint(mono * 32768.0), -32768, 32767).astype(np.int16)
