"""Stop a run whose training loss is NaN or infinite, with an error that says where and what to change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class FiniteLossCheck(Callback):
    """Raises `NonFiniteLossError` when the training loss is not finite (checked every `every_n_steps`).

    Once the loss is NaN the weights are too, and every later step is wasted; in a sweep the job is then
    recorded as failed with this message and the sweep goes on. Reading the loss on the host costs one
    device sync per check (Lightning's `detect_anomaly` checks every operation instead, many times slower);
    a NaN weight never recovers, so checking every few steps on a GPU still stops the run promptly.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.finite_loss.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss).all()):
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        raise NonFiniteLossError(
            f"training loss is {float(loss)} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"lr {lr:.3g}): the run diverged. Lower optimizer.lr, add a warm-up (scheduler=cosine), or clip "
            "gradients (trainer.gradient_clip_val=1.0)"
        )
