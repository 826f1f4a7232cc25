"""Download one URL to a file over HTTP(S): progress bar, resume with ``Range``, retries with back-off.

The bytes go to ``<dest>.part`` and are renamed to `dest` only once the server has sent all of them, so
a file under the final name is always whole (its checksum is checked by the caller). Every failure is a
`DownloadError` with a one-line message naming the URL and what to do; transient ones (HTTP 5xx / 408 /
429, a reset or cut connection, a timeout) are retried first, resuming from the partial file.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_NO_NETWORK = {errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH}


class DownloadError(RuntimeError):
    """A download that failed for good; the message is one line naming the URL and the fix."""


class _Transient(Exception):
    """A failure worth retrying (resuming from the partial file)."""


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _size_text(count: int | None) -> str:
    if count is None:
        return "unknown size"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """The server's response to a GET from `offset`; errors sorted into transient or final."""
    host = urlsplit(url).netloc or url
    headers = {"User-Agent": "kws-lightning", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 404:
            raise DownloadError(
                f"{url}: not found (HTTP 404): check the URL (or dataset= / mirror=: the archive name is "
                "kept)"
            ) from None
        if error.code == 416:
            raise _Transient("the server refused to resume (HTTP 416)") from None
        if error.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, socket.gaierror):
            raise DownloadError(
                f"{url}: cannot resolve the host {host} (DNS failure: {reason.strerror}): check the network "
                "connection and the URL, or use a mirror=BASE_URL / url=file:///path/to/archive"
            ) from None
        if isinstance(reason, OSError) and reason.errno in _NO_NETWORK:
            raise DownloadError(
                f"{url}: no network ({reason.strerror}): connect this machine to the internet, or download "
                "the archive elsewhere and pass url=file:///path/to/archive"
            ) from None
        if isinstance(reason, TimeoutError | ConnectionError):
            raise _Transient(f"{type(reason).__name__} connecting to {host}: {reason}") from None
        raise DownloadError(f"{url}: {reason}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
        raise _Transient(f"{type(error).__name__} from {host}: {error}") from None


def _content_range_start(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _download_once(
    url: str, part: Path, expected_size: int | None, timeout: float, progress: bool, label: str
) -> None:
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        log.warning(
            "%s is longer than the archive (%d > %d bytes): starting again", part, offset, expected_size
        )
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size and offset:
        return
    try:
        response = _open(url, offset, timeout)
    except _Transient:
        if offset:  # e.g. 416: the partial file does not fit what the server has; start clean next time
            part.unlink(missing_ok=True)
        raise
    with response:
        if offset and response.status == 200:
            log.info(
                "%s ignored the Range request (answered 200): restarting from byte 0", urlsplit(url).netloc
            )
            offset = 0
        elif offset and _content_range_start(response) != offset:
            part.unlink()
            raise _Transient(f"the server answered another range ({response.headers.get('Content-Range')})")
        elif offset:
            log.info("resuming %s from byte %d (%s already in %s)", label, offset, _size_text(offset), part)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else expected_size
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} is {total} bytes but the published size is {expected_size}: the server sends another "
                "file; check the URL or mirror="
            )
        received = offset
        try:
            with (
                open(part, "ab" if offset else "wb") as out,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=label,
                    disable=not progress,
                    mininterval=0.5,
                ) as bar,
            ):
                while True:
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise DownloadError(
                    f"disk full writing {part} ({_size_text(received)} of {_size_text(total)}): free "
                    f"space on {part.parent} (the archive needs {_size_text(total)} and about as much again "
                    "to extract), then run the same command to resume"
                ) from None
            if isinstance(error, TimeoutError | ConnectionError):
                raise _Transient(f"connection lost after {received} bytes ({error})") from None
            raise
        except http.client.HTTPException as error:
            raise _Transient(f"connection lost after {received} bytes ({type(error).__name__})") from None
        if total is not None and received < total:
            raise _Transient(f"connection closed after {received} of {total} bytes")


def fetch(
    url: str,
    dest: str | Path,
    expected_size: int | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff_s: float = 2.0,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download `url` to `dest` (through ``<dest>.part``, resumed when present) and return `dest`.

    Transient failures are retried up to `retries` times, waiting ``backoff_s * 2**k`` seconds; the
    partial file is kept, so running again later resumes too.
    """
    dest = Path(dest)
    if urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http://, https:// and file:// URLs are supported")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    failures = 0
    while True:
        try:
            _download_once(url, part, expected_size, timeout, progress, dest.name)
            break
        except _Transient as error:
            failures += 1
            have = part.stat().st_size if part.exists() else 0
            if failures > retries:
                raise DownloadError(
                    f"{url}: {error}; gave up after {retries} retries. Run the same command again to resume "
                    f"({have} bytes kept in {part})"
                ) from None
            delay = backoff_s * 2 ** (failures - 1)
            log.warning(
                "%s; retry %d/%d in %.0f s (resuming from byte %d)", error, failures, retries, delay, have
            )
            sleep(delay)
    os.replace(part, dest)
    return dest
