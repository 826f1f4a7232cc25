"""Rank a sweep's jobs by the optimised metric: `python -m kws_lightning.sweep_summary SWEEP_DIR`.

Reads every `job_result.json` under the sweep folder (each job writes one, failed jobs too) and writes
`sweep_summary.csv` and `sweep_summary.md` there, printing the Markdown table; when the jobs vary `seed`, a
second table has one row per configuration, mean ± std over its seeds (kws_lightning/sweep_groups.py, also
`sweep_summary_groups.csv`). Also runs by itself at the end of every multirun (the Hydra callback
`SweepSummary`, configured in conf/hydra/default.yaml), and when a signal stops the sweep (`run_job`). Jobs
the sweep planned but never started (read from `multirun.yaml`) are listed as "not started".

    python -m kws_lightning.sweep_summary logs/train/multiruns/2026-01-01_12-00-00
    python -m kws_lightning.sweep_summary DIR --metric val/loss --direction min
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from kws_lightning.sweep_groups import (
    GROUP_COLUMNS,
    GROUPS_CSV_NAME,
    group_cells,
    group_jobs,
    groups_markdown,
    varies_seed,
)
from kws_lightning.utils.job_result import (
    FILENAME,
    INTERRUPTED,
    NOT_STARTED,
    OK,
    JobResult,
    read_job_result,
)

log = logging.getLogger(__name__)

CSV_NAME = "sweep_summary.csv"
MARKDOWN_NAME = "sweep_summary.md"
COLUMNS = ("rank", "job", "status", "value", "best_step", "wall_time_s", "params", "overrides", "error")
PLAN_NAME = "multirun.yaml"  # the sweep's config, saved by Hydra's sweeper before the first job


@dataclass
class Row:
    job: str
    result: JobResult
    rank: int | None = None
    overrides: str = ""


def guess_direction(metric: str | None) -> str:
    """'min' for losses and error rates, 'max' for everything else (accuracies)."""
    name = (metric or "").lower()
    return "min" if any(word in name for word in ("loss", "err", "wer", "eer", "fpr", "fnr")) else "max"


def find_results(sweep_dir: Path) -> list[tuple[str, JobResult]]:
    """(job folder relative to `sweep_dir`, result) for every job_result.json below it."""
    found = []
    for path in sorted(sweep_dir.rglob(FILENAME)):
        job = path.parent.relative_to(sweep_dir).as_posix()
        found.append((job, read_job_result(path)))
    return found


def _job_order(item: tuple[str, JobResult]) -> tuple[int, str]:
    job, result = item
    number = result.job_num if result.job_num is not None else (int(job) if job.isdigit() else 1 << 30)
    return number, job


def rank_jobs(results: Sequence[tuple[str, JobResult]], direction: str) -> list[Row]:
    """Successful jobs with a finite value, best first; then the others (no value, failed) by job number."""
    if direction not in ("max", "min"):
        raise ValueError(f"direction={direction!r} must be 'max' or 'min'")
    ordered = sorted(results, key=_job_order)
    common = set(common_overrides(ordered))
    rows = [
        Row(job, result, overrides=" ".join(o for o in result.overrides if o not in common))
        for job, result in ordered
    ]
    sign = -1.0 if direction == "max" else 1.0

    def ranked(row: Row) -> bool:
        return row.result.status == OK and row.result.value is not None and math.isfinite(row.result.value)

    best_first = sorted((row for row in rows if ranked(row)), key=lambda row: sign * row.result.value)
    for rank, row in enumerate(best_first, start=1):
        row.rank = rank
    return best_first + [row for row in rows if not ranked(row)]


def common_overrides(results: Sequence[tuple[str, JobResult]]) -> list[str]:
    """The overrides every job that ran shares (shown once above the table, not in every row)."""
    results = [item for item in results if item[1].status != NOT_STARTED]  # a search's have none
    if len(results) < 2:
        return []
    shared = set.intersection(*(set(r.overrides) for _, r in results))
    return [o for o in results[0][1].overrides if o in shared]


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def row_cells(row: Row) -> dict[str, str]:
    r = row.result
    return {
        "rank": "" if row.rank is None else str(row.rank),
        "job": row.job,
        "status": r.status,
        "value": _cell(r.value),
        "best_step": _cell(r.best_step),
        "wall_time_s": _cell(r.wall_time_s, 1),
        "params": _cell(r.params),
        "overrides": row.overrides,
        "error": r.error or "",
    }


def metric_name(results: Sequence[tuple[str, JobResult]]) -> str | None:
    names = Counter(r.metric for _, r in results if r.metric)
    return names.most_common(1)[0][0] if names else None


def markdown(
    rows: Sequence[Row], metric: str | None, direction: str, sweep_dir: Path, common: list[str]
) -> str:
    # Interrupted jobs (SIGINT/SIGTERM) are not failures: they resume from their last.ckpt.
    interrupted = sum(row.result.status == INTERRUPTED for row in rows)
    not_started = sum(row.result.status == NOT_STARTED for row in rows)
    failed = sum(row.result.status not in (OK, INTERRUPTED, NOT_STARTED) for row in rows)
    counts = f"{len(rows) - failed - interrupted - not_started} ok, {failed} failed"
    counts += f", {interrupted} interrupted" if interrupted else ""
    counts += f", {not_started} not started" if not_started else ""
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(rows)} jobs ({counts}), ranked by "
        f"{metric or 'no metric'} ({'higher' if direction == 'max' else 'lower'} is better).",
    ]
    if common:
        lines.append(f"Overrides common to every job: `{' '.join(common)}`")
    header = [(metric or "value") if column == "value" else column for column in COLUMNS]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = row_cells(row)
        cells["overrides"] = f"`{cells['overrides']}`" if cells["overrides"] else ""
        lines.append("| " + " | ".join(cells[c].replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def summarize(
    sweep_dir: str | Path, metric: str | None = None, direction: str | None = None, echo: bool = True
) -> list[Row]:
    """Write `sweep_summary.{csv,md}` into `sweep_dir` (and print the Markdown); the ranked rows."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist")
    results = find_results(sweep_dir)
    if not results:
        raise FileNotFoundError(
            f"no {FILENAME} under {sweep_dir}: give a sweep folder (logs/<task_name>/multiruns/<stamp>) "
            "whose jobs have finished or failed"
        )
    if metric is not None:
        results = [(job, _revalue(result, metric)) for job, result in results]
    metric = metric or metric_name(results)
    direction = direction or guess_direction(metric)
    started = results
    results = [*results, *not_started_jobs(sweep_dir, results, metric)]
    rows = rank_jobs(results, direction)
    with open(sweep_dir / CSV_NAME, "w", newline="") as handle:
        # The CSV keeps every job's full override list; the Markdown shows only what differs between jobs.
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, "metric"])
        writer.writeheader()
        for row in rows:
            overrides = " ".join(row.result.overrides)
            writer.writerow({**row_cells(row), "overrides": overrides, "metric": metric or ""})
    common = common_overrides(sorted(results, key=_job_order))
    text = markdown(rows, metric, direction, sweep_dir, common)
    if varies_seed(started):
        # Jobs differing only in `seed`: a row per configuration, mean ± std (kws_lightning/sweep_groups.py).
        groups = group_jobs(started, direction, common)
        text += groups_markdown(groups, metric)
        with open(sweep_dir / GROUPS_CSV_NAME, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*GROUP_COLUMNS, "metric"])
            writer.writeheader()
            writer.writerows({**group_cells(group), "metric": metric or ""} for group in groups)
    (sweep_dir / MARKDOWN_NAME).write_text(text)
    if echo:
        print(text, end="", flush=True)
    return rows


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides as the sweep planned them, in job order, from `<sweep_dir>/multirun.yaml`:
    the basic sweeper's grid (its `params` and the command line's sweeps), or `n_trials` jobs of unknown
    overrides for a search (Optuna). None when the plan cannot be told."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = sweep_dir / PLAN_NAME
    if not path.is_file():
        return None
    try:
        hydra_cfg = OmegaConf.to_container(OmegaConf.load(path).hydra, resolve=False)
        sweeper = hydra_cfg.get("sweeper") or {}
        if str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
            parsed = OverridesParser.create().parse_overrides([*params, *hydra_cfg["overrides"]["task"]])
            # The basic sweeper's grid: the product of each key's values, in order (a later key wins).
            values: dict[str, list[str]] = {}
            for override in parsed:
                key = override.get_key_element()
                swept = override.sweep_string_iterator() if override.is_sweep_override() else None
                values[key] = [f"{key}={value}" for value in swept or [override.get_value_element_as_str()]]
            return [list(job) for job in itertools.product(*values.values())]
        trials = sweeper.get("n_trials")
        return [[] for _ in range(trials)] if isinstance(trials, int) else None
    except Exception as error:  # the summary of what did run is written anyway
        log.warning("cannot tell the jobs %s planned (%s): jobs never started are not listed", path, error)
        return None


