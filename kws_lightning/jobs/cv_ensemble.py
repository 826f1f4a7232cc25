"""`cv ensemble=[RUN,...]`: score an ensemble of finished cv runs fold by fold, training nothing.

Fold i of the ensemble averages the posteriors (`inference.Predictor`) of every member's fold_i checkpoint
(last.ckpt, or the best-validation one with `ensemble_weights=best`), scored on fold i's held-out draw as
`cv_scores._score` scores a fold: rebuilt from the first member's data config; a member whose data config
differs must rebuild the same clips with the same targets (else an error). Each member is scored alone on
that same draw, so the paired difference ensemble - member is over identical clips. The ensemble's training
time is the sum of its members' wall times (job_result.json). With `tta=true` the ensemble and every member
are scored with test-time augmentation (`inference.TTAConfig`, `tta_options`), so an ensemble of one run
with and without it measures TTA on the same draws. Scores are cached in
`<out_dir>/fold_<i>/ensemble_scores.json`, keyed by the member checkpoints' stamps (and the TTA options).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kws_lightning.jobs.cv_folds import DONE, CVError, fold_dir, fold_state, override_key, split_overrides
from kws_lightning.jobs.cv_scores import (
    checkpoint_fold,
    checkpoint_stamp,
    fold_checkpoints,
    held_out_facts,
    held_out_set,
    read_cached,
    weights_entry,
    write_cached,
)
from kws_lightning.jobs.cv_summary import (
    describe,
    fig,
    missing_lines,
    over_folds_header,
    per_class_lines,
    per_class_recall_mean,
    pooled_accuracy,
    stat_line,
    summary_head,
    table_lines,
    write_summary,
)
from kws_lightning.utils.job_result import FILENAME, OK

log = logging.getLogger(__name__)
ENSEMBLE_FILE = "ensemble_scores.json"
ENSEMBLE_VERSION = 1
ENSEMBLE = "ensemble"  # the ensemble's entry among the per-weights figures (members use their run names)
WEIGHT_CHOICES = ("last", "best")
TIME_NOTE = "sum of the members' training wall times (job_result.json wall_time_s) of the fold"
# Data settings that do not change which clips a held-out draw holds, nor their targets.
DRAW_NEUTRAL = (
    "cache_dir",
    "batch_size",
    "num_workers",
    "decode_threads",
    "verify_cache",
    "keep_caches",
    "report_dir",
    "download",
)


@dataclass
class Member:
    """One finished cv run of the ensemble: its folder's name and path."""

    name: str
    run_dir: Path


@dataclass
class EnsembleSettings:
    members: list[Member]
    k: int
    weights: str
    out_dir: Path
    cache_dir: str
    batch_size: int
    device: str
    threads: int
    # Test-time augmentation of every score (kws_lightning.inference.TTAConfig); None: plain clips.
    tta: Any = None


def run_folds_of(run_dir: Path) -> int:
    """k of a cv run: its fold_0..fold_{k-1} folders (a gap is an error naming the run)."""
    folds = sorted(int(p.name[5:]) for p in run_dir.glob("fold_*") if p.is_dir() and p.name[5:].isdigit())
    if not folds:
        raise CVError(f"{run_dir} has no fold_<i> folders: ensemble= takes the out_dir of finished cv runs")
    if folds != list(range(len(folds))):
        raise CVError(
            f"{run_dir} has folds {folds}, not fold_0..fold_{len(folds) - 1}: not the out_dir of one cv run"
        )
    return len(folds)


