"""Helpers for the service tests: a real `python -m kws_lightning.serve` on a free local port, and audio
the tiny test model is sure about."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.inference import Predictor
from kws_lightning.listen import Detection, RecognizeCommands, StreamingDetector, listen_file

# listen's smoothing; the detection threshold is set per recording (`threshold_for`): the tiny test
# model's posteriors rarely reach listen's default 0.7.
SMOOTHING = {"average_window_ms": 500, "suppression_ms": 500, "minimum_count": 3}


@contextlib.contextmanager
def running_server(
    ckpt: Path | None, work: Path, detector: dict, *overrides: str, timeout: float = 90
) -> Iterator[str]:
    """Start the service on port 0 (the OS picks a free one) with `detector` settings (those of
    conf/listen.yaml) and yield its base URL; stopped on exit."""
    work.mkdir(parents=True, exist_ok=True)
    out, err = work / "serve.out", work / "serve.err"
    command = [
        sys.executable,
        "-m",
        "kws_lightning.serve",
        *([f"ckpt_path={ckpt}"] if ckpt else []),  # None: `overrides` name model_path=
        "port=0",
        "threads=1",
        f"paths.log_dir={work / 'logs'}",
        f"hydra.run.dir={work / 'run'}",
        *[f"{key}={value}" for key, value in detector.items()],
        *overrides,
    ]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, cwd=work, stdout=stdout, stderr=stderr, env=dict(os.environ))
    try:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", out.read_text())
            if found and "startup complete" in err.read_text():
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"the server did not start (exit {process.poll()}):\n{err.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def confident_clips(ckpt: Path, data_root: Path, count: int) -> list[tuple[Path, str, float]]:
    """The `count` testing-list keyword clips the model scores highest for their own word:
    (path, keyword, posterior), one per keyword first, so the streams hold different words."""
    predictor = Predictor.from_checkpoints(ckpt, "cpu")
    testing = (data_root / "testing_list.txt").read_text().split()
    paths = [data_root / rel for rel in testing if rel.split("/")[0] in predictor.keywords]
    probs, _ = predictor.predict_files([str(p) for p in paths], batch_size=128)
    scored = []
    for path, row in zip(paths, probs, strict=True):
        word = path.parent.name
        scored.append((path, word, float(row[predictor.labels.index(word)])))
    scored.sort(key=lambda s: -s[2])
    chosen, words = [], set()
    for item in scored:  # best clip of each word first, then the next best overall
        if item[1] not in words:
            chosen.append(item)
            words.add(item[1])
    chosen += [s for s in scored if s not in chosen]
    return chosen[:count]


def write_stream(clips: list[Path], out: Path, gap_s: float = 1.5, noise: float = 0.003) -> Path:
    """Clips one after another with `gap_s` of faint noise before each and after the last."""
    rng = np.random.default_rng(0)
    parts = []
    for clip in clips:
        parts.append(rng.normal(0, noise, int(gap_s * 16000)))
        parts.append(read_audio_int16(clip).astype(np.float64) / 32768.0)
    parts.append(rng.normal(0, noise, int(gap_s * 16000)))
    sf.write(out, np.clip(np.concatenate(parts), -1, 1), 16000, subtype="PCM_16")
    return out


class PeakRecognizer(RecognizeCommands):
    """RecognizeCommands that records the highest averaged keyword score it decided on."""

    peak = 0.0

    def process(self, time_ms: float, scores: np.ndarray) -> Detection | None:
        found = super().process(time_ms, scores)
        span = self.results[-1][0] - self.results[0][0]
        if len(self.results) >= self.minimum_count and span >= self.average_window_ms / 4:
            average = np.mean([s for _, s in self.results], axis=0)
            if self.labels[int(average.argmax())] not in self.ignore:
                self.peak = max(self.peak, float(average.max()))
        return found


def detector_for(predictor: Predictor, wav: Path, fraction: float = 0.9) -> dict:
    """listen's smoothing with a detection threshold at `fraction` of the highest averaged keyword score
    in `wav`: the recording then has at least one detection, whatever the model learnt."""
    recognizer = PeakRecognizer(predictor.labels, detection_threshold=np.inf, **SMOOTHING)
    listen_file(StreamingDetector(predictor, recognizer), str(wav), echo=False)
    assert recognizer.peak > 0, f"the model never ranks a keyword first in {wav}"
    return {**SMOOTHING, "detection_threshold": round(fraction * recognizer.peak, 4)}
