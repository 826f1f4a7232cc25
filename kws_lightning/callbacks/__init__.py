"""Training callbacks: the seed-style console table, last.ckpt, TensorBoard's confusion matrix and feature
images, the NaN/inf loss check, the EMA of the weights, the closing validation, the stop on SIGINT/SIGTERM
and the exact resume (random generators' states in checkpoints)."""

from kws_lightning.callbacks.console_table import ConsoleTable
from kws_lightning.callbacks.ema import EMA
from kws_lightning.callbacks.exact_resume import ExactResume
from kws_lightning.callbacks.final_validation import FinalValidation
from kws_lightning.callbacks.finite_loss import FiniteLossCheck, NonFiniteLossError
from kws_lightning.callbacks.last_checkpoint import LastCheckpoint
from kws_lightning.callbacks.stop_on_signal import StopOnSignal
from kws_lightning.callbacks.tensorboard_extras import TensorBoardExtras, log_hparams_with_metrics
from kws_lightning.utils.signals import TrainingInterrupted

__all__ = [
    "EMA",
    "ConsoleTable",
    "ExactResume",
    "FinalValidation",
    "FiniteLossCheck",
    "LastCheckpoint",
    "NonFiniteLossError",
    "StopOnSignal",
    "TensorBoardExtras",
    "TrainingInterrupted",
    "log_hparams_with_metrics",
]
