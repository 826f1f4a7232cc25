"""SIGINT / SIGTERM in training: finish the current step, save last.ckpt at it, raise `TrainingInterrupted`.

SIGTERM is what SLURM and most schedulers send on preemption or at the time limit (then SIGKILL after a grace
period, 30 s by default); SIGINT is Ctrl+C. Lightning's own handling loses work: its SIGTERM ends the run with
a `SystemExit` (exit code 0) and no checkpoint, and its KeyboardInterrupt lands anywhere, mid optimiser step
included. Here the signal only sets a flag; the stop happens at the next step boundary, where the state is
consistent and the saved checkpoint resumes exactly (mid-epoch too).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint

from kws_lightning.utils.signals import STOP_SIGNALS, TrainingInterrupted, install_handlers, restore_handlers

log = logging.getLogger(__name__)

HANDLED_SIGNALS = STOP_SIGNALS


class StopOnSignal(Checkpoint):
    """Turns SIGINT/SIGTERM into a clean stop at the next training step (or validation) end.

    The handlers are installed when training starts (after Lightning installs its own) and removed when it
    ends. A second Ctrl+C while waiting for the step to end stops at once, unsaved. Under DDP the
    processes agree on stopping at the same step (one tiny all-reduce a step), SIGTERM sent to the launching
    process is passed on to the processes it started, and every process takes part in writing the checkpoint.
    A signal during the sanity check, the closing validation or the test is acted on by the caller
    (`kws_lightning.train` records the run as interrupted).

    Submitit (conf/hydra/launcher/slurm.yaml) warns a job before its time limit or preemption with its own
    signal (`SUBMITIT_PREEMPT_SIGNAL`, USR2 by default) and at once requeues the job and exits. When such a
    handler is installed, that signal is deferred the same way: last.ckpt is saved at the step, then
    submitit's handler runs, so the requeued job resumes from it (`ckpt_path=auto`).
    """

    # A `Checkpoint` so Lightning runs its hooks after every other callback's (EMA's update of the step
    # included): the state it saves is the step's complete state. It monitors no metric.
    monitor = None

    def __init__(self) -> None:
        self.received: int | None = None
        self._trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}
        self._requeue_handler: Any = None  # submitit's, called once the checkpoint is saved

    # ---- handlers --------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:  # a second Ctrl+C: the user does not want to wait
                raise TrainingInterrupted(signum)
            return
        self.received = signum
        log.warning(
            "received %s: stopping after the current step and saving last.ckpt", signal.Signals(signum).name
        )
        # Ctrl+C reaches every process of the terminal's group; `kill PID` and schedulers may reach only ours.
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if signum == signal.SIGTERM and launcher is not None:
            launcher.kill(signum)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self.received = None
        requeue = _requeue_signal()
        self._requeue_handler = signal.getsignal(requeue) if requeue is not None else None
        if not callable(self._requeue_handler):  # no requeueing launcher: leave that signal alone
            self._requeue_handler = requeue = None
        self._previous = install_handlers(
            self._handle, (*HANDLED_SIGNALS, *([requeue] if requeue is not None else []))
        )

    def _restore_handlers(self) -> None:
        restore_handlers(self._previous)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    # ---- where training may stop -------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            # Any process signalled: all stop here, so the checkpoint write below stays collective.
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received if self.received is not None else signal.SIGTERM
        path = self.checkpoint_path(trainer)
        if path is not None:
            trainer.save_checkpoint(path)
        if signum == _requeue_signal() and self._requeue_handler is not None:
            handler, self._requeue_handler = self._requeue_handler, None
            self._restore_handlers()
            try:
                handler(signum, None)  # submitit: requeue this job, then sys.exit
            except SystemExit:
                pass
        raise TrainingInterrupted(signum, trainer.global_step, path)

    @staticmethod
    def checkpoint_path(trainer: pl.Trainer) -> str | None:
        """Where the LastCheckpoint callback keeps last.ckpt (None without one)."""
        from kws_lightning.callbacks.last_checkpoint import LastCheckpoint

        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LastCheckpoint) and callback.dirpath:
                return str(Path(callback.dirpath) / f"{callback.filename}{callback.FILE_EXTENSION}")
        return None


def _requeue_signal() -> int | None:
    """The signal submitit sends before a time limit or preemption (None where the platform lacks it)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
