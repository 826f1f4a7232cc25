"""`last.ckpt`: the run's latest state, for `ckpt_path=.../last.ckpt` to resume from."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Writes `<dirpath>/last.ckpt` at every checkpoint opportunity (validation end, or train epoch end
    when validation is per epoch) and once more when training ends between two validations.

    `ModelCheckpoint(monitor=..., save_last=True)` refreshes last.ckpt only when a new best is saved, so
    after a plateau it lags behind; this one does not depend on any metric. Without a monitor,
    `best_model_path` is the file written last, i.e. last.ckpt once anything was saved.
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        super().__init__(
            dirpath=dirpath, filename=filename, monitor=None, save_top_k=1, enable_version_counter=False
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # max_steps off the validation grid stops training after the last checkpoint: keep that tail.
        if not trainer.fast_dev_run and trainer.global_step != self._last_global_step_saved:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
