"""DET pictures (matplotlib, Agg): the stream benchmark's miss rate vs false alarms per hour (log x, one
line per SNR), and eval's per-keyword one-vs-rest curves of clip scores."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stream_det(curves: Mapping[str, pd.DataFrame], path: Path, title: str = "") -> Path:
    """One line per curve name (e.g. "20 dB"): best miss rate at each FA/h, drawn as the staircase the
    sweep's operating points make. FA/h of 0 is drawn at the left edge."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    low, high = 0.1, 100.0
    for name, curve in curves.items():
        points = curve.dropna(subset=["miss_rate"]).sort_values(["fa_per_hour", "miss_rate"])
        fa = np.clip(points["fa_per_hour"].to_numpy(), low, None)
        best = np.minimum.accumulate(points["miss_rate"].to_numpy())
        high = max(high, float(fa.max(initial=low)) * 1.2)
        ax.step(
            np.append(fa, high), np.append(best, best[-1] if len(best) else 1.0), where="post", label=name
        )
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(0, 1)
    ax.axvline(1.0, color="grey", lw=0.7, ls=":")
    ax.set_xlabel("false alarms per hour")
    ax.set_ylabel("miss rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="SNR")
    ax.set_title(title or "keyword spotting in a stream: DET")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_clip_det(curves: pd.DataFrame, path: Path) -> Path:
    """Per keyword (one-vs-rest on clip posteriors): miss rate vs false-alarm rate, both log axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    floor = 1e-4
    for keyword, curve in curves.groupby("keyword", sort=False):
        ax.plot(
            np.clip(curve["false_alarm_rate"], floor, 1), np.clip(curve["miss_rate"], floor, 1), label=keyword
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-alarm rate (other clips scored above the threshold)")
    ax.set_ylabel("miss rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("clip scores, one keyword vs rest: DET")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
