"""The library's loggers: `logging`'s logger ``surefetch`` and its children, with
`logging` imported only once a record can reach someone.

Most runs log nothing, and importing `logging` (with `traceback`, `string`, `weakref`
and their patterns) costs ~4 ms of every start. Nothing is lost by waiting: while
`logging` is not imported, no handler and no level can have been set, and the library's
records go nowhere (the ``surefetch`` logger gets a `logging.NullHandler`, so that
Python's last-resort handler never prints them unasked). A record is therefore dropped
here, unimported, exactly when `logging` would drop it; otherwise it goes to `logging`,
which then decides as ever.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["DEBUG", "ERROR", "INFO", "WARNING", "Logger", "get_logger", "log", "when_listened"]

# `logging`'s levels (the same numbers).
DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40

# Set up by `when_listened`, to run when `logging` is first needed; with the lowest
# level their handlers take.
_pending: list[Callable[[], None]] = []
_pending_from_level: int | None = None
_ready = False


class Logger:
    """A named logger whose records are handed to `logging` only when it is imported
    (by anyone) or a set-up waits (`when_listened`); the methods are `logging`'s, with
    %-style arguments."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg: str, *args: object) -> None:
        log(self.name, DEBUG, msg, *args, stacklevel=3)

    def info(self, msg: str, *args: object) -> None:
        log(self.name, INFO, msg, *args, stacklevel=3)

    def warning(self, msg: str, *args: object) -> None:
        log(self.name, WARNING, msg, *args, stacklevel=3)

    def error(self, msg: str, *args: object) -> None:
        log(self.name, ERROR, msg, *args, stacklevel=3)

    def exception(self, msg: str, *args: object) -> None:
        """An error, with the exception being handled (its traceback)."""
        log(self.name, ERROR, msg, *args, exc_info=True, stacklevel=3)

    def log(self, level: int, msg: str, *args: object) -> None:
        log(self.name, level, msg, *args, stacklevel=3)

    def __repr__(self) -> str:
        return f"<surefetch logger {self.name}>"


def get_logger(name: str) -> Logger:
    """The logger `name` (``surefetch`` or ``surefetch.<part>``)."""
    return Logger(name)


def log(
    name: str, level: int, msg: str, *args: object, exc_info: bool = False, stacklevel: int = 1
) -> None:
    """Logs `msg % args` at `level` (`logging`'s numbers) on the logger `name`: dropped
    when nothing could receive it (see the module's documentation). The engine's notes
    come here too (logger ``surefetch.engine``). `stacklevel`: as `logging`'s, counted
    from this function (the record names the caller that many frames up)."""
    if not _ready:
        if "logging" not in sys.modules and (
            _pending_from_level is None or level < _pending_from_level
        ):
            return
        _get_ready()
    import logging

    logging.getLogger(name).log(level, msg, *args, exc_info=exc_info, stacklevel=stacklevel)


def when_listened(setup: Callable[[], None], level: int) -> None:
    """Runs `setup` (which adds handlers from `level` up) before the first record of
    `level` or above, or at once when `logging` is already in use here; a set-up that
    never ran is replaced by the next one."""
    global _pending_from_level
    if _ready:
        setup()
        return
    _pending[:] = [setup]
    _pending_from_level = level


def _get_ready() -> None:
    global _ready, _pending_from_level
    import logging

    _ready = True
    logging.getLogger("surefetch").addHandler(logging.NullHandler())
    setups, _pending[:] = list(_pending), []
    _pending_from_level = None
    for setup in setups:
        setup()
