"""Decode one audio file to mono int16: the only place a WAV is read, and where bad audio is refused.

Every refusal is an `AudioReadError` whose reason says what is wrong in words a user can act on
(missing, broken link, permission denied, truncated, non-finite samples, not audio, a `.wav` holding
another format, a sample rate outside `MIN_SAMPLE_RATE`-`MAX_SAMPLE_RATE`); callers report
and skip the file, never train on or predict it silently. The file's bytes are read once, hashed
(blake2b, for the wave cache's integrity check) and decoded from memory.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from math import ceil
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

log = logging.getLogger(__name__)
_warned_rates: set[int] = set()
DIGEST_SIZE = 16  # bytes of blake2b per file: collisions are irrelevant at data-set scale
# Streaming writers put 0 or 0xFFFFFFFF in the data chunk's size: "unknown", not "truncated".
_UNKNOWN_DATA_SIZES = (0, 0xFFFFFFFF)
# The sample rates (Hz) a file header or a request may declare: every real recording's (8 kHz telephone
# to 384 kHz studio) with room to spare. Outside it a header is damaged or forged, and resampling from it
# would size the work by it (999,999,999 Hz: a 149 GiB filter for a 52-byte file).
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
# Polyphase resampling designs a filter of ~20 x max(up, down) taps: 1.4 s and 370 MB at 383,999 Hz.
# A ratio needing larger factors (none of the usual rates: 44.1 -> 16 kHz is 160/441) is replaced by
# the nearest one within this bound, at most 0.05 % off in rate.
MAX_RESAMPLE_FACTOR = 1000
# libsndfile's names of the containers a `.wav` file may hold (NIST: TIMIT's .wav files are SPHERE).
WAV_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "NIST")


class AudioReadError(RuntimeError):
    """A clip that cannot be decoded; carries the path so batch jobs can report and skip it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read audio file {path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded file: int16 mono samples, the blake2b digest of its bytes, and what was repaired."""

    samples: np.ndarray
    digest: bytes
    note: str | None = None  # e.g. "cropped ...": the clip was used, but not as stored


def file_digest(data: bytes) -> bytes:
    """blake2b of a file's bytes: what the wave cache records per source clip."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def read_file_bytes(path: str | Path) -> bytes:
    """The file's bytes, or an AudioReadError naming the cause (not libsndfile's bare "System error")."""
    if os.path.islink(path) and not os.path.exists(path):
        target = os.readlink(path)
        raise AudioReadError(path, f"broken link: it points to {target}, which does not exist")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise AudioReadError(path, _os_reason(error)) from None


def _os_reason(error: OSError) -> str:
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: this user cannot read it (fix its permissions, e.g. chmod a+r)"
    if error.errno == errno.ENOENT:
        return "no such file"
    if error.errno == errno.EISDIR:
        return "is a folder, not an audio file"
    return f"cannot read the file: {error.strerror or error}"


@dataclass(frozen=True)
class _WavLayout:
    """What a RIFF/WAVE header says: the fmt fields that matter here and where the data chunk is."""

    audio_format: int
    channels: int
    rate: int
    block_align: int
    bits: int
    data_offset: int
    declared: int  # bytes the data chunk's header declares
    present: int  # bytes actually there


def _wav_layout(data: bytes) -> _WavLayout | None:
    """The header of a plain RIFF/WAVE file, or None (another format, RF64, or a fmt-less file)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fmt, pos = None, 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"fmt " and pos + 24 <= len(data):
            fmt = struct.unpack_from("<HHIIHH", data, pos + 8)
        elif chunk == b"data":
            if fmt is None:
                return None
            present = len(data) - (pos + 8)
            audio_format, channels, rate, _, block_align, bits = fmt
            return _WavLayout(audio_format, channels, rate, block_align, bits, pos + 8, size, present)
        pos += 8 + size + (size & 1)
    return None


def wav_truncation(data: bytes) -> tuple[int, int] | None:
    """(frames the header declares, frames present) when a RIFF/WAVE file is cut short, else None.

    libsndfile silently shortens such a file to what is there; a clip cut from 16,000 samples to 500
    would be trained on as a word. Only plain RIFF/WAVE is checked (RF64 and others: None).
    """
    wav = _wav_layout(data)
    if wav is None or wav.declared in _UNKNOWN_DATA_SIZES or wav.declared <= wav.present:
        return None
    if wav.block_align == 0:
        return None
    return wav.declared // wav.block_align, wav.present // wav.block_align


def _pcm16_mono(data: bytes) -> tuple[np.ndarray, int] | None:
    """(float32 samples / 32768, rate) of a plain 16-bit PCM mono WAV - Speech Commands' format - read
    straight from the bytes (4x faster than libsndfile here, and the same numbers); None for anything
    else, which libsndfile decodes."""
    wav = _wav_layout(data)
    if wav is None or (wav.audio_format, wav.channels, wav.bits, wav.block_align) != (1, 1, 16, 2):
        return None
    count = min(wav.declared, wav.present) // 2
    samples = np.frombuffer(data, "<i2", count, wav.data_offset)
    return samples.astype(np.float32) / np.float32(32768.0), wav.rate


def sample_rate_problem(rate: int) -> str | None:
    """Why a declared sample rate (a file header's, a request's) is refused, or None when it is usable."""
    if MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        return None
    return f"sample rate {rate} Hz is outside the {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz this tool reads"


def resample(samples: np.ndarray, file_rate: int, sample_rate: int) -> np.ndarray:
    """`samples` (float, at `file_rate`, checked by `sample_rate_problem`) polyphase-resampled to
    `sample_rate`, with up / down factors of at most `MAX_RESAMPLE_FACTOR` (the cost stays bounded)."""
    ratio = Fraction(sample_rate, file_rate)
    if max(ratio.numerator, ratio.denominator) > MAX_RESAMPLE_FACTOR:
        # Approximate the factor below 1 (its denominator bounds both); invert back when upsampling.
        ratio = (
            ratio.limit_denominator(MAX_RESAMPLE_FACTOR)
            if ratio < 1
            else 1 / (1 / ratio).limit_denominator(MAX_RESAMPLE_FACTOR)
        )
    return resample_poly(samples.astype(np.float64), ratio.numerator, ratio.denominator)


def _libsndfile_decode(data: bytes, path: str | Path) -> tuple[np.ndarray, int]:
    """(float32 samples (frames, channels), rate) of any format libsndfile reads; a file named `.wav`
    must hold a WAV container (an MP3 renamed `.wav` would otherwise be used without a word)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as audio:
            if Path(str(path)).suffix.lower() == ".wav" and audio.format not in WAV_FORMATS:
                raise AudioReadError(
                    path,
                    f"named .wav but it holds {audio.format} audio ({audio.format_info}), not WAV: convert "
                    "it to WAV (e.g. ffmpeg -i IN -ar 16000 OUT.wav) or delete it",
                )
            # float32, not int16: libsndfile reads float WAVs as int16 without scaling (all zeros).
            # For PCM16 the float32 values are exactly s / 32768, so the round trip is lossless.
            return audio.read(dtype="float32", always_2d=True), audio.samplerate
    except AudioReadError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        # error_string: libsndfile's words without soundfile's "Error opening <BytesIO ...>" prefix.
        reason = getattr(error, "error_string", None) or str(error).strip() or type(error).__name__
        raise AudioReadError(path, f"not a readable audio file ({reason})") from None


def decode_audio(path: str | Path, sample_rate: int = 16000, max_samples: int | None = None) -> DecodedAudio:
    """Read `path` as mono int16 at `sample_rate`, refusing bad audio with an `AudioReadError`.

    Stereo is mixed down; other rates are resampled (polyphase, warned once per rate). Refused: missing,
    unreadable or empty files, broken links, truncated WAVs (header longer than the data), float WAVs
    holding NaN or Inf, rates outside `MIN_SAMPLE_RATE`-`MAX_SAMPLE_RATE` and `.wav` files of another
    format. A clip longer than `max_samples` is cropped to its centre (what evaluation
    scores) and the returned `note` says so.
    """
    return decode_audio_bytes(read_file_bytes(path), path, sample_rate, max_samples)


def decode_audio_bytes(
    data: bytes, path: str | Path, sample_rate: int = 16000, max_samples: int | None = None
) -> DecodedAudio:
    """`decode_audio` of bytes already in memory (an upload); `path` only names them in errors."""
    if not data:
        raise AudioReadError(path, "the file is empty (0 bytes)")
    digest = file_digest(data)
    truncated = wav_truncation(data)
    if truncated is not None:
        raise AudioReadError(
            path,
            f"truncated: its header declares {truncated[0]} samples, the file holds {truncated[1]} "
            "(cut short by a copy or download; re-export or delete it)",
        )
    pcm = _pcm16_mono(data)
    if pcm is not None:
        samples, file_rate = pcm[0][:, None], pcm[1]
    else:
        samples, file_rate = _libsndfile_decode(data, path)
    rate_problem = sample_rate_problem(file_rate)
    if rate_problem is not None:  # before anything is sized by the rate
        raise AudioReadError(
            path, f"{rate_problem} (a damaged or forged header; re-export it, e.g. at 16 kHz)"
        )
    if samples.shape[0] == 0:
        raise AudioReadError(path, "the file holds no samples")
    finite = np.isfinite(samples)
    if not finite.all():
        nan = int(np.isnan(samples).sum())
        raise AudioReadError(
            path,
            f"non-finite samples ({nan} NaN, {int((~finite).sum()) - nan} +-Inf): a broken float export; "
            "re-export it",
        )
    mono = samples.mean(axis=1, dtype=np.float64) if samples.shape[1] > 1 else samples[:, 0]
    note = None
    if max_samples is not None and len(mono) * sample_rate > max_samples * file_rate:
        # Crop before resampling (a little wide, trimmed after): a 10-minute file costs 3 s of work.
        keep = min(len(mono), ceil(max_samples * file_rate / sample_rate) + 2)
        start = (len(mono) - keep) // 2
        note = (
            f"cropped from {len(mono) / file_rate:.2f} s to its centre {max_samples / sample_rate:.2f} s "
            "(max_clip_s)"
        )
        mono = mono[start : start + keep]
    if file_rate != sample_rate:
        if file_rate not in _warned_rates:
            _warned_rates.add(file_rate)
            log.warning("resampling clips at %d Hz to %d Hz (first: %s)", file_rate, sample_rate, path)
        mono = resample(mono, int(file_rate), int(sample_rate))
    if max_samples is not None and len(mono) > max_samples:
        start = (len(mono) - max_samples) // 2
        mono = mono[start : start + max_samples]
    clip = np.clip(np.rint(mono * 32768.0), -32768, 32767).astype(np.int16)
    return DecodedAudio(clip, digest, note)


def read_audio_int16(
    path: str | Path, sample_rate: int = 16000, max_samples: int | None = None
) -> np.ndarray:
    """The samples of `decode_audio` (mono int16 at `sample_rate`); raises AudioReadError for bad audio."""
    return decode_audio(path, sample_rate, max_samples).samples
