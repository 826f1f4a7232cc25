"""Every fit ends with a validation of its final weights, so val/*, val/acc_best and the best checkpoint exist
even for a run shorter than one validation interval (a smoke test with trainer.max_steps=20)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from kws_lightning.utils.lightning_private import last_batch_of_epoch, validate_now


class FinalValidation(Callback):
    """Validates the final weights when the last training step was not a validation step.

    On the last step (``global_step == max_steps``, or the last batch of the last epoch) it sets
    ``trainer.should_stop``: Lightning's training loop then validates at that step like at any other
    validation step, before the epoch ends, so ModelCheckpoint, LastCheckpoint, EMA, the console table and the
    loggers all see it. Training stops there anyway, so stopping changes nothing else.

    One case the loop cannot validate (``check_val_every_n_epoch`` skips the last epoch) is validated from
    ``on_train_end`` instead, where the checkpoint callbacks (which then save after validation) still see it.
    Under DDP every process decides the same from the same counters, so the evaluation stays collective.
    """

    def __init__(self) -> None:
        self._validated_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        if trainer.fast_dev_run or not trainer.enable_validation:
            return
        loop = trainer.fit_loop
        max_steps_reached = 0 < loop.max_steps <= trainer.global_step
        last_epoch = loop.max_epochs is not None and 0 <= loop.max_epochs <= trainer.current_epoch + 1
        if max_steps_reached or (last_epoch and last_batch_of_epoch(trainer)):
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.fast_dev_run
            or not trainer.enable_validation
            or trainer.global_step == 0
            or self._validated_step == trainer.global_step
        ):
            return
        validate_now(trainer)
