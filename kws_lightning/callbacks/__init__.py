"""Training callbacks: the seed-style console table, last.ckpt, TensorBoard's confusion matrix and feature
images, the NaN/inf loss check, the EMA of the weights."""

from kws_lightning.callbacks.console_table import ConsoleTable
from kws_lightning.callbacks.ema import EMA
from kws_lightning.callbacks.finite_loss import FiniteLossCheck, NonFiniteLossError
from kws_lightning.callbacks.last_checkpoint import LastCheckpoint
from kws_lightning.callbacks.tensorboard_extras import TensorBoardExtras, log_hparams_with_metrics

__all__ = [
    "EMA",
    "ConsoleTable",
    "FiniteLossCheck",
    "LastCheckpoint",
    "NonFiniteLossError",
    "TensorBoardExtras",
    "log_hparams_with_metrics",
]
