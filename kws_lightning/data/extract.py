"""Verify an archive, then unpack it safely and atomically, and record what was unpacked in a marker file.

Safety: every member is checked before it is written (no absolute path, no ``..``, no link leaving the
folder, no device file) and written by tarfile's ``filter="data"`` as a second line of defence. Atomicity:
the archive is unpacked into a temporary folder beside the target, the marker is written last, and the
folder is renamed into place, so an interrupted or refused extraction never leaves a folder that looks
complete. The marker (``.kws_download.json``) records the archive's URL, SHA-256 and what it held.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kws_lightning.data.archives import MARKER_NAME

log = logging.getLogger(__name__)
HASH_CHUNK = 4 << 20


class ArchiveError(RuntimeError):
    """An archive that cannot be trusted or unpacked; the message is one line naming the file and the fix."""


class ChecksumMismatch(ArchiveError):
    """The archive's SHA-256 is not the expected one."""


class UnsafeArchiveError(ArchiveError):
    """A member would be written outside the target folder (or is a device file)."""


class UnreadableArchiveError(ArchiveError):
    """Not a tar archive, or a truncated one."""


def sha256_file(path: Path, progress: bool = False) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with (
        open(path, "rb") as source,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"sha256 {path.name}",
            disable=not progress,
            mininterval=0.5,
        ) as bar,
    ):
        while chunk := source.read(HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_archive(
    path: Path, sha256: str | None, size: int | None, source: str, progress: bool = False
) -> str:
    """The archive's SHA-256, after checking its size and (when known) its checksum against `source`'s."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumMismatch(f"{path} is {actual_size} bytes, expected {size} ({source})")
    digest = sha256_file(path, progress)
    if sha256 is not None and digest != sha256:
        raise ChecksumMismatch(f"{path}: SHA-256 mismatch: expected {sha256} ({source}), got {digest}")
    return digest


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse a member that would land outside the extraction folder, or that is not a file/folder/link."""
    name = member.name
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"member {name!r} has an absolute path")
    if ".." in parts:
        raise UnsafeArchiveError(f"member {name!r} climbs out of the folder with '..'")
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            raise UnsafeArchiveError(f"member {name!r} links to the absolute path {target!r}")
        # A symlink is relative to its own folder; a hard link to the archive's root.
        base = posixpath.dirname("/".join(parts)) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchiveError(f"member {name!r} links outside the folder (to {target!r})")
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"member {name!r} is a device or pipe, not a file")


def _content_root(folder: Path) -> Path:
    """The unpacked folder itself, or its only sub-folder when the archive wraps everything in one."""
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a folder this tool unpacked, or None (no marker, or an unreadable one)."""
    path = root / MARKER_NAME
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _publish(content: Path, root: Path) -> None:
    """Rename `content` to `root`; an existing `root` is replaced only if empty or made by this tool."""
    if root.is_symlink() or root.exists():
        if root.is_dir() and not root.is_symlink() and not any(root.iterdir()):
            root.rmdir()
        elif root.is_dir() and read_marker(root) is not None:
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.replaced-", dir=root.parent))
            os.replace(root, old / root.name)
            os.replace(content, root)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise ArchiveError(
                f"{root} already exists and was not unpacked by this tool (no {MARKER_NAME}): choose another "
                "root=, or move it away"
            )
    os.replace(content, root)


def extract_archive(
    archive: Path, root: Path, record: dict[str, Any], progress: bool = False
) -> dict[str, Any]:
    """Unpack `archive` into `root` (see the module docstring); returns the marker written there."""
    from tqdm import tqdm

    root.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{root.name}.extracting-", dir=root.parent))
    files = 0
    try:
        with (
            tarfile.open(archive, "r:*") as tar,
            tqdm(unit=" files", desc=f"extract {archive.name}", disable=not progress, mininterval=0.5) as bar,
        ):
            for member in tar:
                check_member(member)
                tar.extract(member, temp, filter="data")
                if member.isfile():
                    files += 1
                    bar.update(1)
        content = _content_root(temp)
        entries = sorted(p.name for p in content.iterdir())
        if not entries:
            raise ArchiveError(f"{archive} is empty")
        marker = {
            **record,
            "extracted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            "entries": entries,
        }
        # Written last, inside the folder that is renamed: a folder with a marker is always complete.
        (content / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        _publish(content, root)
        return marker
    except UnsafeArchiveError as error:
        raise UnsafeArchiveError(f"{archive} refused, nothing was unpacked into {root}: {error}") from None
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(f"{archive} refused, nothing was unpacked into {root}: {error}") from None
    except (tarfile.TarError, EOFError) as error:
        raise UnreadableArchiveError(
            f"{archive} is not a readable tar archive ({error}), nothing was unpacked into {root}"
        ) from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ArchiveError(
                f"disk full unpacking {archive} into {root.parent}: free space there (the archive is kept), "
                "then run the same command again"
            ) from None
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
