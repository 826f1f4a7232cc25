"""`ckpt_path=last` and `ckpt_path=auto`: words for "resume where the last run stopped", resolved to a file.

- `last`: this run's own `checkpoints/last.ckpt` when its folder already holds one (a rerun with the same
  `hydra.run.dir`, a requeued sweep job); otherwise, in a single run, the newest `last.ckpt` (by the time it
  was written) of the runs under `<paths.log_dir>/<task_name>/runs/`. No such file is an error.
- `auto`: this run's own `last.ckpt` when there is one, else start fresh. For jobs a scheduler may requeue
  (SLURM): the first attempt starts, every later one resumes (README, "SLURM").

Any other value is a path, passed on unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kws_lightning.utils.checkpoint_io import remove_stale_temporaries

log = logging.getLogger(__name__)

LAST, AUTO = "last", "auto"
CHECKPOINT_NAME = "last.ckpt"


def own_last_checkpoint(output_dir: str | Path) -> Path | None:
    """`<output_dir>/checkpoints/last.ckpt` when it exists."""
    path = Path(output_dir) / "checkpoints" / CHECKPOINT_NAME
    return path if path.is_file() else None


def newest_run_checkpoint(runs_dir: str | Path) -> Path | None:
    """The most recently written `<run>/checkpoints/last.ckpt` under `runs_dir` (None when there is none)."""
    candidates = [path for path in Path(runs_dir).glob(f"*/checkpoints/{CHECKPOINT_NAME}") if path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: str | Path, runs_dir: str | Path, in_sweep: bool = False
) -> str | None:
    """The checkpoint file `ckpt_path` names (see the module docstring); None to start fresh."""
    if ckpt_path not in (LAST, AUTO):
        return ckpt_path
    found = own_last_checkpoint(output_dir)
    if found is None and ckpt_path == LAST and not in_sweep:
        found = newest_run_checkpoint(runs_dir)
    if found is None:
        if ckpt_path == AUTO:
            log.info("ckpt_path=auto: no %s in %s yet, starting fresh", CHECKPOINT_NAME, output_dir)
            return None
        where = f"{output_dir}/checkpoints" if in_sweep else f"{runs_dir}/*/checkpoints (or {output_dir})"
        hint = (
            "in a sweep, `last` means each job's own folder: use ckpt_path=auto to start jobs that have none"
            if in_sweep
            else "train first, check paths.log_dir and task_name, or give the file: ckpt_path=PATH"
        )
        from kws_lightning.checkpoints import CheckpointError

        raise CheckpointError(f"ckpt_path=last: no {CHECKPOINT_NAME} under {where}: {hint}")
    # A run killed while writing a checkpoint may have left its temporary file beside it.
    remove_stale_temporaries(found.parent)
    log.info("ckpt_path=%s: resuming from %s", ckpt_path, found)
    return str(found)