def ensemble_settings(cfg: DictConfig, task_overrides: list[str]) -> EnsembleSettings:
    """The ensemble command's settings; a bad one is a `CVError` naming the fix."""
    runs = cfg.ensemble
    runs = [runs] if isinstance(runs, str) else list(runs)
    if not runs:
        raise CVError("ensemble=[] names no run: ensemble=[RUN_DIR,RUN_DIR,...] (cv out_dirs)")
    extra = [o for o in split_overrides(task_overrides) if not override_key(o).startswith("paths.")]
    if extra:
        raise CVError(
            f"{extra}: ensemble= scores runs already trained, a training override changes nothing; drop it"
        )
    weights = str(cfg.ensemble_weights)
    if weights not in WEIGHT_CHOICES:
        raise CVError(f"ensemble_weights={weights}: choose one of {list(WEIGHT_CHOICES)}")
    out_dir = Path(str(cfg.out_dir)).expanduser().resolve()
    members: list[Member] = []
    for run in runs:
        run_dir = Path(str(run)).expanduser().resolve()
        if not run_dir.is_dir():
            raise CVError(f"ensemble member {run} is not a folder: give the out_dir of a finished cv run")
        if run_dir == out_dir:
            raise CVError(f"out_dir={out_dir} is a member of the ensemble: give another out_dir=DIR")
        if run_dir.name in {m.name for m in members} | {ENSEMBLE}:
            raise CVError(
                f"{run_dir}: two members named {run_dir.name!r}: give runs with distinct folder names"
            )
        members.append(Member(run_dir.name, run_dir))
    ks = {m.name: run_folds_of(m.run_dir) for m in members}
    k = ks[members[0].name]
    for member in members[1:]:
        if ks[member.name] != k:
            raise CVError(
                f"{member.run_dir} has {ks[member.name]} folds, {members[0].run_dir} has {k}: only runs "
                "with the same folds (same k) can be ensembled fold by fold"
            )
    given_k = [o for o in task_overrides if override_key(o) == "k"]
    if given_k and cfg.k != k:
        raise CVError(f"k={cfg.k}, but the members have {k} folds: drop k= (it is read from the runs)")
    if any((fold_dir(out_dir, f) / FILENAME).is_file() for f in range(k)):
        raise CVError(f"out_dir={out_dir} holds trained cv folds: give the ensemble its own out_dir=DIR")
    tta = None
    if cfg.get("tta"):
        from kws_lightning.inference import TTAConfig

        try:
            tta = TTAConfig.from_mapping(cfg.get("tta_options"))
        except ValueError as error:
            raise CVError(f"tta_options: {error}") from None
    return EnsembleSettings(
        members=members,
        k=k,
        weights=weights,
        out_dir=out_dir,
        cache_dir=str(cfg.paths.cache_dir),
        batch_size=int(cfg.score_batch_size),
        device=str(cfg.score_device),
        threads=int(cfg.threads),
        tta=tta,
    )


class FoldMissing(Exception):
    """A member's fold is not finished: the ensemble's fold is left out of the figures, with the reason."""


def member_fold(member: Member, fold: int, weights: str) -> tuple[Path, float | None]:
    """The member's fold checkpoint of `weights` and the fold's training wall time."""
    state = fold_state(member.run_dir, fold)
    if state.state != DONE or state.result is None or state.result.status != OK:
        raise FoldMissing(f"{member.name} fold {fold} not finished: {state.detail}")
    try:
        checkpoints = fold_checkpoints(state.folder, state.result)
    except FileNotFoundError as error:
        raise FoldMissing(f"{member.name} fold {fold}: {error}") from None
    return checkpoints[weights], state.result.wall_time_s


def score_ensemble_fold(settings: EnsembleSettings, fold: int) -> dict[str, Any]:
    """Fold `fold`'s ensemble and member scores (from the cache when the member checkpoints are unchanged)
    and its summed training time."""
    checkpoints, times = {}, {}
    for member in settings.members:
        checkpoints[member.name], times[member.name] = member_fold(member, fold, settings.weights)
    # A list: the members' order matters (the first member's data config gives the held-out draw).
    key = [[name, checkpoint_stamp(path)] for name, path in checkpoints.items()]
    if settings.tta is not None:  # appended only with TTA: plain scores cached before TTA existed stay valid
        key.append(["tta", asdict(settings.tta)])
    folder = fold_dir(settings.out_dir, fold)
    cache = folder / ENSEMBLE_FILE
    record = read_cached(cache, key, ENSEMBLE_VERSION)
    if record is None:
        folder.mkdir(parents=True, exist_ok=True)
        record = _score(settings, checkpoints, fold)
        record.update(version=ENSEMBLE_VERSION, fold=fold, weights_used=settings.weights, checkpoints=key)
        record["tta"] = None if settings.tta is None else asdict(settings.tta)
        write_cached(cache, record)
        record["cached"] = False
    # Times are read afresh (not cached): they are the members' records, not scores.
    known = [t for t in times.values() if t is not None]
    record["member_time_s"] = times
    record["train_time_s"] = sum(known) if len(known) == len(times) else None
    return record


