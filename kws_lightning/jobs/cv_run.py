"""`cv` from start to end: check the command, train the folds that are not done (in parallel processes),
score each finished fold with both weights, and write the summary. Returns the exit status."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from kws_lightning.jobs.cv_folds import (
    BUSY,
    DONE,
    START,
    CVError,
    FoldState,
    check_same_training,
    fold_command,
    fold_dir,
    fold_log,
    fold_state,
    override_key,
    recorded_overrides,
    split_overrides,
)
from kws_lightning.utils.job_result import OK

log = logging.getLogger(__name__)
LOCK_FILE = ".cv.lock"


@dataclass
class CVSettings:
    k: int
    jobs: int
    threads: int
    out_dir: Path
    aggregate_only: bool
    folds: list[int]  # the folds this run trains (all k unless `folds=` says)
    train_overrides: list[str]
    cache_dir: str
    score_batch_size: int
    score_device: str


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def settings_from(cfg: DictConfig, task_overrides: list[str]) -> CVSettings:
    """cv's settings from its composed config and command line; a bad one is a `CVError` naming the fix."""
    k = cfg.k
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise CVError(f"k={k}: cross-validation needs an integer number of folds k >= 2 (e.g. k=5)")
    threads = cfg.threads
    if not isinstance(threads, int) or threads < 1:
        raise CVError(f"threads={threads}: CPU threads per fold must be an integer >= 1")
    jobs = cfg.jobs if cfg.jobs is not None else max(1, available_cores() // threads)
    if not isinstance(jobs, int) or jobs < 1:
        raise CVError(
            f"jobs={cfg.jobs}: folds trained at a time must be an integer >= 1 (or null: cores // threads)"
        )
    folds = chosen_folds(cfg.get("folds"), k)
    train_overrides = split_overrides(task_overrides)
    aggregate_only = bool(cfg.aggregate_only)
    if not aggregate_only:
        check_data_root(cfg)
        check_train_config(cfg, k)
    return CVSettings(
        k=k,
        jobs=jobs,
        threads=threads,
        out_dir=Path(str(cfg.out_dir)).expanduser().resolve(),
        aggregate_only=aggregate_only,
        folds=folds,
        train_overrides=train_overrides,
        cache_dir=str(cfg.paths.cache_dir),
        score_batch_size=int(cfg.score_batch_size),
        score_device=str(cfg.score_device),
    )


def chosen_folds(given: Any, k: int) -> list[int]:
    """`folds=`: null -> every fold; else distinct integers in 0..k-1, sorted."""
    if given is None:
        return list(range(k))
    values = list(given) if OmegaConf.is_list(given) or isinstance(given, (list, tuple)) else [given]
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < k]
    if bad or not values or len(set(values)) != len(values):
        raise CVError(
            f"folds={given}: give distinct fold numbers from 0 to {k - 1} (k={k}), e.g. folds=[0,1], "
            "or leave it out to train every fold"
        )
    return sorted(values)


def check_data_root(cfg: DictConfig) -> None:
    """The recipe's data set must be there before k trainings start (synthetic data is generated)."""
    fix = "pass data.root=DIR, a Speech Commands folder in its training layout"
    try:
        root = cfg.data.root
    except MissingMandatoryValue:
        raise CVError(f"data.root is not set: {fix}") from None
    for extra in cfg.data.get("extra_training_roots") or []:
        if not Path(str(extra)).expanduser().is_dir():
            raise CVError(
                f"data.extra_training_roots names {extra}, which is not a folder (from {Path.cwd()}): fix "
                "the path, write it (python -m kws_lightning.data.synthetic out=DIR), or drop it"
            )
    if root is None:
        if cfg.data.get("synthetic") is None:
            raise CVError(f"data.root is null and the data config is not synthetic: {fix}")
        return
    if not Path(str(root)).expanduser().is_dir():
        raise CVError(f"data.root={root} is not a folder (from {Path.cwd()}): {fix}")


def check_train_config(cfg: DictConfig, k: int) -> None:
    """The fold's training config, validated as `train` would (kws_lightning/config_check.py), so a bad value
    fails once, in a second, instead of in k subprocesses."""
    from kws_lightning.config_check import ConfigError, validate_train_config
    from kws_lightning.jobs.cv_folds import CV_KEYS

    train_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key not in CV_KEYS])
    OmegaConf.update(train_cfg, "data.fold", 0, force_add=True)
    OmegaConf.update(train_cfg, "data.num_folds", k, force_add=True)
    try:
        validate_train_config(train_cfg)
    except ConfigError as error:
        raise CVError(str(error)) from None


