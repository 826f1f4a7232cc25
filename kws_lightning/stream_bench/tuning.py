"""Choose the detector's settings on validation streams: a grid of smoothing windows and suppression times,
each with a full threshold sweep, ranked by the mean (over SNRs) miss rate at the target false-alarm rate
(ties: the DET area). Optionally per-keyword thresholds, allotting the false-alarm budget where it buys
the most hits (a Lagrangian split of the pooled budget), kept only when they beat one shared threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product

import numpy as np

from kws_lightning.stream_bench.scoring import (
    DEFAULT_THRESHOLDS,
    Counts,
    count,
    curve_of,
    decide,
    det_auc,
    match,
    miss_at,
    smooth,
)
from kws_lightning.stream_bench.settings import DetectorSettings


@dataclass
class ScoredStream:
    """A stream's posteriors and ground truth, ready for any detector setting."""

    name: str
    times_ms: np.ndarray
    probs: np.ndarray
    truth: object  # pd.DataFrame
    hours: float


def counts_for(
    stream: ScoredStream, labels: Sequence[str], settings: DetectorSettings, smoothed: object = None
) -> tuple[Counts, object]:
    """Counts of one setting on one stream, and the matched detections."""
    smoothed = smoothed or smooth(
        stream.times_ms, stream.probs, settings.average_window_ms, settings.minimum_count
    )
    detections = decide(
        smoothed, labels, settings.detection_threshold, settings.suppression_ms, settings.keyword_thresholds
    )
    matched = match(detections, stream.truth)
    return count(matched, stream.truth, labels[2:], stream.hours), matched


def sweep(
    stream: ScoredStream,
    labels: Sequence[str],
    settings: DetectorSettings,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[tuple[float, Counts]]:
    """Counts at every threshold (per-keyword thresholds ignored), smoothing computed once."""
    smoothed = smooth(stream.times_ms, stream.probs, settings.average_window_ms, settings.minimum_count)
    out = []
    for threshold in thresholds:
        one = replace(settings, detection_threshold=float(threshold), keyword_thresholds={})
        out.append((float(threshold), counts_for(stream, labels, one, smoothed)[0]))
    return out


def pooled(sweeps: Sequence[Sequence[tuple[float, Counts]]]) -> list[tuple[float, Counts]]:
    """Sweeps of several streams (same thresholds) added into one."""
    out = list(sweeps[0])
    for other in sweeps[1:]:
        out = [(t, a + b) for (t, a), (_, b) in zip(out, other, strict=True)]
    return out


def tune(
    streams: Sequence[ScoredStream],
    labels: Sequence[str],
    average_windows_ms: Sequence[float] = (300, 500, 750, 1000),
    suppressions_ms: Sequence[float] = (250, 500, 1000, 1500),
    minimum_counts: Sequence[int] = (3,),
    target_fa_per_hour: float = 1.0,
    per_keyword: bool = False,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> tuple[DetectorSettings, list[dict]]:
    """The best settings on `streams` and the table of every grid point (for the report)."""
    table, best, best_key = [], None, None
    for window, suppression, minimum in product(average_windows_ms, suppressions_ms, minimum_counts):
        base = DetectorSettings(float(window), 0.7, float(suppression), int(minimum))
        sweeps = [sweep(s, labels, base, thresholds) for s in streams]
        misses = [miss_at(curve_of(one), target_fa_per_hour)[0] for one in sweeps]
        pool = pooled(sweeps)
        pool_curve = curve_of(pool)
        pool_miss, threshold = miss_at(pool_curve, target_fa_per_hour)
        area = float(np.mean([det_auc(curve_of(one)) for one in sweeps]))
        key = (float(np.mean(misses)), area)
        table.append(
            {
                "average_window_ms": window,
                "suppression_ms": suppression,
                "minimum_count": minimum,
                "mean_miss_rate": round(key[0], 4),
                "mean_det_auc": round(area, 4),
                "pooled_miss_rate": round(pool_miss, 4),
                "threshold": threshold,
            }
        )
        if best_key is None or key < best_key:
            # Never "off": when no threshold meets the target, the highest one below 1 (listen still hears).
            chosen = (
                threshold if np.isfinite(threshold) and threshold < 1 else max(t for t in thresholds if t < 1)
            )
            best, best_key = (replace(base, detection_threshold=float(chosen)), pool, pool_miss), key
    settings, pool, pool_miss = best
    if per_keyword:
        split = keyword_thresholds(pool, labels, target_fa_per_hour)
        candidate = replace(settings, keyword_thresholds=split)
        total = None
        for stream in streams:
            one = counts_for(stream, labels, candidate)[0]
            total = one if total is None else total + one
        miss = 1.0 - total.hits.sum() / max(total.positives.sum(), 1)
        fa_rate = total.false_alarms.sum() / total.hours
        table.append(
            {"per_keyword": split, "pooled_miss_rate": round(float(miss), 4), "fa_per_hour": fa_rate}
        )
        if fa_rate <= target_fa_per_hour and miss < pool_miss:
            settings = candidate
    return settings, table


def keyword_thresholds(
    pool: Sequence[tuple[float, Counts]], labels: Sequence[str], target_fa_per_hour: float
) -> dict[str, float]:
    """Per keyword the threshold minimising misses + lambda * false alarms, lambda the smallest on a grid
    whose summed false alarms fit the pooled budget (target x hours). Keywords are nearly independent at
    these rates, so one shared sweep's per-keyword counts predict each keyword's own."""
    pool = [(t, c) for t, c in pool if t < 1]  # a threshold of 1 would switch a keyword off
    thresholds = np.array([t for t, _ in pool])
    misses = np.stack([c.positives - c.hits for _, c in pool])  # (thresholds, keywords)
    alarms = np.stack([c.false_alarms for _, c in pool])
    budget = target_fa_per_hour * pool[0][1].hours
    keywords = list(labels[2:])
    pick = np.full(len(keywords), len(thresholds) - 1)
    for lam in np.logspace(-2, 3, 61):  # small lambda: more hits, more false alarms
        cost = misses + lam * alarms
        # Among equal costs, the highest threshold.
        choice = len(thresholds) - 1 - np.argmin(cost[::-1], axis=0)
        if alarms[choice, np.arange(len(keywords))].sum() <= budget:
            pick = choice
            break
    return {k: float(thresholds[pick[i]]) for i, k in enumerate(keywords)}
