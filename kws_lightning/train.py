"""`python -m kws_lightning.train [overrides]`: compose conf/train.yaml, train, test the best checkpoint.

Examples::

    python -m kws_lightning.train experiment=quickstart
    python -m kws_lightning.train experiment=seed_baseline data.root=/path/to/speech_commands
    python -m kws_lightning.train ckpt_path=logs/train/runs/<stamp>/checkpoints/last.ckpt   # resume
    python -m kws_lightning.train -m feature=mfcc,logmel optimizer.lr=0.01,0.003          # grid sweep
    python -m kws_lightning.train hparams_search=cnn_trad_pool2_optuna                   # Optuna search
    python -m kws_lightning.train trainer=ddp trainer.devices=4                          # 4 GPUs

Every run writes `job_result.json` (metric, best step, wall time, parameters, status) into its folder; a
sweep ranks its jobs in `<sweep dir>/sweep_summary.{csv,md}` (kws_lightning.sweep_summary). A sweep job
that fails is recorded as failed and the sweep goes on; a single run raises.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from kws_lightning.utils.sweep_job import register_resolvers

# Before @hydra.main composes anything: conf/logger/tensorboard.yaml uses ${kws.sweep_job_name:}.
register_resolvers()
log = logging.getLogger(__name__)

# The keys of the config that describe the experiment (the HParams view and the checkpoint record them).
HPARAM_GROUPS = (
    "data",
    "feature",
    "augment",
    "spec_augment",
    "mixup",
    "loss",
    "model",
    "optimizer",
    "scheduler",
    "trainer",
)
# Printed at the end and written to the HParams view (as hp/<name>).
FINAL_METRICS = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss")
# Which weights `test: true` scores: the best checkpoint by val/acc, or the final ones (last.ckpt).
TEST_WEIGHTS = ("best", "last")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then test the checkpoint `test_weights` names. Returns (metrics, objects) for callers and
    sweepers."""
    # Heavy imports here, not at module level: a config error is then reported in a fraction of a second.
    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from kws_lightning.callbacks import log_hparams_with_metrics
    from kws_lightning.module import KWSLightningModule
    from kws_lightning.utils.instantiate import build_kws_model, instantiate_named, to_plain

    # The module logs torchmetrics results at epoch end, whose compute() has already summed the metric states
    # over all DDP processes: Lightning's advice to add sync_dist (a second, averaging reduction) is moot.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/")

    test_weights = cfg.get("test_weights", "best")
    if test_weights not in TEST_WEIGHTS:
        raise ValueError(f"test_weights must be one of {TEST_WEIGHTS}, got {test_weights!r}")
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    model = build_kws_model(
        cfg.feature, cfg.model, datamodule.num_classes, num_samples=datamodule.clip_samples
    )
    record = {key: to_plain(cfg.get(key)) for key in HPARAM_GROUPS}
    # The data module's absolute paths, so a checkpoint is evaluated the same from any directory.
    record["data"].update(root=datamodule.hparams.root, cache_dir=datamodule.hparams.cache_dir)
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    # Training-only knobs; an empty group choice (spec_augment=none, mixup=none) switches one off.
    module = KWSLightningModule(
        model=model,
        labels=datamodule.labels,
        optimizer=optimizer,
        scheduler=scheduler,
        config=record,
        sample_rate=datamodule.sample_rate,
        clip_samples=datamodule.clip_samples,
        loss=instantiate(cfg.loss) if cfg.get("loss") else None,
        spec_augment=instantiate(cfg.spec_augment) if cfg.get("spec_augment") else None,
        mixup=instantiate(cfg.mixup) if cfg.get("mixup") else None,
    )

    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_named(cfg.get("logger"), "logger")
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _floats(trainer.callback_metrics)

    best = best_checkpoint(trainer)
    if cfg.get("test"):
        tested = test_checkpoint(trainer, test_weights)
        if not tested:
            print("no checkpoint was saved (fast_dev_run or checkpointing off): testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=tested or None)
        metrics.update(_floats(trainer.callback_metrics))

    final = {f"hp/{name.replace('/', '_')}": metrics[name] for name in FINAL_METRICS if name in metrics}
    log_hparams_with_metrics(trainer, {**record, "seed": cfg.get("seed")}, final)

    if trainer.is_global_zero:
        run_dir = (
            HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else trainer.default_root_dir
        )
        summary = "  ".join(f"{name} {metrics[name]:.4f}" for name in FINAL_METRICS if name in metrics)
        print(f"final metrics: {summary or 'none (no validation ran)'}")
        print(f"run dir: {run_dir}")
        print(f"best checkpoint: {best or 'none'}")
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "best_ckpt": best}


