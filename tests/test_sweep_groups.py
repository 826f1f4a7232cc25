"""Seeds in sweeps (issue 11): jobs that differ only in `seed` are grouped in the sweep summary, mean ± std
per configuration, from job_result.json files as sweep jobs write them."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from kws_lightning.sweep_groups import GROUPS_CSV_NAME, group_jobs, split_seed, varies_seed
from kws_lightning.sweep_summary import MARKDOWN_NAME, find_results, main, summarize
from kws_lightning.utils.job_result import make_result, write_job_result

METRIC = "val/acc_best"
# (feature, lr, seed) -> val/acc_best; None = the job failed (diverged).
JOBS = {
    ("mfcc", "0.01", "1"): 0.80,
    ("mfcc", "0.01", "2"): 0.84,
    ("mfcc", "0.01", "3"): 0.82,
    ("logmel", "0.01", "1"): 0.78,
    ("logmel", "0.01", "2"): 0.70,
    ("logmel", "0.01", "3"): None,
    ("mfcc", "0.005", "1"): 0.60,
    ("mfcc", "0.005", "2"): 0.62,
    ("mfcc", "0.005", "3"): 0.61,
}


def write_sweep(sweep_dir: Path, jobs: dict = JOBS) -> Path:
    """One folder per job with the job_result.json train.py writes (same writer, same fields)."""
    for number, ((feature, lr, seed), value) in enumerate(jobs.items()):
        overrides = [f"feature={feature}", f"optimizer.lr={lr}", f"seed={seed}", "data.root=/data"]
        if value is None:
            result = make_result(
                "failed", METRIC, {}, overrides=overrides, job_num=number, error="NonFiniteLossError: nan"
            )
        else:
            result = make_result(
                "ok", METRIC, {METRIC: value, "val/loss": 1 - value}, overrides=overrides, job_num=number
            )
        write_job_result(sweep_dir / str(number), result)
    return sweep_dir


def test_groups_average_over_seeds_and_count_failures(tmp_path: Path) -> None:
    results = find_results(write_sweep(tmp_path))
    assert varies_seed(results)
    groups = group_jobs(results, "max", common=["data.root=/data"])
    by_name = {g.configuration: g for g in groups}
    assert list(by_name) == [
        "feature=mfcc optimizer.lr=0.01",
        "feature=logmel optimizer.lr=0.01",
        "feature=mfcc optimizer.lr=0.005",
    ]  # ranked by mean, best first
    mfcc = by_name["feature=mfcc optimizer.lr=0.01"]
    assert (mfcc.rank, mfcc.n, mfcc.failed, mfcc.seeds) == (1, 3, 0, ["1", "2", "3"])
    assert mfcc.mean == pytest.approx(0.82)
    assert mfcc.std == pytest.approx(statistics.stdev([0.80, 0.84, 0.82]))  # sample std (n - 1)
    logmel = by_name["feature=logmel optimizer.lr=0.01"]
    assert (logmel.n, logmel.failed) == (2, 1) and logmel.mean == pytest.approx(0.74)
    assert [g.configuration for g in group_jobs(results, "min", ["data.root=/data"])][0].endswith("0.005")


def test_summary_writes_the_grouped_table_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_sweep(tmp_path)
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / MARKDOWN_NAME).read_text()
    assert text == capsys.readouterr().out
    assert "## By configuration, over seeds" in text
    mfcc_std = statistics.stdev([0.80, 0.84, 0.82])
    assert (
        f"| 1 | `feature=mfcc optimizer.lr=0.01` | 3 | 0.8200 ± {mfcc_std:.4f} | 0.8000 | 0.8400 "
        "| 1 2 3 | 0 |" in text
    )
    assert "| 2 | `feature=logmel optimizer.lr=0.01` | 2 | 0.7400 ± " in text
    # Best vs next: 0.08 apart, the larger std is logmel's 0.0566: more than the seed spread.
    assert "leads the next by 0.0800, more than the larger seed-to-seed std (0.0566)" in text
    rows = list(csv.DictReader(open(tmp_path / GROUPS_CSV_NAME)))
    assert [(r["rank"], r["n"], r["failed"]) for r in rows] == [
        ("1", "3", "0"),
        ("2", "2", "1"),
        ("3", "3", "0"),
    ]
    assert float(rows[0]["mean"]) == pytest.approx(0.82) and rows[0]["metric"] == METRIC


def test_ranking_by_another_metric_groups_that_metric(tmp_path: Path) -> None:
    write_sweep(tmp_path)
    summarize(tmp_path, metric="val/loss", echo=False)
    rows = list(csv.DictReader(open(tmp_path / GROUPS_CSV_NAME)))
    assert rows[0]["configuration"] == "feature=mfcc optimizer.lr=0.01"  # lowest loss first
    assert float(rows[0]["mean"]) == pytest.approx(0.18)


def test_no_grouped_table_without_several_seeds(tmp_path: Path) -> None:
    one_seed = {key: value for key, value in JOBS.items() if key[2] == "1"}
    write_sweep(tmp_path, one_seed)
    summarize(tmp_path, echo=False)
    text = (tmp_path / MARKDOWN_NAME).read_text()
    assert "By configuration" not in text and not (tmp_path / GROUPS_CSV_NAME).exists()


def test_single_seed_groups_have_no_std_and_seed_forms_are_recognised() -> None:
    assert split_seed(["a=1", "seed=4", "b=2"]) == (["a=1", "b=2"], "4")
    assert split_seed(["+seed=7"]) == ([], "7") and split_seed(["a=1"]) == (["a=1"], None)
    results = [("0", make_result("ok", METRIC, {METRIC: 0.5}, overrides=["seed=1", "x=1"]))]
    (group,) = group_jobs(results, "max")
    assert group.std is None and group.n == 1 and not math.isnan(group.mean)


def test_feature_sweep_recipe_sweeps_features_and_rates_on_the_dev_set() -> None:
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=feature_sweep"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"feature": "mfcc,logmel,logspec", "optimizer.lr": "0.01,0.005"}
    assert cfg.data.root == "../shared/data/speech_commands_dev" and cfg.model.name == "cnn_trad_pool2"
    assert cfg.feature.normalize == "per_utterance" and cfg.trainer.max_epochs == 2
