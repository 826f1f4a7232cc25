"""`python -m kws_lightning.cv compare=[A,B]` (issue 16): two finished cv runs paired fold by fold. Figures
checked against the committed real-data CV summaries (experiments/cv_*), recomputed here with numpy and
scipy; refusals on runs that do not share their folds. The pairing against a freshly scored ensemble is in
tests/test_cv_ensemble.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from kws_lightning.jobs.cv_compare import compare, format_compare_markdown, load_side, run_compare, verdict
from kws_lightning.jobs.cv_folds import CVError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SWA = EXPERIMENTS / "cv_best_balanced_swa"
SWA_REVERB = EXPERIMENTS / "cv_best_balanced_swa_reverb"
BEST = EXPERIMENTS / "cv_best"


def fold_column(run: Path, column: str, name: str = "cv_folds.csv") -> np.ndarray:
    with open(run / name, newline="") as handle:
        return np.array([float(row[column]) for row in csv.DictReader(handle)])


def test_paired_figures_match_numpy_and_scipy_on_the_committed_runs(tmp_path):
    cfg = OmegaConf.create({"compare": [str(SWA), str(SWA_REVERB)], "out_dir": str(tmp_path)})
    assert run_compare(cfg) == 0
    result = json.loads((tmp_path / "cv_compare.json").read_text())
    diffs = fold_column(SWA_REVERB, "acc_last") - fold_column(SWA, "acc_last")
    assert [row["b_minus_a"] for row in result["folds"]] == pytest.approx(diffs.tolist(), abs=1e-12)
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert result["b_minus_a"]["mean"] == pytest.approx(diffs.mean())
    assert result["b_minus_a"]["ci95"] == pytest.approx([low, high])
    assert (result["folds_b_higher"], result["folds_b_lower"]) == ((diffs > 0).sum(), (diffs < 0).sum())
    correct = fold_column(SWA_REVERB, "correct_last").sum() - fold_column(SWA, "correct_last").sum()
    items = fold_column(SWA, "held_out_items").sum()
    assert result["pooled"]["b_minus_a"] == pytest.approx(correct / items)
    assert "no difference shown by these folds" in (tmp_path / "cv_compare.md").read_text()


def test_best_checkpoints_and_an_ensemble_summary_are_read_from_their_own_columns():
    best_ckpt = load_side(BEST, "best")
    assert [best_ckpt.rows[i]["accuracy"] for i in range(5)] == pytest.approx(
        fold_column(BEST, "acc_best_ckpt").tolist()
    )
    ensemble = load_side(SWA / "ens_tc_resnet_cv_summary.json", "last")
    assert ensemble.figure == "ensemble"
    result = compare(load_side(SWA, "last"), ensemble)
    expected = fold_column(SWA, "ensemble_minus_best_balanced_swa", "ens_tc_resnet_cv_folds.csv")
    assert [row["b_minus_a"] for row in result["folds"]] == pytest.approx(expected.tolist(), abs=1e-12)
    # Higher in four folds of five, yet the interval (-0.24 to +0.81 points) straddles zero: no claim.
    assert (result["folds_b_higher"], result["folds_b_lower"]) == (4, 1)
    assert "(95 % interval -0.24 to +0.81)" in verdict(result) and "no difference shown" in verdict(result)
    # Against `best`, every fold is higher and the interval is clear of zero.
    versus_best = compare(load_side(BEST, "last"), ensemble)
    assert versus_best["folds_b_higher"] == 5 and "is better on unseen speakers" in verdict(versus_best)


def edited_copy(run: Path, where: Path, edit) -> Path:
    """A copy of a committed run's summary with `edit(summary)` applied."""
    where.mkdir()
    summary = json.loads((run / "cv_summary.json").read_text())
    edit(summary)
    (where / "cv_summary.json").write_text(json.dumps(summary))
    return where


def test_runs_on_other_folds_are_refused_and_a_missing_fold_is_named(tmp_path):
    other_draw = edited_copy(
        SWA, tmp_path / "other_draw", lambda s: s["folds"][1].update(held_out_items=1600)
    )
    with pytest.raises(
        CVError, match="fold 1 held out 1680 items in cv_best_balanced_swa and 1600 in other_draw"
    ):
        compare(load_side(SWA, "last"), load_side(other_draw, "last"))
    other_k = edited_copy(SWA, tmp_path / "other_k", lambda s: s.update(k=4))
    with pytest.raises(CVError, match="k=5 folds and other_k k=4"):
        compare(load_side(SWA, "last"), load_side(other_k, "last"))
    four = edited_copy(SWA_REVERB, tmp_path / "four", lambda s: s["folds"].pop(3))
    result = compare(load_side(SWA, "last"), load_side(four, "last"))
    assert [row["fold"] for row in result["folds"]] == [0, 1, 2, 4]
    assert result["folds_left_out"] == {"3": "not scored in four"}
    # Per-class means over five folds and over four are not paired: left out, and the report says so.
    assert result["per_class_recall_mean"] == {}
    assert "Per-class recall: not compared" in format_compare_markdown(result, "t")


def test_the_command_line_names_what_is_wrong(run_cli, tmp_path):
    missing = tmp_path / "no_run"
    result = run_cli("cv", f"compare=[{SWA},{missing}]", f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2 and f"no cv summary at {missing}:" in result.stderr
    assert "Traceback" not in result.stderr
    one = run_cli("cv", f"compare=[{SWA}]", f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert one.returncode == 2 and "compare takes two finished cv runs" in one.stderr
    shutil.copy(SWA / "cv_folds.csv", tmp_path / "not_a_summary.json")
    bad = run_cli("cv", f"compare=[{SWA},{tmp_path / 'not_a_summary.json'}]", cwd=tmp_path)
    assert bad.returncode == 2 and "is not a cv summary" in bad.stderr
