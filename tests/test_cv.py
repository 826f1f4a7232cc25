"""Cross-validation (`python -m kws_lightning.cv`, issue 16): speaker-disjoint folds, the fold bookkeeping
(resume, skip, failures, folds trained elsewhere), the figures over folds, and one real run on synthetic
speech that a second run re-uses without retraining."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from audio_trees import DEV_DATA
from training_helpers import check_ok

from kws_lightning.data.index import assign_cv_fold, index_training_layout
from kws_lightning.jobs.cv_folds import (
    BUSY,
    DONE,
    RESUME,
    RETRY,
    START,
    CVError,
    check_same_training,
    fold_command,
    fold_state,
    split_overrides,
)
from kws_lightning.jobs.cv_launch import FoldJob, child_env, run_folds
from kws_lightning.jobs.cv_summary import describe, summarize, t_quantile, write_summary
from kws_lightning.utils.job_result import make_result, read_job_result, write_job_result

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def check_folds(root: Path, k: int) -> None:
    """Every training + validation speaker held out in exactly one of the k folds; testing-list clips never
    used; held-out, validation and training speakers disjoint within each fold."""
    plain = index_training_layout(root, KEYWORDS).clips
    assert set(plain["split"]) == {"training", "validation", "testing"}
    pool = plain[plain["split"] != "testing"]
    test_list = set(plain.loc[plain["split"] == "testing", "rel"])
    held_out_of: dict[str, int] = {}
    for fold in range(k):
        clips = index_training_layout(root, KEYWORDS, fold=fold, num_folds=k).clips
        assert sorted(clips["rel"]) == sorted(pool["rel"])  # every pool clip once, no test-list clip
        assert not test_list & set(clips["rel"])
        speakers = {split: set(group) for split, group in clips.groupby("split")["speaker"]}
        assert set(speakers) == {"training", "validation", "testing"}, f"fold {fold}: {set(speakers)}"
        assert not speakers["testing"] & speakers["training"]
        assert not speakers["testing"] & speakers["validation"]
        assert not speakers["validation"] & speakers["training"]
        for speaker in speakers["testing"]:
            assert speaker not in held_out_of, (
                f"{speaker} held out in folds {held_out_of[speaker]} and {fold}"
            )
            held_out_of[speaker] = fold
    assert set(held_out_of) == set(pool["speaker"])
    assert set(held_out_of.values()) == set(range(k))


def test_folds_are_speaker_disjoint_and_cover_every_speaker(synthetic_root):
    for k in (2, 3):
        check_folds(synthetic_root, k)


@pytest.mark.skipif(not DEV_DATA.is_dir(), reason=f"the real dev set is not at {DEV_DATA} (KWS_DEV_DATA)")
def test_folds_on_the_real_dev_set():
    check_folds(DEV_DATA, 5)


def test_fold_assignment_is_deterministic_and_ignores_file_order(synthetic_root):
    clips = index_training_layout(synthetic_root, KEYWORDS).clips
    first = assign_cv_fold(clips, 1, 3, 10.0)
    again = assign_cv_fold(clips.copy(), 1, 3, 10.0)
    pd.testing.assert_frame_equal(first, again)
    shuffled = assign_cv_fold(clips.sample(frac=1.0, random_state=7).reset_index(drop=True), 1, 3, 10.0)
    assert dict(zip(shuffled["rel"], shuffled["split"], strict=True)) == dict(
        zip(first["rel"], first["split"], strict=True)
    )
    # A fold is about a tenth validation and a k-th held out (hash shares, on ~40 speakers: loose bounds).
    speakers = first.groupby("speaker")["split"].first().value_counts(normalize=True)
    assert 0.15 < speakers["testing"] < 0.55


# ---- figures over folds -------------------------------------------------------------------------------


def fake_scores(best: float, last: float, items: int, recalls: dict[str, tuple[float, float]]) -> dict:
    """A cv_scores.json record with the given accuracies (correct counts rounded from them)."""

    def weights(acc: float, which: int) -> dict:
        per_class = {label: {"recall": r[which]} for label, r in recalls.items()}
        return {"accuracy": acc, "correct": round(acc * items), "per_class": per_class}

    return {
        "labels": list(recalls),
        "held_out_items": items,
        "held_out_speakers": items // 10,
        "weights": {"best": weights(best, 0), "last": weights(last, 1)},
    }


def test_t_quantiles_match_the_table():
    # Two-sided 95 % critical values from any t table.
    for dof, value in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert t_quantile(dof) == pytest.approx(value, abs=1e-3)


def test_summary_figures_on_known_inputs(tmp_path):
    folds = {
        0: fake_scores(0.90, 0.91, 200, {"yes": (1.0, 0.5), "no": (0.5, 0.5)}),
        1: fake_scores(0.92, 0.92, 100, {"yes": (0.8, 0.7), "no": (0.6, None)}),
        2: fake_scores(0.94, 0.97, 100, {"yes": (0.9, 0.9), "no": (0.7, 0.9)}),
    }
    summary = summarize(4, folds, {0: 0.95, 1: 0.96, 2: None}, {3: "failed: boom"})
    best = summary["acc_best_ckpt"]
    # By hand: mean 0.92, deviations -0.02, 0, 0.02 -> variance 0.0008 / 2 = 0.0004, std 0.02;
    # half width t(0.975, 2) * 0.02 / sqrt(3) with t = 4.302653.
    assert best["mean"] == pytest.approx(0.92)
    assert best["std"] == pytest.approx(0.02)
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert best["ci95"] == pytest.approx([0.92 - half, 0.92 + half], abs=1e-6)
    # Paired differences 0.01, 0.00, 0.03: mean 0.0133, std sqrt(((-1/3)^2 + (4/3)^2 + (5/3)^2) / 2) / 100.
    diff = summary["last_minus_best"]
    assert diff["mean"] == pytest.approx(0.04 / 3)
    std = math.sqrt(((1 / 3) ** 2 + (4 / 3) ** 2 + (5 / 3) ** 2) / 2) / 100
    assert diff["std"] == pytest.approx(std)
    assert diff["half_width"] == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-5)
    # Pooled: (180 + 92 + 94) / 400 best, (182 + 92 + 97) / 400 last.
    assert summary["pooled"] == {"items": 400, "acc_best_ckpt": 366 / 400, "acc_last": 371 / 400}
    # Per class: the mean over folds of each recall, a fold without one (None) left out.
    assert summary["per_class_recall_mean"]["yes"]["best"] == pytest.approx(0.9)
    assert summary["per_class_recall_mean"]["no"]["last"] == pytest.approx(0.7)
    assert summary["val_acc_best"]["n"] == 2 and summary["val_acc_best"]["mean"] == pytest.approx(0.955)
    assert summary["folds_scored"] == [0, 1, 2] and summary["folds_missing"] == {"3": "failed: boom"}

    markdown = write_summary(summary, tmp_path)
    assert "fold 3: failed: boom" in markdown and "| 0.9200 | 0.0200 |" in markdown
    table = pd.read_csv(tmp_path / "cv_folds.csv")
    assert table["acc_last"].tolist() == [0.91, 0.92, 0.97]
    assert json.loads((tmp_path / "cv_summary.json").read_text())["acc_last"]["n"] == 3


def test_describe_with_one_fold_has_no_interval():
    one = describe([0.9])
    assert one["mean"] == 0.9 and one["std"] is None and one["ci95"] is None
    assert describe([])["mean"] is None


# ---- fold bookkeeping -------------------------------------------------------------------------------


def test_cv_owns_fold_keys_and_passes_the_rest_on():
    given = ["experiment=best", "k=3", "jobs=2", "data.root=/x", "threads=1", "out_dir=/o", "seed=1"]
    assert split_overrides(given) == ["experiment=best", "data.root=/x", "seed=1"]
    for owned in ("data.fold=1", "+data.num_folds=3", "ckpt_path=last", "hparams_search=x"):
        with pytest.raises(CVError, match="drop it"):
            split_overrides(["experiment=best", owned])
    command = fold_command(["experiment=best", "data.root=/x"], 2, 5, Path("/o/fold_2"), resume=False)
    assert command[1:] == [
        "-m",
        "kws_lightning.train",
        "experiment=best",
        "data.root=/x",
        "data.fold=2",
        "data.num_folds=5",
        "hydra.run.dir=/o/fold_2",
    ]
    assert fold_command([], 2, 5, Path("/o/fold_2"), resume=True)[-1] == "ckpt_path=auto"


def fake_fold(out_dir: Path, fold: int, status: str | None, last_ckpt: bool = True) -> Path:
    folder = out_dir / f"fold_{fold}"
    (folder / "checkpoints").mkdir(parents=True)
    if last_ckpt:
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if status:
        write_job_result(folder, make_result(status, "val/acc_best", {"val/acc_best": 0.5}, error="why"))
    return folder


def test_fold_states_skip_done_and_resume_interrupted(tmp_path):
    fake_fold(tmp_path, 0, "ok")
    fake_fold(tmp_path, 1, "interrupted")
    fake_fold(tmp_path, 2, "failed")
    fake_fold(tmp_path, 3, None)  # killed: a last.ckpt, no job_result.json
    states = {fold: fold_state(tmp_path, fold) for fold in range(5)}
    assert {f: s.state for f, s in states.items()} == {0: DONE, 1: RESUME, 2: RETRY, 3: RESUME, 4: START}
    assert "interrupted" in states[1].detail and "last.ckpt" in states[1].detail
    assert states[0].result.metrics == {"val/acc_best": 0.5}


def test_interrupted_fold_is_resumed_with_ckpt_path_auto(tmp_path):
    """The launcher runs the resume command, reads this attempt's job_result.json (never the old one)."""
    folder = fake_fold(tmp_path, 1, "interrupted")
    assert fold_state(tmp_path, 1).state == RESUME
    # A stand-in for train: records the arguments it got and an ok job_result.json, like a resumed fold.
    script = (
        "import sys, json, pathlib;"
        "from kws_lightning.utils.job_result import make_result, write_job_result;"
        "d = pathlib.Path(next(a.split('=', 1)[1] for a in sys.argv if a.startswith('hydra.run.dir=')));"
        "(d / 'args.json').write_text(json.dumps(sys.argv[1:]));"
        "write_job_result(d, make_result('ok', 'val/acc_best', {'val/acc_best': 0.75}))"
    )
    command = fold_command(["seed=1"], 1, 3, folder, resume=True)
    command[1:3] = ["-c", script]
    outcomes, stopped = run_folds([FoldJob(1, command, folder, tmp_path / "fold_1.log")], 1, child_env(1))
    assert stopped is None and [(o.fold, o.status, o.exit_code) for o in outcomes] == [(1, "ok", 0)]
    args = json.loads((folder / "args.json").read_text())
    assert args == ["seed=1", "data.fold=1", "data.num_folds=3", f"hydra.run.dir={folder}", "ckpt_path=auto"]
    assert read_job_result(folder / "job_result.json").metrics == {"val/acc_best": 0.75}
    state = fold_state(tmp_path, 1)
    assert state.state == DONE


