"""Test-only Lightning callback: each process records what it trains and evaluates on.

Added to a `python -m kws_lightning.train` subprocess with ``+callbacks.probe._target_=ddp_probe.ShardProbe``
(tests/ on PYTHONPATH), so production code needs no debug switch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


def mapped_files() -> set[str]:
    """Files this process has memory-mapped (Linux /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return set()
    return {
        line.split(maxsplit=5)[5].strip() for line in maps.read_text().splitlines() if len(line.split()) == 6
    }


class ShardProbe(Callback):
    """At the start of epoch 0 writes `<out_dir>/rank<r>.json`: this rank's training shard (the sampler the
    DataLoader really uses), the whole epoch draw, its validation items, and how it holds the wave cache."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        datamodule = trainer.datamodule
        sampler = trainer.train_dataloader.sampler
        assert sampler.skip_next == 0  # a fresh run: iterating here changes nothing
        val_loader = trainer.val_dataloaders
        samples = datamodule.cache.samples
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "sampler": type(sampler).__name__,
            "shard": [int(item) for item in sampler],
            "epoch_draw": sampler.epoch_items(0).tolist(),
            "val_items": [int(item) for item in val_loader.sampler],
            "val_draw": datamodule.eval_items["validation"].tolist(),
            "cache_is_memmap": isinstance(samples, np.memmap),
            "cache_file": str(Path(samples.filename).resolve()) if isinstance(samples, np.memmap) else None,
            "mapped_files": sorted(mapped_files()),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
