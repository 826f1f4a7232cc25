"""Clips that were skipped or repaired: one summary line per kind in the log, every one in a CSV.

The log shows counts and the first few paths; ``data_issues.csv`` in the run dir lists every file
(path, action, reason), so nothing a run skipped or cropped is known only to its first three lines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)
ISSUES_FILE = "data_issues.csv"
SKIPPED = "skipped"  # not used: unreadable or refused audio
CROPPED = "cropped"  # used, but cut to max_clip_s


@dataclass(frozen=True)
class ClipIssue:
    path: str
    action: str  # SKIPPED or CROPPED
    reason: str


def hydra_run_dir() -> Path | None:
    """The running Hydra job's output dir (the run dir), or None outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    except Exception:  # no Hydra, or a config without a runtime section (compose API)
        return None


def write_issues_csv(issues: Sequence[ClipIssue], folder: str | Path, name: str = ISSUES_FILE) -> Path:
    """``folder/name`` with columns path, action, reason; written atomically (a temp file, then a rename)."""
    import pandas as pd

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pd.DataFrame([asdict(i) for i in issues], columns=["path", "action", "reason"]).to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def report_issues(
    issues: Sequence[ClipIssue], total: int, report_dir: str | Path | None = None
) -> Path | None:
    """Log one line per kind (skipped, cropped) with the count and first paths; write the CSV to
    `report_dir` when given (and there is anything to list). Returns the CSV's path or None."""
    if not issues:
        return None
    csv = write_issues_csv(issues, report_dir) if report_dir is not None else None
    where = f"all listed in {csv}" if csv else "set a report dir to list them all"
    skipped = [i for i in issues if i.action == SKIPPED]
    cropped = [i for i in issues if i.action == CROPPED]
    if skipped:
        first = "; ".join(f"{i.path} ({i.reason})" for i in skipped[:3])
        log.warning(
            "skipped %d of %d clips that could not be used (%s); first: %s. Delete or re-export them.",
            len(skipped),
            total,
            where,
            first,
        )
    if cropped:
        log.warning(
            "cropped %d of %d clips longer than max_clip_s to their centre (%s); first: %s (%s)",
            len(cropped),
            total,
            where,
            cropped[0].path,
            cropped[0].reason,
        )
    return csv
