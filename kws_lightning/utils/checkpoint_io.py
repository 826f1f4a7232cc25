"""Checkpoint files written atomically: a temporary file beside the target, then a rename.

Lightning's default writer goes through fsspec, whose temporary file lives in TMPDIR; when TMPDIR is on
another filesystem (a node-local /tmp, the usual case on clusters) the final "move" is a copy, and a process
killed during it leaves a truncated last.ckpt. A rename within one directory is atomic: the target is
either the old file or the new one. Set on the trainer by conf/trainer/default.yaml (`plugins`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

# `.last.ckpt.tmp-<pid>`: hidden, so checkpoint globs (`*.ckpt`) never pick a half-written file.
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temporary_path(path: Path) -> Path:
    """Where `path` is written before the rename: same folder, hidden, named after this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint files left in `folder` by processes no longer running (killed mid-write)"""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        match = _TMP_PATTERN.match(candidate.name)
        if match is None or not match["name"].endswith(".ckpt") or _alive(int(match["pid"])):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    if removed:
        log.info("removed %d unfinished checkpoint file(s) of killed runs in %s", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, but not being written now: left by an earlier failed write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_torch_save(checkpoint: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, flushed to disk, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic on any local filesystem, whatever TMPDIR is; the first save
    into a folder also clears temporary files that killed processes left there. Remote URLs (s3://...) keep
    Lightning's fsspec path."""

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        folder = Path(path).parent
        if folder not in self._cleaned:
            remove_stale_temporaries(folder)
            self._cleaned.add(folder)
        atomic_torch_save(checkpoint, path)
