"""`make bench`: run every benchmark script, print one ``name value unit`` line per figure, and rewrite the
figure table in benchmarks/README.md (figure, value, machine, date, command).

    python benchmarks/run_all.py            # the quick sizes below, < 10 min on 2 cores
    python benchmarks/run_all.py --scale    # the 65,000-clip scale run (make bench-scale)
    python benchmarks/run_all.py --only predict,listen --no-readme

Each script runs in its own process (a fresh interpreter: no thread pool, allocator or page-cache state
carried from one figure to the next). A figure line is exactly ``name value unit``; everything else a
script prints goes to stderr as context. The README table is merged by figure name: a run replaces the
rows of the figures it produced and keeps the others (so `bench` and `bench-scale` share one table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
TABLE_START = "<!-- bench-table:start -->"
TABLE_END = "<!-- bench-table:end -->"
FIGURE_LINE = re.compile(r"^([a-z][a-z0-9_]*) (-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?) (\S+)$")


@dataclass(frozen=True)
class Bench:
    """One script run: `name` selects it (--only), `args` fix its sizes."""

    name: str
    script: str
    args: tuple[str, ...] = ()

    def command(self) -> str:
        return shlex.join(["python", f"benchmarks/{self.script}", *self.args])

    def with_threads(self, threads: int) -> Bench:
        """`{threads}` in the arguments filled in: torch threads = the seed's worker processes."""
        return Bench(self.name, self.script, tuple(a.replace("{threads}", str(threads)) for a in self.args))


@dataclass(frozen=True)
class Figure:
    name: str
    value: str
    unit: str
    command: str


# Sizes chosen so the whole list fits in 10 minutes on 2 cores; the table's command column shows them.
# `{threads}` is --threads (default 2: one per core; on a machine other jobs keep busy, 1 avoids OpenMP
# threads waiting on each other at every operation, which slowed 2-thread training steps ~8x there).
BENCHES: tuple[Bench, ...] = (
    Bench("input", "input_pipeline.py", ("--epochs", "1", "--seed-clips", "3000", "--threads", "{threads}")),
    Bench("train_share", "train_data_share.py", ("--steps", "12", "--threads", "{threads}")),
    Bench("train_speed", "train_throughput.py", ("--seconds", "2", "--threads", "{threads}")),
    Bench(
        "predict",
        "predict_throughput.py",
        ("--models", "cnn_trad_pool2,best", "--clips", "20000", "--threads", "{threads}", "--workers", "2"),
    ),
    Bench("listen", "listen_latency.py", ("--threads", "{threads}")),
    Bench("frontend", "frontend_speed.py", ("--seconds", "0.5", "--threads", "{threads}")),
    Bench(
        "export", "export_latency.py", ("--model", "tc_resnet14", "--runs", "50", "--threads", "{threads}")
    ),
    Bench("wave_cache", "wave_cache_verify.py", ("--repeats", "1", "--threads", "2")),
    Bench("augment", "augment_cost.py", ("--recipe", "best", "--threads", "{threads}")),
)
SCALE_BENCHES: tuple[Bench, ...] = (
    Bench("scale", "scale_epoch.py", ("--clips", "65000", "--threads", "{threads}")),
)


def parse_figures(text: str, command: str) -> list[Figure]:
    """The ``name value unit`` lines of a script's stdout."""
    figures = []
    for line in text.splitlines():
        match = FIGURE_LINE.match(line.strip())
        if match:
            figures.append(Figure(*match.groups(), command))
    return figures


def run_bench(bench: Bench, timeout_s: float | None = None) -> tuple[list[Figure], str | None]:
    """Run one script; its figures as they were printed, and an error message if it failed."""
    argv = [sys.executable, str(HERE / bench.script), *bench.args]
    started = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(
            argv, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode() if isinstance(error.stdout, bytes) else error.stdout or ""
        return parse_figures(out, bench.command()), f"{bench.command()} ran past {timeout_s:.0f} s"
    seconds = time.perf_counter() - started
    figures = parse_figures(done.stdout, bench.command())
    for line in done.stdout.splitlines():
        if not FIGURE_LINE.match(line.strip()):
            print(f"  [{bench.name}] {line}", file=sys.stderr)
    print(f"  [{bench.name}] {len(figures)} figures in {seconds:.0f} s", file=sys.stderr)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        return figures, f"{bench.command()} exited {done.returncode}:\n{tail}"
    return figures, None


def machine_description() -> str:
    """CPU model, cores and torch version, plus the load when the run started (the figures are noisy)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, CPU only, torch {torch.__version__}, load {load:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_row(figure: Figure, machine: str, date: str) -> str:
    cells = [f"`{figure.name}`", figure.value, figure.unit, machine, date, f"`{figure.command}`"]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def rewrite_table(readme: Path, figures: Sequence[Figure], machine: str, date: str) -> None:
    """Replace the rows of `figures` in the table between the markers (kept: rows of other figures)."""
    text = readme.read_text() if readme.exists() else ""
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(
            f"{readme} has no figure table: add the two lines {TABLE_START} and {TABLE_END} where it goes"
        )
    head, rest = text.split(TABLE_START, 1)
    body, tail = rest.split(TABLE_END, 1)
    rows: dict[str, str] = {}
    for line in body.splitlines():
        match = re.match(r"^\| `([a-z0-9_]+)` \|", line)
        if match:
            rows[match.group(1)] = line
    for figure in figures:
        rows[figure.name] = render_row(figure, machine, date)
    header = "| figure | value | unit | machine | date (UTC) | command |\n|---|---|---|---|---|---|\n"
    table = header + "".join(row + "\n" for row in rows.values())
    readme.write_text(f"{head}{TABLE_START}\n{table}{TABLE_END}{tail}")


def run(benches: Sequence[Bench], readme: Path | None, timeout_s: float | None = None) -> int:
    """Run `benches` in order, print their figures, update `readme` (None: leave it); the exit code."""
    machine = machine_description()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    started = time.perf_counter()
    figures: list[Figure] = []
    failures = []
    for bench in benches:
        print(f"# {bench.command()}", file=sys.stderr, flush=True)
        found, error = run_bench(bench, timeout_s)
        for figure in found:
            print(f"{figure.name} {figure.value} {figure.unit}", flush=True)
        figures.extend(found)
        if error:
            failures.append(error)
            print(f"FAILED: {error}", file=sys.stderr, flush=True)
    print(f"bench_wall_s {time.perf_counter() - started:.0f} s", flush=True)
    if readme is not None and figures:
        rewrite_table(readme, figures, machine, date)
        print(f"# table updated: {readme}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true", help="the scale run (make bench-scale) instead")
    parser.add_argument("--only", help="comma-separated bench names: " + ",".join(b.name for b in BENCHES))
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--no-readme", action="store_true", help="print only, leave the table")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per script")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per script")
    args = parser.parse_args(argv)
    benches = SCALE_BENCHES if args.scale else BENCHES
    if args.only:
        wanted = set(args.only.split(","))
        known = {b.name for b in (*BENCHES, *SCALE_BENCHES)}
        if wanted - known:
            raise SystemExit(f"unknown bench name(s) {sorted(wanted - known)}; valid: {sorted(known)}")
        benches = tuple(b for b in (*BENCHES, *SCALE_BENCHES) if b.name in wanted)
    benches = tuple(b.with_threads(args.threads) for b in benches)
    return run(benches, None if args.no_readme else args.readme, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
