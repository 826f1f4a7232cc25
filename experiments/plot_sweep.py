"""Overlay a sweep's validation curves, one line per job, in one PNG (what TensorBoard's Scalars view shows
for ``tensorboard --logdir SWEEP_DIR``, tags val/acc and val/loss).

    python experiments/plot_sweep.py logs/feature_sweep/multiruns/<stamp>     # -> <stamp>/val_curves.png
    python experiments/plot_sweep.py SWEEP_DIR --out curves.png --title "..." --metrics val/acc

Reads every job's TensorBoard event files (<job>/tensorboard/<run name>/events.*; the run name is the job's
swept values, as TensorBoard lists it) and its job_result.json when there (a failed job's label says so).
Colour follows the first swept value, line style the others; jobs that differ only in ``seed`` share
both; a failed job's points are crosses. Works on a sweep that is still running or was killed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot_curves import read_scalars  # noqa: E402  (beside this file)

METRICS = ("val/acc", "val/loss")
STYLES = ("-", "--", "-.", ":")
SEED = re.compile(r"(^|,)\+{0,2}seed=[^,]*")


def find_jobs(sweep_dir: Path) -> list[dict]:
    """One entry per job folder that has TensorBoard events: its label, status and scalar series."""
    jobs = []
    for events in sorted({p.parent for p in sweep_dir.rglob("events.out.tfevents.*")}):
        job_dir = next(
            (p for p in events.parents if (p / ".hydra").is_dir() or p.parent == sweep_dir), events
        )
        label = events.name if events.name != "tensorboard" else job_dir.name
        result_file = job_dir / "job_result.json"
        status = (
            json.loads(result_file.read_text()).get("status", "?") if result_file.is_file() else "running"
        )
        jobs.append({"job": job_dir.name, "label": label, "status": status, "series": read_scalars(events)})
    if not jobs:
        raise SystemExit(
            f"no TensorBoard event files under {sweep_dir}: pass a sweep folder (.../multiruns/<stamp>)"
        )
    return sorted(jobs, key=lambda j: (SEED.sub("", j["label"]), j["label"]))


def plot(sweep_dir: Path, out: Path, title: str, metrics: tuple[str, ...] = METRICS) -> None:
    jobs = find_jobs(sweep_dir)
    configurations = sorted({SEED.sub("", j["label"]).strip(",") for j in jobs})
    # Colour by the first swept value (e.g. the feature), line style by the rest (e.g. the learning rate).
    firsts = sorted({c.split(",")[0] for c in configurations})
    rests = sorted({",".join(c.split(",")[1:]) for c in configurations})
    colours = {c: plt.get_cmap("tab10")(firsts.index(c.split(",")[0]) % 10) for c in configurations}
    styles = {c: STYLES[rests.index(",".join(c.split(",")[1:])) % len(STYLES)] for c in configurations}
    sizes = {c: sum(SEED.sub("", j["label"]).strip(",") == c for j in jobs) for c in configurations}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        labelled = set()
        for job in jobs:
            if metric not in job["series"]:
                continue
            steps, values = job["series"][metric]
            configuration = SEED.sub("", job["label"]).strip(",")
            label = configuration if configuration not in labelled else None
            if label is not None and job["status"] not in ("ok", "running"):
                label += f" ({job['status']})"
            elif label is not None and sizes[configuration] > 1:
                label += f" ({sizes[configuration]} seeds)"
            elif label is not None and metric.endswith("acc") and values:
                label += f": max {max(values):.3f}"
            labelled.add(configuration)
            failed = job["status"] not in ("ok", "running")
            ax.plot(
                steps,
                values,
                marker="x" if failed else ".",
                color=colours[configuration],
                ls=styles[configuration],
                label=label,
            )
        ax.set_title(metric)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if metric.endswith("acc"):
            ax.set_ylim(0, 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=9, frameon=False
    )
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(jobs)} jobs); the same overlay live: tensorboard --logdir {sweep_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default: SWEEP_DIR/val_curves.png")
    parser.add_argument("--title", default="")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), help="scalar tags, one panel each")
    args = parser.parse_args()
    out = args.out or args.sweep_dir / "val_curves.png"
    plot(args.sweep_dir, out, args.title or str(args.sweep_dir), tuple(args.metrics))


if __name__ == "__main__":
    main()
