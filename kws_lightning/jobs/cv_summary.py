"""`cv`'s figures over folds: per-fold table, mean, standard deviation (ddof 1), 95 % interval of the mean
(Student's t, k-1 degrees of freedom), the paired difference final weights - best checkpoint, per-class
accuracy (recall) averaged over folds and the accuracy pooled over every held-out item. Written as
`cv_summary.json`, `cv_folds.csv` and `cv_summary.md`. The pieces (per class, pooled, table lines) are
shared with the ensemble summary (`cv_ensemble.py`)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIDENCE = 0.95
FOLD_COLUMNS = (
    "fold",
    "held_out_items",
    "held_out_speakers",
    "val_acc_best",
    "acc_best_ckpt",
    "acc_last",
    "last_minus_best",
    "correct_best_ckpt",
    "correct_last",
)


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t critical value (scipy is a dependency)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2.0, dof))


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, std (ddof 1) and the 95 % t interval of the mean; std and interval are None below 2 values."""
    values = [float(v) for v in values]
    n = len(values)
    out: dict[str, Any] = {"n": n, "mean": None, "std": None, "ci95": None, "half_width": None}
    if n == 0:
        return out
    mean = sum(values) / n
    out.update(mean=mean, min=min(values), max=max(values))
    if n >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(n - 1) * std / math.sqrt(n)
        out.update(std=std, half_width=half, ci95=[mean - half, mean + half])
    return out


def fold_row(fold: int, scores: Mapping[str, Any], val_acc_best: float | None) -> dict[str, Any]:
    """One row of the per-fold table from a fold's `cv_scores.json` record."""
    best, last = scores["weights"]["best"], scores["weights"]["last"]
    return {
        "fold": fold,
        "held_out_items": scores["held_out_items"],
        "held_out_speakers": scores["held_out_speakers"],
        "val_acc_best": val_acc_best,
        "acc_best_ckpt": best["accuracy"],
        "acc_last": last["accuracy"],
        "last_minus_best": last["accuracy"] - best["accuracy"],
        "correct_best_ckpt": best["correct"],
        "correct_last": last["correct"],
    }


def summarize(
    k: int,
    folds: Mapping[int, Mapping[str, Any]],
    val_acc: Mapping[int, float | None],
    missing: Mapping[int, str],
) -> dict[str, Any]:
    """The summary of the folds scored (`folds`: fold -> cv_scores record) and why the others are missing."""
    order = sorted(folds)
    rows = [fold_row(i, folds[i], val_acc.get(i)) for i in order]
    vals = [row["val_acc_best"] for row in rows if row["val_acc_best"] is not None]
    return {
        **summary_head(k, order, missing),
        "acc_best_ckpt": describe([row["acc_best_ckpt"] for row in rows]),
        "acc_last": describe([row["acc_last"] for row in rows]),
        "last_minus_best": describe([row["last_minus_best"] for row in rows]),
        "val_acc_best": describe(vals),
        "pooled": pooled_accuracy(rows, {"acc_best_ckpt": "correct_best_ckpt", "acc_last": "correct_last"}),
        "per_class_recall_mean": per_class_recall_mean(folds, ("best", "last")),
        "folds": rows,
    }


def summary_head(k: int, order: Sequence[int], missing: Mapping[int, str]) -> dict[str, Any]:
    """The keys every cv summary starts with: k, the folds scored and why the others are missing."""
    return {
        "k": k,
        "folds_scored": list(order),
        "folds_missing": {str(i): reason for i, reason in sorted(missing.items())},
        "confidence": CONFIDENCE,
    }


