"""SIGTERM / SIGINT sent to a running `python -m kws_lightning.train` lose no work, and resuming is exact.

Real subprocesses, real signals: a test-only callback (tests/signal_probe.py) holds the run at a known step
while the signal is sent, so the step the run must stop and save at is known.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader
from training_helpers import RepeatBatch, check_ok, make_trainer

from kws_lightning.checkpoints import CheckpointError

TESTS_DIR = Path(__file__).resolve().parent
# 400 synthetic items a epoch at batch 16: 25 steps an epoch. The schedule changes the rate every step and
# SpecAugment, mixup, the noise mixer and dropout all draw random numbers: a resume that re-seeded any
# generator, or restored the schedule one step off, would end with different weights.
QUIET = [
    "model.n_feature_maps=8",
    "data.batch_size=16",
    "scheduler=cosine",
    "scheduler.warmup_steps=5",
    "spec_augment=default",
    "mixup=default",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.tensorboard_extras=null",
    "test=false",
]
TOTAL_STEPS = 30  # crosses the epoch boundary at 25 (a validation there and at the end)
HOLD_STEP = 7  # mid-epoch, between validations


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _command(cwd: Path, *args: str) -> list[str]:
    flags = [arg for arg in args if arg.startswith("-")]  # -m before the overrides, as argparse wants
    overrides = [arg for arg in args if not arg.startswith("-")]
    return [sys.executable, "-m", "kws_lightning.train", *flags, f"paths.log_dir={cwd / 'logs'}", *overrides]


def run_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(cwd, *overrides), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def interrupt_at(cwd: Path, probe: Path, signum: int, *overrides: str) -> subprocess.CompletedProcess:
    """Start a run held at HOLD_STEP, send `signum` once it is there, release it, wait for it to exit."""
    hold = [
        "+callbacks.hold._target_=signal_probe.HoldAtStep",
        f"+callbacks.hold.step={HOLD_STEP}",
        f"+callbacks.hold.out_dir={probe}",
    ]
    process = subprocess.Popen(
        _command(cwd, *overrides, *hold),
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (probe / "reached").exists():
        assert process.poll() is None, f"the run ended before step {HOLD_STEP}: {process.communicate()}"
        assert time.monotonic() < deadline, "the run never reached the hold step"
        time.sleep(0.1)
    process.send_signal(signum)
    time.sleep(0.3)  # the handler runs in the main thread, which is sleeping in the probe
    (probe / "release").touch()
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, synthetic_overrides: list[str]) -> Path:
    """last.ckpt of an uninterrupted run of TOTAL_STEPS steps (outside logs/, so `last` never finds it)."""
    cwd = tmp_path_factory.mktemp("reference")
    check_ok(
        run_train(
            cwd,
            *synthetic_overrides,
            *QUIET,
            f"trainer.max_steps={TOTAL_STEPS}",
            f"hydra.run.dir={cwd / 'ref'}",
        )
    )
    return cwd / "ref" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_step_records_interrupted_and_resume_is_exact(
    tmp_path: Path, synthetic_overrides: list[str], reference: Path, signum: int, code: int
) -> None:
    common = [*synthetic_overrides, *QUIET, f"trainer.max_steps={TOTAL_STEPS}"]
    run_dir = tmp_path / "logs" / "train" / "runs" / "first"
    stopped = interrupt_at(tmp_path, tmp_path / "probe", signum, *common, f"hydra.run.dir={run_dir}")

    # Stopped at once, non-zero (128 + signal), with the state of the step it was at.
    assert stopped.returncode == code, f"{stopped.stdout[-3000:]}\n{stopped.stderr[-3000:]}"
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == HOLD_STEP
    assert not [p.name for p in last.parent.iterdir() if ".tmp-" in p.name]
    result = json.loads((run_dir / "job_result.json").read_text())
    assert result["status"] == "interrupted", result
    assert result["last_checkpoint"] == str(last)
    assert signal.Signals(signum).name in result["error"]

    # `ckpt_path=last` finds it (the newest run under logs/train/runs) and continues to the end ...
    resumed_dir = tmp_path / "resumed"
    check_ok(run_train(tmp_path, *common, "ckpt_path=last", f"hydra.run.dir={resumed_dir}"))
    resumed = resumed_dir / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == TOTAL_STEPS
    # ... ending with exactly the weights the uninterrupted run ended with (bit for bit).
    expected, got = weights(reference), weights(resumed)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different}"


@pytest.mark.slow
def test_sigterm_stops_a_sweep_and_records_the_job(tmp_path: Path, synthetic_overrides: list[str]) -> None:
    """Before: the sweep exited 0 during job 0, with no job_result.json and no checkpoint of its steps."""
    sweep_dir = tmp_path / "sweep"
    stopped = interrupt_at(
        tmp_path,
        tmp_path / "probe",
        signal.SIGTERM,
        "-m",
        *synthetic_overrides,
        *QUIET,
        "trainer.max_steps=10",
        "optimizer.lr=0.01,0.003",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert stopped.returncode == 143, f"{stopped.stdout[-3000:]}\n{stopped.stderr[-3000:]}"
    result = json.loads((sweep_dir / "0" / "job_result.json").read_text())
    assert result["status"] == "interrupted" and result["job_num"] == 0, result
    saved = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    assert saved["global_step"] == HOLD_STEP
    assert not (sweep_dir / "1").exists(), "the sweep went on after the signal"
    # Hydra's end-of-sweep callback never runs: the summary is written on the way out, job 1 listed too
    # (before: no summary; rebuilt by hand it said "1 jobs").
    summary = (sweep_dir / "sweep_summary.md").read_text()
    assert "2 jobs (0 ok, 0 failed, 1 interrupted, 1 not started)" in summary, summary
    assert "| 1 | not started |" in summary and "optimizer.lr=0.003" in summary, summary


def test_sweep_summary_counts_interrupted_jobs(tmp_path: Path) -> None:
    from kws_lightning.sweep_summary import summarize
    from kws_lightning.utils.job_result import FAILED, INTERRUPTED, OK, make_result, write_job_result

    for job, status in enumerate((OK, FAILED, INTERRUPTED)):
        value = {"val/acc_best": 0.5} if status == OK else {}
        write_job_result(tmp_path / str(job), make_result(status, "val/acc_best", value, job_num=job))
    rows = summarize(tmp_path, echo=False)
    assert [row.result.status for row in rows] == [OK, FAILED, INTERRUPTED]
    assert "3 jobs (1 ok, 1 failed, 1 interrupted)" in (tmp_path / "sweep_summary.md").read_text()


def test_ckpt_path_words_resolve_to_the_newest_last_checkpoint(tmp_path: Path) -> None:
    from kws_lightning.utils.resume import resolve_ckpt_path

    runs, here = tmp_path / "logs" / "train" / "runs", tmp_path / "logs" / "train" / "runs" / "now"
    here.mkdir(parents=True)
    assert resolve_ckpt_path("auto", here, runs) is None  # nothing yet: start fresh
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: no last.ckpt under .*runs/\*/checkpoints"):
        resolve_ckpt_path("last", here, runs)
    older, newer = runs / "a" / "checkpoints" / "last.ckpt", runs / "b" / "checkpoints" / "last.ckpt"
    for index, path in enumerate((newer, older)):  # written in the other order than named
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + index, 1000 + index))
    assert resolve_ckpt_path("last", here, runs) == str(older)  # written last
    stale = older.parent / f".last.ckpt.tmp-{2**22 + 12345}"  # a killed writer's leftover (no such pid)
    stale.write_bytes(b"half")
    resolve_ckpt_path("last", here, runs)
    assert not stale.exists()
    with pytest.raises(CheckpointError, match="ckpt_path=auto"):
        resolve_ckpt_path("last", here, runs, in_sweep=True)  # a sweep job only resumes its own folder
    own = here / "checkpoints" / "last.ckpt"
    own.parent.mkdir()
    own.write_bytes(b"x")
    os.utime(own, (1, 1))
    assert resolve_ckpt_path("last", here, runs) == str(own)  # a requeued run's own state comes first
    assert resolve_ckpt_path("auto", here, runs) == str(own)
    assert resolve_ckpt_path("some/file.ckpt", here, runs) == "some/file.ckpt"


# Saves a 32 MB checkpoint in a loop through the checkpoint writer the train config sets on its trainer,
# printing "saved" after each save.
WRITER = """
import sys, torch
from hydra.utils import instantiate
sys.path.insert(0, sys.argv[2])
from training_helpers import compose_train
cfg = compose_train("trainer.default_root_dir=.")
trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
io = trainer.strategy.checkpoint_io
step = 0
while True:
    step += 1
    io.save_checkpoint({"global_step": step, "w": torch.full((8 * 2**20,), float(step))}, sys.argv[1])
    print("saved", step, flush=True)
