"""Clip-level DET / ROC per keyword, one vs rest: the keyword's posterior as the score, its clips as
positives, every other clip (other keywords, unknown, silence) as negatives. Written by `eval` beside the
confusion matrix so the clip view and the stream view (`stream_eval`) sit side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kws_lightning.stream_bench.plots import plot_clip_det


def one_vs_rest(scores: np.ndarray, positive: np.ndarray) -> pd.DataFrame:
    """Every distinct threshold (a clip counts as detected when its score >= threshold), from the highest:
    threshold, miss_rate, false_alarm_rate (= 1 - true-positive rate, false-positive rate)."""
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order].astype(np.int64)
    true_pos, false_pos = np.cumsum(hits), np.cumsum(1 - hits)
    last = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]  # ties count together
    positives, negatives = max(int(hits.sum()), 1), max(int(len(hits) - hits.sum()), 1)
    return pd.DataFrame(
        {
            "threshold": np.r_[np.inf, ranked[last]],
            "miss_rate": np.r_[1.0, 1.0 - true_pos[last] / positives],
            "false_alarm_rate": np.r_[0.0, false_pos[last] / negatives],
        }
    )


def roc_auc(curve: pd.DataFrame) -> float:
    """Area under the ROC (true-positive vs false-positive rate), trapezoids between distinct thresholds."""
    return float(np.trapezoid(1.0 - curve["miss_rate"], curve["false_alarm_rate"]))


def equal_error_rate(curve: pd.DataFrame) -> float:
    """Where miss rate and false-alarm rate cross (the mean of the two at the closest point)."""
    gap = (curve["miss_rate"] - curve["false_alarm_rate"]).abs().to_numpy()
    row = curve.iloc[int(gap.argmin())]
    return float((row["miss_rate"] + row["false_alarm_rate"]) / 2)


def write_clip_det(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str], out_dir: Path) -> dict:
    """det_clips.csv (keyword, threshold, miss_rate, false_alarm_rate), det_clips.json (ROC AUC and
    equal error rate per keyword) and det_clips.png; returns the JSON's content."""
    curves, summary = [], {}
    for index, keyword in enumerate(labels):
        if index < 2:  # silence / unknown are not detected
            continue
        positive = targets == index
        if not positive.any() or positive.all():
            summary[keyword] = {"roc_auc": None, "eer": None, "positives": int(positive.sum())}
            continue
        curve = one_vs_rest(probs[:, index].astype(np.float64), positive)
        summary[keyword] = {
            "roc_auc": round(roc_auc(curve), 5),
            "eer": round(equal_error_rate(curve), 5),
            "positives": int(positive.sum()),
        }
        curves.append(curve.assign(keyword=keyword))
    table = (
        pd.concat(curves)[["keyword", "threshold", "miss_rate", "false_alarm_rate"]]
        if curves
        else pd.DataFrame(columns=["keyword", "threshold", "miss_rate", "false_alarm_rate"])
    )
    table.to_csv(out_dir / "det_clips.csv", index=False)
    (out_dir / "det_clips.json").write_text(json.dumps(summary, indent=2))
    plot_clip_det(table, out_dir / "det_clips.png")
    return summary
