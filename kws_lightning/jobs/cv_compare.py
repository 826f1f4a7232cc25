"""`cv compare=[A,B]`: is recipe B better than recipe A on unseen speakers? Two finished cv runs (or
ensembles) on the same folds, compared fold by fold.

Each side is a cv out_dir, or its `cv_summary.json` (an ensemble's summary, or a copy kept elsewhere such
as `experiments/cv_*/`). The runs must hold the same folds: same k, and every fold compared held out the
same number of items and speakers (different data roots, k or fold seeds are refused, since their
differences would be meaningless). The figure is the paired difference B - A of held-out accuracy per
fold, with its mean, std, 95 % t interval and how many folds went up; a fold scored on one side only is
left out and named. Also the difference of the accuracy pooled over all compared items and, when both runs
scored the same folds, of each class's mean recall. Reads summaries only: nothing is trained or scored."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kws_lightning.jobs.cv_folds import CVError
from kws_lightning.jobs.cv_summary import (
    CONFIDENCE,
    describe,
    fig,
    over_folds_header,
    pooled_accuracy,
    stat_line,
    table_lines,
    write_summary,
)

SUMMARY_FILE = "cv_summary.json"
WEIGHT_CHOICES = ("last", "best")
# Which per-fold column holds a run's held-out accuracy (and its count of correct items), by weights.
ACCURACY_COLUMNS = {"last": ("acc_last", "correct_last"), "best": ("acc_best_ckpt", "correct_best_ckpt")}
ENSEMBLE_COLUMNS = ("acc_ensemble", "correct_ensemble")
COLUMNS = (
    "fold",
    "held_out_items",
    "held_out_speakers",
    "acc_a",
    "acc_b",
    "b_minus_a",
    "correct_a",
    "correct_b",
)


@dataclass
class Side:
    """One run of the comparison: its name, summary file, which figure is read, and its folds' rows."""

    name: str
    path: Path
    figure: str
    k: int
    rows: dict[int, dict[str, Any]]
    per_class: dict[str, float | None]


def summary_path(given: str | Path) -> Path:
    """A cv out_dir or a summary JSON -> the summary JSON; a clear error when there is none."""
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / SUMMARY_FILE
    if not path.is_file():
        raise CVError(
            f"compare: no cv summary at {path}: give a finished cv out_dir (it holds {SUMMARY_FILE}; "
            "`python -m kws_lightning.cv ... aggregate_only=true` writes it) or the summary JSON itself"
        )
    return path


