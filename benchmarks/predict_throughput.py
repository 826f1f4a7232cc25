"""Kaggle-scale throughput of `Predictor.predict_files`, the path `kws_lightning.predict` runs.

Writes N synthetic 1 s PCM16 WAV files (noise plus a tone) to a temporary folder, then times the whole
path: DataLoader workers decoding a batch per task, centred pad / crop, the model on whole batches.
With `--breakdown`, also times decoding alone and the model alone, to show which one limits. Prints
``name value unit`` figure lines and the extrapolated time for Kaggle's 158,538 test clips.

    python benchmarks/predict_throughput.py [--ckpt CKPT | --model cnn_trad_pool2 --feature mfcc]
        [--clips 5000] [--batch 64] [--workers 2] [--threads 0] [--tta] [--breakdown]
    python benchmarks/predict_throughput.py --models cnn_trad_pool2,best --clips 20000   # make bench

`--models` takes recipe names (benchmarks/bench_common.RECIPES: the network, front end and settings its
recipe trains; `best` is conf/experiment/best.yaml) and times each over the same folder of `--clips`
WAV files, written once under logs/bench_cache/ and reused by later runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from bench_common import BENCH_CACHE, KAGGLE_TEST_CLIPS, figure, recipe_model, set_threads
from omegaconf import OmegaConf

from kws_lightning.inference import Predictor, TTAConfig, iterate_file_batches
from kws_lightning.labels import make_labels

CONF = Path(__file__).resolve().parents[1] / "conf"


def untrained_predictor(model: str, feature: str) -> Predictor:
    """A model from conf/model/<model>.yaml and conf/feature/<feature>.yaml: speed needs no training."""
    from kws_lightning.utils.instantiate import build_kws_model

    labels = make_labels()
    net = build_kws_model(
        OmegaConf.load(CONF / "feature" / f"{feature}.yaml"),
        OmegaConf.load(CONF / "model" / f"{model}.yaml"),
        len(labels),
    )
    return Predictor([net.eval()], labels, 16000, 16000)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--ckpt, or an untrained --model on --feature: the model choice every inference benchmark offers."""
    parser.add_argument("--ckpt", help="a checkpoint; default: an untrained --model on --feature")
    parser.add_argument("--model", default="cnn_trad_pool2")
    parser.add_argument("--feature", default="mfcc")


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """The Predictor `add_model_arguments` asked for, on the CPU."""
    if args.ckpt:
        return Predictor.from_checkpoints(args.ckpt, "cpu")
    return untrained_predictor(args.model, args.feature)


def write_clips(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    paths = []
    for k in range(count):
        wave = 0.05 * rng.standard_normal(16000) + 0.2 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
        path = folder / f"clip_{k:06d}.wav"
        sf.write(path, np.clip(wave, -1, 1), 16000, subtype="PCM_16")
        paths.append(str(path))
    return paths


def cached_clips(count: int) -> list[str]:
    """`count` WAV files under BENCH_CACHE, written on the first run only (a marker file says complete)."""
    folder = BENCH_CACHE / f"predict_wavs_{count}"
    done = folder / "COMPLETE"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_clips(folder, count)
        done.write_text("written by benchmarks/predict_throughput.py\n")
        print(f"wrote {count} clips to {folder} in {time.perf_counter() - started:.0f} s")
    return [str(folder / f"clip_{k:06d}.wav") for k in range(count)]


def time_models(args: argparse.Namespace) -> None:
    """predict_clips_per_s_<model> / kaggle_test_minutes_<model> for each of --models, same files."""
    paths = cached_clips(args.clips)
    for name in args.models.split(","):
        model, _ = recipe_model(name)
        predictor = Predictor([model.eval()], make_labels(), 16000, 16000)
        predictor.predict_files(paths[: args.batch], args.batch, 0)  # one-off allocations
        started = time.perf_counter()
        probs, errors = predictor.predict_files(paths, args.batch, args.workers)
        rate = len(paths) / (time.perf_counter() - started)
        if errors or np.isnan(probs).any():
            raise SystemExit(
                f"{name}: {len(errors)} files failed to decode, e.g. {next(iter(errors.items()))}"
            )
        figure(f"predict_clips_per_s_{name}", rate, "clips/s")
        figure(f"kaggle_test_minutes_{name}", KAGGLE_TEST_CLIPS / rate / 60.0, "min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--clips", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (5 views per clip)")
    parser.add_argument("--models", help="comma-separated recipe names (bench_common.RECIPES), e.g. best")
    parser.add_argument("--breakdown", action="store_true", help="also time decoding and the model alone")
    args = parser.parse_args()

    threads = set_threads(args.threads)
    print(f"setup: {args.clips} clips, batch {args.batch}, {args.workers} workers, {threads} threads")
    if args.models:
        time_models(args)
        return
    predictor = predictor_from_args(args)
    tta = TTAConfig() if args.tta else None
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_clips(Path(tmp), args.clips)
        warm = predictor.predict_files(paths[: args.batch], args.batch, 0, tta)  # one-off allocations
        assert not np.isnan(warm[0]).any()
        if args.breakdown:
            breakdown(predictor, paths, args, tta)
        started = time.perf_counter()
        probs, errors = predictor.predict_files(paths, args.batch, args.workers, tta)
        seconds = time.perf_counter() - started
    assert not errors and not np.isnan(probs).any()
    rate = args.clips / seconds
    figure("predict_clips_per_s", rate, "clips/s")
    figure("kaggle_test_minutes", KAGGLE_TEST_CLIPS / rate / 60, "min")


def breakdown(
    predictor: Predictor, paths: list[str], args: argparse.Namespace, tta: TTAConfig | None
) -> None:
    """Decoding alone and the model alone, to show which one limits."""
    started = time.perf_counter()
    for _ in iterate_file_batches(paths, 16000, args.batch, args.workers):
        pass
    decode = args.clips / (time.perf_counter() - started)

    waves = torch.from_numpy(np.random.default_rng(1).normal(0, 0.1, (args.batch, 16000)).astype(np.float32))
    lengths = torch.full((args.batch,), 16000)
    started = time.perf_counter()
    rounds = max(1, args.clips // args.batch // 4)
    for _ in range(rounds):
        predictor.posteriors_int16((waves * 32767).to(torch.int16), lengths, tta)
    model = rounds * args.batch / (time.perf_counter() - started)

    figure("decode_only_clips_per_s", decode, "clips/s")
    figure("model_only_clips_per_s", model, "clips/s")


if __name__ == "__main__":
    main()
