"""Share of training wall time spent in the input path (sampler, gather, augmentation, transfer), for the
tc_resnet14 and bc_resnet recipes on the dev set.

    python benchmarks/train_data_share.py [--models tc_resnet14,bc_resnet] [--steps 24] [--threads 2]

Real steps: the recipe's DataModule (cached int16 waves -> TF-style sampler -> `ClipBatches` gather ->
`to_model_input`: pad / crop, shift, noise, silence) feeding training steps (front end, SpecAugment,
network, loss, backward, optimiser step; the front end counts as model compute). Pre-made steps: the
same batches, already prepared, through the same steps. share = 1 - premade / real, each the faster of
two rounds (other jobs on the machine only ever add time). Prints ``train_data_share_<model> value
fraction`` and the two step times.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from bench_common import BENCH_CACHE, DEV_DATA, figure, recipe_model, set_threads, training_step_fn
from hydra.utils import instantiate


def measure(name: str, root: str, steps: int, rounds: int) -> tuple[float, float]:
    model, cfg = recipe_model(name)
    cfg.data.root = root
    cfg.data.cache_dir = str(BENCH_CACHE / "waves")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    step = training_step_fn(cfg, model)

    def real_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = datamodule.train_dataloader()
        made = []
        for batch in itertools.islice(loader, steps):
            made.append((datamodule.to_model_input(batch, train=True), batch["targets"]))
        return made

    premade = real_batches()
    step(*premade[0])  # warm-up
    real_s, premade_s = float("inf"), float("inf")
    for epoch in range(rounds):
        datamodule.train_sampler.set_epoch(epoch + 1)
        started = time.perf_counter()
        loader = datamodule.train_dataloader()
        for batch in itertools.islice(loader, steps):
            step(datamodule.to_model_input(batch, train=True), batch["targets"])
        real_s = min(real_s, time.perf_counter() - started)
        started = time.perf_counter()
        for waves, targets in premade:
            step(waves, targets)
        premade_s = min(premade_s, time.perf_counter() - started)
    return real_s / steps, premade_s / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tc_resnet14,bc_resnet")
    parser.add_argument("--root", default=DEV_DATA)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not Path(args.root).is_dir():
        raise SystemExit(f"data root {args.root} not found: pass --root PATH (or set KWS_DEV_DATA)")
    threads = set_threads(args.threads)
    print(f"setup: {threads} torch threads, {args.steps} steps x {args.rounds} rounds, num_workers 0")
    for name in args.models.split(","):
        real, premade = measure(name, args.root, args.steps, args.rounds)
        figure(f"train_step_ms_real_{name}", 1000 * real, "ms")
        figure(f"train_step_ms_premade_{name}", 1000 * premade, "ms")
        figure(f"train_data_share_{name}", max(0.0, 1.0 - premade / real), "fraction")


if __name__ == "__main__":
    main()
