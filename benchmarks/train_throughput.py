"""Training cost of every registered network: samples per second of full training steps (CPU or GPU).

    python benchmarks/train_throughput.py [--models a,b] [--seconds 2] [--threads 2]
    python benchmarks/train_throughput.py --device cuda --precision 32-true,bf16-mixed,16-mixed

Each network runs its recipe (bench_common.RECIPES: front end, batch size, SpecAugment, loss, optimiser)
on a batch of random 1 s waves: front end + network forward, backward, optimiser step. The input path is
left out (benchmarks/train_data_share.py measures its share). One warm-up step (three on a GPU), then
steps until `--seconds` have passed (at least two); each step ends by reading the loss, which waits for
the GPU. Prints ``train_samples_per_s_<model> value samples/s`` (CPU, 32-true) and otherwise
``train_samples_per_s_<model>_<device>_<precision> value samples/s`` (precision as Lightning's
`trainer.precision`: 32-true, bf16-mixed, 16-mixed).
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import figure, recipe_model, set_threads, training_step_fn

from kws_lightning.models.registry import available_models


def samples_per_second(name: str, seconds: float, device: torch.device, precision: str) -> tuple[float, int]:
    model, cfg = recipe_model(name)
    model.to(device)
    batch = int(cfg.data.batch_size)
    generator = torch.Generator().manual_seed(0)
    waves = (0.1 * torch.randn(batch, 16000, generator=generator)).to(device)
    targets = torch.randint(0, 12, (batch,), generator=generator).to(device)
    step = training_step_fn(cfg, model, precision)
    for _ in range(3 if device.type == "cuda" else 1):
        step(waves, targets)  # warm-up: allocator, oneDNN / cuDNN kernel choice
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--precision", default="32-true", help="comma-separated: 32-true, bf16-mixed, 16-mixed (GPU)"
    )
    args = parser.parse_args()
    threads = set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    import kws_lightning.models  # noqa: F401  (registers the networks)

    names = args.models.split(",") if args.models else available_models()
    precisions = args.precision.split(",")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} torch threads"
    print(f"setup: {where}, {args.seconds} s per model and precision")
    for name in names:
        for precision in precisions:
            rate, batch = samples_per_second(name, args.seconds, device, precision)
            print(f"{name} {precision}: batch {batch}")
            plain = device.type == "cpu" and precision == "32-true"  # the figure make bench has always had
            suffix = "" if plain else f"_{device.type}_{precision.replace('-', '_')}"
            figure(f"train_samples_per_s_{name}{suffix}", rate, "samples/s")


if __name__ == "__main__":
    main()