"""


@pytest.mark.slow
def test_checkpoint_killed_mid_write_is_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    """TMPDIR on another filesystem (tmpfs) than the checkpoint: kill -9 the writer at random moments.
    Before: fsspec's temporary file in TMPDIR, copied across filesystems onto last.ckpt: a kill during the
    copy left a truncated last.ckpt, and the temporary file stayed in TMPDIR."""
    import random

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's folder")
    tmpdir = shm / f"kws-test-{os.getpid()}"
    tmpdir.mkdir()
    target = tmp_path / "checkpoints" / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    try:
        for _ in range(6):
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(target), str(TESTS_DIR)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert writer.stdout.readline().startswith("saved"), writer.communicate()[1][-3000:]
            time.sleep(rng.uniform(0.0, 0.5))
            writer.kill()
            writer.wait()
            saved = torch.load(target, map_location="cpu", weights_only=True)  # whole, never truncated
            assert torch.all(saved["w"] == saved["global_step"])
            # Python's tempfile names (what fsspec's writer used); other tools may keep their own files there.
            left = [p.name for p in tmpdir.iterdir() if p.name.startswith("tmp")]
            assert not left, f"temporary checkpoint files left in TMPDIR: {left}"
        from kws_lightning.utils.checkpoint_io import remove_stale_temporaries

        remove_stale_temporaries(target.parent)  # what the next save or `ckpt_path=` does first
        assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


class _TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        waves, targets = batch
        return torch.nn.functional.cross_entropy(self.layer(waves), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SignalAt(Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_submitit_requeue_signal_saves_last_checkpoint_before_submitit_requeues(tmp_path: Path) -> None:
    """Submitit's USR2 handler requeues the job and exits at once; the step's state must be saved first."""
    from kws_lightning.callbacks import LastCheckpoint, StopOnSignal, TrainingInterrupted

    last = tmp_path / "ck" / "last.ckpt"
    seen_by_submitit = []

    def fake_submitit(signum, frame):  # what submitit's checkpoint_and_try_requeue ends with
        seen_by_submitit.append(torch.load(last, weights_only=True)["global_step"] if last.exists() else None)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, fake_submitit)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    callbacks = [_SignalAt(3, signal.SIGUSR2), LastCheckpoint(dirpath=str(last.parent)), StopOnSignal()]
    trainer = make_trainer(tmp_path, max_steps=10, enable_checkpointing=True, callbacks=callbacks)
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            trainer.fit(_TinyModule(), train_dataloaders=DataLoader(RepeatBatch(batch, 20), batch_size=None))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen_by_submitit == [3]
    assert stopped.value.step == 3 and stopped.value.checkpoint == str(last)