def test_a_failed_fold_is_reported_and_the_others_go_on(tmp_path):
    fail = [sys.executable, "-c", "import sys; print('ValueError: data.root has no clips'); sys.exit(1)"]
    ok = [sys.executable, "-c", "print('fine')"]
    jobs = [
        FoldJob(0, fail, tmp_path / "fold_0", tmp_path / "fold_0.log"),
        FoldJob(1, ok, tmp_path / "fold_1", tmp_path / "fold_1.log"),
    ]
    outcomes, stopped = run_folds(jobs, 1, child_env(1))
    by_fold = {o.fold: o for o in outcomes}
    assert stopped is None and set(by_fold) == {0, 1}
    assert by_fold[0].status == "failed" and by_fold[0].exit_code == 1
    assert "ValueError: data.root has no clips" in by_fold[0].error
    # Exit 0 without a job_result.json is not a finished training either.
    assert by_fold[1].status == "failed" and "without writing job_result.json" in by_fold[1].error
    assert "=== cv" in (tmp_path / "fold_0.log").read_text()


def test_ctrl_c_is_passed_on_once_and_no_new_fold_starts(tmp_path):
    """SIGINT to cv: the running fold gets it (and records itself interrupted), the next fold never starts."""
    script = (
        "import signal, sys, time, pathlib;"
        "from kws_lightning.utils.job_result import make_result, write_job_result;"
        "d = pathlib.Path(sys.argv[1]);"
        "signal.signal(signal.SIGINT, lambda s, f: (write_job_result(d, make_result("
        "'interrupted', None, error='stopped')), sys.exit(130)));"
        "(d / 'ready').write_text('1');"
        "time.sleep(60)"
    )
    jobs = [
        FoldJob(
            f,
            [sys.executable, "-c", script, str(tmp_path / f"fold_{f}")],
            tmp_path / f"fold_{f}",
            tmp_path / f"fold_{f}.log",
        )
        for f in (0, 1)
    ]

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not (tmp_path / "fold_0" / "ready").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    outcomes, stopped = run_folds(jobs, 1, child_env(1))
    assert stopped == signal.SIGINT
    assert [(o.fold, o.status, o.exit_code) for o in outcomes] == [(0, "interrupted", 130)]
    assert not (tmp_path / "fold_1.log").exists()
    assert fold_state(tmp_path, 0).state == RESUME


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="needs /proc (Linux)")
def test_a_fold_trained_by_another_process_is_left_alone(tmp_path):
    folder = fake_fold(tmp_path, 0, "interrupted")
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "kws_lightning.train",
            f"hydra.run.dir={folder}",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while fold_state(tmp_path, 0).state != BUSY and time.monotonic() < deadline:
            time.sleep(0.05)
        state = fold_state(tmp_path, 0)
        assert state.state == BUSY and str(other.pid) in state.detail
    finally:
        other.kill()
        other.wait()
    assert fold_state(tmp_path, 0).state == RESUME


