"""Per-step cost of knowledge distillation (kws_lightning/distill.py): a recipe's training step with and
without its teachers.

    python benchmarks/distill_overhead.py --teachers A.ckpt,B.ckpt [--recipe best] [--fold 0 --num-folds 5]
                                          [--steps 10] [--rounds 3] [--threads 1]

The student is the recipe's untrained model (bench_common.recipe_model) in `KWSLightningModule`, as train
builds it (SpecAugment, loss, mixup of the recipe), stepped by its own `training_step` + backward + the
recipe's optimiser on one batch of random 1 s waves of the recipe's batch size (content does not change the
cost; the input path is left out, benchmarks/train_data_share.py measures it). The teachers are loaded by
`load_teachers` (the fold guard included when --fold is given). Plain and distilled blocks of `--steps`
steps alternate `--rounds` times (a noisy shared machine then slows both alike); each figure is the median
block. Prints distill_step_ms_plain, distill_step_ms_teachers, distill_teacher_forward_ms and
distill_step_overhead (teachers / plain).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from types import SimpleNamespace

import torch
from bench_common import figure, recipe_model, set_threads


def build(recipe: str, teachers: object | None) -> tuple[object, object, int]:
    from hydra.utils import instantiate

    from kws_lightning.labels import make_labels
    from kws_lightning.module import KWSLightningModule

    model, cfg = recipe_model(recipe)
    module = KWSLightningModule(
        model=model,
        labels=make_labels(),
        loss=instantiate(cfg.loss) if cfg.get("loss") else None,
        spec_augment=instantiate(cfg.spec_augment) if cfg.get("spec_augment") else None,
        mixup=instantiate(cfg.mixup) if cfg.get("mixup") else None,
        teachers=teachers,
    ).train()
    optimizer = instantiate(cfg.optimizer)(params=module.parameters())
    return module, optimizer, int(cfg.data.batch_size)


def block_ms(
    module: object, optimizer: object, batch: tuple[torch.Tensor, torch.Tensor], steps: int
) -> float:
    started = time.perf_counter()
    for index in range(steps):
        loss = module.training_step(batch, index)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return 1000.0 * (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", required=True, help="comma-separated teacher checkpoints")
    parser.add_argument("--recipe", default="best", help="the student's recipe (bench_common.RECIPES key)")
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--fold", type=int, default=None, help="the student's data.fold (checks teachers)")
    parser.add_argument("--num-folds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="plain / distilled block pairs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    # The module logs without a Trainer here; Lightning warns about that once per call.
    warnings.filterwarnings("ignore", message=r".*self\.log\(\)")

    from kws_lightning.distill import load_teachers
    from kws_lightning.labels import make_labels

    student_data = SimpleNamespace(
        hparams={"fold": args.fold, "num_folds": args.num_folds},
        labels=make_labels(),
        sample_rate=16000,
        clip_samples=16000,
    )
    settings = {"teachers": args.teachers.split(","), "alpha": args.alpha, "temperature": args.temperature}
    teachers = load_teachers(settings, student_data)
    plain, plain_opt, batch_size = build(args.recipe, None)
    distilled, distilled_opt, _ = build(args.recipe, teachers)
    generator = torch.Generator().manual_seed(0)
    batch = (0.1 * torch.randn(batch_size, 16000, generator=generator), torch.randint(0, 12, (batch_size,)))
    for teacher_path, model in zip(teachers.paths, teachers.predictor.models, strict=True):
        params = sum(p.numel() for p in model.parameters())
        print(f"teacher: {teacher_path} ({params:,} parameters)")
    print(
        f"setup: student recipe {args.recipe}, batch {batch_size}, {threads} torch thread(s), "
        f"{args.rounds} x {args.steps} steps per mode"
    )

    block_ms(plain, plain_opt, batch, 1)  # warm-up: allocator, oneDNN kernels
    block_ms(distilled, distilled_opt, batch, 1)
    plain_ms, distilled_ms, teacher_ms = [], [], []
    for _ in range(args.rounds):
        plain_ms.append(block_ms(plain, plain_opt, batch, args.steps))
        distilled_ms.append(block_ms(distilled, distilled_opt, batch, args.steps))
        started = time.perf_counter()
        for _ in range(args.steps):
            teachers.posteriors(batch[0])
        teacher_ms.append(1000.0 * (time.perf_counter() - started) / args.steps)
    print(
        f"blocks (ms/step): plain {[round(v) for v in plain_ms]}, with teachers "
        f"{[round(v) for v in distilled_ms]}, teachers alone {[round(v) for v in teacher_ms]}"
    )
    figure("distill_step_ms_plain", statistics.median(plain_ms), "ms")
    figure("distill_step_ms_teachers", statistics.median(distilled_ms), "ms")
    figure("distill_teacher_forward_ms", statistics.median(teacher_ms), "ms")
    figure("distill_step_overhead", statistics.median(distilled_ms) / statistics.median(plain_ms), "x")


if __name__ == "__main__":
    main()