def _score(settings: EnsembleSettings, checkpoints: Mapping[str, Path], fold: int) -> dict[str, Any]:
    import numpy as np

    from kws_lightning.checkpoints import CheckpointError
    from kws_lightning.eval import score
    from kws_lightning.inference import Predictor

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    names = list(checkpoints)
    try:
        ensemble = Predictor.from_checkpoints([str(checkpoints[n]) for n in names], settings.device)
    except CheckpointError as error:
        raise CVError(f"fold {fold}: {error}") from None
    datas = []
    for member, path, config in zip(settings.members, ensemble.paths, ensemble.configs, strict=True):
        fix = f"{member.run_dir} is not a {settings.k}-fold cv run with this fold layout"
        try:
            datas.append(checkpoint_fold(path, config, fold, settings.k, fix))
        except ValueError as error:
            raise CVError(str(error)) from None
    # A real data set is read through this command's cache (members trained elsewhere record other cache
    # folders; the cache is only a decoded copy of the clips); a synthetic one lives in its own cache_dir.
    cache_dir = (
        settings.cache_dir if datas[0].get("root") else str(datas[0].get("cache_dir") or settings.cache_dir)
    )
    eval_set = held_out_set(
        ensemble, {**datas[0], "cache_dir": cache_dir}, settings.cache_dir, settings.batch_size
    )
    probs, targets = score(ensemble, eval_set, settings.tta)
    record: dict[str, Any] = {"labels": list(ensemble.labels), "weights": {}}
    record["weights"][ENSEMBLE] = weights_entry(probs, targets, ensemble.labels)
    draw_differs = []
    for index, name in enumerate(names):
        alone = Predictor(
            [ensemble.models[index]],
            ensemble.labels,
            ensemble.sample_rate,
            ensemble.clip_samples,
            [ensemble.configs[index]],
            [ensemble.paths[index]],
        )
        if _draw_config(datas[index]) != _draw_config(datas[0]):
            # Another data config (e.g. other augmentation): its own draw must be the same clips and targets.
            draw_differs.append(name)
            own_data = {**datas[index], "cache_dir": cache_dir}
            own = held_out_set(alone, own_data, settings.cache_dir, settings.batch_size)
            own_targets = np.concatenate([batch["targets"].numpy() for batch in own.batches])
            if own.names != eval_set.names or not np.array_equal(own_targets, targets):
                raise CVError(
                    f"{checkpoints[name]}: its fold {fold} held-out draw differs from that of "
                    f"{checkpoints[names[0]]} (other clips or targets): the runs were not cut into the same "
                    "folds (same data.root, keywords, percentages and seed); they cannot be ensembled"
                )
        member_probs, member_targets = score(alone, eval_set, settings.tta)
        assert np.array_equal(member_targets, targets), "one eval set, one order of targets"
        record["weights"][name] = weights_entry(member_probs, targets, ensemble.labels)
    record.update(held_out_facts(eval_set))
    record.update(draw_from=names[0], draw_config_differs=draw_differs)
    return record


def _draw_config(data: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in DRAW_NEUTRAL}


def ensemble_row(fold: int, record: Mapping[str, Any], members: Sequence[str]) -> dict[str, Any]:
    """One row of the per-fold table: the ensemble's accuracy, each member's and the paired differences."""
    weights = record["weights"]
    row: dict[str, Any] = {
        "fold": fold,
        "held_out_items": record["held_out_items"],
        "held_out_speakers": record["held_out_speakers"],
        "acc_ensemble": weights[ENSEMBLE]["accuracy"],
        "correct_ensemble": weights[ENSEMBLE]["correct"],
    }
    for name in members:
        row[f"acc_{name}"] = weights[name]["accuracy"]
        row[f"ensemble_minus_{name}"] = weights[ENSEMBLE]["accuracy"] - weights[name]["accuracy"]
        row[f"correct_{name}"] = weights[name]["correct"]
    row["train_time_s"] = record["train_time_s"]
    return row


def summarize_ensemble(
    settings: EnsembleSettings, folds: Mapping[int, Mapping[str, Any]], missing: Mapping[int, str]
) -> dict[str, Any]:
    """The ensemble's figures over folds, in the shape of a cv summary plus the member comparisons."""
    names = [m.name for m in settings.members]
    order = sorted(folds)
    rows = [ensemble_row(i, folds[i], names) for i in order]
    times = [row["train_time_s"] for row in rows if row["train_time_s"] is not None]
    correct_of = {"acc_ensemble": "correct_ensemble", **{f"acc_{n}": f"correct_{n}" for n in names}}
    return {
        **summary_head(settings.k, order, missing),
        "ensemble": {
            "members": {m.name: str(m.run_dir) for m in settings.members},
            "weights": settings.weights,
            "averaging": "posteriors averaged (inference.Predictor)",
            "tta": None if settings.tta is None else asdict(settings.tta),
        },
        "acc_ensemble": describe([row["acc_ensemble"] for row in rows]),
        "acc_members": {n: describe([row[f"acc_{n}"] for row in rows]) for n in names},
        "ensemble_minus_member": {n: describe([row[f"ensemble_minus_{n}"] for row in rows]) for n in names},
        "train_time_s": {**describe(times), "total": sum(times), "note": TIME_NOTE},
        "pooled": pooled_accuracy(rows, correct_of),
        "per_class_recall_mean": per_class_recall_mean(folds, [ENSEMBLE, *names]),
        "draw": {
            str(i): {"from": folds[i]["draw_from"], "config_differs": folds[i]["draw_config_differs"]}
            for i in order
        },
        "folds": rows,
        "out_dir": str(settings.out_dir),
    }


