"""Records what produced a run (kws_lightning/utils/provenance.py) in run_info.json and in every checkpoint.

Added by `kws_lightning.train` itself, not by a config group, so no `callbacks=` choice can drop it.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl

from kws_lightning.utils.provenance import CHECKPOINT_KEY, write_run_info


class RecordProvenance(pl.Callback):
    """`run_info` (collect_run_info) gets the data index hash when fitting starts (the data module is set up
    by then); rank 0 writes it to `run_dir`/run_info.json, and every checkpoint carries it with `config`."""

    def __init__(
        self, run_info: dict[str, Any], config: dict[str, Any], run_dir: str | os.PathLike | None
    ) -> None:
        self.run_info = run_info
        self.config = config
        self.run_dir = run_dir

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "dataset", None) is not None and hasattr(datamodule, "index_hash"):
            clips = datamodule.dataset.clips
            self.run_info["data"] = {
                "index_hash": datamodule.index_hash(),
                "clips": int(len(clips)),
                "usable_clips": int(clips["ok"].sum()) if "ok" in clips else None,
                "root": str(datamodule.dataset.root),
                "split_source": str(datamodule.dataset.split_source),
            }
        if trainer.is_global_zero and self.run_dir is not None:
            write_run_info(self.run_dir, self.run_info)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Plain containers only: checkpoints are opened with torch.load(weights_only=True).
        checkpoint[CHECKPOINT_KEY] = {**self.run_info, "config": self.config}