def run_cv(cfg: DictConfig, task_overrides: list[str]) -> int:
    """Train what is missing, score, summarise. 0: every fold asked for (`folds`, default all) in the
    summary; 1: some missing; 128 + signal when stopped by SIGINT/SIGTERM (run the same command again to
    resume). With `ensemble=[RUN,...]`: score that ensemble of finished cv runs instead (`cv_ensemble.py`),
    training nothing. With `compare=[A,B]`: the paired comparison of two finished cv runs
    (`cv_compare.py`), reading their summaries only."""
    if cfg.get("compare"):
        from kws_lightning.jobs.cv_compare import run_compare

        if cfg.get("ensemble"):
            raise CVError(
                "compare= and ensemble= are separate jobs: score the ensemble first, then compare its out_dir"
            )
        return run_compare(cfg)
    if cfg.get("ensemble"):
        from kws_lightning.jobs.cv_ensemble import run_ensemble

        return run_ensemble(cfg, task_overrides)
    if cfg.get("tta"):
        raise CVError(
            "tta=true applies to scoring finished runs: train the folds without it, then "
            "`python -m kws_lightning.cv ensemble=[OUT_DIR] tta=true out_dir=OTHER_DIR` scores them with TTA"
        )
    settings = settings_from(cfg, task_overrides)
    out_dir = settings.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    states = [fold_state(out_dir, fold) for fold in range(settings.k)]
    failed: dict[int, str] = {}
    if not settings.aggregate_only:
        with _exclusive(out_dir):
            stopped = _train(settings, states, failed)
        if stopped is not None:
            name = signal.Signals(stopped).name
            print(f"cv stopped by {name}: run the same command again to resume the folds")
            return 128 + stopped
        states = [fold_state(out_dir, fold) for fold in range(settings.k)]
    return aggregate(settings, states, failed)


class _exclusive:
    """One cv at a time trains in an out_dir (a lock file held while the folds train)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE

    def __enter__(self) -> None:
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise CVError(
                f"another cv is training in {self.path.parent}: wait for it, or use another out_dir"
            ) from None

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _train(settings: CVSettings, states: list[FoldState], failed: dict[int, str]) -> int | None:
    """Run the folds that need training; returns the stopping signal, if any."""
    from kws_lightning.jobs.cv_launch import FoldJob, child_env, run_folds
    from kws_lightning.utils.job_result import FAILED

    jobs = []
    for state in states:
        if state.fold not in settings.folds and state.state != DONE:
            print(f"fold {state.fold}: not in folds={settings.folds}: left for another run")
            continue
        if state.state == BUSY:
            print(f"fold {state.fold}: left alone, {state.detail}; run cv again when it has finished")
            continue
        expected = [*settings.train_overrides, f"data.fold={state.fold}", f"data.num_folds={settings.k}"]
        check_same_training(state.folder, expected)
        if state.state == DONE:
            print(f"fold {state.fold}: skipped, already trained ({state.detail})")
            continue
        resume = state.state != START
        print(f"fold {state.fold}: {state.detail}: {'resuming (ckpt_path=auto)' if resume else 'training'}")
        command = fold_command(settings.train_overrides, state.fold, settings.k, state.folder, resume)
        jobs.append(FoldJob(state.fold, command, state.folder, fold_log(settings.out_dir, state.fold)))
    if not jobs:
        return None
    parallel = min(settings.jobs, len(jobs))
    print(f"training {len(jobs)} fold(s), {parallel} at a time, {settings.threads} thread(s) each")
    outcomes, stopped = run_folds(jobs, parallel, child_env(settings.threads))
    for outcome in outcomes:
        if outcome.status == FAILED:
            failed[outcome.fold] = f"failed: {outcome.error} (log {outcome.log_path})"
    return stopped


def aggregate(settings: CVSettings, states: list[FoldState], failed: dict[int, str]) -> int:
    """Score the finished folds (or read their cached scores) and write the summary; 0 when every fold is
    in it, 1 when some are missing (each with its reason in the summary)."""
    from kws_lightning.jobs.cv_scores import score_fold
    from kws_lightning.jobs.cv_summary import summarize, write_summary

    scores: dict[int, dict[str, Any]] = {}
    val_acc: dict[int, float | None] = {}
    missing: dict[int, str] = {}
    for state in states:
        if state.state != DONE or state.result is None or state.result.status != OK:
            asked = state.fold in settings.folds
            missing[state.fold] = failed.get(state.fold) or (
                f"not finished: {state.detail}" if asked else f"not trained: not in folds={settings.folds}"
            )
            continue
        try:
            record = score_fold(
                state.folder,
                state.fold,
                settings.k,
                state.result,
                settings.cache_dir,
                settings.score_batch_size,
                settings.score_device,
                settings.threads,
            )
        except Exception as error:  # one fold's problem: reported, the others are still summarised
            missing[state.fold] = f"not scored: {type(error).__name__}: {error}"
            print(f"fold {state.fold}: not scored: {error}")
            continue
        how = "cached scores" if record["cached"] else "scored"
        best, last = record["weights"]["best"]["accuracy"], record["weights"]["last"]["accuracy"]
        print(f"fold {state.fold}: {how}: held-out acc best ckpt {best:.4f}, last {last:.4f}")
        scores[state.fold] = record
        val_acc[state.fold] = (state.result.metrics or {}).get("val/acc_best")
    summary = summarize(settings.k, scores, val_acc, missing)
    # What the folds were trained with: as recorded by the first scored fold (aggregate_only is often run
    # without the training overrides), less the fold's own keys.
    recorded = recorded_overrides(fold_dir(settings.out_dir, min(scores))) if scores else None
    fold_keys = ("data.fold", "data.num_folds", "ckpt_path")
    trained_with = [o for o in recorded or settings.train_overrides if override_key(o) not in fold_keys]
    summary.update(out_dir=str(settings.out_dir), train_overrides=trained_with)
    markdown = write_summary(
        summary, settings.out_dir, f"Cross-validation, {settings.k} folds: {settings.out_dir.name}"
    )
    print(markdown)
    print(f"written: {settings.out_dir}/cv_summary.json, cv_folds.csv, cv_summary.md")
    return 0 if not any(fold in missing for fold in settings.folds) else 1
