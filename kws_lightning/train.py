"""`python -m kws_lightning.train [overrides]`: compose conf/train.yaml, train, test the best checkpoint.

Examples::

    python -m kws_lightning.train experiment=quickstart
    python -m kws_lightning.train experiment=seed_baseline data.root=/path/to/speech_commands
    python -m kws_lightning.train ckpt_path=logs/train/runs/<stamp>/checkpoints/last.ckpt   # resume
    python -m kws_lightning.train -m optimizer.lr=0.01,0.003                             # sweep
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

# The keys of the config that describe the experiment (the HParams view and the checkpoint record them).
HPARAM_GROUPS = ("data", "feature", "augment", "model", "optimizer", "scheduler", "trainer")
# Printed at the end and written to the HParams view (as hp/<name>).
FINAL_METRICS = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then test the best checkpoint. Returns (metrics, objects) for callers and sweepers."""
    # Heavy imports here, not at module level: a config error is then reported in a fraction of a second.
    import pytorch_lightning as pl
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from kws_lightning.callbacks import log_hparams_with_metrics
    from kws_lightning.module import KWSLightningModule
    from kws_lightning.utils.instantiate import build_kws_model, instantiate_named, to_plain

    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    model = build_kws_model(
        cfg.feature, cfg.model, datamodule.num_classes, num_samples=datamodule.clip_samples
    )
    record = {key: to_plain(cfg.get(key)) for key in HPARAM_GROUPS}
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = KWSLightningModule(
        model=model,
        labels=datamodule.labels,
        optimizer=optimizer,
        scheduler=scheduler,
        config=record,
        sample_rate=datamodule.sample_rate,
        clip_samples=datamodule.clip_samples,
    )

    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_named(cfg.get("logger"), "logger")
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _floats(trainer.callback_metrics)

    best = best_checkpoint(trainer)
    if cfg.get("test"):
        if not best:
            print("no checkpoint was saved (fast_dev_run or checkpointing off): testing the current weights")
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update(_floats(trainer.callback_metrics))

    final = {f"hp/{name.replace('/', '_')}": metrics[name] for name in FINAL_METRICS if name in metrics}
    log_hparams_with_metrics(trainer, {**record, "seed": cfg.get("seed")}, final)

    run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else trainer.default_root_dir
    summary = "  ".join(f"{name} {metrics[name]:.4f}" for name in FINAL_METRICS if name in metrics)
    print(f"final metrics: {summary or 'none (no validation ran)'}")
    print(f"run dir: {run_dir}")
    print(f"best checkpoint: {best or 'none'}")
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "best_ckpt": best}


def best_checkpoint(trainer: Any) -> str:
    """The path the first metric-monitoring ModelCheckpoint kept ('' when none saved)."""
    monitoring = [callback for callback in trainer.checkpoint_callbacks if callback.monitor]
    return monitoring[0].best_model_path if monitoring else ""


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def optimized_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; a name the run never logged is an error that lists what it did log."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[name]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return optimized_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
