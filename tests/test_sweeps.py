"""Sweeps as users run them: `python -m kws_lightning.train -m ...` and `hparams_search=...` subprocesses on a
small synthetic set with tiny budgets, the summary they leave, and the search / launcher configs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kws_lightning.sweep_summary import guess_direction, rank_jobs
from kws_lightning.utils.job_result import JobResult, read_job_result

CONF = Path(__file__).resolve().parents[1] / "conf"
# 2 training steps and 2 validation batches a job: seconds each.
TINY = [
    "model.n_feature_maps=8",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "test=false",
]


def run_module(cwd: Path, module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def check_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )
    return result.stdout


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory, synthetic_overrides: list[str]) -> dict:
    """Three jobs: a normal one, one that diverges (lr=1e30: NaN loss at step 2), one with a bad value."""
    cwd = tmp_path_factory.mktemp("grid")
    sweep_dir = cwd / "sweep"
    result = run_module(
        cwd,
        "kws_lightning.train",
        "-m",
        f"paths.log_dir={cwd / 'logs'}",
        *synthetic_overrides,
        *TINY,
        "optimizer.lr=0.01,1e30,-1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return {"sweep_dir": sweep_dir, "stdout": check_ok(result), "cwd": cwd}


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_the_sweep_goes_on(grid_sweep: dict) -> None:
    sweep_dir = grid_sweep["sweep_dir"]
    jobs = [read_job_result(sweep_dir / str(job) / "job_result.json") for job in range(3)]
    assert [job.status for job in jobs] == ["ok", "failed", "failed"]
    assert [job.job_num for job in jobs] == [0, 1, 2]
    ok, diverged, invalid = jobs
    assert ok.metric == "val/acc_best" and 0.0 <= ok.value <= 1.0
    assert ok.best_step == 2 and ok.params == 43_804 and ok.wall_time_s > 0
    assert ok.best_checkpoint and Path(ok.best_checkpoint).is_file()
    assert "optimizer.lr=0.01" in ok.overrides
    assert diverged.error.startswith("NonFiniteLossError: training loss is nan at step 2")
    assert "Lower optimizer.lr" in diverged.error and diverged.value is None
    # Rejected by the config check before anything is built (kws_lightning/config_check.py).
    assert invalid.error == "ConfigError: invalid config: optimizer.lr=-1: expected a number > 0"


@pytest.mark.slow
def test_summary_ranks_jobs_with_their_overrides(grid_sweep: dict) -> None:
    sweep_dir = grid_sweep["sweep_dir"]
    with open(sweep_dir / "sweep_summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["rank"], row["job"], row["status"]) for row in rows] == [
        ("1", "0", "ok"),
        ("", "1", "failed"),
        ("", "2", "failed"),
    ]
    assert (
        rows[0]["metric"] == "val/acc_best" and rows[0]["best_step"] == "2" and rows[0]["params"] == "43804"
    )
    assert rows[1]["error"].startswith("NonFiniteLossError")
    assert rows[2]["overrides"].endswith("optimizer.lr=-1")
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert "3 jobs (1 ok, 2 failed), ranked by val/acc_best (higher is better)" in markdown
    # The table shows what differs between jobs; what they share is listed once above it.
    assert "| 1 | 0 | ok |" in markdown and "`optimizer.lr=1e+30`" in markdown
    assert "Overrides common to every job: `" in markdown
    assert markdown in grid_sweep["stdout"]  # printed at the end of the sweep


@pytest.mark.slow
def test_summary_cli_rewrites_the_same_table(grid_sweep: dict) -> None:
    sweep_dir = grid_sweep["sweep_dir"]
    before = (sweep_dir / "sweep_summary.md").read_text()
    (sweep_dir / "sweep_summary.md").unlink()
    stdout = check_ok(run_module(grid_sweep["cwd"], "kws_lightning.sweep_summary", str(sweep_dir)))
    assert (sweep_dir / "sweep_summary.md").read_text() == before == stdout
    # Ranking by another logged metric: lower val/loss is better.
    check_ok(
        run_module(grid_sweep["cwd"], "kws_lightning.sweep_summary", str(sweep_dir), "--metric", "val/loss")
    )
    assert "ranked by val/loss (lower is better)" in (sweep_dir / "sweep_summary.md").read_text()
    missing = run_module(grid_sweep["cwd"], "kws_lightning.sweep_summary", str(grid_sweep["cwd"] / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.slow
def test_tensorboard_runs_are_named_after_the_swept_values(grid_sweep: dict) -> None:
    sweep_dir = grid_sweep["sweep_dir"]
    # Job 2 (optimizer.lr=-1) fails the config check before its logger exists.
    for job, value in ((0, "0.01"), (1, "1e+30")):
        run = sweep_dir / str(job) / "tensorboard" / f"optimizer.lr={value}"
        assert list(run.glob("events.out.tfevents.*")), sorted((sweep_dir / str(job)).rglob("*"))


@pytest.mark.slow
def test_single_run_fails_with_one_line(tmp_path: Path, synthetic_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    result = run_module(
        tmp_path,
        "kws_lightning.train",
        f"paths.log_dir={tmp_path / 'logs'}",
        *synthetic_overrides,
        *TINY,
        "optimizer.lr=1e30",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 1
    # The tool's own error: one line naming the fix, no traceback (kws_lightning/utils/cli_errors.py).
    assert "error: training loss is nan at step 2" in result.stderr and "Lower optimizer.lr" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert read_job_result(run_dir / "job_result.json").status == "failed"


@pytest.fixture(scope="module")
def optuna_search(tmp_path_factory: pytest.TempPathFactory, synthetic_overrides: list[str]) -> dict:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `sweep` extra")
    cwd = tmp_path_factory.mktemp("optuna")
    sweep_dir = cwd / "sweep"
    storage = f"sqlite:///{cwd / 'optuna.db'}"
    stdout = check_ok(
        run_module(
            cwd,
            "kws_lightning.train",
            "hparams_search=cnn_trad_pool2_optuna",
            f"paths.log_dir={cwd / 'logs'}",
            *synthetic_overrides,
            # data.batch_size is searched: a command-line value would fix it (Optuna drops it from the space).
            *(override for override in TINY if not override.startswith("data.batch_size=")),
            "hydra.sweeper.n_trials=3",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name=test_{cwd.name}",
            f"hydra.sweep.dir={sweep_dir}",
        )
    )
    return {"sweep_dir": sweep_dir, "stdout": stdout, "storage": storage, "study": f"test_{cwd.name}"}


SEARCHED = ("optimizer.lr", "optimizer.weight_decay", "feature", "data.batch_size")


def trial_params(result: JobResult) -> dict[str, str]:
    pairs = (override.split("=", 1) for override in result.overrides)
    return {key: value for key, value in pairs if key in SEARCHED}


@pytest.mark.slow
def test_optuna_search_writes_its_results_and_summary(optuna_search: dict) -> None:
    sweep_dir = optuna_search["sweep_dir"]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == set(SEARCHED)
    trials = [read_job_result(sweep_dir / str(job) / "job_result.json") for job in range(3)]
    assert all(trial.status == "ok" for trial in trials)
    assert best["best_value"] == pytest.approx(max(trial.value for trial in trials))
    with open(sweep_dir / "sweep_summary.csv", newline="") as handle:
        top = next(csv.DictReader(handle))
    assert float(top["value"]) == pytest.approx(best["best_value"], abs=1e-4)
    # The study persisted in the database (SQLAlchemy<2 pin) agrees with the files.
    import optuna

    study = optuna.load_study(study_name=optuna_search["study"], storage=optuna_search["storage"])
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.best_value == pytest.approx(best["best_value"])


@pytest.mark.slow
def test_optuna_search_is_reproducible_from_its_seed(optuna_search: dict) -> None:
    """The trials' parameters are what a TPE sampler with the config's seed draws over the config's space."""
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    sweeper = compose("hparams_search=cnn_trad_pool2_optuna").hydra.sweeper
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    space = {o.key_or_group: create_optuna_distribution_from_override(o) for o in parsed}
    sampler = optuna.samplers.TPESampler(
        seed=sweeper.sampler.seed, n_startup_trials=sweeper.sampler.n_startup_trials
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    sweep_dir = optuna_search["sweep_dir"]
    for job in range(3):
        trial = study.ask(fixed_distributions=space)
        expected = trial.params
        study.tell(trial, 0.0)  # startup trials are random: the values told do not matter yet
        got = trial_params(read_job_result(sweep_dir / str(job) / "job_result.json"))
        assert got == {key: str(value) for key, value in expected.items()}, job


def test_search_configs_compose() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `sweep` extra")
    for name, model, feature in (
        ("cnn_trad_pool2_optuna", "cnn_trad_pool2", "MFCC"),
        ("bc_resnet_optuna", "bc_resnet", "LogMel"),
    ):
        cfg = compose(f"hparams_search={name}")
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
        assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
        assert "optimizer.lr" in sweeper.params and cfg.optimized_metric == "val/acc_best"
        assert cfg.model.name == model and cfg.feature._target_.endswith(feature)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_slurm_launcher_config_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `slurm` extra")
    cfg = compose("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # One SLURM task per GPU: Lightning takes the ranks from SLURM instead of launching processes.
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.use_distributed_sampler is False


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_cpu"])
def test_trainer_configs_never_wrap_our_samplers(trainer: str) -> None:
    cfg = compose(f"trainer={trainer}")
    assert cfg.trainer.use_distributed_sampler is False
    assert cfg.trainer.strategy == ("ddp" if trainer.startswith("ddp") else "auto")


def result(status: str, value: float | None, job: int, overrides: list[str]) -> tuple[str, JobResult]:
    return str(job), JobResult(status=status, metric="m", value=value, job_num=job, overrides=overrides)


def test_rank_jobs_orders_by_direction_and_puts_failures_last() -> None:
    jobs = [
        result("ok", 0.5, 0, ["a=1", "lr=1"]),
        result("failed", None, 1, ["a=1", "lr=2"]),
        result("ok", 0.9, 2, ["a=1", "lr=3"]),
        result("ok", math.nan, 3, ["a=1", "lr=4"]),
        result("ok", 0.1, 4, ["a=1", "lr=5"]),
    ]
    rows = rank_jobs(jobs, "max")
    assert [(row.rank, row.job) for row in rows] == [(1, "2"), (2, "0"), (3, "4"), (None, "1"), (None, "3")]
    assert rows[0].overrides == "lr=3"  # a=1 is common to all jobs
    assert [row.job for row in rank_jobs(jobs, "min")][:3] == ["4", "0", "2"]
    with pytest.raises(ValueError, match="direction"):
        rank_jobs(jobs, "up")


def test_guess_direction() -> None:
    assert guess_direction("val/acc_best") == "max"
    assert guess_direction("val/loss") == "min"
    assert guess_direction(None) == "max"


def test_job_result_writes_non_finite_values_as_null(tmp_path: Path) -> None:
    from kws_lightning.utils.job_result import make_result, write_job_result

    path = write_job_result(tmp_path, make_result("ok", "val/loss", {"val/loss": math.inf, "val/acc": 0.5}))
    record = json.loads(path.read_text())  # strict JSON: no NaN / Infinity tokens
    assert record["value"] is None and record["metrics"] == {"val/loss": None, "val/acc": 0.5}
    with pytest.raises(ValueError, match="job_result.json"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "job_result.json").write_text("{not json")
        read_job_result(tmp_path / "bad" / "job_result.json")


@pytest.mark.parametrize("sweeper", ["grid", "optuna"])
def test_summary_lists_the_jobs_a_stopped_sweep_never_started(tmp_path: Path, sweeper: str) -> None:
    """Before: a sweep stopped in job 0 of 2 had a summary saying "1 jobs". The plan comes from the
    multirun.yaml Hydra's sweeper saves before the first job (a real one: tests/test_interrupts.py)."""
    from kws_lightning.sweep_summary import summarize
    from kws_lightning.utils.job_result import INTERRUPTED, make_result, write_job_result

    grid = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None}
    search = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "n_trials": 3}
    plan = {
        "hydra": {
            "sweeper": {**grid, "params": {"seed": "1,2"}} if sweeper == "grid" else search,
            "overrides": {"task": ["optimizer.lr=0.01,0.003", "trainer.max_steps=10"]},
        }
    }
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(plan))
    started = ["seed=1", "optimizer.lr=0.01", "trainer.max_steps=10"]
    write_job_result(tmp_path / "0", make_result(INTERRUPTED, "val/acc_best", overrides=started, job_num=0))
    rows = summarize(tmp_path, echo=False)
    markdown = (tmp_path / "sweep_summary.md").read_text()
    if sweeper == "grid":  # 2 seeds x 2 learning rates, in the basic sweeper's order
        assert [(row.job, row.result.status) for row in rows] == [
            ("0", "interrupted"),
            ("1", "not started"),
            ("2", "not started"),
            ("3", "not started"),
        ]
        assert rows[3].result.overrides == ["seed=2", "optimizer.lr=0.003", "trainer.max_steps=10"]
        assert "4 jobs (0 ok, 0 failed, 1 interrupted, 3 not started)" in markdown
        assert (
            "| 3 | not started |" in markdown
            and "`seed=2 optimizer.lr=0.003 trainer.max_steps=10`" in markdown
        )
    else:  # a search: n_trials jobs, the others' parameters never drawn
        assert [row.result.status for row in rows] == ["interrupted", "not started", "not started"]
        assert "3 jobs (0 ok, 0 failed, 1 interrupted, 2 not started)" in markdown