def per_class_recall_mean(
    folds: Mapping[int, Mapping[str, Any]], weights: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Each class's recall averaged over folds, per weights (a fold where it is undefined left out)."""
    order = sorted(folds)
    labels = folds[order[0]]["labels"] if order else []
    per_class: dict[str, dict[str, Any]] = {}
    for label in labels:
        entry = {}
        for name in weights:
            recalls = [folds[i]["weights"][name]["per_class"][label]["recall"] for i in order]
            entry[name] = describe([r for r in recalls if r is not None])["mean"]
        per_class[label] = entry
    return per_class


def pooled_accuracy(rows: Sequence[Mapping[str, Any]], correct_of: Mapping[str, str]) -> dict[str, Any]:
    """Accuracy over every held-out item of the rows: name -> sum of its `correct` column / items."""
    items = sum(row["held_out_items"] for row in rows)
    pooled: dict[str, Any] = {"items": items}
    for name, column in correct_of.items():
        pooled[name] = sum(row[column] for row in rows) / items if items else None
    return pooled


def fig(value: float | None, digits: int = 4) -> str:
    """A figure for a Markdown table; '-' when there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def table_lines(
    headers: Sequence[str], rows: Iterable[Sequence[str]], label_column: bool = False
) -> list[str]:
    """A Markdown table of figures: right-aligned columns (the first left-aligned with `label_column`)."""
    align = ["---" if label_column and i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def over_folds_header(confidence: float) -> list[str]:
    """The lines that open a summary's table of figures over folds."""
    return [
        "",
        f"Over folds (std ddof 1; {int(confidence * 100)} % interval of the mean, t, k-1 dof):",
        "",
        "| figure | mean | std | 95 % interval | folds |",
        "|---|---:|---:|---:|---:|",
    ]


def stat_line(name: str, stats: Mapping[str, Any], signed: bool = False) -> str:
    """One row of the over-folds table: mean, std, 95 % interval, folds."""
    if stats["mean"] is None:
        return f"| {name} | - | - | - | 0 |"
    fmt = "+.4f" if signed else ".4f"
    interval = "-" if stats["ci95"] is None else f"[{stats['ci95'][0]:{fmt}}, {stats['ci95'][1]:{fmt}}]"
    return f"| {name} | {stats['mean']:{fmt}} | {fig(stats['std'])} | {interval} | {stats['n']} |"


def format_markdown(summary: Mapping[str, Any], title: str = "Cross-validation") -> str:
    lines = [f"# {title}", ""]
    headers = ["fold", "held-out items", "speakers", "val acc (best)", "held-out acc, best ckpt"]
    headers += ["held-out acc, last", "last - best"]
    lines += table_lines(
        headers,
        (
            [str(row["fold"]), str(row["held_out_items"]), str(row["held_out_speakers"])]
            + [fig(row["val_acc_best"]), fig(row["acc_best_ckpt"]), fig(row["acc_last"])]
            + [f"{row['last_minus_best']:+.4f}"]
            for row in summary["folds"]
        ),
    )
    lines += over_folds_header(summary["confidence"]) + [
        stat_line("held-out acc, best-validation checkpoint", summary["acc_best_ckpt"]),
        stat_line("held-out acc, final weights (last.ckpt)", summary["acc_last"]),
        stat_line("paired difference last - best", summary["last_minus_best"], signed=True),
        stat_line("validation acc (best)", summary["val_acc_best"]),
    ]
    pooled = summary["pooled"]
    lines += [
        "",
        f"Pooled over all {pooled['items']} held-out items: "
        f"best checkpoint {fig(pooled['acc_best_ckpt'])}, "
        f"final weights {fig(pooled['acc_last'])}.",
    ]
    lines += per_class_lines(summary["per_class_recall_mean"], {"best": "best ckpt", "last": "last"})
    lines += missing_lines(summary)
    return "\n".join(lines) + "\n"


def per_class_lines(per_class: Mapping[str, Mapping[str, Any]], columns: Mapping[str, str]) -> list[str]:
    """The per-class recall table (`columns`: weights name -> header), after a blank line; none if empty."""
    if not per_class:
        return []
    rows = ([label, *(fig(entry[name]) for name in columns)] for label, entry in per_class.items())
    header = ["", "Per-class accuracy (recall), mean over folds:", ""]
    return header + table_lines(["class", *columns.values()], rows, label_column=True)


def missing_lines(summary: Mapping[str, Any]) -> list[str]:
    """Which folds are not in the figures and why (or that all are), after a blank line."""
    missing = summary["folds_missing"]
    if not missing:
        return ["", f"All {summary['k']} folds scored."]
    lines = ["", f"Missing {len(missing)} of {summary['k']} folds (not in the figures above):"]
    return lines + [f"- fold {fold}: {reason}" for fold, reason in missing.items()]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(
    summary: Mapping[str, Any],
    out_dir: Path,
    title: str = "Cross-validation",
    columns: Sequence[str] = FOLD_COLUMNS,
    formatter: Callable[[Mapping[str, Any], str], str] = format_markdown,
    stem: str = "cv_summary",
) -> str:
    """cv_summary.json, cv_folds.csv (`columns` of the summary's fold rows) and cv_summary.md (`formatter`)
    in `out_dir` (with another `stem`: STEM.json, STEM_folds.csv, STEM.md); returns the Markdown."""
    folds_name = "cv_folds.csv" if stem == "cv_summary" else f"{stem}_folds.csv"
    _write(out_dir / f"{stem}.json", json.dumps(summary, indent=2) + "\n")
    tmp = out_dir / f".{folds_name}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summary["folds"])
    os.replace(tmp, out_dir / folds_name)
    markdown = formatter(summary, title)
    _write(out_dir / f"{stem}.md", markdown)
    return markdown
