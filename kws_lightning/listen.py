"""`python -m kws_lightning.listen ckpt_path=CKPT input=long.wav|mic`: spot keywords in a stream.

A window of one clip (1 s) slides over the audio at `hop_ms`; the windows of each chunk of audio go
through the model as one batch. Posteriors are smoothed and turned into detections the way TensorFlow's
speech_commands ``RecognizeCommands`` does it (see `RecognizeCommands`). Only keywords are reported,
never silence or unknown.

The front end runs on every window from scratch rather than incrementally: the model was trained on
features of isolated 1 s clips (zero padding at both edges of each STFT), so recomputing them is what
keeps streaming scores equal to clip scores, and it is cheap next to the network (the real-time factor
is printed at the end of a file; benchmarks/export_latency.py and tests/test_listen.py measure it).
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from kws_lightning.labels import SILENCE, UNKNOWN

log = logging.getLogger(__name__)
MIC = "mic"
MIC_HINT = "pip install 'kws-lightning[mic]'"
FILE_CHUNK_SECONDS = 30.0  # bounds the memory of one batch of windows for long files


class MicrophoneError(RuntimeError):
    """input=mic cannot work here (sounddevice or PortAudio missing); the message says how to get it."""


@dataclass(frozen=True)
class Detection:
    time_s: float  # end of the latest window when the keyword was recognised (stream time, causal)
    keyword: str
    score: float  # the smoothed posterior


class RecognizeCommands:
    """Smooth per-window posteriors and decide when a new command was heard (TF's RecognizeCommands).

    For each window (its end time `time_ms`, its posteriors):
    1. keep the results of the last `average_window_ms` (times >= now - average_window_ms);
    2. with fewer than `minimum_count` results, or spanning less than a quarter of the window, decide
       nothing (the average is not yet reliable);
    3. else average them; the top class and its mean posterior are the current result;
    4. it is a new command when its score > `detection_threshold`, it differs from the previous
       command, and more than `suppression_ms` passed since that one.
    Silence and unknown take part as commands (a stretch of silence between two "yes" lets the second
    count as new), but only keywords are returned as detections.
    """

    def __init__(
        self,
        labels: Sequence[str],
        average_window_ms: float = 500.0,
        detection_threshold: float = 0.7,
        suppression_ms: float = 500.0,
        minimum_count: int = 3,
        ignore: Sequence[str] = (SILENCE, UNKNOWN),
        keyword_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        if average_window_ms <= 0 or minimum_count < 1:
            raise ValueError(
                f"need average_window_ms > 0 and minimum_count >= 1, got {average_window_ms}, {minimum_count}"
            )
        self.labels = list(labels)
        self.average_window_ms = average_window_ms
        self.detection_threshold = detection_threshold
        self.suppression_ms = suppression_ms
        self.minimum_count = minimum_count
        self.ignore = set(ignore)
        # Tuned per keyword (kws_lightning.stream_eval tune=true); other labels use detection_threshold.
        self.keyword_thresholds = dict(keyword_thresholds or {})
        self.results: deque[tuple[float, np.ndarray]] = deque()
        self.previous_label: str | None = None
        self.previous_time_ms = -np.inf

    def process(self, time_ms: float, scores: np.ndarray) -> Detection | None:
        """Add one window's posteriors; returns a Detection when a new keyword was recognised."""
        scores = np.asarray(scores, np.float64)
        if scores.shape != (len(self.labels),):
            raise ValueError(f"expected {len(self.labels)} posteriors, got shape {scores.shape}")
        if self.results and time_ms < self.results[-1][0]:
            raise ValueError(f"results must come in time order: {time_ms} ms after {self.results[-1][0]} ms")
        self.results.append((time_ms, scores))
        while self.results[0][0] < time_ms - self.average_window_ms:
            self.results.popleft()
        span = time_ms - self.results[0][0]
        if len(self.results) < self.minimum_count or span < self.average_window_ms / 4:
            return None
        average = np.mean([s for _, s in self.results], axis=0)
        top = int(average.argmax())
        label, score = self.labels[top], float(average[top])
        if (
            score > self.keyword_thresholds.get(label, self.detection_threshold)
            and label != self.previous_label
            and time_ms - self.previous_time_ms > self.suppression_ms
        ):
            self.previous_label, self.previous_time_ms = label, time_ms
            if label not in self.ignore:
                return Detection(round(time_ms / 1000.0, 4), label, round(score, 4))
        return None


class StreamingDetector:
    """Feed audio of any chunk size; every `hop_ms` a window of the last clip_samples is scored.

    The stream is taken to start in digital silence (the first windows are zero-padded on the left), so a
    word in the first second is heard too. Windows of one `feed` go through the model in batches, or, with
    `incremental` (true, or auto: when the model allows it; kws_lightning/streaming_state.py), one by one
    reusing the previous windows' frames and activations, with the same posteriors (fewer multiply-adds,
    but not faster in eager PyTorch on a CPU, hence off by default).
    """

    def __init__(
        self,
        predictor: Any,
        recognizer: RecognizeCommands,
        hop_ms: float = 100.0,
        batch_size: int = 64,
        incremental: str | bool = "false",
    ):
        self.predictor = predictor
        self.recognizer = recognizer
        self.clip = predictor.clip_samples
        self.rate = predictor.sample_rate
        self.hop = int(round(hop_ms * self.rate / 1000.0))
        if not 0 < self.hop <= self.clip:
            raise ValueError(f"hop_ms must be in (0, clip length], got {hop_ms} ({self.hop} samples)")
        self.batch_size = batch_size
        self.tail = np.zeros(self.clip, np.float32)  # the stream's last clip_samples samples
        self.total = 0  # samples consumed
        self.next_end = self.hop  # stream position (samples) where the next window ends
        self.windows = 0
        from kws_lightning.streaming_state import build_incremental

        self.incremental = build_incremental(predictor, self.hop, incremental)

    def feed(self, chunk: np.ndarray) -> list[Detection]:
        """Consume float samples in [-1, 1] (or int16); returns the detections they completed."""
        import torch

        chunk = np.asarray(chunk)
        if chunk.dtype == np.int16:
            chunk = chunk.astype(np.float32) / 32768.0
        buffer = np.concatenate([self.tail, chunk.astype(np.float32, copy=False)])
        end = self.total + len(chunk)
        count = (end - self.next_end) // self.hop + 1 if self.next_end <= end else 0
        detections = []
        if count > 0:
            # buffer[0] is stream sample total - clip, so the window ending at e starts at e - total.
            first = self.next_end - self.total
            windows = torch.from_numpy(buffer[first:]).unfold(0, self.clip, self.hop)[:count]
            ends = self.next_end + self.hop * np.arange(count)
            for start in range(0, count, self.batch_size):
                if self.incremental is not None:  # stream sample of window i's start: ends[i] - clip
                    batch = zip(windows[start : start + self.batch_size], ends[start:], strict=False)
                    probs = np.concatenate(
                        [self.incremental.posteriors(w, int(e) - self.clip).numpy() for w, e in batch]
                    )
                else:
                    probs = self.predictor.posteriors(windows[start : start + self.batch_size]).cpu().numpy()
                for window_end, row in zip(ends[start : start + self.batch_size], probs, strict=True):
                    found = self.recognizer.process(1000.0 * window_end / self.rate, row)
                    if found is not None:
                        detections.append(found)
            self.next_end += self.hop * count
            self.windows += count
        self.tail = buffer[-self.clip :]
        self.total = end
        return detections

    def flush(self) -> list[Detection]:
        """End of a file: half a clip of silence, so a word in the last moments still reaches mid-window."""
        return self.feed(np.zeros(self.clip // 2, np.float32))


def listen_file(detector: StreamingDetector, path: str, echo: bool = True) -> tuple[list[Detection], float]:
    """All detections in an audio file (resampled to the model's rate) and the real-time factor."""
    from kws_lightning.data.audio_io import read_audio_int16

    samples = read_audio_int16(path, detector.rate)
    started = time.perf_counter()
    step = int(FILE_CHUNK_SECONDS * detector.rate)
    detections = []
    for first in range(0, len(samples), step):
        found = detector.feed(samples[first : first + step])
        detections += found
        if echo:
            print_detections(found)
    found = detector.flush()
    detections += found
    if echo:
        print_detections(found)
    seconds = time.perf_counter() - started
    return detections, seconds / (len(samples) / detector.rate)


def import_sounddevice() -> Any:
    """sounddevice, or an error that says how to get it (it is an optional extra, and needs PortAudio)."""
    try:
        import sounddevice
    except ImportError:
        raise MicrophoneError(f"input=mic needs the sounddevice package: {MIC_HINT}") from None
    except OSError as error:  # sounddevice is installed but the PortAudio library is not
        raise MicrophoneError(
            f"input=mic: sounddevice cannot load PortAudio ({error}); install it, e.g. "
            "apt-get install libportaudio2, or brew install portaudio"
        ) from None
    return sounddevice


def listen_microphone(detector: StreamingDetector, duration_s: float | None = None) -> list[Detection]:
    """Detections from the default input device until Ctrl-C (or `duration_s`); printed as they come."""
    sounddevice = import_sounddevice()
    blocks: queue.Queue[np.ndarray] = queue.Queue()

    def on_audio(indata: np.ndarray, frames: int, when: Any, status: Any) -> None:
        if status:
            log.warning("audio input: %s", status)
        blocks.put(indata[:, 0].copy())

    detections: list[Detection] = []
    stream = sounddevice.InputStream(
        samplerate=detector.rate, channels=1, dtype="float32", blocksize=detector.hop, callback=on_audio
    )
    print(f"listening on the default microphone at {detector.rate} Hz; Ctrl-C to stop", file=sys.stderr)
    started = time.monotonic()
    try:
        with stream:
            while duration_s is None or time.monotonic() - started < duration_s:
                try:
                    chunk = [blocks.get(timeout=1.0)]
                except queue.Empty:
                    continue
                while not blocks.empty():  # fell behind: score everything waiting as one batch
                    chunk.append(blocks.get_nowait())
                found = detector.feed(np.concatenate(chunk))
                print_detections(found)
                detections += found
    except KeyboardInterrupt:
        pass
    return detections


def print_detections(detections: Sequence[Detection]) -> None:
    for d in detections:
        print(f"{d.time_s:9.2f} s  {d.keyword:<10} {d.score:.3f}", flush=True)


def write_detections(detections: Sequence[Detection], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([d.__dict__ for d in detections], columns=["time_s", "keyword", "score"])
    frame.to_csv(path, index=False)


def listen(cfg: DictConfig) -> list[Detection]:
    import torch

    from kws_lightning.inference import Predictor
    from kws_lightning.stream_bench.settings import predictor_settings

    if not cfg.get("input"):
        raise ValueError("input is required: input=long.wav, or input=mic for the default microphone")
    if cfg.input == MIC:
        import_sounddevice()  # fail before loading the model
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    # ckpt_path=CKPT, or model_path= an exported model (.onnx float or int8, .pt): it runs whole windows.
    predictor = Predictor.from_config(
        cfg.get("ckpt_path"), cfg.get("model_path"), cfg.device, trust_code=bool(cfg.get("trust_code", False))
    )
    # Settings given on the command line, else those tuned into the checkpoint (or export), else TF's.
    settings, source = predictor_settings(cfg, predictor)
    log.info("detector settings (%s): %s", source, settings.to_dict())
    recognizer = settings.recognizer(predictor.labels)
    detector = StreamingDetector(
        predictor, recognizer, cfg.hop_ms, cfg.batch_size, cfg.get("incremental", "false")
    )
    if cfg.input == MIC:
        detections = listen_microphone(detector, cfg.get("duration_s"))
    else:
        detections, rtf = listen_file(detector, cfg.input)
        audio_s = (detector.total - detector.clip // 2) / detector.rate
        print(
            f"{len(detections)} detection(s) in {audio_s:.1f} s of audio; {detector.windows} windows; "
            f"real-time factor {rtf:.4f} ({1 / rtf:.0f}x faster than real time, "
            f"{torch.get_num_threads()} thread(s))"
        )
    if cfg.get("out"):
        write_detections(detections, Path(cfg.out).expanduser())
        print(f"wrote {cfg.out}")
    return detections


@hydra.main(version_base="1.3", config_path="../conf", config_name="listen")
def main(cfg: DictConfig) -> None:
    from kws_lightning.utils.cli_errors import one_line_errors

    # An unreadable file (broken link, truncated, ...), a refused checkpoint: one line, exit status 2.
    with one_line_errors(code=2, extra=(MicrophoneError,)):
        listen(cfg)


if __name__ == "__main__":
    main()
