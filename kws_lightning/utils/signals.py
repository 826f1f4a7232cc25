"""SIGINT/SIGTERM: installing and restoring handlers (the one place the package swaps them) and
`TrainingInterrupted`, the stop they cause. Light on purpose: a job imports it before torch."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
Handler = Callable[[int, FrameType | None], Any]


def install_handlers(handler: Handler, signals: Iterable[int] = STOP_SIGNALS) -> dict[int, Any]:
    """Route `signals` to `handler`; returns the previous handlers for `restore_handlers`. Outside the main
    thread Python refuses to set handlers: then nothing changes and {} is returned."""
    previous: dict[int, Any] = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        restore_handlers(previous)
        return {}
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back what `install_handlers` replaced (a handler set outside Python comes back as the default)."""
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def handling_signals(handler: Handler, signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """Within: `signals` go to `handler`; the previous handlers come back on exit."""
    previous = install_handlers(handler, signals)
    try:
        yield
    finally:
        restore_handlers(previous)


class TrainingInterrupted(BaseException):
    """Training stopped on a signal after saving its state. A BaseException, like KeyboardInterrupt: generic
    `except Exception` handlers (a sweep's "record the failure, go on") must not swallow a request to stop."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None) -> None:
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(self.signum).name
        if checkpoint:
            where = f"saved {checkpoint}; resume with ckpt_path={checkpoint} (or ckpt_path=last)"
        elif step is None:
            where = "outside the training loop, nothing to save"
        else:
            where = "no checkpoint saved (no LastCheckpoint callback)"
        at = "" if step is None else f" at step {step}"
        super().__init__(f"interrupted by {name}{at}: {where}")

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by a signal: 128 + its number (SIGTERM 143, SIGINT 130)."""
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise TrainingInterrupted(signum)


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """Within: SIGINT/SIGTERM raise `TrainingInterrupted` at once (Lightning's SIGTERM handler calls this one
    too). For a job's start-up, sanity check, closing validation and test, where there is nothing to save;
    `StopOnSignal` defers the signals while training runs. Outside the main thread: no change."""
    with handling_signals(_raise_interrupted, STOP_SIGNALS):
        yield
