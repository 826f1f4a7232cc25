"""One table row per validation, as the seed printed it: rate, iter, epoch, valid/train loss and acc, time."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

COLUMNS = ("rate", "iter", "epoch", "valid loss", "valid acc", "train loss", "train acc", "elapsed")
WIDTHS = (9, 8, 6, 11, 10, 11, 10, 10)


def format_row(values: tuple[str, ...]) -> str:
    return " ".join(value.rjust(width) for value, width in zip(values, WIDTHS, strict=True))


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ConsoleTable(Callback):
    """Prints a header once, then a row at the end of every validation (not the sanity check).

    Train loss/acc are the means over the batches since the previous row, so each row describes the
    interval it closes. Rows go through the progress bar's `print` (which writes above the bar) when a
    bar is shown, plain `print` otherwise.
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._header_done = False
        self._reset_interval()

    def _reset_interval(self) -> None:
        # Device tensors, read once per row: no host sync on every batch.
        self._loss_sum: torch.Tensor | float = 0.0
        self._correct: torch.Tensor | float = 0.0
        self._count = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._reset_interval()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or "preds" not in outputs:
            return
        n = len(outputs["targets"])
        self._loss_sum = self._loss_sum + outputs["loss"].detach() * n
        self._correct = self._correct + (outputs["preds"] == outputs["targets"]).sum()
        self._count += n

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        if self._count:
            train_loss = f"{float(self._loss_sum) / self._count:.4f}"
            train_acc = f"{float(self._correct) / self._count:.4f}"
        else:
            train_loss = train_acc = "-"
        row = (
            f"{lr:.2e}",
            str(trainer.global_step),
            str(trainer.current_epoch),
            _metric(metrics, "val/loss"),
            _metric(metrics, "val/acc"),
            train_loss,
            train_acc,
            format_elapsed(time.monotonic() - self._start),
        )
        if not self._header_done:
            self._write(trainer, format_row(COLUMNS))
            self._header_done = True
        self._write(trainer, format_row(row))
        self._reset_interval()

    @staticmethod
    def _write(trainer: pl.Trainer, line: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None and bar.is_enabled:
            bar.print(line)
        else:
            print(line, flush=True)


def _metric(metrics: dict[str, Any], name: str) -> str:
    value = metrics.get(name)
    return "-" if value is None else f"{float(value):.4f}"