def best_checkpoint(trainer: Any) -> str:
    """The path the first metric-monitoring ModelCheckpoint kept ('' when none saved)."""
    monitoring = [callback for callback in trainer.checkpoint_callbacks if callback.monitor]
    return monitoring[0].best_model_path if monitoring else ""


def test_checkpoint(trainer: Any, weights: str) -> str:
    """The checkpoint `test_weights` names: "best" (by the monitored metric) or "last" (the final
    weights, last.ckpt); '' when none was saved."""
    from kws_lightning.callbacks.last_checkpoint import LastCheckpoint

    if weights == "best":
        return best_checkpoint(trainer)
    if weights == "last":
        latest = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint)]
        return latest[0].best_model_path if latest else ""
    raise ValueError(f"test_weights must be one of {TEST_WEIGHTS}, got {weights!r}")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; a name the run never logged is an error that lists what it did log."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[name]


def checkpoint_step(path: str) -> int | None:
    """The global step a checkpoint was saved at (None without a checkpoint)."""
    if not path:
        return None
    import torch

    # mmap: only the small metadata is read, not the weights.
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def trainable_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def run_job(cfg: DictConfig, module_name: str = "kws_lightning.train") -> float | None:
    """Train, write job_result.json, return the optimised metric.

    In a sweep an exception is recorded (status failed, the error) and NaN returned, so the sweep goes on
    and the summary lists the failure; a single run raises. A sweep job that Lightning would run as several
    processes (DDP) runs as a single run in a process of its own (see kws_lightning.utils.sweep_job).
    """
    from hydra.core.hydra_config import HydraConfig
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    from kws_lightning.utils import sweep_job
    from kws_lightning.utils.job_result import FAILED, OK, error_message, make_result, write_job_result

    start = time.monotonic()
    metric = cfg.get("optimized_metric")
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    output_dir = hydra_cfg.runtime.output_dir if hydra_cfg else None
    context = {
        "overrides": list(hydra_cfg.overrides.task) if hydra_cfg else [],
        "job_num": hydra_cfg.job.num if sweep_job.is_multirun() else None,
    }
    try:
        if sweep_job.is_multirun() and sweep_job.launches_own_processes(cfg.trainer):
            return _run_in_fresh_process(module_name, output_dir, metric, start, context)
        metrics, objects = train(cfg)
        value = optimized_value(metrics, metric)
        trainer = objects["trainer"]
        result = make_result(
            OK,
            metric,
            metrics,
            best_step=checkpoint_step(objects["best_ckpt"]),
            params=trainable_parameters(objects["module"].model),
            world_size=trainer.world_size,
            best_checkpoint=objects["best_ckpt"] or None,
            **context,
        )
    except Exception as error:
        if output_dir and rank_zero_only.rank == 0:
            failure = make_result(FAILED, metric, error=error_message(error), **context)
            failure.wall_time_s = time.monotonic() - start
            write_job_result(output_dir, failure)
        if not sweep_job.is_multirun():
            raise
        log.exception("job %s failed; the sweep goes on (recorded in job_result.json)", context["job_num"])
        return float("nan") if metric else None
    result.wall_time_s = time.monotonic() - start
    if output_dir and rank_zero_only.rank == 0:
        write_job_result(output_dir, result)
    return value


def _run_in_fresh_process(
    module_name: str, output_dir: str, metric: str | None, start: float, context: dict[str, Any]
) -> float | None:
    """Run the job as a single run in a new process; its job_result.json becomes this sweep job's."""
    from kws_lightning.utils import sweep_job
    from kws_lightning.utils.job_result import (
        FAILED,
        FILENAME,
        OK,
        make_result,
        read_job_result,
        write_job_result,
    )

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
    if result.status != OK:
        log.error("job %s failed; the sweep goes on: %s", context["job_num"], result.error)
        return float("nan") if metric else None
    return result.value


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