def load_side(given: str | Path, weights: str) -> Side:
    """Read one side: a plain cv run's `weights` figure, or an ensemble's own figure."""
    path = summary_path(given)
    try:
        summary = json.loads(path.read_text())
        k = int(summary["k"])
        folds = summary["folds"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CVError(f"compare: {path} is not a cv summary ({error}); give a cv out_dir") from None
    is_ensemble = "ensemble" in summary
    accuracy, correct = ENSEMBLE_COLUMNS if is_ensemble else ACCURACY_COLUMNS[weights]
    recall_key = "ensemble" if is_ensemble else weights
    rows = {}
    for row in folds:
        if accuracy not in row:
            raise CVError(f"compare: {path} has no `{accuracy}` column in its folds; is it a cv summary?")
        rows[int(row["fold"])] = {
            "held_out_items": int(row["held_out_items"]),
            "held_out_speakers": int(row["held_out_speakers"]),
            "accuracy": float(row[accuracy]),
            "correct": int(row[correct]),
        }
    per_class = {
        label: entry.get(recall_key) for label, entry in (summary.get("per_class_recall_mean") or {}).items()
    }
    name = path.parent.name if path.name == SUMMARY_FILE else path.stem
    figure = "ensemble" if is_ensemble else f"{weights} weights"
    return Side(name=name, path=path, figure=figure, k=k, rows=rows, per_class=per_class)


def common_folds(a: Side, b: Side) -> tuple[list[int], dict[int, str]]:
    """The folds both sides scored (checked to hold the same draw) and why the others are left out."""
    if a.k != b.k:
        raise CVError(f"compare: {a.name} has k={a.k} folds and {b.name} k={b.k}: not the same folds")
    common, left_out = [], {}
    for fold in range(a.k):
        row_a, row_b = a.rows.get(fold), b.rows.get(fold)
        if row_a is None or row_b is None:
            left_out[fold] = f"not scored in {a.name if row_a is None else b.name}"
            continue
        for key in ("held_out_items", "held_out_speakers"):
            if row_a[key] != row_b[key]:
                raise CVError(
                    f"compare: fold {fold} held out {row_a[key]} {key.split('_')[-1]} in {a.name} and "
                    f"{row_b[key]} in {b.name}: the runs do not share their folds (another data.root, k or "
                    "data.fold_seed?); compare runs of the same data and folds"
                )
        common.append(fold)
    if not common:
        raise CVError(f"compare: {a.name} and {b.name} have no fold scored in both")
    return common, left_out


def compare(a: Side, b: Side) -> dict[str, Any]:
    """The paired comparison B - A over the folds both scored."""
    common, left_out = common_folds(a, b)
    rows = []
    for fold in common:
        row_a, row_b = a.rows[fold], b.rows[fold]
        rows.append(
            {
                "fold": fold,
                "held_out_items": row_a["held_out_items"],
                "held_out_speakers": row_a["held_out_speakers"],
                "acc_a": row_a["accuracy"],
                "acc_b": row_b["accuracy"],
                "b_minus_a": row_b["accuracy"] - row_a["accuracy"],
                "correct_a": row_a["correct"],
                "correct_b": row_b["correct"],
            }
        )
    diffs = [row["b_minus_a"] for row in rows]
    pooled = pooled_accuracy(rows, {"a": "correct_a", "b": "correct_b"})
    # The summaries hold per-class means over each run's own folds: comparable only when both scored the
    # same folds, else left out rather than shown unpaired.
    per_class: dict[str, dict[str, float | None]] = {}
    same_folds = set(a.rows) == set(b.rows) == set(common)
    for label in a.per_class if same_folds else []:
        ra, rb = a.per_class.get(label), b.per_class.get(label)
        per_class[label] = {"a": ra, "b": rb, "b_minus_a": None if ra is None or rb is None else rb - ra}
    return {
        "k": a.k,
        "confidence": CONFIDENCE,
        "a": {"name": a.name, "summary": str(a.path), "figure": a.figure},
        "b": {"name": b.name, "summary": str(b.path), "figure": b.figure},
        "folds_compared": common,
        "folds_left_out": {str(f): why for f, why in left_out.items()},
        "acc_a": describe([row["acc_a"] for row in rows]),
        "acc_b": describe([row["acc_b"] for row in rows]),
        "b_minus_a": describe(diffs),
        "folds_b_higher": sum(d > 0 for d in diffs),
        "folds_equal": sum(d == 0 for d in diffs),
        "folds_b_lower": sum(d < 0 for d in diffs),
        "pooled": {**pooled, "b_minus_a": pooled["b"] - pooled["a"]},
        "per_class_recall_mean": per_class,
        "folds": rows,
    }


def verdict(result: Mapping[str, Any]) -> str:
    """One sentence: is the difference's 95 % interval clear of zero?"""
    diff = result["b_minus_a"]
    a, b = result["a"]["name"], result["b"]["name"]
    if diff["ci95"] is None:
        return f"{b} - {a}: {diff['mean'] * 100:+.2f} points on one fold; no interval from one fold."
    lo, hi = (100 * v for v in diff["ci95"])
    text = f"{b} - {a}: {diff['mean'] * 100:+.2f} points (95 % interval {lo:+.2f} to {hi:+.2f}), "
    text += f"higher in {result['folds_b_higher']} of {len(result['folds'])} folds: "
    if lo > 0:
        return text + f"{b} is better on unseen speakers."
    if hi < 0:
        return text + f"{b} is worse on unseen speakers."
    return text + "no difference shown by these folds."


def format_compare_markdown(result: Mapping[str, Any], title: str) -> str:
    a, b = result["a"], result["b"]
    lines = [f"# {title}", "", f"A = {a['name']} ({a['figure']}; {a['summary']})"]
    lines += [f"B = {b['name']} ({b['figure']}; {b['summary']})", ""]
    lines += table_lines(
        ["fold", "held-out items", "speakers", "A", "B", "B - A"],
        (
            [str(row["fold"]), str(row["held_out_items"]), str(row["held_out_speakers"])]
            + [fig(row["acc_a"]), fig(row["acc_b"]), f"{row['b_minus_a']:+.4f}"]
            for row in result["folds"]
        ),
    )
    lines += over_folds_header(result["confidence"]) + [
        stat_line("A, held-out acc", result["acc_a"]),
        stat_line("B, held-out acc", result["acc_b"]),
        stat_line("paired difference B - A", result["b_minus_a"], signed=True),
    ]
    pooled = result["pooled"]
    lines += [
        "",
        f"Pooled over {pooled['items']} held-out items: A {fig(pooled['a'])}, B {fig(pooled['b'])} "
        f"({pooled['b_minus_a'] * 100:+.2f} points).",
        "",
        verdict(result),
    ]
    if not result["per_class_recall_mean"]:
        lines += ["", "Per-class recall: not compared (the runs scored different folds)."]
    else:
        lines += ["", "Per-class recall, mean over each run's folds:", ""]
        rows = (
            [label, fig(e["a"]), fig(e["b"]), "-" if e["b_minus_a"] is None else f"{e['b_minus_a']:+.4f}"]
            for label, e in result["per_class_recall_mean"].items()
        )
        lines += table_lines(["class", "A", "B", "B - A"], rows, label_column=True)
    for fold, why in result["folds_left_out"].items():
        lines.append(f"- fold {fold} left out: {why}")
    return "\n".join(lines) + "\n"


def run_compare(cfg: DictConfig) -> int:
    """`compare=[A,B]`: print the comparison and write it to `<out_dir>/cv_compare.{json,md}` and
    `cv_compare_folds.csv` (names no cv run uses, so out_dir may be one of the runs compared)."""
    runs = list(cfg.compare)
    if len(runs) != 2:
        raise CVError(f"compare takes two finished cv runs, compare=[A,B]; got {len(runs)}: {runs}")
    weights = str(cfg.get("compare_weights", "last"))
    if weights not in WEIGHT_CHOICES:
        raise CVError(f"compare_weights={weights}: choose one of {', '.join(WEIGHT_CHOICES)}")
    a, b = (load_side(run, weights) for run in runs)
    result = compare(a, b)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"Paired comparison over {len(result['folds'])} folds: {b.name} - {a.name}"
    print(write_summary(result, out_dir, title, COLUMNS, format_compare_markdown, stem="cv_compare"))
    print(f"written: {out_dir}/cv_compare.json, cv_compare_folds.csv, cv_compare.md")
    return 0
