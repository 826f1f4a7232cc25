"""One training job's bookkeeping around `train`: validate the config, run it (in a fresh process for a
multi-process sweep job), and leave `job_result.json` whatever happens (ok, failed, interrupted).

In a sweep a failure is recorded and NaN returned, so the sweep goes on and the summary lists it; a single
run raises (the command prints an expected error as one line, kws_lightning/utils/cli_errors.py; a full disk
is raised as `DiskFullError` naming the run dir). SIGINT/SIGTERM are recorded as interrupted (training saves
last.ckpt at the step it stopped) and end the run, and a sweep with it (its summary then lists the jobs never
started), with exit code 128 + the signal's number.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kws_lightning.config_check import validate_train_config
from kws_lightning.utils import sweep_job
from kws_lightning.utils.cli_errors import disk_full, expected_message
from kws_lightning.utils.job_result import (
    FAILED,
    FILENAME,
    INTERRUPTED,
    OK,
    JobResult,
    error_message,
    make_result,
    read_job_result,
    write_job_result,
)
from kws_lightning.utils.signals import TrainingInterrupted, raise_on_signals

log = logging.getLogger(__name__)
TrainFunction = Callable[[DictConfig], tuple[dict[str, float], dict[str, Any]]]


def run_job(cfg: DictConfig, train: TrainFunction, module_name: str) -> float | None:
    """Run `train(cfg)`, write job_result.json, return the optimised metric (None when there is none).

    `module_name` is the entry (`python -m <module_name>`) a multi-process sweep job is re-run with.
    """
    from hydra.core.hydra_config import HydraConfig

    start = time.monotonic()
    metric = cfg.get("optimized_metric")
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    output_dir = hydra_cfg.runtime.output_dir if hydra_cfg else None
    context = {
        "overrides": list(hydra_cfg.overrides.task) if hydra_cfg else [],
        "job_num": hydra_cfg.job.num if sweep_job.is_multirun() else None,
    }

    def record(result: JobResult) -> None:
        result.wall_time_s = time.monotonic() - start
        if output_dir and _is_rank_zero():
            try:
                write_job_result(output_dir, result)
            except OSError as error:  # a full disk must not hide the error being recorded
                log.error("could not write %s in %s: %s", FILENAME, output_dir, error)

    try:
        # Before torch is imported or a file read: a wrong type, range or pair of keys fails in a second.
        validate_train_config(cfg)
        with raise_on_signals():
            if sweep_job.is_multirun() and sweep_job.launches_own_processes(cfg.trainer):
                return _run_in_fresh_process(module_name, output_dir, metric, start, context)
            metrics, objects = train(cfg)
        value = optimized_value(metrics, metric, required=sweep_job.sweeper_needs_value())
        result = make_result(
            OK,
            metric,
            metrics,
            best_step=checkpoint_step(objects["best_ckpt"]),
            params=trainable_parameters(objects["module"].model),
            world_size=objects["trainer"].world_size,
            best_checkpoint=objects["best_ckpt"] or None,
            **context,
        )
    except (TrainingInterrupted, KeyboardInterrupt, SystemExit) as stop:
        checkpoint = getattr(stop, "checkpoint", None)
        record(
            make_result(INTERRUPTED, metric, error=error_message(stop), last_checkpoint=checkpoint, **context)
        )
        log.error("%s", stop if str(stop) else f"interrupted ({type(stop).__name__})")
        if hydra_cfg is not None and sweep_job.is_multirun() and _is_rank_zero():
            _summarize_stopped_sweep(hydra_cfg)
        if isinstance(stop, TrainingInterrupted):
            raise SystemExit(stop.exit_code) from None
        raise
    except Exception as error:
        # ENOSPC (torch raises it from inside its own errors) is named as a full disk with the folder.
        full = disk_full(error, output_dir)
        record(make_result(FAILED, metric, error=error_message(full or error), **context))
        if not sweep_job.is_multirun():
            if full is not None:
                raise full from error
            raise
        message = expected_message(error, folder=output_dir)
        if message is None:  # a bug: its traceback goes to the sweep's log
            log.exception(
                "job %s failed; the sweep goes on (recorded in job_result.json)", context["job_num"]
            )
        else:
            log.error("job %s failed; the sweep goes on: %s", context["job_num"], message)
        return float("nan") if metric else None
    record(result)
    return value


def _summarize_stopped_sweep(hydra_cfg: Any) -> None:
    """With Hydra's basic launcher (jobs one after another in this process) the sweep ends with this job and
    its end-of-sweep callback never runs: write the summary here (jobs never started listed as such). Other
    launchers (SLURM) run the other jobs elsewhere, and go on."""
    from kws_lightning.sweep_summary import summarize_sweep

    if not str(hydra_cfg.launcher.get("_target_", "")).endswith(".BasicLauncher"):
        return
    try:
        summarize_sweep(hydra_cfg)
    except Exception as error:  # the stop goes on whatever happens to the summary
        log.error("could not write the sweep summary: %s", error)


def _is_rank_zero() -> bool:
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def optimized_value(metrics: dict[str, float], name: str | None, required: bool = False) -> float | None:
    """The value a sweeper optimises (None when not logged). `required` (a sweeper that needs the value, such
    as Optuna): a name the run never logged is an error naming the fix and what was logged."""
    if not name:
        return None
    if name not in metrics:
        if required:
            raise KeyError(
                f"optimized_metric={name!r} was not logged, and the sweeper needs it: set optimized_metric "
                f"to one of {sorted(metrics)}, or make the run validate (trainer.limit_val_batches > 0 and a "
                "validation split: data.validation_percentage > 0 or a validation list)"
            )
        log.warning("optimized_metric=%r was not logged (logged: %s)", name, sorted(metrics))
        return None
    return metrics[name]


def checkpoint_step(path: str) -> int | None:
    """The global step a checkpoint was saved at (None without a checkpoint)."""
    if not path:
        return None
    from kws_lightning.checkpoints import load_checkpoint

    # mmap: only the small metadata is read, not the weights.
    return int(load_checkpoint(path, mmap=True)["global_step"])


def trainable_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _run_in_fresh_process(
    module_name: str, output_dir: str, metric: str | None, start: float, context: dict[str, Any]
) -> float | None:
    """Run the job as a single run in a new process; its job_result.json becomes this sweep job's."""
    result_path = Path(output_dir) / FILENAME
    result_path.unlink(missing_ok=True)
    code = sweep_job.run_in_fresh_process(module_name, output_dir)
    if result_path.is_file():
        result = read_job_result(result_path)
        result.job_num = context["job_num"]
    else:
        result = make_result(FAILED, metric, error=f"the job's process exited with code {code}", **context)
    if code != 0 and result.status == OK:
        result.status, result.error = FAILED, f"the job's process exited with code {code}"
    result.wall_time_s = time.monotonic() - start
    write_job_result(output_dir, result)
    if result.status == INTERRUPTED:
        # The job stopped on SIGINT/SIGTERM: the sweep stops too (the signal was meant for all of it).
        signum = code - 128 if 128 < code < 128 + 65 else signal.SIGTERM
        raise TrainingInterrupted(signum, checkpoint=result.last_checkpoint)
    if result.status != OK:
        log.error("job %s failed; the sweep goes on: %s", context["job_num"], result.error)
        return float("nan") if metric else None
    return result.value
