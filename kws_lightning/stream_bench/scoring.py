"""Score a detector on a stream: its decisions from per-window posteriors (the `RecognizeCommands` logic,
vectorised so a threshold sweep re-runs only the cheap part), hits / false alarms against the ground
truth, and the DET figures (miss rate at N false alarms per hour, area under the DET curve, latency).

A hit is a detection of the right keyword between the keyword's start and `tolerance_s` after its end;
each keyword is hit at most once (the earliest such detection); every other detection is a false alarm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kws_lightning.labels import SILENCE, UNKNOWN

TOLERANCE_S = 0.75
FA_POINTS = (0.5, 1.0, 2.0)  # false alarms per hour at which miss rates are reported
AUC_RANGE = (0.1, 10.0)  # FA/h range of the DET area (log-uniform)
# The sweep: coarse below 0.9, then ever closer to 1 (softmax posteriors of a good model crowd there).
DEFAULT_THRESHOLDS = tuple(
    sorted({round(float(t), 6) for t in [*np.arange(0.2, 0.9, 0.05), *(1 - np.logspace(-4, -1, 31)), 1.0]})
)


@dataclass
class Smoothed:
    """Per window (end time): the top class of the averaged posteriors, its score, and whether the average
    counts (enough results spanning a quarter of the averaging window, as RecognizeCommands requires)."""

    times_ms: np.ndarray
    top: np.ndarray
    score: np.ndarray
    valid: np.ndarray


def smooth(times_ms: np.ndarray, probs: np.ndarray, average_window_ms: float, minimum_count: int) -> Smoothed:
    """RecognizeCommands steps 1-3 for every window at once (same result as feeding them one by one)."""
    times_ms = np.asarray(times_ms, np.float64)
    probs = np.asarray(probs, np.float64)
    first = np.searchsorted(times_ms, times_ms - average_window_ms, side="left")
    counts = np.arange(len(times_ms)) - first + 1
    total = np.zeros_like(probs)
    for lag in range(int(counts.max(initial=1))):  # oldest results first, as np.mean adds them
        rows = np.arange(len(times_ms))
        source = first + lag
        use = source <= rows
        total[use] += probs[source[use]]
    average = total / counts[:, None]
    top = average.argmax(axis=1)
    span = times_ms - times_ms[first]
    valid = (counts >= minimum_count) & (span >= average_window_ms / 4)
    return Smoothed(times_ms, top, average[np.arange(len(top)), top], valid)


def decide(
    smoothed: Smoothed,
    labels: Sequence[str],
    threshold: float,
    suppression_ms: float,
    keyword_thresholds: Mapping[str, float] | None = None,
    ignore: Sequence[str] = (SILENCE, UNKNOWN),
) -> pd.DataFrame:
    """RecognizeCommands step 4 over a whole stream: detections (time_s, keyword, score)."""
    per_label = np.array([(keyword_thresholds or {}).get(name, threshold) for name in labels], np.float64)
    candidates = np.flatnonzero(smoothed.valid & (smoothed.score > per_label[smoothed.top]))
    skip = {labels.index(name) for name in ignore if name in labels}
    previous_label, previous_time = -1, -np.inf
    times, tops, scores = smoothed.times_ms.tolist(), smoothed.top.tolist(), smoothed.score.tolist()
    rows = []
    for i in candidates.tolist():  # windows below threshold never change the state
        if tops[i] != previous_label and times[i] - previous_time > suppression_ms:
            previous_label, previous_time = tops[i], times[i]
            if tops[i] not in skip:
                rows.append((round(times[i] / 1000.0, 4), labels[tops[i]], round(scores[i], 4)))
    return pd.DataFrame(rows, columns=["time_s", "keyword", "score"])


def match(detections: pd.DataFrame, truth: pd.DataFrame, tolerance_s: float = TOLERANCE_S) -> pd.DataFrame:
    """`detections` with `hit` (row of `truth` it hits, -1 for a false alarm) and `latency_s` (from the
    keyword's end; NaN for false alarms). Only truth rows whose word is a detected-able keyword count."""
    starts = truth["start"].to_numpy(np.float64)
    ends = truth["end"].to_numpy(np.float64)
    words = truth["word"].to_numpy()
    used = np.zeros(len(truth), bool)
    hits, latencies = [], []
    for time_s, keyword in zip(
        detections["time_s"].to_numpy(), detections["keyword"].to_numpy(), strict=True
    ):
        open_rows = np.flatnonzero(
            (words == keyword) & ~used & (starts <= time_s) & (time_s <= ends + tolerance_s + 1e-9)
        )
        if len(open_rows):
            row = int(open_rows[0])
            used[row] = True
            hits.append(row)
            latencies.append(round(float(time_s - ends[row]), 4))
        else:
            hits.append(-1)
            latencies.append(np.nan)
    out = detections.copy()
    out["hit"] = np.array(hits, np.int64)
    out["latency_s"] = np.array(latencies, np.float64)
    return out


@dataclass
class Counts:
    """Per keyword at one operating point: keywords in the truth, hits, false alarms; hit latencies."""

    keywords: list[str]
    positives: np.ndarray
    hits: np.ndarray
    false_alarms: np.ndarray
    latencies: list[np.ndarray]  # per keyword
    hours: float

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.keywords,
            self.positives + other.positives,
            self.hits + other.hits,
            self.false_alarms + other.false_alarms,
            [np.concatenate([a, b]) for a, b in zip(self.latencies, other.latencies, strict=True)],
            self.hours + other.hours,
        )


