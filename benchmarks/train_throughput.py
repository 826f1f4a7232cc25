"""Training cost of every registered network: samples per second of full training steps on the CPU.

    python benchmarks/train_throughput.py [--models a,b] [--seconds 2] [--threads 2]

Each network runs its recipe (bench_common.RECIPES: front end, batch size, SpecAugment, loss, optimiser)
on a batch of random 1 s waves: front end + network forward, backward, optimiser step. The input path is
left out (benchmarks/train_data_share.py measures its share). One warm-up step, then steps until
`--seconds` have passed (at least two). Prints ``train_samples_per_s_<model> value samples/s``.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import figure, recipe_model, set_threads, training_step_fn

from kws_lightning.models.registry import available_models


def samples_per_second(name: str, seconds: float) -> tuple[float, int]:
    model, cfg = recipe_model(name)
    batch = int(cfg.data.batch_size)
    generator = torch.Generator().manual_seed(0)
    waves = 0.1 * torch.randn(batch, 16000, generator=generator)
    targets = torch.randint(0, 12, (batch,), generator=generator)
    step = training_step_fn(cfg, model)
    step(waves, targets)  # warm-up: allocator, oneDNN kernels
    steps, started = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - started < seconds:
        step(waves, targets)
        steps += 1
    return steps * batch / (time.perf_counter() - started), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated; default: every registered model")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    import kws_lightning.models  # noqa: F401  (registers the networks)

    names = args.models.split(",") if args.models else available_models()
    print(f"setup: {threads} torch threads, {args.seconds} s per model")
    for name in names:
        rate, batch = samples_per_second(name, args.seconds)
        print(f"{name}: batch {batch}")
        figure(f"train_samples_per_s_{name}", rate, "samples/s")


if __name__ == "__main__":
    main()
