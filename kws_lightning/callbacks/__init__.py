"""Training callbacks: the seed-style console table, last.ckpt, TensorBoard's confusion matrix and feature
images."""

from kws_lightning.callbacks.console_table import ConsoleTable
from kws_lightning.callbacks.last_checkpoint import LastCheckpoint
from kws_lightning.callbacks.tensorboard_extras import TensorBoardExtras, log_hparams_with_metrics

__all__ = ["ConsoleTable", "LastCheckpoint", "TensorBoardExtras", "log_hparams_with_metrics"]
