"""Training callbacks: the seed-style console table, last.ckpt, TensorBoard's confusion matrix and feature
images, the NaN/inf loss check."""

from kws_lightning.callbacks.console_table import ConsoleTable
from kws_lightning.callbacks.finite_loss import FiniteLossCheck, NonFiniteLossError
from kws_lightning.callbacks.last_checkpoint import LastCheckpoint
from kws_lightning.callbacks.tensorboard_extras import TensorBoardExtras, log_hparams_with_metrics

__all__ = [
    "ConsoleTable",
    "FiniteLossCheck",
    "LastCheckpoint",
    "NonFiniteLossError",
    "TensorBoardExtras",
    "log_hparams_with_metrics",
]
