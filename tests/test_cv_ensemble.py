"""Cross-validated ensembles (`python -m kws_lightning.cv ensemble=[RUN,...]`, issue 16): fold by fold, the
members' fold checkpoints averaged and scored on the fold's held-out draw, nothing trained. One tiny k=2 cv
run is trained (as tests/test_cv.py trains it); the second member is that run with perturbed weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_cv import TINY
from training_helpers import check_ok

from kws_lightning.jobs.cv_folds import CVError
from kws_lightning.jobs.cv_scores import fold_checkpoints
from kws_lightning.utils.job_result import read_job_result, write_job_result

K = 2
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(synthetic_overrides: list[str], run_cli, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two finished k=2 cv runs: `one` trained by cv, `two` its copy with other weights and wall times
    (each fold's wall time: one 100 + fold s, two 1000 + fold s)."""
    work = Path(tmp_path_factory.mktemp("cv_ensemble"))
    one = work / "one"
    args = [*synthetic_overrides, *TINY, f"k={K}", f"jobs={K}", f"out_dir={one}"]
    check_ok(run_cli("cv", *args, cwd=work, env=ENV, timeout=300))
    two = work / "two"
    shutil.copytree(one, two)
    generator = torch.Generator().manual_seed(0)
    for fold in range(K):
        set_wall_time(one / f"fold_{fold}", 100.0 + fold)
        folder = two / f"fold_{fold}"
        set_wall_time(folder, 1000.0 + fold)
        for path in (folder / "checkpoints").glob("*.ckpt"):
            perturb(path, generator)
    return {"work": work, "one": one, "two": two, "cache_dir": synthetic_cache(synthetic_overrides)}


def synthetic_cache(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("paths.cache_dir="))


def set_wall_time(folder: Path, seconds: float) -> None:
    """Give a fold a known training time, its best checkpoint named in its own folder (a copied run)."""
    result = read_job_result(folder / "job_result.json")
    result.wall_time_s = seconds
    if result.best_checkpoint:
        result.best_checkpoint = str(folder / "checkpoints" / Path(result.best_checkpoint).name)
    write_job_result(folder, result)


def perturb(path: Path, generator: torch.Generator) -> None:
    """Another model of the same fold: every float weight moved by noise of half its spread."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for value in checkpoint["state_dict"].values():
        if value.is_floating_point() and value.numel() > 1:
            value.add_(torch.randn(value.shape, generator=generator) * 0.5 * value.std())
    torch.save(checkpoint, path)


def ensemble_cfg(
    members: list[Path], out_dir: Path, cache_dir: str, weights: str = "last", tta: bool = False
):
    """cv's composed config as the ensemble reads it."""
    return OmegaConf.create(
        {
            "ensemble": [str(m) for m in members],
            "ensemble_weights": weights,
            "tta": tta,
            "tta_options": {"shift_ms": 100.0, "gains_db": [-6.0, 6.0]},
            "out_dir": str(out_dir),
            "k": 5,
            "threads": 1,
            "score_batch_size": 64,
            "score_device": "cpu",
            "paths": {"cache_dir": cache_dir},
        }
    )


def run_in_process(
    members: list[Path], out_dir: Path, cache_dir: str, weights: str = "last", tta: bool = False
) -> dict:
    from kws_lightning.jobs.cv_ensemble import run_ensemble

    assert run_ensemble(ensemble_cfg(members, out_dir, cache_dir, weights, tta), []) == 0
    return json.loads((out_dir / "cv_summary.json").read_text())


def test_an_ensemble_of_one_run_scores_as_that_run(runs, tmp_path):
    own = json.loads((runs["one"] / "cv_summary.json").read_text())["folds"]
    for weights, column in (("last", "acc_last"), ("best", "acc_best_ckpt")):
        summary = run_in_process([runs["one"]], tmp_path / weights, runs["cache_dir"], weights)
        assert summary["folds_scored"] == [0, 1] and summary["ensemble"]["weights"] == weights
        for row, reference in zip(summary["folds"], own, strict=True):
            assert row["held_out_items"] == reference["held_out_items"]
            assert row["acc_ensemble"] == pytest.approx(reference[column], abs=1e-12)
            assert row["acc_one"] == row["acc_ensemble"] and row["ensemble_minus_one"] == 0.0
        assert summary["train_time_s"]["total"] == pytest.approx(100.0 + 101.0)


