"""`job_result.json`: what one training job (a single run or one job of a sweep) leaves for the sweep summary.

Written by the job's rank-0 process into its output folder whether the job succeeded or failed, so a sweep
summary can list every job, failed ones with their error, without parsing logs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILENAME = "job_result.json"
OK = "ok"
FAILED = "failed"
# Stopped by SIGINT/SIGTERM (Ctrl+C, a scheduler's preemption or time limit): last.ckpt holds the state at the
# step it stopped, and `last_checkpoint` names it for `ckpt_path=`.
INTERRUPTED = "interrupted"
# Never written by a job: the sweep summary's row for a job the sweep planned but never started (it was
# interrupted first).
NOT_STARTED = "not started"
STATUSES = (OK, FAILED, INTERRUPTED, NOT_STARTED)


@dataclass
class JobResult:
    """One job's outcome. `value` is the optimised metric (`metric`), None when the job failed, was
    interrupted, or never logged it."""

    status: str
    metric: str | None
    value: float | None
    best_step: int | None = None
    wall_time_s: float | None = None
    params: int | None = None
    overrides: list[str] = field(default_factory=list)
    job_num: int | None = None
    world_size: int | None = None
    error: str | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        record = asdict(self)
        # JSON has no NaN: a non-finite metric (a diverged run) is written as null.
        record["value"] = _finite_or_none(self.value)
        record["metrics"] = {name: _finite_or_none(v) for name, v in self.metrics.items()}
        return json.dumps(record, indent=2)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def write_job_result(output_dir: str | os.PathLike, result: JobResult) -> Path:
    """Write `output_dir/job_result.json` atomically (a summary read mid-sweep never sees half a file)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    tmp = folder / f".{FILENAME}.tmp-{os.getpid()}"
    tmp.write_text(result.to_json() + "\n")
    os.replace(tmp, path)
    return path


def read_job_result(path: str | os.PathLike) -> JobResult:
    """Read one `job_result.json`; a file that is not one is an error naming the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        return JobResult(**record)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"{path} is not a readable {FILENAME} ({error}): delete it or rerun the job"
        ) from error


def error_message(error: BaseException, limit: int = 500) -> str:
    """`Type: message` on one line, shortened: what a summary table can show."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_result(
    status: str,
    metric: str | None,
    metrics: Mapping[str, float] | None = None,
    *,
    overrides: Sequence[str] = (),
    **fields: Any,
) -> JobResult:
    """A `JobResult` whose `value` is `metrics[metric]` (None when absent)."""
    metrics = dict(metrics or {})
    value = metrics.get(metric) if metric else None
    return JobResult(
        status=status, metric=metric, value=value, overrides=list(overrides), metrics=metrics, **fields
    )
