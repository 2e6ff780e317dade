"""Signals held back while a step that must not stop halfway runs (a sync's install).

Python runs a signal's handler between two bytecodes of the main thread, so Ctrl+C can
raise KeyboardInterrupt between any two renames of a series that only makes sense whole.
`held_back` replaces the handlers of SIGINT and SIGTERM for the duration of such a step
with one that notes the signal, then puts the previous handlers back and acts on the
first signal that arrived, as its handler would have: the step is never cut, and the
interrupt is not lost, only delayed by the step's duration.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["COMPLETED_FIRST", "completed", "held_back", "mark_completed"]

#: The attribute of an exception raised by a held-back signal's handler that says what
#: completed before it took effect (for a library caller; the command line's handlers
#: note a signal after completion instead of raising: `completed`).
COMPLETED_FIRST = "surefetch_completed_first"

_HELD = (signal.SIGINT, signal.SIGTERM)

_completed: str | None = None


def completed() -> str | None:
    """What this process's command completed, that a later signal cannot undo (set by
    `held_back` when its step ends, and by `mark_completed`); None before that. A command
    line that owns the process stops raising on signals once it is set."""
    return _completed


def mark_completed(what: str | None) -> None:
    """Records that `what` is done (a file installed): see `completed`. None clears it."""
    global _completed
    _completed = what


@contextlib.contextmanager
def held_back(completed: str) -> Iterator[None]:
    """Runs the block with SIGINT and SIGTERM held back (see the module), then records
    `completed` (`mark_completed`) and acts on the first signal that arrived: its
    handler's exception (KeyboardInterrupt for SIGINT) is raised with `COMPLETED_FIRST`
    set to `completed`; under the default action the process ends by the signal; an
    ignored one stays ignored. When the block raises, its exception is raised and the
    signals that arrived are dropped.

    Only the main thread can set handlers; in another thread the block runs as it is
    (Python runs handlers only in the main thread, so they cannot cut it anyway).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def note(signum: int, frame: Any) -> None:
        arrived.append(signum)

    previous: dict[int, Any] = {signum: signal.signal(signum, note) for signum in _HELD}
    try:
        yield
    except BaseException:
        # The step failed: its error is what the caller hears of (a signal that arrived
        # meanwhile would only hide it, and claim a completion that did not happen).
        _restore(previous)
        raise
    mark_completed(completed)
    _restore(previous)
    if arrived:
        _act_on(arrived[0], previous[arrived[0]], completed)


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _act_on(signum: int, handler: Any, completed: str) -> None:
    if handler is None or handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action, now that it is back
    elif callable(handler):
        try:
            handler(signum, None)
        except BaseException as exc:
            setattr(exc, COMPLETED_FIRST, completed)
            raise
