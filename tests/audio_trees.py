"""Build small Speech-Commands-layout folders of real WAV files for tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

DEV_DATA = Path(
    os.environ.get("KWS_DEV_DATA", Path(__file__).resolve().parents[2] / "shared/data/speech_commands_dev")
)


def tone(seconds: float = 1.0, freq: float = 440.0, rate: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path


def make_training_tree(
    root: Path,
    words: dict[str, int],
    speakers: int = 10,
    noise_seconds: float = 3.0,
    short_every: int = 0,
) -> Path:
    """`words` maps folder name → clips; clip k of a word is said by speaker k % speakers.

    Each word gets its own tone frequency, so a model or a check can tell classes apart.
    Every `short_every`-th clip is 0.6 s long (0 = none).
    """
    for w, (word, count) in enumerate(sorted(words.items())):
        for k in range(count):
            speaker = f"{(k % speakers) * 7919:08x}"
            seconds = 0.6 if short_every and k % short_every == 0 else 1.0
            write_wav(root / word / f"{speaker}_nohash_{k // speakers}.wav", tone(seconds, 200.0 + 90 * w))
    if noise_seconds:
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(int(noise_seconds * 16000)) * 0.1 * 32767).astype(np.int16)
        write_wav(root / "_background_noise_" / "white_noise.wav", noise)
    return root


def write_truncated_wav(path: Path, declared: int = 16000, present: int = 500) -> Path:
    """A PCM16 mono WAV whose hand-built header declares `declared` samples but holds only `present`:
    what a copy or download cut short leaves behind."""
    import struct

    data = tone(present / 16000).tobytes()[: 2 * present]
    header = b"RIFF" + struct.pack("<I", 36 + 2 * declared) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    header += b"data" + struct.pack("<I", 2 * declared)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + data)
    return path


def write_float_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """A 32-bit float WAV holding `samples` as given (NaN and Inf included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(samples, np.float32), rate, subtype="FLOAT")
    return path
