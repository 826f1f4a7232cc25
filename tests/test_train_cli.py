"""`python -m kws_lightning.train` as a user runs it: real subprocesses on a small synthetic data set."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import check_ok

# Quiet, small and fast; every run writes under tmp_path only (cwd, run dir and log dir).
FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "data.batch_size=16"]


def run_train(cwd: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kws_lightning.train", f"paths.log_dir={cwd / 'logs'}", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def final_lines(stdout: str) -> dict[str, str]:
    """The closing lines, in order: `final metrics: ...`, `run dir: ...`, `best checkpoint: ...`."""
    lines = stdout.strip().splitlines()[-3:]
    keys = [line.split(":", 1)[0] for line in lines]
    assert keys == ["final metrics", "run dir", "best checkpoint"], lines
    return {key: line.split(":", 1)[1].strip() for key, line in zip(keys, lines, strict=True)}


def metric(summary: str, name: str) -> float:
    match = re.search(rf"{re.escape(name)} ([0-9.]+)", summary)
    assert match, f"{name} missing from {summary!r}"
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "feature"), [("cnn_trad_pool2", "mfcc"), ("cnn_trad_pool2", "logmel"), ("light_cnn", "logspec")]
)
def test_fast_dev_run_each_model_and_feature(
    tmp_path: Path, synthetic_overrides: list[str], model: str, feature: str
) -> None:
    run_dir = tmp_path / "run"
    stdout = check_ok(
        run_train(
            tmp_path,
            *synthetic_overrides,
            *FAST,
            f"model={model}",
            f"feature={feature}",
            "trainer.fast_dev_run=true",
            f"hydra.run.dir={run_dir}",
        )
    )
    closing = final_lines(stdout)
    assert Path(closing["run dir"]) == run_dir
    # fast_dev_run saves no checkpoint, so the test ran on the current weights.
    assert closing["best checkpoint"] == "none"
    assert 0.0 <= metric(closing["final metrics"], "test/acc") <= 1.0
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["name"] == model
    assert saved["feature"]["_target_"].endswith(
        {"mfcc": "MFCC", "logmel": "LogMel", "logspec": "LogSpectrogram"}[feature]
    )
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("override", "listed"),
    [("model=cnn_trad_pool3", ["cnn_trad_pool2", "light_cnn"]), ("optimizer=sgdd", ["adam", "adamw", "sgd"])],
)
def test_unknown_group_choice_lists_the_valid_options(
    tmp_path: Path, override: str, listed: list[str]
) -> None:
    result = run_train(tmp_path, override)
    group = override.split("=")[0]
    assert result.returncode != 0
    assert f"Available options in '{group}'" in result.stderr, result.stderr
    options = re.search(rf"Available options in '{group}':\n((?:\t.*\n?)+)", result.stderr).group(1).split()
    assert set(listed) <= set(options)
    assert not (tmp_path / "logs").exists()  # failed before anything ran


@pytest.mark.parametrize("override", ["optimizer.lrr=0.1", "trainer.max_step=5", "seeed=1"])
def test_key_typo_fails_at_start_up(tmp_path: Path, override: str) -> None:
    result = run_train(tmp_path, override)
    key = override.split("=")[0]
    assert result.returncode != 0
    assert f"Could not override '{key}'" in result.stderr and "not in struct" in result.stderr, result.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_resume_continues_at_the_saved_step(tmp_path: Path, synthetic_overrides: list[str]) -> None:
    # Epochs of 3 batches, validation (and so checkpoints) every 2 batches: the run stops mid-epoch 1.
    common = [
        *synthetic_overrides,
        *FAST,
        "model.n_feature_maps=8",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "test=false",
    ]
    first = tmp_path / "first"
    check_ok(run_train(tmp_path, *common, "trainer.max_steps=4", f"hydra.run.dir={first}"))
    last = first / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and saved["epoch"] == 1
    momentum = saved["optimizer_states"][0]["state"]
    assert momentum, "the SGD momentum buffers are in the checkpoint"

    second = tmp_path / "second"
    stdout = check_ok(
        run_train(tmp_path, *common, "trainer.max_steps=8", f"ckpt_path={last}", f"hydra.run.dir={second}")
    )
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 8
    assert resumed["epoch"] == 2  # epochs 0 and 1 took 6 steps; steps 7-8 are epoch 2
    # The console table continues the step count: rows at 6 and 8 only, not from 0 again.
    table_row = re.compile(r"\s*\d\.\d\de[-+]\d\d\s+\d+\s")
    iters = [int(row.split()[1]) for row in stdout.splitlines() if table_row.match(row)]
    assert iters == [6, 8], stdout
    # Best-so-far accuracy came back with the weights, so the resumed best is never below the first run's.
    assert resumed["state_dict"]["val_acc_best.max_value"] >= saved["state_dict"]["val_acc_best.max_value"]


@pytest.mark.slow
def test_quick_training_beats_chance_by_far(tmp_path: Path, synthetic_overrides: list[str]) -> None:
    """The quickstart recipe on the small test set (20 epochs of ~400 clips, ~45 s on 2 cores).

    Measured: val/acc_best 0.56, test/acc 0.58 (12 classes: chance is 1/12 = 0.083); asserted with margin.
    """
    run_dir = tmp_path / "run"
    stdout = check_ok(
        run_train(
            tmp_path,
            "experiment=quickstart",
            *synthetic_overrides,
            "data.batch_size=32",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
            timeout=600,
        )
    )
    closing = final_lines(stdout)
    assert metric(closing["final metrics"], "val/acc_best") >= 0.4, stdout[-3000:]
    assert metric(closing["final metrics"], "test/acc") >= 0.35, stdout[-3000:]
    best = Path(closing["best checkpoint"])
    assert best.parent == run_dir / "checkpoints" and best.is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "valid acc" in stdout  # the console table's header


def test_test_weights_last_scores_the_final_checkpoint(
    tmp_path: Path, synthetic_overrides: list[str]
) -> None:
    # Validation (and a best checkpoint) at step 2, training ends at step 3: best and last differ.
    run_dir = tmp_path / "run"
    result = run_train(
        tmp_path,
        *synthetic_overrides,
        *FAST,
        "model.n_feature_maps=8",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "test_weights=last",
        f"hydra.run.dir={run_dir}",
    )
    stdout = check_ok(result)
    loaded = re.findall(r"Loaded model weights from the checkpoint at (\S+)", stdout + result.stderr)
    assert loaded == [str(run_dir / "checkpoints" / "last.ckpt")], loaded
    assert torch.load(loaded[0], map_location="cpu", weights_only=True)["global_step"] == 3
    assert Path(final_lines(stdout)["best checkpoint"]).name.startswith("best-step000002")


def test_bad_test_weights_fails_at_start_up(tmp_path: Path) -> None:
    result = run_train(tmp_path, "test_weights=final", "data=synthetic", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "test_weights must be one of ('best', 'last'), got 'final'" in result.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to fill a disk")
def test_disk_full_during_training_is_one_line_naming_the_folder(
    tmp_path: Path, synthetic_overrides: list[str]
) -> None:
    """Before: a traceback ending in torch's "unexpected pos" RuntimeError context. Now one line."""
    import json
    import os

    run_dir = tmp_path / "run"
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kws_lightning.train",
            f"paths.log_dir={tmp_path / 'logs'}",
            *synthetic_overrides,
            *FAST,
            "model.n_feature_maps=8",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            "test=false",
            "+callbacks.full._target_=training_helpers.WriteToFullDisk",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"error: disk full: no space left on the device writing {run_dir}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    recorded = json.loads((run_dir / "job_result.json").read_text())
    assert recorded["status"] == "failed" and recorded["error"].startswith("DiskFullError:"), recorded
