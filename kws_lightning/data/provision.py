"""Make a data set present under a folder: marker check → download (or a local file) → verify → unpack.

Shared by `python -m kws_lightning.data.download`, the data module's ``data.download=true`` and eval's
``input=test_v0.02``. A folder whose marker matches the request is returned at once, with no network
request. One process at a time prepares a folder (a lock file beside it), so DDP ranks on several
machines sharing a file system, or two commands started together, download it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kws_lightning.data.archives import DATASETS, MARKER_NAME, TEST_SETS, ArchiveSpec
from kws_lightning.data.extract import (
    ArchiveError,
    ChecksumMismatch,
    UnreadableArchiveError,
    UnsafeArchiveError,
    extract_archive,
    read_marker,
    verify_archive,
)
from kws_lightning.data.fetch import fetch, part_path

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The data folder, its marker, and whether this call found it already done (no download)."""

    root: Path
    marker: dict[str, Any]
    already_present: bool


def _marker_matches(marker: dict[str, Any], spec: ArchiveSpec) -> bool:
    if spec.sha256 is not None:
        return marker.get("sha256") == spec.sha256
    if spec.name is not None:
        return marker.get("dataset") == spec.name
    return marker.get("url") == spec.url


def _describe(spec: ArchiveSpec) -> str:
    return spec.name or spec.url


def check_existing(root: Path, spec: ArchiveSpec) -> Prepared | None:
    """A finished folder for `spec` (None: nothing there yet); an error for a folder holding anything else."""
    marker = read_marker(root)
    if marker is None:
        if root.is_dir() and any(root.iterdir()):
            raise ArchiveError(
                f"{root} already exists and was not unpacked by this tool (no {MARKER_NAME}): choose another "
                "root=, or use it as it is (data.root=... needs no download)"
            )
        if root.exists() and not root.is_dir():
            raise ArchiveError(f"{root} exists and is not a folder: choose another root=")
        return None
    if not _marker_matches(marker, spec):
        held = marker.get("dataset") or marker.get("url")
        raise ArchiveError(
            f"{root} holds {held} (sha256 {marker.get('sha256')}), not {_describe(spec)}: choose another "
            "root=, or add force=true to replace it"
        )
    missing = [name for name in marker.get("entries", []) if not (root / name).exists()]
    if missing:
        raise ArchiveError(
            f"{root} lacks {len(missing)} of the entries its download held (first: {missing[:3]}): add "
            "force=true to download it again"
        )
    return Prepared(root, marker, already_present=True)


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``.<root>.lock`` beside `root`, deleted on release. A waiter that wakes up
    holding a lock file another process has already deleted tries again with the new one."""
    root.parent.mkdir(parents=True, exist_ok=True)
    path = root.parent / f".{root.name}.lock"
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def download_folder(root: Path) -> Path:
    """Where downloads for `root` go (``.<root name>.download/`` beside it): a folder only this tool
    writes, so a file of the user's with the archive's name is never taken, verified or deleted."""
    return root.parent / f".{root.name}.download"


def local_archive(url: str) -> Path | None:
    """The path of a ``file://`` URL (None for other schemes); an error when the file is missing."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    path = Path(urllib.request.url2pathname(parts.path))
    if not path.is_file():
        raise ArchiveError(f"{url}: no such file {path}")
    return path