def count(matched: pd.DataFrame, truth: pd.DataFrame, keywords: Sequence[str], hours: float) -> Counts:
    keywords = list(keywords)
    positives = np.array([(truth["word"] == k).sum() for k in keywords], np.int64)
    is_hit = matched["hit"].to_numpy() >= 0
    hits = np.array([(is_hit & (matched["keyword"] == k).to_numpy()).sum() for k in keywords], np.int64)
    alarms = np.array([(~is_hit & (matched["keyword"] == k).to_numpy()).sum() for k in keywords], np.int64)
    latencies = [
        matched["latency_s"].to_numpy()[is_hit & (matched["keyword"] == k).to_numpy()] for k in keywords
    ]
    return Counts(keywords, positives, hits, alarms, latencies, hours)


def _miss(hits: np.ndarray, positives: np.ndarray) -> float | None:
    return float(1.0 - hits.sum() / positives.sum()) if positives.sum() > 0 else None


def miss_at(curve: pd.DataFrame, fa_per_hour: float) -> tuple[float, float]:
    """(miss rate, threshold) of the best operating point with at most `fa_per_hour`; (1.0, inf) when no
    threshold of the sweep gets there (the detector would have to be off)."""
    ok = curve[(curve["fa_per_hour"] <= fa_per_hour + 1e-12) & curve["miss_rate"].notna()]
    if ok.empty:
        return 1.0, float("inf")
    best = ok["miss_rate"].min()
    # Among equal miss rates, the highest threshold (fewest false alarms).
    row = ok[ok["miss_rate"] == best].sort_values("threshold").iloc[-1]
    return float(best), float(row["threshold"])


def det_auc(curve: pd.DataFrame, low: float = AUC_RANGE[0], high: float = AUC_RANGE[1]) -> float:
    """Mean best miss rate over FA/h log-uniform in [low, high]: the area under the DET curve on its log
    axis, normalised to [0, 1] (lower is better)."""
    grid = np.logspace(np.log10(low), np.log10(high), 101)
    return float(np.mean([miss_at(curve, x)[0] for x in grid]))


def curve_of(sweep: Sequence[tuple[float, Counts]], keyword: int | None = None) -> pd.DataFrame:
    """The DET points (threshold, miss_rate, fa_per_hour, hits, positives, false_alarms) of a sweep,
    overall or for one keyword (its misses, and false alarms naming it)."""
    rows = []
    for threshold, c in sweep:
        pick = slice(None) if keyword is None else slice(keyword, keyword + 1)
        hits, positives, alarms = c.hits[pick], c.positives[pick], c.false_alarms[pick]
        rows.append(
            {
                "threshold": threshold,
                "miss_rate": _miss(hits, positives),
                "fa_per_hour": float(alarms.sum() / c.hours) if c.hours > 0 else float("nan"),
                "hits": int(hits.sum()),
                "positives": int(positives.sum()),
                "false_alarms": int(alarms.sum()),
            }
        )
    return pd.DataFrame(rows)


def latency_summary(latencies: Sequence[np.ndarray]) -> dict[str, float | None]:
    values = np.concatenate([np.asarray(v, np.float64) for v in latencies]) if latencies else np.zeros(0)
    if not len(values):
        return {"latency_median_s": None, "latency_p90_s": None}
    return {
        "latency_median_s": round(float(np.median(values)), 4),
        "latency_p90_s": round(float(np.percentile(values, 90)), 4),
    }


