"""The artifact locks: one ``flock`` per artifact in ``locks/`` (key: ``sha256-<hex>``
or ``url-<hash>``), so that at most one process fetches an artifact at a time. The
kernel releases a lock when its holder dies, so none can go stale; the holder writes
who it is into the lock file, and a waiter names it in its messages."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from surefetch._fs import try_flock
from surefetch.cache.store import FILE_MODE, BlobStore, printable
from surefetch.download import CancelToken
from surefetch.errors import Cancelled, DownloadTimeout, LockTimeout, redact_url

__all__ = ["flocked_if_free", "locked", "locked_if_free", "take_if_free"]

_log = logging.getLogger("surefetch.cache")
_POLL_S = 0.05


@contextlib.contextmanager
def locked(
    store: BlobStore,
    key: str,
    url: str,
    deadline: float | None,
    lock_timeout: float,
    cancel: CancelToken | None,
    on_wait: Callable[[str], None] | None,
) -> Iterator[None]:
    """Holds the artifact lock `key`, waiting for its holder if needed (see
    `_wait_for_lock`)."""
    path = store.directory("locks") / f"{key}.lock"
    fd = _wait_for_lock(path, url, deadline, lock_timeout, cancel, on_wait)
    try:
        _write_holder(fd, url)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)


def take_if_free(store: BlobStore, key: str, url: str) -> int | None:
    """The descriptor that now holds the artifact lock `key` (its holder told: fetching
    `url`), for the caller to close; None when another process (or an earlier request of
    this one) has it."""
    fd = _flock_nb(store.directory("locks") / f"{key}.lock")
    if fd is not None:
        _write_holder(fd, url)
    return fd


@contextlib.contextmanager
def locked_if_free(store: BlobStore, key: str) -> Iterator[bool]:
    """Holds the artifact lock `key` if nobody else does; yields whether it does."""
    with flocked_if_free(store.checked("locks") / f"{key}.lock", unlink=False) as ok:
        yield ok


@contextlib.contextmanager
def flocked_if_free(path: Path, *, unlink: bool) -> Iterator[bool]:
    """Holds `path`'s flock if free (yields True), else yields False.

    With `unlink`, removes the lock file while still holding it (the engine's
    protocol: a waiter then notices the inode changed). A missing lock file
    counts as free, and is not created.
    """
    if not path.parent.is_dir():
        yield True
        return
    try:
        fd = _flock_nb(path)
    except FileNotFoundError:
        yield True
        return
    if fd is None:
        yield False
        return
    try:
        yield True
        if unlink:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _flock_nb(path: Path) -> int | None:
    """A descriptor holding an exclusive flock on the file now at `path`, or None when busy."""
    return try_flock(path, FILE_MODE)


def _wait_for_lock(
    path: Path,
    url: str,
    deadline: float | None,
    lock_timeout: float,
    cancel: CancelToken | None,
    on_wait: Callable[[str], None] | None,
) -> int:
    """Polls the flock on `path` until it is ours, the time runs out, or `cancel` fires."""
    started = time.monotonic()
    lock_deadline = started + lock_timeout
    told = False
    while True:
        if cancel is not None and cancel.cancelled:
            raise Cancelled(
                f"cancelled while waiting for {_holder(path)} to finish {redact_url(url)}"
            )
        fd = _flock_nb(path)
        if fd is not None:
            return fd
        now = time.monotonic()
        if not told:
            told = True
            _log.info("waiting for %s (cache lock of %s)", _holder(path), redact_url(url))
            if on_wait is not None:
                on_wait(_holder(path))
        waited = now - started
        if deadline is not None and now >= deadline and deadline <= lock_deadline:
            raise DownloadTimeout(
                f"the timeout ran out after {waited:.1f} s waiting for {_holder(path)} "
                f"to finish {redact_url(url)}; allow more time (timeout / --timeout) or stop "
                "that process"
            )
        if now >= lock_deadline:
            raise LockTimeout(
                f"gave up after {waited:.1f} s waiting for the cache lock on {redact_url(url)}, "
                "held by "
                f"{_holder(path)}; if that process is stuck stop it (its lock goes with it), "
                f"or wait longer (lock_timeout / --lock-timeout)"
            )
        time.sleep(_POLL_S)


def _write_holder(fd: int, url: str) -> None:
    """Tells waiters who holds the lock (best effort: another user's file is read-only).

    Others may read the lock file: the URL's password is not written.
    """
    import socket

    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "url": redact_url(url),
        "since": time.time(),
    }
    with contextlib.suppress(OSError):
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _holder(path: Path) -> str:
    """``pid 12 on host h (fetching URL since 12:00:01)``, from the lock file's content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            record = json.loads(os.read(fd, 8192) or b"{}")
        finally:
            os.close(fd)
        pid, host = int(record["pid"]), printable(str(record["host"]))
        url = printable(redact_url(str(record["url"])))
        since = time.strftime("%H:%M:%S", time.localtime(float(record["since"])))
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return "another process (it has not said which)"
    return f"pid {pid} on host {host} (fetching {url} since {since})"