def ensure_dataset(
    spec: ArchiveSpec,
    root: str | Path,
    force: bool = False,
    keep_archive: bool = False,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    backoff_s: float = 2.0,
    accept_unmarked: bool = False,
) -> Prepared:
    """`spec`'s archive unpacked at `root`: at once when its marker is there, else fetched, verified and
    unpacked. The download goes to `download_folder(root)` (``<archive>.part`` while incomplete, resumed
    from there) and is deleted after unpacking unless `keep_archive`; a ``file://`` archive is read where
    it is and never deleted. `accept_unmarked`: a non-empty folder without a marker (unpacked by hand) is
    used as it is, with a warning, instead of being an error."""
    root = Path(root).expanduser().absolute()
    if accept_unmarked and root.is_dir() and read_marker(root) is None and any(root.iterdir()):
        log.warning("%s was not downloaded by this tool (no %s): used as it is", root, MARKER_NAME)
        return Prepared(root, {}, already_present=True)
    if not force and (done := check_existing(root, spec)) is not None:
        return done
    with _folder_lock(root):
        # Another process may have finished it while this one waited for the lock.
        if not force and (done := check_existing(root, spec)) is not None:
            return done
        if force and root.exists() and read_marker(root) is None and any(root.iterdir()):
            check_existing(root, spec)  # raises: never replace a folder this tool did not make
        if spec.sha256 is None:
            log.warning(
                "%s: no checksum to compare with (%s): the content is unverified; its SHA-256 goes into %s",
                _describe(spec),
                spec.checksum_source,
                root / MARKER_NAME,
            )
        local = local_archive(spec.url)
        archive = local or download_folder(root) / spec.filename
        if local is None and force:
            archive.unlink(missing_ok=True)
            part_path(archive).unlink(missing_ok=True)
        if local is None and not archive.exists():
            log.info("downloading %s to %s", spec.url, archive)
            try:
                fetch(spec.url, archive, spec.size, retries, timeout, backoff_s, progress)
            except BaseException:
                with contextlib.suppress(OSError):  # nothing to resume: leave no empty folder behind
                    archive.parent.rmdir()
                raise
        elif local is None:
            log.info("found %s from an earlier download: verifying it", archive)
        started = time.perf_counter()
        try:
            digest = verify_archive(archive, spec.sha256, spec.size, spec.checksum_source, progress)
        except ChecksumMismatch as error:
            if local is None:
                _discard(archive)
                raise ChecksumMismatch(f"{error}; deleted it: run again to download it afresh") from None
            raise
        log.info(
            "%s: SHA-256 %s (%s, %.1f s)",
            archive.name,
            digest,
            "verified" if spec.sha256 else "unverified: no checksum to compare with",
            time.perf_counter() - started,
        )
        record = {
            "tool": "kws-lightning",
            "dataset": spec.name,
            "url": spec.url,
            "archive": archive.name,
            "sha256": digest,
            "verified": spec.sha256 is not None,
            "size": archive.stat().st_size,
        }
        try:
            marker = extract_archive(archive, root, record, progress)
        except (UnsafeArchiveError, UnreadableArchiveError) as error:
            if local is None:  # a download that can never be unpacked: nothing of it is kept
                _discard(archive)
                raise type(error)(f"{error} (the downloaded archive was deleted)") from None
            raise
        if local is None and not keep_archive:
            _discard(archive)
        elif local is None:
            log.info("kept the archive: %s", archive)
        return Prepared(root, marker, already_present=False)


def _discard(archive: Path) -> None:
    """Delete a downloaded archive, and its download folder once empty."""
    archive.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        archive.parent.rmdir()


def official_test_set_folder(name: str, data_dir: str | Path) -> Path:
    """Where an official test set (`name` in TEST_SETS) lives by default: ``<data_dir>/<archive name>``."""
    return Path(data_dir).expanduser() / DATASETS[name].folder


def resolve_test_set_input(value: str, data_dir: str | Path, download: bool, progress: bool = True) -> str:
    """eval's ``input=``: a folder as given, or a test-set name (test_v0.01, test_v0.02) resolved to its
    folder under `data_dir`, downloaded first when `download` and it is not there yet."""
    from kws_lightning.data.archives import resolve_archive

    if value not in TEST_SETS:
        return value
    folder = official_test_set_folder(value, data_dir)
    spec = resolve_archive(value)
    if download:
        return str(ensure_dataset(spec, folder, progress=progress, accept_unmarked=True).root)
    if not (folder.is_dir() and any(folder.iterdir())):
        raise ArchiveError(
            f"input={value}: the official test set is not in {folder}: add download=true, or fetch it first "
            f"with `python -m kws_lightning.data.download dataset={value}`"
        )
    return str(folder)
