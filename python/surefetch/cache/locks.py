"""The artifact locks, so that at most one process fetches an artifact at a time.

An artifact's lock is one byte of the lock table, at an offset derived from its key
(``sha256-<hex>`` or ``url-<hash>``): an open file description lock
(`surefetch._fs.try_range_lock`), so that a batch takes a lock per artifact without
creating a file per artifact. The table is `TABLE_FILES` files,
``locks/artifacts.00`` to ``.31``, each key in one of them: the kernel checks a new
lock against every lock held on its file, so one file would make a batch of n
artifacts cost n² checks (0.8 s for 10,000). The kernel releases a lock when its holder
dies, so none can go stale. A holder says in the catalog who it is
(`Catalog.hold`), and a waiter names it in its messages.

A batch holds its locks through one descriptor per table file (`BatchLocks`): a batch
of any size keeps at most `TABLE_FILES` files open. A descriptor per lock failed at
the usual limit of 1,024 open files, and made the engine's threads wait for an RCU
grace period (8-16 ms here) each time the process's descriptor table doubled.

Caches of surefetch before the table were locked with one ``flock`` file per
artifact, ``locks/<key>.lock``, and their downloads ran in ``tmp/``. This version's
run in ``tmp/v2/`` (`PARTS`): a process of each kind on one cache can at worst
fetch an artifact twice, never write into the other's part file."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from surefetch._digests import blake2b
from surefetch._fs import (
    RANGE_LOCK_LIMIT,
    lock_byte,
    open_range_lock_file,
    try_flock,
    try_range_lock,
)
from surefetch._log import get_logger
from surefetch._procs import machine_name
from surefetch.cache.store import FILE_MODE, BlobStore, printable
from surefetch.download import CancelToken
from surefetch.errors import Cancelled, DownloadTimeout, LockTimeout, StorageError, redact_url

__all__ = [
    "PARTS",
    "TABLE_FILES",
    "BatchLocks",
    "announce",
    "flocked_if_free",
    "lock_place",
    "locked",
    "locked_if_free",
    "take_if_free",
    "withdraw",
]

_log = get_logger("surefetch.cache")
_POLL_S = 0.05
TABLE_FILES: Final = 32
PARTS: Final = ("tmp", "v2")  # where downloads under the table's locks run


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
    fd = _wait_for_lock(store, key, url, deadline, lock_timeout, cancel, on_wait)
    try:
        announce(store, [(key, url)])
        yield
    finally:
        withdraw(store, [key])
        os.close(fd)


def take_if_free(store: BlobStore, key: str) -> int | None:
    """The descriptor that now holds the artifact lock `key`, for the caller to close
    (after `announce`, and `withdraw` before closing); None when another process (or an
    earlier request of this one) has it."""
    name, offset = lock_place(key)
    locks = store.directory("locks")
    table = _table_path(locks, name)
    try:
        return try_range_lock(table, offset, create=True, mode=FILE_MODE, share=_shared_bits(locks))
    except OSError as exc:
        raise _table_error(table, exc) from exc


@functools.lru_cache(maxsize=4 * TABLE_FILES)
def _table_path(locks: Path, name: str) -> Path:
    return locks / name


class BatchLocks:
    """The artifact locks a batch takes and holds until `close`: each a byte of the lock
    table, all through one open file description per table file (its byte locks are
    released together when it is closed). Two requests of the batch for one artifact
    exclude each other here, as two descriptors would in the kernel."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._tables: dict[str, int] = {}
        self._held: set[int] = set()

    def take_if_free(self, key: str) -> bool:
        """Holds the artifact lock `key` if nobody (no other process, no other holder in
        this one, no earlier request of this batch) has it; False otherwise."""
        name, offset = lock_place(key)
        if offset in self._held:
            return False
        fd = self._tables.get(name)
        locks = self._store.directory("locks")
        table = _table_path(locks, name)
        try:
            if fd is None:
                fd = open_range_lock_file(
                    table, create=True, mode=FILE_MODE, share=_shared_bits(locks)
                )
                self._tables[name] = fd
            taken = lock_byte(fd, offset)
        except OSError as exc:
            raise _table_error(table, exc) from exc
        if taken:
            self._held.add(offset)
        return taken

    def close(self) -> None:
        """Releases every lock of the batch."""
        tables, self._tables = self._tables, {}
        self._held.clear()
        for fd in tables.values():
            os.close(fd)

    def __enter__(self) -> BatchLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def announce(store: BlobStore, held: list[tuple[str, str]]) -> None:
    """Says in the catalog that this process holds the locks of `held` (key, URL), for
    waiters to name it (best effort; the URLs are redacted: others may read it)."""
    if held:
        store.catalog.hold([(key, redact_url(url)) for key, url in held], _identity())


def withdraw(store: BlobStore, keys: list[str]) -> None:
    """Takes back what `announce` said of `keys`."""
    if keys:
        pid, host, _ = _identity()
        store.catalog.released(keys, pid, host)


