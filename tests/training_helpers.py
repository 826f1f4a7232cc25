"""Helpers shared by the in-process training tests: compose the train config, repeat a fixed batch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import Dataset

from kws_lightning.data.datamodule import SpeechCommandsDataModule

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides: str) -> DictConfig:
    """conf/train.yaml with `overrides`, as `python -m kws_lightning.train` would compose it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


class RepeatBatch(Dataset):
    """The same (waves, targets) batch `length` times; a DataLoader with batch_size=None yields it as is."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def yes_no_datamodule(root: Path, tmp_path: Path, cache_on_device: str = "false") -> SpeechCommandsDataModule:
    """A small `yes` / `no` data module over `root` (audio_trees.make_training_tree), cached under `tmp_path`,
    with a fixed seed: what the data-path tests (resume, device cache) train on."""
    return SpeechCommandsDataModule(
        root=str(root),
        keywords=["yes", "no"],
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
        seed=5,
        cache_on_device=cache_on_device,
    )


def make_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing under `tmp_path`; `kwargs` override the defaults."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def check_ok(result: subprocess.CompletedProcess) -> str:
    """A CLI run's stdout (its last lines name the run dir and best checkpoint); on failure, the exit
    code and both streams' tails in the message."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )
    return result.stdout


class WriteToFullDisk(pl.Callback):
    """Test-only (``+callbacks.full._target_=training_helpers.WriteToFullDisk``, tests/ on PYTHONPATH): after
    the first training step, write the weights as a checkpoint would, onto /dev/full, which fails with
    ENOSPC as a full disk does (torch reports it from inside its own error)."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        with open("/dev/full", "wb") as handle:
            torch.save(trainer.lightning_module.state_dict(), handle)
            handle.flush()
