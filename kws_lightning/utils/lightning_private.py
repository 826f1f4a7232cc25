"""Every use of PyTorch Lightning's private API, in this one module (DESIGN.md).

Exact resume (callbacks/exact_resume.py), the final validation (callbacks/final_validation.py) and the sweep's
"does Lightning re-run this command for DDP?" check (utils/sweep_job.py) need internals Lightning does not
promise to keep. pyproject.toml pins the Lightning minor they were tested with, and
tests/test_lightning_private.py asserts that every name listed in `PRIVATE_NAMES` exists on the installed
Lightning, so an upgrade that drops or renames one fails there, by name, instead of silently in a run.
"""

from __future__ import annotations

import importlib
from operator import attrgetter
from typing import Any

import pytorch_lightning as pl

# Where each private name is reached from: an attribute path on a Trainer ("" = the Trainer itself), or a
# module ("module:" prefix). Keep in step with the functions below.
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "fit_loop": (
        "_combined_loader",
        "_combined_loader_states_to_load",
        "_data_fetcher",
        "_load_combined_loader_states",
    ),
    "fit_loop.epoch_loop": ("_num_ready_batches_reached",),
    "": ("_logger_connector",),
    "_logger_connector": ("_first_loop_iter",),
    "module:pytorch_lightning.trainer.call": ("_call_lightning_module_hook",),
    "module:pytorch_lightning.strategies.launchers": ("_SubprocessScriptLauncher",),
}


def missing_private_names(trainer: pl.Trainer) -> list[str]:
    """The names of `PRIVATE_NAMES` the installed Lightning lacks, as ``owner.name`` ([] when all exist)."""
    missing = []
    for owner, names in PRIVATE_NAMES.items():
        if owner.startswith("module:"):
            target: Any = importlib.import_module(owner.removeprefix("module:"))
        else:
            target = attrgetter(owner)(trainer) if owner else trainer
        missing += [f"{owner or 'Trainer'}.{name}" for name in names if not hasattr(target, name)]
    return missing


def restore_loader_position(trainer: pl.Trainer) -> None:
    """On a resumed fit, put the training loader back at the checkpoint's mid-epoch position now, when a
    schedule built the loader before the checkpoint was loaded (Lightning would restore it only later)."""
    fit_loop = trainer.fit_loop
    if fit_loop.restarting and fit_loop._combined_loader_states_to_load and fit_loop._data_fetcher:
        fit_loop._load_combined_loader_states()
        iter(fit_loop._data_fetcher)  # the epoch's iterator again, now starting at the restored position


def train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The training DataLoaders the fit loop holds ([] before it built them)."""
    combined = trainer.fit_loop._combined_loader
    return list(combined.flattened) if combined is not None else []


def last_batch_of_epoch(trainer: pl.Trainer) -> bool:
    """Whether the training batch just run is the epoch's last."""
    return trainer.fit_loop.epoch_loop._num_ready_batches_reached()


def validate_now(trainer: pl.Trainer) -> None:
    """Run the validation loop from `on_train_end`, as the training loop does at a validation step
    (TrainingEpochLoop.on_advance_end), leaving the logger connector's state as it was."""
    from pytorch_lightning.trainer import call

    logger_connector = trainer._logger_connector
    first_loop_iter = logger_connector._first_loop_iter
    trainer.validating = True
    call._call_lightning_module_hook(trainer, "on_validation_model_zero_grad")
    trainer.fit_loop.epoch_loop.val_loop.run()
    trainer.training = True
    logger_connector._first_loop_iter = first_loop_iter


def reruns_command_for_processes(trainer: pl.Trainer) -> bool:
    """Whether Lightning would start this trainer's other processes by re-running the command line (DDP
    launched by Lightning itself; not under SLURM or torchrun, where the processes exist already)."""
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    launcher = trainer.strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
    )
