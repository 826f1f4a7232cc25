"""Per-batch cost of each waveform augmentation option (kws_lightning/data/augment.py), against a training
step of the recipe it would be added to: what a lever costs before any accuracy is measured.

    python benchmarks/augment_cost.py [--recipe best] [--batch 0] [--steps 10] [--rounds 3] [--threads 1]

A batch of random int16 clips of 0.6-1 s (`--batch`, 0: the recipe's batch size) goes through
`prepare_batch` with the recipe's own augmentation, then with one option added at a time: speed
perturbation (p 1), room reverberation (p 0.5 and 1), the stream-training options of `best_stream`.
Vocal tract length perturbation (kws_lightning/vtlp.py) acts in the front end instead: the recipe's front
end is timed plain and with `vtlp=default`'s warp (frontend_ms_plain, frontend_ms_vtlp). The
recipe's training step (front end, SpecAugment, network, loss, backward, optimiser step; bench_common)
on the same batch is timed in the same rounds. Each figure is the median block of `--rounds` (a shared
machine slows every block alike). Prints augment_ms_<option> (milliseconds per batch) and
augment_step_share_<option> (that time over the training step's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_common import compose_recipe, figure, recipe_model, set_threads, training_step_fn
from omegaconf import OmegaConf

from kws_lightning.data.augment import AugmentConfig, NoiseBank, prepare_batch
from kws_lightning.features import takes_bank_warp
from kws_lightning.vtlp import VTLP

SAMPLE_RATE = 16000

# The options timed, each added to the recipe's own augmentation (dotted keys of conf/augment).
OPTIONS: dict[str, dict] = {
    "recipe": {},
    "speed": {"speed": {"p": 1.0}},
    "reverb_p05": {"reverb": {"p": 0.5}},
    "reverb_p1": {"reverb": {"p": 1.0}},
    "stream": {
        "noise": {"p": 0.8, "snr_db": [0.0, 30.0]},
        "silence": {"snr_db": [0.0, 30.0], "snr_p": 0.5},
        "stream": {"offset_p": 0.75, "min_speech_kept": 0.8},
    },
}


def merged(base: dict, extra: dict) -> AugmentConfig:
    return AugmentConfig.from_mapping(OmegaConf.to_container(OmegaConf.merge(base, extra), resolve=True))


def median_block_ms(run: Callable[[], object], steps: int, rounds: int) -> float:
    blocks = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            run()
        blocks.append(1000.0 * (time.perf_counter() - started) / steps)
    return statistics.median(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="best", help="bench_common.RECIPES key")
    parser.add_argument("--batch", type=int, default=0, help="clips per batch (0: the recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="batches per timed block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    torch.manual_seed(0)

    cfg = compose_recipe(args.recipe)
    batch = args.batch or int(cfg.data.batch_size)
    base = OmegaConf.to_container(cfg.augment, resolve=True)
    lengths = torch.randint(int(0.6 * SAMPLE_RATE), SAMPLE_RATE + 1, (batch,))
    waves = (torch.randn(batch, SAMPLE_RATE) * 3000).clamp(-32768, 32767).to(torch.int16)
    waves[torch.arange(SAMPLE_RATE)[None, :] >= lengths[:, None]] = 0  # rows zero past their length
    silence = torch.zeros(batch, dtype=torch.bool)
    silence[: max(1, batch // 10)] = True  # the sampler's 10 % silence
    bank = NoiseBank([(torch.randn(10 * SAMPLE_RATE) * 2000).to(torch.int16) for _ in range(3)])
    print(f"recipe {args.recipe}, batch {batch}, {threads} torch thread(s)")

    model, model_cfg = recipe_model(args.recipe)
    step = training_step_fn(model_cfg, model)
    targets = torch.randint(12, (batch,))
    x = prepare_batch(waves, lengths, silence, bank, merged(base, {}), train=True)
    step(x, targets)  # warm-up
    step_ms = median_block_ms(lambda: step(x, targets), args.steps, args.rounds)
    figure(f"augment_train_step_ms_{args.recipe}", step_ms, "ms")
    for name, extra in OPTIONS.items():
        options = merged(base, extra)
        prepare_batch(waves, lengths, silence, bank, options, train=True)  # warm-up
        ms = median_block_ms(
            lambda options=options: prepare_batch(waves, lengths, silence, bank, options, train=True),
            args.steps,
            args.rounds,
        )
        figure(f"augment_ms_{name}", ms, "ms")
        figure(f"augment_step_share_{name}", ms / step_ms, "x")
    frontend, vtlp = model.frontend, VTLP()  # conf/vtlp/default.yaml's settings
    if not takes_bank_warp(frontend):
        print(f"{type(frontend).__name__} has no mel filter bank: no VTLP figures")
        return
    with torch.no_grad():
        for name, warp in (("plain", None), ("vtlp", vtlp)):
            frontend(x, bank_warp=warp)  # warm-up
            ms = median_block_ms(lambda warp=warp: frontend(x, bank_warp=warp), args.steps, args.rounds)
            figure(f"frontend_ms_{name}", ms, "ms")


if __name__ == "__main__":
    main()
