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

__all__ = ["COMPLETED_FIRST", "held_back"]

#: The attribute of an exception raised by a held-back signal's handler that says what
#: completed before it took effect (for the command line's one line on stderr).
COMPLETED_FIRST = "surefetch_completed_first"

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def held_back(completed: str) -> Iterator[None]:
    """Runs the block with SIGINT and SIGTERM held back (see the module), then acts on
    the first that arrived: its handler's exception (KeyboardInterrupt for SIGINT) is
    raised with `COMPLETED_FIRST` set to `completed`; under the default action the
    process ends by the signal; an ignored one stays ignored.

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
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if arrived:
            _act_on(arrived[0], previous[arrived[0]], completed)


def _act_on(signum: int, handler: Any, completed: str) -> None:
    if handler is None or handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action, now that it is back
    elif callable(handler):
        try:
            handler(signum, None)
        except BaseException as exc:
            setattr(exc, COMPLETED_FIRST, completed)
            raise
