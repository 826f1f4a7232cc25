"""The one way a command reports an error the tool raises or expects: ``error: <message>`` on one line of
stderr and a non-zero exit status, never a traceback. Anything else is a bug and keeps its traceback.

Expected errors: kws-lightning's own error classes (`EXPECTED`: each names the bad input and the fix), a
command's `extra` classes, and a full disk (an ``OSError`` ENOSPC anywhere in the exception's chain: torch
raises it from inside its own errors), reported with the file or folder it was writing. The classes are
looked up among the modules already imported: an exception of a class can only exist once its module is
loaded, so reporting a config typo never imports torch.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# (module, class): the errors kws-lightning raises for bad input, each message naming the fix.
EXPECTED: tuple[tuple[str, str], ...] = (
    ("kws_lightning.utils.cli_errors", "UsageError"),
    ("kws_lightning.config_check", "ConfigError"),
    ("kws_lightning.checkpoints", "CheckpointError"),
    ("kws_lightning.data.index", "DataLayoutError"),
    ("kws_lightning.data.audio_io", "AudioReadError"),
    ("kws_lightning.data.archives", "ArchiveRequestError"),
    ("kws_lightning.data.extract", "ArchiveError"),
    ("kws_lightning.data.fetch", "DownloadError"),
    ("kws_lightning.data.espeak", "EspeakError"),
    ("kws_lightning.callbacks.finite_loss", "NonFiniteLossError"),
    ("kws_lightning.jobs.cv_folds", "CVError"),
)


class UsageError(ValueError):
    """A command's setting that cannot work as given; the message names the setting and the fix."""


class DiskFullError(OSError):
    """No space left on the device a command was writing to; the message names the file or folder."""


def _expected_classes() -> tuple[type[BaseException], ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in EXPECTED)
    return tuple(cls for cls in found if isinstance(cls, type))


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full(error: BaseException, folder: str | None = None) -> DiskFullError | None:
    """A `DiskFullError` naming where `error` failed to write, when it (or an error it came from) is ENOSPC;
    None otherwise. `folder`: what the command was writing into, when the error names no file."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno == errno.ENOSPC:
            where = link.filename or folder
            place = f" writing {where}" if where else ""
            return DiskFullError(
                errno.ENOSPC,
                f"disk full: no space left on the device{place}. Free space there, or write elsewhere "
                "(hydra.run.dir, paths.log_dir, paths.cache_dir)",
            )
    return None


def expected_message(
    error: BaseException, extra: tuple[type[BaseException], ...] = (), folder: str | None = None
) -> str | None:
    """The one line to print for `error` when it is expected (see the module docstring), else None."""
    full = error if isinstance(error, DiskFullError) else disk_full(error, folder)
    if full is not None:
        return full.strerror
    if isinstance(error, _expected_classes() + tuple(extra)):
        return str(error)
    return None


@contextmanager
def one_line_errors(
    code: int = 2, extra: tuple[type[BaseException], ...] = (), folder: str | None = None
) -> Iterator[None]:
    """Within: an expected error ends the process with ``error: <message>`` on stderr and exit `code`;
    `folder` is named for a full disk when the error names no file. Other errors propagate unchanged."""
    try:
        yield
    except Exception as error:
        message = expected_message(error, extra, folder)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None
