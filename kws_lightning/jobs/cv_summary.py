"""`cv`'s figures over folds: per-fold table, mean, standard deviation (ddof 1), 95 % interval of the mean
(Student's t, k-1 degrees of freedom), the paired difference final weights - best checkpoint, per-class
accuracy (recall) averaged over folds and the accuracy pooled over every held-out item. Written as
`cv_summary.json`, `cv_folds.csv` and `cv_summary.md`."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIDENCE = 0.95


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
    labels = folds[order[0]]["labels"] if order else []
    per_class: dict[str, dict[str, Any]] = {}
    for label in labels:
        entry = {}
        for weights in ("best", "last"):
            recalls = [folds[i]["weights"][weights]["per_class"][label]["recall"] for i in order]
            entry[weights] = describe([r for r in recalls if r is not None])["mean"]
        per_class[label] = entry
    items = sum(row["held_out_items"] for row in rows)
    pooled = {
        "items": items,
        "acc_best_ckpt": sum(row["correct_best_ckpt"] for row in rows) / items if items else None,
        "acc_last": sum(row["correct_last"] for row in rows) / items if items else None,
    }
    vals = [row["val_acc_best"] for row in rows if row["val_acc_best"] is not None]
    return {
        "k": k,
        "folds_scored": order,
        "folds_missing": {str(i): reason for i, reason in sorted(missing.items())},
        "confidence": CONFIDENCE,
        "acc_best_ckpt": describe([row["acc_best_ckpt"] for row in rows]),
        "acc_last": describe([row["acc_last"] for row in rows]),
        "last_minus_best": describe([row["last_minus_best"] for row in rows]),
        "val_acc_best": describe(vals),
        "pooled": pooled,
        "per_class_recall_mean": per_class,
        "folds": rows,
    }


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _stat_line(name: str, stats: Mapping[str, Any], signed: bool = False) -> str:
    if stats["mean"] is None:
        return f"| {name} | - | - | - | 0 |"
    fmt = "+.4f" if signed else ".4f"
    interval = "-" if stats["ci95"] is None else f"[{stats['ci95'][0]:{fmt}}, {stats['ci95'][1]:{fmt}}]"
    return f"| {name} | {stats['mean']:{fmt}} | {_f(stats['std'])} | {interval} | {stats['n']} |"


def format_markdown(summary: Mapping[str, Any], title: str = "Cross-validation") -> str:
    lines = [f"# {title}", ""]
    lines += [
        "| fold | held-out items | speakers | val acc (best) | held-out acc, best ckpt "
        "| held-out acc, last | last - best |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["folds"]:
        lines.append(
            f"| {row['fold']} | {row['held_out_items']} | {row['held_out_speakers']} | "
            f"{_f(row['val_acc_best'])} | {_f(row['acc_best_ckpt'])} | {_f(row['acc_last'])} | "
            f"{row['last_minus_best']:+.4f} |"
        )
    lines += [
        "",
        f"Over folds (std ddof 1; {int(summary['confidence'] * 100)} % interval of the mean, t, k-1 dof):",
        "",
        "| figure | mean | std | 95 % interval | folds |",
        "|---|---:|---:|---:|---:|",
        _stat_line("held-out acc, best-validation checkpoint", summary["acc_best_ckpt"]),
        _stat_line("held-out acc, final weights (last.ckpt)", summary["acc_last"]),
        _stat_line("paired difference last - best", summary["last_minus_best"], signed=True),
        _stat_line("validation acc (best)", summary["val_acc_best"]),
    ]
    pooled = summary["pooled"]
    lines += [
        "",
        f"Pooled over all {pooled['items']} held-out items: best checkpoint {_f(pooled['acc_best_ckpt'])}, "
        f"final weights {_f(pooled['acc_last'])}.",
    ]
    if summary["per_class_recall_mean"]:
        lines += ["", "Per-class accuracy (recall), mean over folds:", "", "| class | best ckpt | last |"]
        lines.append("|---|---:|---:|")
        for label, entry in summary["per_class_recall_mean"].items():
            lines.append(f"| {label} | {_f(entry['best'])} | {_f(entry['last'])} |")
    missing = summary["folds_missing"]
    lines += [""]
    if missing:
        lines.append(f"Missing {len(missing)} of {summary['k']} folds (not in the figures above):")
        lines += [f"- fold {fold}: {reason}" for fold, reason in missing.items()]
    else:
        lines.append(f"All {summary['k']} folds scored.")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(summary: Mapping[str, Any], out_dir: Path, title: str = "Cross-validation") -> str:
    """cv_summary.json, cv_folds.csv and cv_summary.md in `out_dir`; returns the Markdown."""
    _write(out_dir / "cv_summary.json", json.dumps(summary, indent=2) + "\n")
    columns = [
        "fold",
        "held_out_items",
        "held_out_speakers",
        "val_acc_best",
        "acc_best_ckpt",
        "acc_last",
        "last_minus_best",
        "correct_best_ckpt",
        "correct_last",
    ]
    tmp = out_dir / f".cv_folds.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summary["folds"])
    os.replace(tmp, out_dir / "cv_folds.csv")
    markdown = format_markdown(summary, title)
    _write(out_dir / "cv_summary.md", markdown)
    return markdown