def test_a_fold_trained_with_other_overrides_is_refused(tmp_path):
    folder = tmp_path / "fold_0"
    (folder / ".hydra").mkdir(parents=True)
    recorded = ["experiment=best", "data.root=/data/sc", "data.fold=0", "data.num_folds=5"]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in recorded))
    # The same training, resumed and without a progress bar: the same fold.
    check_same_training(folder, [*recorded, "ckpt_path=auto", "trainer.enable_progress_bar=false"])
    with pytest.raises(CVError, match=r"experiment: best there, res8 now"):
        check_same_training(folder, ["experiment=res8", *recorded[1:]])
    with pytest.raises(CVError, match=r"seed: \(not set\) there, 3 now"):
        check_same_training(folder, [*recorded, "seed=3"])


def test_summary_lists_folds_that_cannot_be_scored_or_did_not_finish(tmp_path):
    from kws_lightning.jobs.cv_run import CVSettings, aggregate

    fake_fold(tmp_path, 0, "ok")  # job_result ok, but no best-*.ckpt beside last.ckpt
    fake_fold(tmp_path, 2, "interrupted")
    settings = CVSettings(
        k=3,
        jobs=1,
        threads=1,
        out_dir=tmp_path,
        aggregate_only=True,
        folds=[0, 1, 2],
        train_overrides=[],
        cache_dir=str(tmp_path / "cache"),
        score_batch_size=64,
        score_device="cpu",
    )
    states = [fold_state(tmp_path, fold) for fold in range(3)]
    assert aggregate(settings, states, {}) == 1
    summary = json.loads((tmp_path / "cv_summary.json").read_text())
    assert summary["folds_scored"] == [] and set(summary["folds_missing"]) == {"0", "1", "2"}
    assert "not scored: FileNotFoundError" in summary["folds_missing"]["0"]
    assert "best-*.ckpt" in summary["folds_missing"]["0"]
    assert summary["folds_missing"]["1"] == "not finished: not started"
    assert "interrupted" in summary["folds_missing"]["2"]
    assert "Missing 3 of 3 folds" in (tmp_path / "cv_summary.md").read_text()


