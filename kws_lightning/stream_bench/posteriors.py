"""Per-window posteriors of a whole stream through `listen`'s own window path (`StreamingDetector`), so
the benchmark scores exactly what `listen` computes; computed once, then every detector setting and
threshold of a sweep is decided from them (`scoring.smooth` / `scoring.decide`). They are saved beside
the stream with a fingerprint of the model, so scoring the same model on the same streams again (other
detector settings, e.g. after tuning) skips the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kws_lightning.listen import FILE_CHUNK_SECONDS, StreamingDetector


class PosteriorRecorder:
    """Takes a recognizer's place in `StreamingDetector`: keeps every window's (end time, posteriors)."""

    def __init__(self) -> None:
        self.times_ms: list[float] = []
        self.rows: list[np.ndarray] = []

    def process(self, time_ms: float, scores: np.ndarray) -> None:
        self.times_ms.append(time_ms)
        self.rows.append(np.asarray(scores, np.float32))


def stream_posteriors(
    predictor: Any, audio: np.ndarray, hop_ms: float = 100.0, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(window end times in ms (T,), posteriors (T, classes)) of int16 `audio`, as `listen` scores a file
    (fed in 30 s chunks, then the flush of half a clip of silence)."""
    recorder = PosteriorRecorder()
    detector = StreamingDetector(predictor, recorder, hop_ms, batch_size)
    step = int(FILE_CHUNK_SECONDS * detector.rate)
    for first in range(0, len(audio), step):
        detector.feed(audio[first : first + step])
    detector.flush()
    probs = np.stack(recorder.rows) if recorder.rows else np.zeros((0, len(predictor.labels)), np.float32)
    return np.asarray(recorder.times_ms, np.float64), probs


def model_fingerprint(predictor: Any, hop_ms: float) -> str:
    """A digest of what decides the posteriors: every model's weights, the labels and the hop."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((list(predictor.labels), float(hop_ms), predictor.clip_samples)).encode())
    for model in predictor.models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_path(folder: Path, wav: str) -> Path:
    return folder / f"{Path(wav).stem}.posteriors.npz"


def load_cached(path: Path, fingerprint: str, classes: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Posteriors saved beside a stream by an earlier run of the same model and hop, else None (a cache
    that does not match, or cannot be read, is ignored: it is only a shortcut)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint:
                return None
            times_ms, probs = stored["times_ms"].astype(np.float64), stored["probs"].astype(np.float32)
    except (OSError, ValueError, KeyError):
        return None
    if probs.ndim != 2 or probs.shape != (len(times_ms), classes) or not np.isfinite(probs).all():
        return None
    return times_ms, probs


def save_cached(path: Path, fingerprint: str, times_ms: np.ndarray, probs: np.ndarray) -> None:
    np.savez_compressed(path, fingerprint=np.array(fingerprint), times_ms=times_ms, probs=probs)