def not_started_jobs(
    sweep_dir: Path, results: Sequence[tuple[str, JobResult]], metric: str | None
) -> list[tuple[str, JobResult]]:
    """A `NOT_STARTED` row for each job the sweep planned (`planned_jobs`) that left no result."""
    planned = planned_jobs(sweep_dir) or []
    done = {_job_order(item)[0] for item in results}
    return [
        (str(number), JobResult(NOT_STARTED, metric, None, overrides=overrides, job_num=number))
        for number, overrides in enumerate(planned)
        if number not in done
    ]


def _revalue(result: JobResult, metric: str) -> JobResult:
    """Rank by another metric the jobs logged (recorded in each job_result.json's `metrics`)."""
    value = result.metrics.get(metric)
    return JobResult(**{**result.__dict__, "metric": metric, "value": value})


class SweepSummary(Callback):
    """Hydra callback: the summary of the sweep that just ended (configured in conf/hydra/default.yaml).

    Silent for sweeps whose jobs write no job_result.json (other entry points sharing conf/hydra).
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        summarize_sweep(config.hydra)


def summarize_sweep(hydra_cfg: Any) -> None:
    """The summary of the sweep `hydra_cfg` (Hydra's config node) runs, once it ended or was stopped."""
    sweep_dir = Path(hydra_cfg.sweep.dir)
    if not sweep_dir.is_dir() or next(sweep_dir.rglob(FILENAME), None) is None:
        return
    direction = None
    # The Optuna sweeper's (maximize / minimize, a string or its Direction enum); else from the name.
    sweeper_direction = hydra_cfg.sweeper.get("direction")
    sweeper_direction = getattr(sweeper_direction, "name", sweeper_direction)
    if isinstance(sweeper_direction, str):
        direction = "max" if sweeper_direction.lower().startswith("max") else "min"
    summarize(sweep_dir, direction=direction)
    print(f"sweep summary: {sweep_dir / MARKDOWN_NAME} and {CSV_NAME}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kws_lightning.sweep_summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="the multirun folder (logs/<task_name>/multiruns/<stamp>)"
    )
    parser.add_argument("--metric", help="rank by this logged metric instead of each job's optimized_metric")
    parser.add_argument(
        "--direction", choices=("max", "min"), help="default: min for losses/errors, else max"
    )
    args = parser.parse_args(argv)
    try:
        summarize(args.sweep_dir, args.metric, args.direction)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
