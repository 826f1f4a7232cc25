"""Verify an archive, then unpack it safely and atomically, and record what was unpacked in a marker file.

Safety: Speech Commands archives hold plain files and folders only, so every other member (symbolic or
hard link, device, pipe) is refused, as are absolute names and ``..``. All members are checked before
anything is written (tarfile's data filter too, where this Python has it, as a second opinion only: it
was bypassed by CVE-2025-4517's PATH_MAX symlink chain on Pythons before 3.11.13 / 3.12.11). This module
writes each member itself, never through a link: the destination's resolved path must be the
destination itself, and files are created with ``O_EXCL | O_NOFOLLOW``. Atomicity: the archive is
unpacked into a private temporary folder beside the target, the marker is written last, and the folder
is renamed into place, so an interrupted or refused extraction never leaves a folder that looks
complete. The marker (``.kws_download.json``) records the archive's URL, SHA-256 and what it held.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kws_lightning.data.archives import MARKER_NAME

log = logging.getLogger(__name__)
HASH_CHUNK = 4 << 20
COPY_CHUNK = 1 << 20
# tarfile's own check (Python 3.11.4+ and backports): a second opinion, never the only one.
_DATA_FILTER = getattr(tarfile, "data_filter", None)


class ArchiveError(RuntimeError):
    """An archive that cannot be trusted or unpacked; the message is one line naming the file and the fix."""


class ChecksumMismatch(ArchiveError):
    """The archive's SHA-256 is not the expected one."""


class UnsafeArchiveError(ArchiveError):
    """A member that is not a plain file or folder, or that would be written outside the target folder."""


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


def _shown(text: str) -> str:
    """`text` quoted for a one-line message, cut short when long (links of the PATH_MAX attack)."""
    return repr(text if len(text) <= 160 else f"{text[:100]}...")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_member(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path inside the folder, as parts; refuses anything but a plain file or folder with a
    relative name that stays inside (Speech Commands archives hold no links, devices or pipes)."""
    name = member.name
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        raise UnsafeArchiveError(
            f"member {_shown(name)} is a {kind} (to {_shown(member.linkname)}): Speech Commands archives "
            "hold no links"
        )
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"member {_shown(name)} is a device, pipe or other special file")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"member {_shown(name)} has an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchiveError(f"member {_shown(name)} climbs out of the folder with '..'")
    return tuple(part for part in name.split("/") if part not in ("", "."))


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A failure of the archive's own bytes (corrupt or cut compression, unreadable file) as a
    tarfile.ReadError, told apart from a failure to write."""
    try:
        yield
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise tarfile.ReadError(f"{type(error).__name__}: {error}") from None


def _open(archive: Path) -> tarfile.TarFile:
    with _reading():
        try:
            return tarfile.open(archive, "r:*")
        except tarfile.ReadError:
            with open(archive, "rb") as source:
                head = source.read(32)
            raise tarfile.ReadError(f"not gzip, bzip2, xz or tar data; it starts with {head!r}") from None


def _scan(tar: tarfile.TarFile, folder: Path) -> list[tuple[tarfile.TarInfo, Path]]:
    """Every member with its destination, all checked before anything is written: check_member, the
    data filter, no file where a folder is (or under a file); a later copy of a file replaces an earlier
    one, as tar does. The stream is then read to its end, because tarfile stops quietly at a corrupt
    header: a damaged archive must fail, not unpack a shorter data set."""
    planned: dict[tuple[str, ...], tarfile.TarInfo] = {}
    is_folder: dict[tuple[str, ...], bool] = {}
    with _reading():
        for member in tar:
            parts = check_member(member)
            if _DATA_FILTER is not None:
                _DATA_FILTER(member, str(folder))
            if not parts:
                if member.isdir():  # the archive's "./" entry: the folder itself
                    continue
                raise UnsafeArchiveError(f"member {_shown(member.name)} is a file without a name")
            for end in range(1, len(parts)):
                if is_folder.setdefault(parts[:end], True) is False:
                    raise UnsafeArchiveError(
                        f"member {_shown(member.name)} lies under the file {'/'.join(parts[:end])!r}"
                    )
            if is_folder.setdefault(parts, member.isdir()) != member.isdir():
                kinds = ("folder", "file") if member.isdir() else ("file", "folder")
                raise UnsafeArchiveError(
                    f"member {_shown(member.name)} is a {kinds[0]} where an earlier member is a {kinds[1]}"
                )
            planned.pop(parts, None)
            planned[parts] = member
        while chunk := tar.fileobj.read(COPY_CHUNK):  # gzip checks its CRC at the end of the stream
            if chunk.strip(b"\0"):
                raise tarfile.ReadError(
                    f"it is corrupt: data follows the end of its file list at byte {tar.offset}"
                )
    return [(member, folder.joinpath(*parts)) for parts, member in planned.items()]


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    with _reading():
        source = tar.extractfile(member)
    while True:
        with _reading():
            chunk = source.read(COPY_CHUNK)
        if not chunk:
            return
        yield chunk


def write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Write a checked file or folder member at `dest` (an absolute, resolved path), never through a
    link: `dest` must resolve to itself (no link on the way), and a file is created afresh without
    following one (O_EXCL | O_NOFOLLOW)."""
    resolved = os.path.realpath(dest)
    if resolved != str(dest):
        raise UnsafeArchiveError(
            f"member {_shown(member.name)} would be written through a link, to {resolved}"
        )
    if member.isdir():
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(dest, flags, 0o666), "wb") as out:
        for chunk in _member_bytes(tar, member):
            out.write(chunk)
        out.flush()
        os.utime(out.fileno(), (member.mtime, member.mtime))


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
    # Private (0700): no other user can put a link in it while it fills. The archive goes into its
    # sub-folder, made with the usual permissions, which is what is renamed to root.
    temp = Path(tempfile.mkdtemp(prefix=f".{root.name}.extracting-", dir=root.parent)).resolve()
    folder = temp / "unpacked"
    try:
        folder.mkdir()
        with _open(archive) as tar:
            planned = _scan(tar, folder)
            files = sum(member.isfile() for member, _ in planned)
            with tqdm(
                total=files,
                unit=" files",
                desc=f"extract {archive.name}",
                disable=not progress,
                mininterval=0.5,
            ) as bar:
                for member, dest in planned:
                    write_member(tar, member, dest)
                    bar.update(member.isfile())
        content = _content_root(folder)
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
    except (UnsafeArchiveError, tarfile.FilterError) as error:
        raise UnsafeArchiveError(
            f"{archive} refused, nothing was unpacked into {root}: {_one_line(error)}"
        ) from None
    except tarfile.TarError as error:
        raise UnreadableArchiveError(
            f"{archive} is not a readable tar archive ({_one_line(error)}): check that url= / mirror= serves "
            f"the .tar.gz itself (a server may send an error page or a cut file); nothing was unpacked into "
            f"{root}"
        ) from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ArchiveError(
                f"disk full unpacking {archive} into {root.parent}: free space there (the archive is kept), "
                "then run the same command again"
            ) from None
        raise ArchiveError(f"cannot unpack {archive} into {root}: {_one_line(error)}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