# ---- the command ----------------------------------------------------------------------------------------

TINY = [
    "experiment=quickstart",
    "model.n_feature_maps=8",
    "data.batch_size=32",
    "trainer.max_steps=4",
    "trainer.max_epochs=1",
    "scheduler.warmup_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.tensorboard_extras=null",
]


def test_cv_cli_trains_scores_summarises_and_a_rerun_reuses_the_folds(synthetic_overrides, run_cli, tmp_path):
    out_dir = tmp_path / "cv"
    args = [*synthetic_overrides, *TINY, "k=2", "jobs=1", f"out_dir={out_dir}"]
    env = {"OMP_NUM_THREADS": "1"}
    first = check_ok(run_cli("cv", *args, cwd=tmp_path, env=env, timeout=240))
    summary = json.loads((out_dir / "cv_summary.json").read_text())
    print(first[first.index("# Cross-validation") :])  # the summary, for the report (pytest -s)
    assert summary["k"] == 2 and summary["folds_scored"] == [0, 1] and summary["folds_missing"] == {}
    assert (out_dir / "cv_summary.md").read_text() in first
    for fold in (0, 1):
        assert f"fold {fold}: started" in first and (out_dir / f"fold_{fold}.log").is_file()
        result = read_job_result(out_dir / f"fold_{fold}" / "job_result.json")
        assert result.status == "ok"
        overrides = (out_dir / f"fold_{fold}" / ".hydra" / "overrides.yaml").read_text()
        assert f"data.fold={fold}" in overrides and "data.num_folds=2" in overrides
        row = summary["folds"][fold]
        # Scored in cv through eval's code = what trainer.test measured on the same held-out fold
        # (quickstart tests its best-validation checkpoint).
        assert row["acc_best_ckpt"] == pytest.approx(result.metrics["test/acc"], abs=1e-6)
        assert row["val_acc_best"] == pytest.approx(result.metrics["val/acc_best"])
        assert row["held_out_items"] > 0 and row["held_out_speakers"] > 0
    accs = [row["acc_last"] for row in summary["folds"]]
    assert summary["acc_last"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["acc_last"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert summary["train_overrides"] == [f"paths.log_dir={tmp_path / 'logs'}", *synthetic_overrides, *TINY]
    assert len(pd.read_csv(out_dir / "cv_folds.csv")) == 2

    checkpoints = sorted((out_dir).glob("fold_*/checkpoints/*.ckpt"))
    stamps = {path: path.stat().st_mtime_ns for path in checkpoints}
    second = check_ok(run_cli("cv", *args, cwd=tmp_path, env=env, timeout=240))
    assert second.count("skipped, already trained") == 2 and "started" not in second
    assert second.count("cached scores") == 2
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == stamps
    assert json.loads((out_dir / "cv_summary.json").read_text())["folds"] == summary["folds"]


def test_folds_trains_only_the_folds_asked_for_and_a_later_run_completes(
    synthetic_overrides, run_cli, tmp_path
):
    out_dir = tmp_path / "cv"
    args = [*synthetic_overrides, *TINY, "k=2", "jobs=1", f"out_dir={out_dir}"]
    env = {"OMP_NUM_THREADS": "1"}
    first = check_ok(run_cli("cv", *args, "folds=[1]", cwd=tmp_path, env=env, timeout=240))
    summary = json.loads((out_dir / "cv_summary.json").read_text())
    assert summary["folds_scored"] == [1]
    assert summary["folds_missing"] == {"0": "not trained: not in folds=[1]"}
    assert "fold 0: not in folds=[1]: left for another run" in first and "fold 1: started" in first
    assert not (out_dir / "fold_0").exists()
    # The same command without folds= trains the other one and keeps fold 1 as it was.
    second = check_ok(run_cli("cv", *args, cwd=tmp_path, env=env, timeout=240))
    assert "fold 1: skipped, already trained" in second and "fold 0: started" in second
    full = json.loads((out_dir / "cv_summary.json").read_text())
    assert full["folds_scored"] == [0, 1] and full["folds_missing"] == {}
    assert full["folds"][1] == summary["folds"][0]
    bad = run_cli("cv", *args, "folds=[1,2]", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "folds=[1, 2]: give distinct fold numbers from 0 to 1 (k=2)" in bad.stderr


def test_cv_cli_refuses_bad_commands(run_cli, tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    result = run_cli("cv", "experiment=quickstart", "k=1", cwd=tmp_path, env=env)
    assert result.returncode == 2 and "k=1: cross-validation needs" in result.stderr
    result = run_cli("cv", "experiment=best", "data.root=/nowhere/sc", cwd=tmp_path, env=env)
    assert result.returncode == 2 and "data.root=/nowhere/sc is not a folder" in result.stderr
    assert not any(tmp_path.glob("logs/cv/*/fold_*")), "nothing trained"
