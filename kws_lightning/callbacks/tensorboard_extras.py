"""TensorBoard beyond scalars: the validation confusion matrix, one feature image per class, and the
hyper-parameters with the run's final metrics (the HParams view)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

CONFUSION_TAG = "val/confusion_matrix"
FEATURE_TAG_PREFIX = "features/"


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class TensorBoardExtras(Callback):
    """At the end of each validation: a confusion-matrix image (rows true, columns predicted).

    At the end of the first validation: the front end's output for one validation clip of each class
    (the features of fixed clips do not change, so once is enough). Needs the module's validation_step
    to return ``{"preds", "targets"}`` and the model to expose `frontend` (`KWSModel` does).
    """

    def __init__(self, confusion_matrix: bool = True, feature_images: bool = True) -> None:
        self.confusion_matrix = confusion_matrix
        self.feature_images = feature_images
        self._confusion: torch.Tensor | None = None
        self._examples: dict[int, torch.Tensor] = {}
        self._features_logged = False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._confusion = None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not isinstance(outputs, Mapping) or "preds" not in outputs:
            return
        preds, targets = outputs["preds"], outputs["targets"]
        num_classes = len(pl_module.hparams["labels"])
        if self.confusion_matrix:
            counts = torch.bincount(targets * num_classes + preds, minlength=num_classes**2)
            counts = counts.reshape(num_classes, num_classes)
            self._confusion = counts if self._confusion is None else self._confusion + counts
        if self.feature_images and not self._features_logged and len(self._examples) < num_classes:
            waves = batch[0]
            for index, label in enumerate(targets.tolist()):
                self._examples.setdefault(label, waves[index].detach())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loggers = tensorboard_loggers(trainer)
        labels = list(pl_module.hparams["labels"])
        if self._confusion is not None:
            image = confusion_matrix_image(self._confusion.cpu().numpy(), labels)
            for logger in loggers:
                logger.experiment.add_image(CONFUSION_TAG, image, trainer.global_step, dataformats="HWC")
        if self._examples and not self._features_logged:
            images = self._feature_images(pl_module)
            for logger in loggers:
                for label, image in images.items():
                    logger.experiment.add_image(
                        FEATURE_TAG_PREFIX + label, image, trainer.global_step, dataformats="HWC"
                    )
            self._features_logged = True
            self._examples = {}

    def _feature_images(self, pl_module: pl.LightningModule) -> dict[str, np.ndarray]:
        frontend = getattr(pl_module.model, "frontend", None)
        if frontend is None:
            return {}
        labels = list(pl_module.hparams["labels"])
        order = sorted(self._examples)
        with torch.no_grad():
            features = frontend(torch.stack([self._examples[i] for i in order]))  # (n, 1, T, F)
        return {labels[i]: feature_image(features[k, 0].float().cpu().numpy()) for k, i in enumerate(order)}


def feature_image(feature: np.ndarray, min_height: int = 120) -> np.ndarray:
    """(T, F) features -> RGB image (F, T, 3) in [0, 1]: time left to right, low bins at the bottom.

    Each bin is standardised over time: MFCC's first coefficient dwarfs the others, so one global scale
    would show a flat image. Rows are repeated up to `min_height` pixels so 40 bins stay readable.
    """
    from matplotlib import colormaps

    spread = feature.std(axis=0, keepdims=True)
    scaled = (feature - feature.mean(axis=0, keepdims=True)) / np.where(spread > 1e-8, spread, 1.0)
    unit = (np.clip(scaled, -3.0, 3.0) + 3.0) / 6.0
    rows = unit.T[::-1]
    rows = np.repeat(rows, max(1, -(-min_height // rows.shape[0])), axis=0)
    return colormaps["viridis"](rows)[..., :3].astype(np.float32)


def confusion_matrix_image(counts: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """A matplotlib rendering of `counts` (rows true, columns predicted) as an RGB uint8 array (H, W, 3).

    Cells are coloured by the row-normalised rate (recall) and annotated with the raw counts.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(labels)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * n + 1.5)
    figure = Figure(figsize=(size, size), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(n), labels, rotation=90)
    axes.set_yticks(range(n), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in range(n):
        for col in range(n):
            if counts[row, col]:
                colour = "white" if rates[row, col] > 0.5 else "black"
                axes.text(
                    col, row, str(int(counts[row, col])), ha="center", va="center", fontsize=7, color=colour
                )
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axes.set_title(f"validation accuracy {accuracy:.4f}")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@rank_zero_only
def log_hparams_with_metrics(
    trainer: pl.Trainer, params: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """Write the HParams view: `params` (nested, flattened with '/') against the final `metrics`."""
    for logger in tensorboard_loggers(trainer):
        logger.log_hyperparams(dict(params), metrics={name: float(value) for name, value in metrics.items()})
        logger.save()
