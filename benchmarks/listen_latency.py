"""Streaming keyword spotting (`kws_lightning.listen`): real-time factor, and the latency from the end of
a spoken keyword to its detection.

    python benchmarks/listen_latency.py [--ckpt CKPT] [--threads 2] [--hop-ms 100] [--keywords 20]

listen_rtf: the `best` recipe's network (untrained: cost does not depend on the weights) in a
`StreamingDetector` fed 60 s of noise in hop-sized chunks, as a microphone delivers it: compute seconds
per second of audio. listen_rtf_file: the same audio fed at once (a file: windows scored in batches).

listen_latency_ms needs a model that recognises words: `--ckpt`, or else a TC-ResNet8 trained once on the
dev set for `--train-steps` steps (cached under logs/bench_cache/). Test-split keyword clips are spliced
into background noise, 2 s apart, and fed in hop-sized chunks; for each clip that is detected as its own
keyword, latency = detection time (end of the window that fired, stream time) - end of the word in the
clip (last 20 ms frame within 20 dB of the clip's loudest) + the wall time of the `feed` call that fired.
The median is printed, with the fraction of clips detected.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import (
    BENCH_CACHE,
    DEV_DATA,
    compose_recipe,
    figure,
    recipe_model,
    set_threads,
    training_step_fn,
)

from kws_lightning.data.audio_io import read_audio_int16
from kws_lightning.inference import Predictor
from kws_lightning.labels import make_labels
from kws_lightning.listen import RecognizeCommands, StreamingDetector
from kws_lightning.utils.instantiate import build_kws_model

RATE = 16000


def feed_live(detector: StreamingDetector, audio: np.ndarray, hop: int) -> list[tuple[object, float]]:
    """Feed `audio` hop by hop; every detection with the wall time of the call that produced it."""
    found = []
    for start in range(0, len(audio), hop):
        tic = time.perf_counter()
        detections = detector.feed(audio[start : start + hop])
        seconds = time.perf_counter() - tic
        found.extend((d, seconds) for d in detections)
    return found


def real_time_factors(threads: int, hop_ms: float) -> tuple[float, float]:
    model, _ = recipe_model("best")
    predictor = Predictor([model.eval()], make_labels(), RATE, RATE)
    stream = np.random.default_rng(1).normal(0, 0.05, 60 * RATE).astype(np.float32)
    hop = int(hop_ms * RATE / 1000)
    live = StreamingDetector(predictor, RecognizeCommands(predictor.labels), hop_ms, batch_size=64)
    feed_live(live, stream[:RATE], hop)  # warm-up
    started = time.perf_counter()
    feed_live(live, stream, hop)
    live_rtf = (time.perf_counter() - started) / 60.0
    whole = StreamingDetector(predictor, RecognizeCommands(predictor.labels), hop_ms, batch_size=64)
    whole.feed(stream[:RATE])
    started = time.perf_counter()
    whole.feed(stream)
    return live_rtf, (time.perf_counter() - started) / 60.0


def trained_once(root: str, steps: int) -> Predictor:
    """A TC-ResNet8 trained for `steps` steps on the dev set's training split (recipe SGD, lr 0.05),
    cached as a state_dict: the latency figure needs a model that fires, not a good one."""
    # Plain cross-entropy and fast batch-norm statistics: a short run must end confident enough to pass
    # RecognizeCommands' threshold (label smoothing and the recipe's bn_momentum 0.003 left it at ~0.3).
    overrides = ["optimizer.lr=0.05", "spec_augment=none", "loss=cross_entropy", "model.bn_momentum=0.1"]
    cfg = compose_recipe("tc_resnet8", overrides)
    model = build_kws_model(cfg.feature, cfg.model, 12)
    path = BENCH_CACHE / f"listen_tc_resnet8_ce_{steps}steps.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        from hydra.utils import instantiate

        cfg.data.root, cfg.data.cache_dir = root, str(BENCH_CACHE / "waves")
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup("fit")
        step = training_step_fn(cfg, model)
        started, done = time.perf_counter(), 0
        for epoch in itertools.count():
            datamodule.train_sampler.set_epoch(epoch)
            for batch in datamodule.train_dataloader():
                loss = step(datamodule.to_model_input(batch, train=True), batch["targets"])
                done += 1
                if done == steps:
                    break
            if done == steps:
                break
        print(f"trained the latency model once: {steps} steps, last loss {loss:.3f}")
        figure("listen_model_train_once_s", time.perf_counter() - started, "s")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    return Predictor([model.eval()], make_labels(), RATE, RATE)


def word_end(clip: np.ndarray) -> int:
    """Sample where the word ends: the end of the last 20 ms frame within 20 dB of the loudest frame."""
    frames = clip[: len(clip) // 320 * 320].astype(np.float64).reshape(-1, 320)
    rms = np.sqrt((frames**2).mean(axis=1)) + 1e-9
    return int((np.flatnonzero(rms >= rms.max() / 10.0).max() + 1) * 320)


def latency(predictor: Predictor, root: str, count: int, hop_ms: float) -> tuple[float, float]:
    from kws_lightning.data.index import index_training_layout

    dataset = index_training_layout(root, predictor.keywords)
    test = dataset.split("testing")
    test = test[test["label"].isin(predictor.keywords)].sample(frac=1.0, random_state=0).head(count)
    noise_files = list(dataset.noise_files)
    noise = read_audio_int16(noise_files[0], RATE).astype(np.float32) / 32768.0 if noise_files else None
    rng = np.random.default_rng(0)
    parts, truth, position = [], [], 0
    for path, label in zip(test["path"], test["label"], strict=True):
        clip = read_audio_int16(path, RATE)
        gap = 0.01 * rng.standard_normal(2 * RATE).astype(np.float32)
        if noise is not None:
            start = rng.integers(0, len(noise) - len(gap))
            gap = gap + 0.1 * noise[start : start + len(gap)]
        parts += [gap, clip.astype(np.float32) / 32768.0]
        position += len(gap)
        truth.append((label, position, position + word_end(clip)))
        position += len(clip)
    parts.append(np.zeros(2 * RATE, np.float32))
    audio = np.concatenate(parts)
    detector = StreamingDetector(predictor, RecognizeCommands(predictor.labels), hop_ms, batch_size=64)
    found = feed_live(detector, audio, int(hop_ms * RATE / 1000))
    delays = []
    for label, start, end in truth:
        for detection, seconds in found:
            at = detection.time_s * RATE
            if detection.keyword == label and start <= at <= end + 1.5 * RATE:
                delays.append(1000.0 * ((at - end) / RATE + seconds))
                break
    if not delays:
        raise SystemExit(
            f"none of {len(truth)} keywords was detected: pass --ckpt with a trained model, or more "
            "--train-steps"
        )
    return statistics.median(delays), len(delays) / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a trained checkpoint for the latency figure")
    parser.add_argument("--root", default=DEV_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hop-ms", type=float, default=100.0)
    parser.add_argument("--keywords", type=int, default=20, help="keyword clips in the latency stream")
    parser.add_argument("--train-steps", type=int, default=400)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"setup: {threads} torch threads, hop {args.hop_ms:.0f} ms")
    live_rtf, file_rtf = real_time_factors(threads, args.hop_ms)
    figure("listen_rtf", live_rtf, "x")
    figure("listen_rtf_file", file_rtf, "x")
    if not Path(args.root).is_dir():
        raise SystemExit(f"data root {args.root} not found: pass --root PATH (or set KWS_DEV_DATA)")
    if args.ckpt:
        predictor = Predictor.from_checkpoints(args.ckpt, "cpu")
    else:
        predictor = trained_once(args.root, args.train_steps)
    median_ms, detected = latency(predictor, args.root, args.keywords, args.hop_ms)
    figure("listen_latency_ms", median_ms, "ms")
    figure("listen_detected_fraction", detected, "fraction")


if __name__ == "__main__":
    main()