def summarize(sweep: Sequence[tuple[float, Counts]]) -> dict:
    """Overall and per-keyword figures of one sweep: miss rate (and its threshold) at FA_POINTS false
    alarms per hour, DET area, and hit latency at the 1 FA/h operating point."""
    by_threshold = dict(sweep)

    def figures(curve: pd.DataFrame, keyword: int | None) -> dict:
        out: dict = {"miss_rate_at_fa_per_hour": {}, "threshold_at_fa_per_hour": {}}
        for point in FA_POINTS:
            miss, threshold = miss_at(curve, point)
            out["miss_rate_at_fa_per_hour"][f"{point:g}"] = round(miss, 4)
            out["threshold_at_fa_per_hour"][f"{point:g}"] = threshold if np.isfinite(threshold) else None
        out["det_auc"] = round(det_auc(curve), 4)
        _, at_one = miss_at(curve, 1.0)
        counts = by_threshold.get(at_one)
        lat = [] if counts is None else counts.latencies if keyword is None else [counts.latencies[keyword]]
        out.update(latency_summary(lat))
        return out

    first = sweep[0][1]
    overall = figures(curve_of(sweep), None)
    overall.update(positives=int(first.positives.sum()), hours=round(first.hours, 4))
    overall["per_keyword"] = {
        name: figures(curve_of(sweep, k), k) | {"positives": int(first.positives[k])}
        for k, name in enumerate(first.keywords)
    }
    return overall


def operating_point(counts: Counts, threshold: float | None = None) -> dict:
    """Figures of one detector setting (what `listen` would do): miss rate, FA/h, latency, per keyword."""
    out = {
        "miss_rate": None if (m := _miss(counts.hits, counts.positives)) is None else round(m, 4),
        "fa_per_hour": round(float(counts.false_alarms.sum() / counts.hours), 4) if counts.hours else None,
        "hits": int(counts.hits.sum()),
        "positives": int(counts.positives.sum()),
        "false_alarms": int(counts.false_alarms.sum()),
        **latency_summary(counts.latencies),
    }
    if threshold is not None:
        out["threshold"] = threshold
    out["per_keyword"] = {
        name: {
            "miss_rate": None
            if (m := _miss(counts.hits[k : k + 1], counts.positives[k : k + 1])) is None
            else round(m, 4),
            "false_alarms": int(counts.false_alarms[k]),
            "positives": int(counts.positives[k]),
        }
        for k, name in enumerate(counts.keywords)
    }
    return out


FLOOR_THRESHOLDS = (0.5, 0.9)  # the miss floor is reported at these thresholds and at the detector's own


def keyword_peaks(
    times_ms: np.ndarray,
    probs: np.ndarray,
    truth: pd.DataFrame,
    labels: Sequence[str],
    average_window_ms: float,
    tolerance_s: float = TOLERANCE_S,
) -> np.ndarray:
    """Per keyword in `truth` (rows whose word is a label other than silence / unknown, in order): the
    highest posterior the network gives its class in any window that a smoothed score inside the hit span
    can average (window ends from `average_window_ms` before the speech start to `tolerance_s` after its
    end). An average never exceeds its largest term, so no detector with that smoothing and a threshold at
    or above this peak can hit the keyword."""
    times_s = np.asarray(times_ms, np.float64) / 1000.0
    index = {name: i for i, name in enumerate(labels) if name not in (SILENCE, UNKNOWN)}
    peaks = []
    for word, start, end in zip(truth["word"], truth["start"], truth["end"], strict=True):
        if word not in index:
            continue
        inside = (times_s >= start - average_window_ms / 1000.0) & (times_s <= end + tolerance_s + 1e-9)
        peaks.append(float(np.max(probs[inside, index[word]])) if inside.any() else 0.0)
    return np.asarray(peaks, np.float64)


def miss_floor(peaks: np.ndarray, thresholds: Sequence[float]) -> dict[str, float | None]:
    """Share of keywords whose peak (`keyword_peaks`) is at or below each threshold (>= 0.5, where a
    score above it is the top class): misses no detector setting at that threshold can avoid, false alarms
    or not. What separates the floor from the miss rate at 1 FA/h is the detector's (and the false alarms')
    share; the floor itself is the network's."""
    peaks = np.asarray(peaks, np.float64)
    return {f"{t:g}": (round(float((peaks <= t).mean()), 4) if len(peaks) else None) for t in thresholds}