def format_ensemble_markdown(summary: Mapping[str, Any], title: str) -> str:
    names = list(summary["ensemble"]["members"])
    weights = summary["ensemble"]["weights"]
    lines = [f"# {title}", ""]
    lines.append(
        f"Members ({weights} weights of each fold, posteriors averaged): "
        + ", ".join(f"{n} ({p})" for n, p in summary["ensemble"]["members"].items())
    )
    tta = summary["ensemble"].get("tta")
    if tta:
        lines.append(
            f"Every score (ensemble and members) with test-time augmentation: the clip, shifted by "
            f"±{tta['shift_ms']:g} ms, and at gains {list(tta['gains_db'])} dB, posteriors averaged."
        )
    lines += [""] + table_lines(
        ["fold", "held-out items", "ensemble", *names, "train time (s, sum)"],
        (
            [str(row["fold"]), str(row["held_out_items"]), f"{row['acc_ensemble']:.4f}"]
            + [f"{row[f'acc_{n}']:.4f}" for n in names]
            + ["-" if row["train_time_s"] is None else f"{row['train_time_s']:.0f}"]
            for row in summary["folds"]
        ),
    )
    lines += over_folds_header(summary["confidence"]) + [
        stat_line("held-out acc, ensemble", summary["acc_ensemble"])
    ]
    lines += [stat_line(f"held-out acc, {n} alone", summary["acc_members"][n]) for n in names]
    lines += [
        stat_line(f"paired difference ensemble - {n}", summary["ensemble_minus_member"][n], signed=True)
        for n in names
    ]
    time = summary["train_time_s"]
    lines += [
        "",
        f"Training time of the ensemble = the sum of its members' training wall times per fold "
        f"(job_result.json): mean {fig(time['mean'], 0)} s a fold, {time['total']:.0f} s over "
        f"{time['n']} folds.",
    ]
    pooled = summary["pooled"]
    alone = ", ".join(f"{n} {fig(pooled[f'acc_{n}'])}" for n in names)
    lines += [
        "",
        f"Pooled over all {pooled['items']} held-out items: ensemble {fig(pooled['acc_ensemble'])}; {alone}.",
    ]
    lines += per_class_lines(summary["per_class_recall_mean"], {ENSEMBLE: ENSEMBLE, **{n: n for n in names}})
    differs = sorted({n for d in summary["draw"].values() for n in d["config_differs"]})
    if differs:
        lines += [
            "",
            f"Held-out draw: {names[0]}'s data config. {differs} have another data config: their own draw "
            "was rebuilt and holds the same clips and targets (checked); every member is scored alone on "
            f"{names[0]}'s draw here.",
        ]
    lines += missing_lines(summary)
    return "\n".join(lines) + "\n"


def run_ensemble(cfg: DictConfig, task_overrides: list[str]) -> int:
    """Score the ensemble fold by fold and write the summary; 0 when every fold is in it, 1 otherwise."""
    settings = ensemble_settings(cfg, task_overrides)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    folds: dict[int, dict[str, Any]] = {}
    missing: dict[int, str] = {}
    for fold in range(settings.k):
        try:
            record = score_ensemble_fold(settings, fold)
        except FoldMissing as reason:
            missing[fold] = str(reason)
            print(f"fold {fold}: left out: {reason}")
            continue
        how = "cached scores" if record["cached"] else "scored"
        alone = ", ".join(
            f"{n} {record['weights'][n]['accuracy']:.4f}" for n in record["weights"] if n != ENSEMBLE
        )
        print(
            f"fold {fold}: {how}: held-out acc ensemble "
            f"{record['weights'][ENSEMBLE]['accuracy']:.4f} ({alone})"
        )
        folds[fold] = record
    summary = summarize_ensemble(settings, folds, missing)
    columns = list(summary["folds"][0]) if summary["folds"] else ["fold"]
    title = f"Cross-validated ensemble, {settings.k} folds: {settings.out_dir.name}"
    markdown = write_summary(summary, settings.out_dir, title, columns, format_ensemble_markdown)
    print(markdown)
    print(f"written: {settings.out_dir}/cv_summary.json, cv_folds.csv, cv_summary.md")
    return 0 if not missing else 1
