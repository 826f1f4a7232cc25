"""Every fit ends validated: runs shorter than one validation interval (the user's smoke test), single,
DDP and swept, exit 0 with val metrics, a best checkpoint and the closing test; a missing optimised metric
is an error only for a sweeper that reads it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from training_helpers import RepeatBatch, check_ok, make_trainer

# One epoch is 25 steps of 16 (400 synthetic items) and validation is per epoch: 3 steps never validate
# on their own.
SHORT = [
    "model.n_feature_maps=8",
    "data.batch_size=16",
    "trainer.max_steps=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.tensorboard_extras=null",
]


def run_train(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    flags = [arg for arg in args if arg.startswith("-")]  # -m before the overrides, as argparse wants
    overrides = [arg for arg in args if not arg.startswith("-")]
    return subprocess.run(
        [sys.executable, "-m", "kws_lightning.train", *flags, f"paths.log_dir={cwd / 'logs'}", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def final_metrics(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("final metrics:"))
    return {name: float(value) for name, value in re.findall(r"(\S+) ([0-9.]+)", line.split(":", 1)[1])}


def check_validated_run(run_dir: Path, stdout: str, step: int) -> None:
    metrics = final_metrics(stdout)
    assert {"val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss"} <= metrics.keys(), stdout[-2000:]
    best = re.search(r"^best checkpoint: (.+)$", stdout, re.M).group(1).strip()
    assert Path(best).parent == run_dir / "checkpoints", best
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == step
    result = json.loads((run_dir / "job_result.json").read_text())
    assert result["status"] == "ok" and result["value"] == pytest.approx(metrics["val/acc_best"], abs=1e-4)
    assert result["best_step"] == step


def test_run_shorter_than_an_epoch_validates_its_final_weights(
    tmp_path: Path, synthetic_overrides: list[str]
) -> None:
    run_dir = tmp_path / "run"
    stdout = check_ok(run_train(tmp_path, *synthetic_overrides, *SHORT, f"hydra.run.dir={run_dir}"))
    check_validated_run(run_dir, stdout, step=3)
    # One validation (the closing one), shown in the console table like any other.
    assert len(re.findall(r"^\s*\d\.\d\de[-+]\d\d\s+3\s", stdout, re.M)) == 1, stdout[-2000:]


@pytest.mark.slow
def test_short_ddp_cpu_run_validates_its_final_weights(
    tmp_path: Path, synthetic_overrides: list[str]
) -> None:
    run_dir = tmp_path / "run"
    stdout = check_ok(
        run_train(
            tmp_path,
            *synthetic_overrides,
            *SHORT,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_steps=2",
            f"hydra.run.dir={run_dir}",
        )
    )
    check_validated_run(run_dir, stdout, step=2)


@pytest.mark.slow
def test_short_sweep_records_every_job_ok(tmp_path: Path, synthetic_overrides: list[str]) -> None:
    sweep_dir = tmp_path / "sweep"
    check_ok(
        run_train(
            tmp_path,
            "-m",
            *synthetic_overrides,
            *SHORT,
            "test=false",
            "optimizer.lr=0.01,0.003",
            f"hydra.sweep.dir={sweep_dir}",
        )
    )
    results = [json.loads((sweep_dir / job / "job_result.json").read_text()) for job in ("0", "1")]
    assert [r["status"] for r in results] == ["ok", "ok"], results
    assert all(r["value"] is not None and r["best_step"] == 3 for r in results), results
    summary = (sweep_dir / "sweep_summary.md").read_text()
    assert "2 jobs (2 ok, 0 failed)" in summary, summary


def test_missing_optimized_metric_is_an_error_only_when_required() -> None:
    from kws_lightning.utils.job_runner import optimized_value

    logged = {"test/acc": 0.5}
    assert optimized_value(logged, "val/acc_best") is None
    assert optimized_value(logged, "test/acc", required=True) == 0.5
    with pytest.raises(KeyError, match=r"set optimized_metric to one of \['test/acc'\].*limit_val_batches"):
        optimized_value(logged, "val/acc_best", required=True)


class _ValidatedModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        self.validated_at: list[int] = []

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self.layer(batch[0]).argmax(1) == batch[1]).float().mean())

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_at.append(self.trainer.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        ({"max_steps": 3}, [3]),  # shorter than the epoch of 5 batches
        ({"max_steps": 7}, [5, 7]),  # ends mid-epoch after one epoch-end validation
        ({"max_epochs": 1, "check_val_every_n_epoch": 2}, [5]),  # the interval skips the last epoch
        ({"max_epochs": 2}, [5, 10]),  # validated anyway: no second validation
    ],
)
def test_final_validation_keeps_a_best_checkpoint(tmp_path: Path, length: dict, expected: list[int]) -> None:
    from kws_lightning.callbacks import FinalValidation

    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best-{step}")
    module = _ValidatedModule()
    trainer = make_trainer(tmp_path, enable_checkpointing=True, callbacks=[FinalValidation(), best], **length)
    loader = DataLoader(RepeatBatch(batch, 5), batch_size=None)
    trainer.fit(
        module, train_dataloaders=loader, val_dataloaders=DataLoader(RepeatBatch(batch, 1), batch_size=None)
    )
    assert module.validated_at == expected
    assert best.best_model_path and "val/acc" in trainer.callback_metrics