def by_hand(members: list[Path], fold: int, cache_dir: str, tta: Any = None) -> tuple[float, list[float]]:
    """Accuracy of the mean of the members' last.ckpt posteriors, each member loaded on its own."""
    from kws_lightning.eval import datamodule_test_set, score
    from kws_lightning.inference import Predictor

    probs, targets = [], None
    for member in members:
        folder = member / f"fold_{fold}"
        last = fold_checkpoints(folder, read_job_result(folder / "job_result.json"))["last"]
        predictor = Predictor.from_checkpoints(str(last), "cpu")
        eval_set = datamodule_test_set(predictor, cache_dir, 64, 0, None, "testing")
        member_probs, member_targets = score(predictor, eval_set, tta)
        assert targets is None or np.array_equal(targets, member_targets)
        probs.append(member_probs)
        targets = member_targets
    alone = [float((p.argmax(axis=1) == targets).mean()) for p in probs]
    return float((np.mean(probs, axis=0).argmax(axis=1) == targets).mean()), alone


def test_an_ensemble_of_two_averages_posteriors_sums_times_and_reruns_from_cache(runs, run_cli, capsys):
    out_dir = runs["work"] / "ens_one_two"
    members = [runs["one"], runs["two"]]
    command = [f"ensemble=[{members[0]},{members[1]}]", f"out_dir={out_dir}"]
    first = check_ok(run_cli("cv", *command, cwd=runs["work"], env=ENV, timeout=240))
    assert first.count(": scored: held-out acc ensemble") == K
    summary = json.loads((out_dir / "cv_summary.json").read_text())
    assert summary["folds_missing"] == {} and list(summary["ensemble"]["members"]) == ["one", "two"]
    for row in summary["folds"]:
        expected, (alone_one, alone_two) = by_hand(members, row["fold"], runs["cache_dir"])
        assert row["acc_ensemble"] == pytest.approx(expected, abs=1e-12)
        assert row["acc_one"] == pytest.approx(alone_one, abs=1e-12)
        assert row["acc_two"] == pytest.approx(alone_two, abs=1e-12)
        assert row["ensemble_minus_two"] == pytest.approx(expected - alone_two)
        # The ensemble's training time: both members' wall times of the fold, added.
        assert row["train_time_s"] == pytest.approx(100.0 + 1000.0 + 2 * row["fold"])
    # The perturbed member is another model: the comparison is not trivially zero everywhere.
    assert any(row["acc_one"] != row["acc_two"] for row in summary["folds"])
    diffs = [row["ensemble_minus_one"] for row in summary["folds"]]
    assert summary["ensemble_minus_member"]["one"]["mean"] == pytest.approx(np.mean(diffs))
    assert summary["ensemble_minus_member"]["one"]["std"] == pytest.approx(np.std(diffs, ddof=1))
    assert summary["train_time_s"]["total"] == pytest.approx(1100.0 + 1102.0)
    markdown = (out_dir / "cv_summary.md").read_text()
    assert (
        "sum of its members' training wall times" in markdown
        and "paired difference ensemble - two" in markdown
    )
    assert (out_dir / "cv_folds.csv").read_text().splitlines()[0].startswith("fold,held_out_items")

    # Run again: every fold from its cache (keyed by the members' checkpoints), the same figures.
    capsys.readouterr()
    again = run_in_process(members, out_dir, runs["cache_dir"])
    assert capsys.readouterr().out.count(": cached scores: held-out acc ensemble") == K
    assert again["folds"] == summary["folds"]


