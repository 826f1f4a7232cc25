"""`python -m kws_lightning.train [overrides]`: compose conf/train.yaml, train, test the best checkpoint.

Examples::

    python -m kws_lightning.train experiment=quickstart
    python -m kws_lightning.train experiment=seed_baseline data.root=/path/to/speech_commands
    python -m kws_lightning.train ckpt_path=logs/train/runs/<stamp>/checkpoints/last.ckpt   # resume
    python -m kws_lightning.train ckpt_path=last                     # resume the newest run's last.ckpt
    python -m kws_lightning.train -m feature=mfcc,logmel optimizer.lr=0.01,0.003          # grid sweep
    python -m kws_lightning.train hparams_search=cnn_trad_pool2_optuna                   # Optuna search
    python -m kws_lightning.train trainer=ddp trainer.devices=4                          # 4 GPUs

Every run writes `job_result.json` (metric, best step, wall time, parameters, status: ok, failed or
interrupted) into its folder (kws_lightning/utils/job_runner.py); a sweep ranks its jobs in
`<sweep dir>/sweep_summary.{csv,md}` (kws_lightning.sweep_summary). A sweep job that fails is recorded as
failed and the sweep goes on; a single run raises. SIGINT/SIGTERM save last.ckpt at the current step,
record the job as interrupted and stop the run (or sweep) with exit code 130/143.
"""

from __future__ import annotations

import logging
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
    "vtlp",
    "loss",
    "model",
    "optimizer",
    "scheduler",
    "trainer",
    "distill",
)
# Printed at the end and written to the HParams view (as hp/<name>).
FINAL_METRICS = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss")
# Which weights `test: true` scores: the best checkpoint by val/acc, or the final ones (last.ckpt).
TEST_WEIGHTS = ("best", "last")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then test the checkpoint `test_weights` names. Returns (metrics, objects) for callers and
    sweepers. `cfg` is validated by the caller (`run_job`: kws_lightning/config_check.py)."""
    # Heavy imports here, not at module level: a config error is then reported in a fraction of a second.
    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from kws_lightning.callbacks import log_hparams_with_metrics
    from kws_lightning.callbacks.provenance import RecordProvenance
    from kws_lightning.checkpoints import check_resume_checkpoint
    from kws_lightning.distill import load_teachers
    from kws_lightning.module import KWSLightningModule
    from kws_lightning.utils.instantiate import build_kws_model, instantiate_named, to_plain
    from kws_lightning.utils.provenance import collect_run_info, resolved_config, write_resolved_config

    # What produced this run: config_resolved.yaml now, run_info.json and each checkpoint's record later.
    run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    if run_dir is not None:
        write_resolved_config(run_dir, cfg)
    provenance = RecordProvenance(collect_run_info(cfg, run_dir), resolved_config(cfg), run_dir)

    # The module logs torchmetrics results at epoch end, whose compute() has already summed the metric states
    # over all DDP processes: Lightning's advice to add sync_dist (a second, averaging reduction) is moot.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/")
    # A frozen front end (feature=speech_embedding) keeps itself in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

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
    if "extra_training_roots" in record["data"]:
        record["data"]["extra_training_roots"] = list(datamodule.hparams.extra_training_roots)
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    # Training-only knobs; an empty group choice (spec_augment=none, mixup=none, vtlp=none) switches one off.
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
        vtlp=instantiate(cfg.vtlp) if cfg.get("vtlp") else None,
        # Reloaded from the config on every run (a resumed one too), never from a checkpoint.
        teachers=load_teachers(to_plain(cfg.get("distill")), datamodule),
    )

    callbacks = [*instantiate_named(cfg.get("callbacks"), "callbacks"), provenance]
    loggers = instantiate_named(cfg.get("logger"), "logger")
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    # Checkpoints are data, not code: resume opens its file with weights_only=True, checked first so a
    # refused file, or one of another model, is named with the reason (kws_lightning/checkpoints.py).
    resume = check_resume_checkpoint(resume_path(cfg, trainer.default_root_dir), module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    metrics = _floats(trainer.callback_metrics)

    best = best_checkpoint(trainer)
    if cfg.get("test"):
        tested = test_checkpoint(trainer, test_weights)
        if not tested:
            print("no checkpoint was saved (fast_dev_run or checkpointing off): testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=tested or None, weights_only=True)
        metrics.update(_floats(trainer.callback_metrics))

    final = {f"hp/{name.replace('/', '_')}": metrics[name] for name in FINAL_METRICS if name in metrics}
    log_hparams_with_metrics(trainer, {**record, "seed": cfg.get("seed")}, final)

    if trainer.is_global_zero:
        summary = "  ".join(f"{name} {metrics[name]:.4f}" for name in FINAL_METRICS if name in metrics)
        print(f"final metrics: {summary or 'none (no validation ran)'}")
        print(f"run dir: {run_dir or trainer.default_root_dir}")
        print(f"best checkpoint: {best or 'none'}")
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "best_ckpt": best}


def resume_path(cfg: DictConfig, output_dir: str) -> str | None:
    """`ckpt_path` as a file: the words `last` and `auto` resolved (kws_lightning/utils/resume.py)."""
    from kws_lightning.utils import sweep_job
    from kws_lightning.utils.resume import resolve_ckpt_path

    runs_dir = Path(cfg.paths.log_dir) / str(cfg.task_name) / "runs"
    return resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, runs_dir, in_sweep=sweep_job.is_multirun())


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kws_lightning.utils.cli_errors import one_line_errors
    from kws_lightning.utils.job_runner import run_job

    # Exit status 1, as for any failed run.
    with one_line_errors(code=1):
        return run_job(cfg, train, module_name="kws_lightning.train")


if __name__ == "__main__":
    main()
