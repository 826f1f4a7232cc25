"""Run `cv`'s fold trainings as subprocesses, `parallel` at a time, each logging to its own file.

Each child runs in a session of its own, so a Ctrl+C in the terminal reaches only cv, which passes it on
once: every running fold saves its last.ckpt and records itself as interrupted, no new fold starts, and the
next cv run resumes them. A second signal is passed on too (the folds then stop without saving).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kws_lightning.jobs.cv_folds import last_error_line
from kws_lightning.utils.job_result import FAILED, FILENAME, INTERRUPTED, read_job_result
from kws_lightning.utils.signals import handling_signals

log = logging.getLogger(__name__)
POLL_S = 0.2


@dataclass
class FoldJob:
    fold: int
    command: list[str]
    folder: Path
    log_path: Path


@dataclass
class FoldOutcome:
    """How one fold's process ended: `status` ok / failed / interrupted (from its job_result.json, or
    failed when it left none), its exit code, the error and its log."""

    fold: int
    status: str
    exit_code: int
    error: str | None
    log_path: Path


def run_folds(
    jobs: list[FoldJob], parallel: int, env: dict[str, str]
) -> tuple[list[FoldOutcome], int | None]:
    """Run every job, `parallel` at a time. Returns the outcomes (in the order they ended) and the signal
    that stopped the run (None when it was not stopped)."""
    pending = list(jobs)
    running: dict[int, tuple[FoldJob, subprocess.Popen, Any]] = {}
    outcomes: list[FoldOutcome] = []
    stops: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stops.append(signum)
        name = signal.Signals(signum).name
        what = "stop without saving" if len(stops) > 1 else "save last.ckpt and stop"
        log.warning(
            "%s: passing it on to %d running fold(s) (%s); no new fold starts", name, len(running), what
        )
        for _, process, _ in running.values():
            if process.poll() is None:
                process.send_signal(signum)

    with handling_signals(stop):
        while (pending and not stops) or running:
            while pending and not stops and len(running) < parallel:
                job = pending.pop(0)
                running[job.fold] = (job, *_start(job, env))
            for fold, (job, process, handle) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                handle.close()
                del running[fold]
                outcomes.append(_outcome(job, code))
                _report(outcomes[-1])
            time.sleep(POLL_S)
    return outcomes, (stops[0] if stops else None)


def _start(job: FoldJob, env: dict[str, str]) -> tuple[subprocess.Popen, Any]:
    job.folder.mkdir(parents=True, exist_ok=True)
    # The outcome is read from the job_result.json this attempt writes, never an earlier attempt's.
    (job.folder / FILENAME).unlink(missing_ok=True)
    handle = open(job.log_path, "a", buffering=1)  # appended: an earlier attempt's output stays above
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    handle.write(f"\n=== cv {stamp}: {' '.join(job.command)}\n")
    handle.flush()
    process = subprocess.Popen(
        job.command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    print(f"fold {job.fold}: started (pid {process.pid}), log {job.log_path}", flush=True)
    return process, handle


def _outcome(job: FoldJob, code: int) -> FoldOutcome:
    result_path = job.folder / FILENAME
    if result_path.is_file():
        try:
            result = read_job_result(result_path)
        except ValueError as error:
            return FoldOutcome(job.fold, FAILED, code, str(error), job.log_path)
        status, error = result.status, result.error
        if code != 0 and status not in (FAILED, INTERRUPTED):
            status, error = FAILED, f"exited with code {code}"
        if status == FAILED and not error:
            error = last_error_line(job.log_path)
        return FoldOutcome(job.fold, status, code, error, job.log_path)
    status = INTERRUPTED if code in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGTERM) else FAILED
    error = f"exited with code {code} without writing {FILENAME}: {last_error_line(job.log_path)}"
    return FoldOutcome(job.fold, status, code, error, job.log_path)


def _report(outcome: FoldOutcome) -> None:
    if outcome.status == FAILED:
        print(
            f"fold {outcome.fold}: FAILED (exit {outcome.exit_code}): {outcome.error}; log {outcome.log_path}"
        )
    else:
        print(f"fold {outcome.fold}: {outcome.status} (exit {outcome.exit_code}); log {outcome.log_path}")


def child_env(threads: int) -> dict[str, str]:
    """This environment with each fold limited to `threads` CPU threads (torch reads OMP_NUM_THREADS)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