def test_tta_scores_every_member_with_test_time_augmentation_and_is_cached_apart(runs, tmp_path):
    from kws_lightning.inference import TTAConfig
    from kws_lightning.jobs.cv_run import run_cv

    plain = run_in_process([runs["one"], runs["two"]], tmp_path / "ens", runs["cache_dir"])
    # Same out_dir: the plain scores are cached there, TTA must not reuse them.
    tta = run_in_process([runs["one"], runs["two"]], tmp_path / "ens", runs["cache_dir"], tta=True)
    assert tta["ensemble"]["tta"] == {"shift_ms": 100.0, "gains_db": [-6.0, 6.0]}
    options = TTAConfig(shift_ms=100.0, gains_db=(-6.0, 6.0))
    for row in tta["folds"]:
        expected, (alone_one, alone_two) = by_hand(
            [runs["one"], runs["two"]], row["fold"], runs["cache_dir"], options
        )
        assert row["acc_ensemble"] == pytest.approx(expected, abs=1e-12)
        assert (row["acc_one"], row["acc_two"]) == pytest.approx((alone_one, alone_two), abs=1e-12)
    # TTA changes the posteriors: some member figure moves (the perturbed model's, at least).
    assert [r["acc_two"] for r in tta["folds"]] != [r["acc_two"] for r in plain["folds"]]
    assert "test-time augmentation" in (tmp_path / "ens" / "cv_summary.md").read_text()
    # A training cv run refuses it: TTA is a way of scoring, not of training.
    with pytest.raises(CVError, match="tta=true applies to scoring finished runs"):
        run_cv(OmegaConf.create({"ensemble": None, "tta": True}), ["tta=true"])


def test_runs_cut_into_other_folds_are_refused(runs, run_cli, tmp_path):
    from kws_lightning.jobs.cv_ensemble import run_ensemble

    # Another k: a run with three fold folders.
    three = tmp_path / "three"
    shutil.copytree(runs["one"], three)
    shutil.copytree(three / "fold_1", three / "fold_2")
    with pytest.raises(CVError, match=rf"{three} has 3 folds, {runs['one']} has 2"):
        run_ensemble(ensemble_cfg([runs["one"], three], tmp_path / "out", runs["cache_dir"]), [])
    # Same k, but fold_1 holds fold 0's model: named, with the data.fold it was trained with.
    swapped = tmp_path / "swapped"
    shutil.copytree(runs["two"], swapped)
    shutil.copy(runs["two"] / "fold_0/checkpoints/last.ckpt", swapped / "fold_1/checkpoints/last.ckpt")
    cfg = ensemble_cfg([runs["one"], swapped], tmp_path / "out", runs["cache_dir"])
    with pytest.raises(CVError, match=r"swapped/fold_1/checkpoints/last.ckpt was trained with data.fold=0"):
        run_ensemble(cfg, [])
    # Nothing is trained: a training override is refused, and so is a trained run as out_dir.
    with pytest.raises(CVError, match="drop it"):
        run_ensemble(cfg, ["experiment=best"])
    with pytest.raises(CVError, match="holds trained cv folds"):
        run_ensemble(ensemble_cfg([runs["two"]], runs["one"], runs["cache_dir"]), [])
    # From the command line: exit 2 and the message, no traceback.
    result = run_cli(
        "cv", f"ensemble=[{runs['one']},{three}]", f"out_dir={tmp_path / 'cli'}", cwd=tmp_path, env=ENV
    )
    assert result.returncode == 2 and f"error: {three} has 3 folds" in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_pairs_a_run_with_an_ensemble_fold_by_fold(runs, run_cli, tmp_path):
    """`cv compare=[A,B]` reads two summaries; its B - A per fold is what the ensemble scored on its own
    (ensemble - member over the same clips), from the command line."""
    ens = run_in_process([runs["one"], runs["two"]], tmp_path / "ens", runs["cache_dir"])
    out_dir = tmp_path / "cmp"
    stdout = check_ok(
        run_cli(
            "cv", f"compare=[{runs['one']},{tmp_path / 'ens'}]", f"out_dir={out_dir}", cwd=tmp_path, env=ENV
        )
    )
    result = json.loads((out_dir / "cv_compare.json").read_text())
    assert result["a"]["figure"] == "last weights" and result["b"]["figure"] == "ensemble"
    assert [row["fold"] for row in result["folds"]] == list(range(K))
    for row, ens_row in zip(result["folds"], ens["folds"], strict=True):
        assert row["b_minus_a"] == pytest.approx(ens_row["ensemble_minus_one"], abs=1e-12)
    assert result["b_minus_a"]["mean"] == pytest.approx(ens["ensemble_minus_member"]["one"]["mean"])
    assert result["b_minus_a"]["std"] == pytest.approx(ens["ensemble_minus_member"]["one"]["std"])
    assert "paired difference B - A" in stdout and "ens - one:" in stdout
    # Its own file names: the compared runs' summaries in out_dir are not overwritten.
    assert not (out_dir / "cv_summary.json").exists() and (out_dir / "cv_compare_folds.csv").is_file()