def lock_place(key: str) -> tuple[str, int]:
    """Where the artifact lock `key` is: the table file (in ``locks/``) and the byte in
    it, from 62 bits of the key's BLAKE2b (two keys share one with odds of 2**-62, and
    then only wait for each other)."""
    digest = blake2b(key.encode(), digest_size=8).digest()
    offset = int.from_bytes(digest, "big") % RANGE_LOCK_LIMIT
    return f"artifacts.{offset % TABLE_FILES:02d}", offset


@contextlib.contextmanager
def locked_if_free(store: BlobStore, key: str) -> Iterator[bool]:
    """Holds the artifact lock `key` if nobody else does; yields whether it does (a
    cache with no lock table has no holder)."""
    name, offset = lock_place(key)
    table = store.checked("locks") / name
    try:
        fd = try_range_lock(table, offset, create=False)
    except FileNotFoundError:
        yield True
        return
    except OSError as exc:  # cannot tell: taken as held, so nothing is removed
        if exc.errno in _NOT_WRITABLE:  # the same for every table file: said once for all
            _warn_once(str(_table_error(table.parent / "artifacts.*", exc)))
        else:
            _warn_once(str(_table_error(table, exc)))
        yield False
        return
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


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
    store: BlobStore,
    key: str,
    url: str,
    deadline: float | None,
    lock_timeout: float,
    cancel: CancelToken | None,
    on_wait: Callable[[str], None] | None,
) -> int:
    """Polls the artifact lock `key` until it is ours, the time runs out, or `cancel` fires."""
    started = time.monotonic()
    lock_deadline = started + lock_timeout
    told = False
    while True:
        if cancel is not None and cancel.cancelled:
            raise Cancelled(
                f"cancelled while waiting for {_holder(store, key)} to finish {redact_url(url)}"
            )
        fd = take_if_free(store, key)
        if fd is not None:
            return fd
        now = time.monotonic()
        if not told:
            told = True
            _log.info("waiting for %s (cache lock of %s)", _holder(store, key), redact_url(url))
            if on_wait is not None:
                on_wait(_holder(store, key))
        waited = now - started
        if deadline is not None and now >= deadline and deadline <= lock_deadline:
            raise DownloadTimeout(
                f"the timeout ran out after {waited:.1f} s waiting for {_holder(store, key)} "
                f"to finish {redact_url(url)}; allow more time (timeout / --timeout) or stop "
                "that process"
            )
        if now >= lock_deadline:
            raise LockTimeout(
                f"gave up after {waited:.1f} s waiting for the cache lock on {redact_url(url)}, "
                "held by "
                f"{_holder(store, key)}; if that process is stuck stop it (its lock goes with it), "
                f"or wait longer (lock_timeout / --lock-timeout)"
            )
        time.sleep(_POLL_S)


_shared: dict[Path, int] = {}
_warned: set[str] = set()


def _shared_bits(locks: Path) -> int:
    """The permission bits that let the others who may write `locks` (its group, or
    everyone) take locks in a table file this process creates: a lock needs the file
    open for writing, and the umask would leave it this user's alone."""
    bits = _shared.get(locks)
    if bits is None:
        try:
            mode = os.stat(locks).st_mode
        except OSError:
            mode = 0
        bits = (0o060 if mode & stat.S_IWGRP else 0) | (0o006 if mode & stat.S_IWOTH else 0)
        _shared[locks] = bits
    return bits


def _table_error(path: Path, exc: OSError) -> OSError:
    """`exc`, which opening the lock table file `path` raised, as a `StorageError` that
    says what to do."""
    if exc.errno == errno.ELOOP:
        problem = "is a symbolic link, which the cache never follows: remove it (the cache "
        problem += "makes it again)"
    elif exc.errno in (errno.EISDIR, errno.EINVAL):
        problem = "is not a regular file: remove it (the cache makes it again)"
    elif exc.errno in _NOT_WRITABLE:
        problem = (
            "cannot be opened for writing, which taking a lock needs: let the users of "
            "this cache write it (chmod g+w, or a+w), or use a cache of your own"
        )
    else:
        return exc
    return StorageError(exc.errno, f"the cache's lock table {path} {problem}", str(path))


_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.warning("%s; its artifacts are taken as in use", message)


def _identity() -> tuple[int, str, float]:
    """This process as a lock holder: pid, host, and now (seconds since the epoch)."""
    return os.getpid(), machine_name(), time.time()


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (a killed holder leaves what it said)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _holder(store: BlobStore, key: str) -> str:
    """``pid 12 on host h (fetching URL since 12:00:01)``, from what the holder said."""
    said = store.catalog.holder(key)
    if said is None or (said.host == machine_name() and not _alive(said.pid)):
        return "another process (it has not said which)"
    try:
        since = time.strftime("%H:%M:%S", time.localtime(said.since))
    except (ValueError, OverflowError, OSError):
        return "another process (it has not said which)"
    host, url = printable(said.host), printable(redact_url(said.url))
    return f"pid {said.pid} on host {host} (fetching {url} since {since})"
