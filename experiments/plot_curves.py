"""Plot a run's training curves from its TensorBoard event files into one PNG.

    python experiments/plot_curves.py RUN_DIR OUT.png [--title TITLE]

Reads the scalars the LightningModule logs (train/loss_epoch, train/acc_epoch, val/loss, val/acc)
with tensorboard's EventAccumulator, so the figure shows exactly what TensorBoard shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

PANELS = {"loss": ("train/loss_epoch", "val/loss"), "accuracy": ("train/acc_epoch", "val/acc")}


def read_scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series of every event file below `run_dir`, by tag."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    event_files = sorted(run_dir.rglob("events.out.tfevents.*"))
    if not event_files:
        raise SystemExit(
            f"no TensorBoard event files under {run_dir}: pass a run directory of kws_lightning.train"
        )
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps, values = series.setdefault(tag, ([], []))
            for event in accumulator.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return series


def plot(run_dir: Path, out: Path, title: str) -> None:
    series = read_scalars(run_dir)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, tags) in zip(axes, PANELS.items(), strict=True):
        for tag in tags:
            if tag in series:
                steps, values = series[tag]
                ax.plot(steps, values, marker="." if tag.startswith("val") else None, label=tag)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    plot(args.run_dir, args.out, args.title or args.run_dir.name)


if __name__ == "__main__":
    main()
