"""The catalog: the cache's metadata in one SQLite file (``catalog.db``), instead of
two small files per blob. It holds, per blob, its size, XXH3-128 and the last URL it
came from, and per URL, which blob it gave and under which validators.

Everything in it can be recomputed or refetched, so it is best effort: a record that
cannot be read or written costs a re-hash or a download, never a failed fetch, and it
is written without fsync (SQLite's WAL with ``synchronous=NORMAL``). A batch's records
are written in a few transactions (`Catalog.deferred`): one write where there were
two file creations and two renames per blob.

A catalog that cannot be written (a read-only cache that a trusted account fills) is
read; one that cannot be used at all is ignored, with one warning per process, until
``surefetch cache verify`` moves it to ``quarantine/`` and records the blobs again.

The file is used only when nobody but us (or root) can have written it (see
`surefetch._fs.written_only_by_us`), and neither it nor its ``-wal`` and ``-shm``
files are followed through a symlink; otherwise the cache works without it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from surefetch._fs import written_only_by_us
from surefetch._log import get_logger

__all__ = ["BlobRecord", "Catalog", "Holder", "UrlRecord", "url_record"]

_log = get_logger("surefetch.cache")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    xxh3_128 TEXT NOT NULL,
    url TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS urls (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    etag TEXT,
    last_modified TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS urls_by_blob ON urls (sha256);
CREATE TABLE IF NOT EXISTS holders (
    key TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    url TEXT NOT NULL,
    since REAL NOT NULL
) WITHOUT ROWID;
"""
# Each SQLite call waits at most this long for another process's lock, so that a
# Ctrl+C or a deadline is never held up; a write tries again (`_execute_all`) for up
# to its patience, then is dropped (the catalog is best effort).
_BUSY_TIMEOUT_S = 0.05
_RETRY_S = 0.01
_RECORDS_PATIENCE_S = 0.5
_HOLDERS_PATIENCE_S = 0.2
# A batch's deferred records are written at least this often (so that a killed batch
# loses few): every this many records, and after this many seconds.
_FLUSH_RECORDS = 1024
_FLUSH_S = 1.0
# Keys per query of `Catalog.urls` (SQLite allows 32,766 parameters since 3.32, 999 before).
_KEYS_PER_QUERY = 500
_warned: set[Path] = set()
# Connections a forked child inherited: kept from the garbage collector (SQLite: a
# connection must not be carried across fork, and that includes closing it there).
_inherited: list[sqlite3.Connection] = []


class BlobRecord(NamedTuple):
    """What the catalog says of a blob: its size in bytes, its XXH3-128 (canonical hex),
    and the URL (redacted) it last came from, if any."""

    size: int
    xxh3_128: str
    url: str | None


class UrlRecord(NamedTuple):
    """Which blob a URL gave last time, and its validators (RFC 9110 §8.8)."""

    url: str
    sha256: str
    etag: str | None
    last_modified: str | None


class Holder(NamedTuple):
    """Who said it holds an artifact lock: a process (`pid` on `host`) fetching `url`
    (redacted) since `since` (seconds since the epoch)."""

    pid: int
    host: str
    url: str
    since: float


class Catalog:
    """The catalog at `path`; opened on first use, once per process (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._writable = False
        self._problem: str | None = None
        self._pid = os.getpid()
        self._deferred = threading.local()
        # The last try to open it met another process's lock (not a lasting problem).
        self._busy_at_open = False

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Closes this process's connection (the next use opens it again)."""
        with self._lock:
            if self._pid == os.getpid():
                self._close()

    def problem(self) -> str | None:
        """Why this process does not use the catalog (None: it does, or there is none yet)."""
        with self._lock:
            self._open()
            return self._problem

    def blob(self, digest: str) -> BlobRecord | None:
        """The record of the blob `digest`, or None (none, or the catalog unusable)."""
        row = self._read("SELECT size, xxh3_128, url FROM blobs WHERE sha256 = ?", (digest,))
        if row is None:
            return None
        size, xxh3, url = row
        if not isinstance(size, int) or not isinstance(xxh3, str):
            return None
        return BlobRecord(size, xxh3, url if isinstance(url, str) else None)

    def url(self, key: str) -> UrlRecord | None:
        """The record of the URL with key `key` (`surefetch.cache.index.url_key`), or None."""
        row = self._read("SELECT url, sha256, etag, last_modified FROM urls WHERE key = ?", (key,))
        return url_record(*row) if row is not None else None

    def urls(self, keys: Sequence[str]) -> dict[str, UrlRecord]:
        """The records of the URLs with these keys that the catalog has (a few queries for
        a whole batch, not one per URL)."""
        found: dict[str, UrlRecord] = {}
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            rows = self._read_all(
                "SELECT key, url, sha256, etag, last_modified FROM urls WHERE key IN "
                f"({', '.join('?' * len(chunk))})",
                tuple(chunk),
            )
            for key, *fields in rows:
                record = url_record(*fields)
                if isinstance(key, str) and record is not None:
                    found[key] = record
        return found

    def put_blob(self, digest: str, size: int, xxh3_128: str, url: str | None = None) -> None:
        """Records a blob (keeping its last URL when `url` is None)."""
        self._write(
            "INSERT INTO blobs (sha256, size, xxh3_128, url) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sha256) DO UPDATE SET size = excluded.size, "
            "xxh3_128 = excluded.xxh3_128, url = COALESCE(excluded.url, blobs.url)",
            (digest, size, xxh3_128, url),
        )

    def put_url(self, key: str, record: UrlRecord) -> None:
        """Records which blob the URL with key `key` gave, and its validators."""
        self._write(
            "INSERT OR REPLACE INTO urls (key, url, sha256, etag, last_modified) "
            "VALUES (?, ?, ?, ?, ?)",
            (key, record.url, record.sha256, record.etag, record.last_modified),
        )

    def hold(self, keys: list[tuple[str, str]], holder: tuple[int, str, float]) -> None:
        """Says that this process (`holder`: pid, host, since) holds the artifact locks
        `keys` (key, redacted URL), for a waiter to name it; written at once, in one
        transaction, whatever `deferred` says."""
        pid, host, since = holder
        self._execute_all(
            [
                (
                    "INSERT OR REPLACE INTO holders (key, pid, host, url, since) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, pid, host, url, since),
                )
                for key, url in keys
            ],
            _HOLDERS_PATIENCE_S,
        )

    def released(self, keys: list[str], pid: int, host: str) -> None:
        """Withdraws what `hold` said of `keys` for this process (pid on host)."""
        self._execute_all(
            [
                ("DELETE FROM holders WHERE key = ? AND pid = ? AND host = ?", (key, pid, host))
                for key in keys
            ],
            _HOLDERS_PATIENCE_S,
        )

    def holder(self, key: str) -> Holder | None:
        """Who last said it holds the artifact lock `key`, or None."""
        row = self._read("SELECT pid, host, url, since FROM holders WHERE key = ?", (key,))
        if row is None:
            return None
        pid, host, url, since = row
        if not (
            isinstance(pid, int)
            and isinstance(host, str)
            and isinstance(url, str)
            and isinstance(since, (int, float))
        ):
            return None
        return Holder(pid, host, url, float(since))

    def forget_blob(self, digest: str) -> None:
        """Drops the records of a blob that left the cache (evicted, quarantined), and of
        the URLs that gave it."""
        self._write("DELETE FROM blobs WHERE sha256 = ?", (digest,))
        self._write("DELETE FROM urls WHERE sha256 = ?", (digest,))

    def set_aside(self, directory: Path) -> list[Path]:
        """Moves the files of an unusable catalog into `directory` (the cache's quarantine)
        so that the next use starts a new one; returns where they went.

        Raises:
            OSError: one could not be moved (it stays unused).
        """
        moved = []
        with self._lock:
            stamp = time.time_ns()
            for name in (self._path.name, f"{self._path.name}-wal", f"{self._path.name}-shm"):
                source = self._path.with_name(name)
                if not os.path.lexists(source):
                    continue
                target = directory / f"{name}.{stamp}"
                os.rename(source, target)
                moved.append(target)
            self._close()
            self._problem = None
        return moved

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block, this thread's writes are grouped: made in one transaction
        every `_FLUSH_RECORDS` records or `_FLUSH_S` seconds, and at the end (a batch's
        records: a few writes, not one per blob, and a killed batch loses few)."""
        if getattr(self._deferred, "writes", None) is not None:
            yield  # already deferred by an enclosing block
            return
        self._deferred.writes = []
        self._deferred.since = time.monotonic()
        try:
            yield
        finally:
            writes, self._deferred.writes = self._deferred.writes, None
            self._execute_all(writes)

    # -- the connection ----------------------------------------------------------

    def _read(self, sql: str, parameters: tuple[object, ...]) -> tuple[object, ...] | None:
        with self._lock:
            connection = self._open()
            if connection is None:
                return None
            try:
                row = connection.execute(sql, parameters).fetchone()
            except sqlite3.Error as exc:
                self._failed("read", exc)
                return None
        return tuple(row) if row is not None else None

    def _read_all(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._lock:
            connection = self._open()
            if connection is None:
                return []
            try:
                rows = connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                self._failed("read", exc)
                return []
        return [tuple(row) for row in rows]

    def _write(self, sql: str, parameters: tuple[object, ...]) -> None:
        pending: list[tuple[str, tuple[object, ...]]] | None = getattr(
            self._deferred, "writes", None
        )
        if pending is None:
            self._execute_all([(sql, parameters)])
            return
        pending.append((sql, parameters))
        now = time.monotonic()
        if len(pending) >= _FLUSH_RECORDS or now - self._deferred.since >= _FLUSH_S:
            self._deferred.writes, self._deferred.since = [], now
            self._execute_all(pending)

    def _execute_all(
        self,
        writes: list[tuple[str, tuple[object, ...]]],
        patience: float = _RECORDS_PATIENCE_S,
    ) -> None:
        """Makes `writes` in one transaction, trying again while another process holds
        the database for up to `patience` seconds (then they are dropped, and said so
        at the info level). The waits are short sleeps, which a Ctrl+C interrupts."""
        if not writes:
            return
        deadline = time.monotonic() + patience
        while True:
            with self._lock:
                connection = self._open()
                if connection is None:
                    # Opening it met another process's lock: try again; else it has none.
                    if not (self._busy_at_open and time.monotonic() < deadline):
                        return
                elif not self._writable:
                    return
                else:
                    try:
                        with connection:  # one transaction
                            for sql, rows in _runs(writes):
                                connection.executemany(sql, rows)
                        return
                    except sqlite3.Error as exc:
                        if not (_busy(exc) and time.monotonic() < deadline):
                            self._failed("write", exc)
                            return
            time.sleep(_RETRY_S)

    def _open(self) -> sqlite3.Connection | None:
        """The connection of this process (opened, and the files checked, on first use);
        None when the catalog cannot be used (`_problem` says why) or does not exist and
        cannot be created yet (tried again next time)."""
        if self._pid != os.getpid():  # forked: start again, never touching the parent's
            if self._connection is not None:
                _inherited.append(self._connection)
            self._connection, self._problem, self._pid = None, None, os.getpid()
        if self._connection is not None or self._problem is not None:
            return self._connection
        self._busy_at_open = False
        problem = _untrusted(self._path)
        if problem is None:
            try:
                self._connection, self._writable = _connect(self._path)
                return self._connection
            except sqlite3.Error as exc:
                if _busy(exc):  # another process is setting it up or writing: next time
                    _log.debug("the catalog %s is busy: %s", self._path, exc)
                    self._busy_at_open = True
                    return None
                if not os.path.lexists(self._path):
                    _log.debug("no catalog at %s yet: %s", self._path, exc)
                    return None
                problem = str(exc)
        self._set_problem(problem)
        return None

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        if isinstance(exc, sqlite3.OperationalError):  # busy, read-only, full disk: for now
            _log.info("cannot %s the cache's catalog %s: %s", what, self._path, exc)
            return
        self._close()  # damaged: not used again in this process
        self._set_problem(str(exc))

    def _set_problem(self, problem: str) -> None:
        self._problem = problem
        if self._path not in _warned:
            _warned.add(self._path)
            _log.warning(
                "the cache's catalog %s is not used (%s): the cache works without it, but "
                "hashes blobs again and downloads again what it would have revalidated; "
                "`surefetch cache verify` replaces it",
                self._path,
                problem,
            )

    def _close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
        self._connection, self._writable = None, False


def _connect(path: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection to the catalog at `path` and whether it can write: read-write (created
    if missing), else read-only (a cache this user may only read), else immutable (a
    read-only directory, where SQLite cannot create the WAL's index)."""
    try:
        connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            # NORMAL first: the switch to WAL and the schema of a new catalog are then
            # written without the fsyncs of the default (FULL).
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
        except sqlite3.Error:
            connection.close()
            raise
        return connection, True
    except sqlite3.OperationalError as first:
        if not os.path.lexists(path):
            raise
        for mode in ("mode=ro", "immutable=1"):
            uri = f"file:{urllib.parse.quote(str(path))}?{mode}"
            connection = sqlite3.connect(
                uri, uri=True, timeout=_BUSY_TIMEOUT_S, check_same_thread=False
            )
            try:
                connection.execute("SELECT count(*) FROM blobs, urls WHERE 0").fetchone()
            except sqlite3.Error:
                connection.close()
                continue
            _log.info("the cache's catalog %s is read only here (%s)", path, first)
            return connection, False
        raise


def url_record(url: object, digest: object, etag: object, modified: object) -> UrlRecord | None:
    """The fields of a URL's record (a row of the ``urls`` table, or an index file of the
    first format) as its record; None when the URL or digest is not a string."""
    if not isinstance(url, str) or not isinstance(digest, str):
        return None
    return UrlRecord(
        url,
        digest,
        etag if isinstance(etag, str) else None,
        modified if isinstance(modified, str) else None,
    )


def _runs(
    writes: list[tuple[str, tuple[object, ...]]],
) -> Iterator[tuple[str, list[tuple[object, ...]]]]:
    """`writes` as runs of one statement each (one `executemany` per run). The rows of
    a statement keep their order, and a DELETE keeps its place between the writes before
    and after it; the other writes are gathered by statement, which is safe because each
    of those upserts a table of its own."""
    upserts: dict[str, list[tuple[object, ...]]] = {}
    deletes: list[tuple[object, ...]] = []
    delete = ""
    for sql, parameters in writes:
        if not sql.startswith("DELETE"):
            if deletes:
                yield delete, deletes
                deletes = []
            upserts.setdefault(sql, []).append(parameters)
            continue
        yield from upserts.items()
        upserts = {}
        if deletes and sql != delete:
            yield delete, deletes
            deletes = []
        delete = sql
        deletes.append(parameters)
    if deletes:
        yield delete, deletes
    yield from upserts.items()


def _busy(exc: sqlite3.Error) -> bool:
    """Whether `exc` says another connection holds the database (SQLITE_BUSY/LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (named from 3.11 on)
    return "locked" in str(exc) or "busy" in str(exc)


def _untrusted(path: Path) -> str | None:
    """Why the catalog's files, those that exist, cannot be trusted (None: they can):
    each must be a regular file with one link that nobody but us (or root) can have
    written."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        file = path.with_name(name)
        try:
            st = file.lstat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{file}: {exc.strerror}"
        if not written_only_by_us(st):
            return (
                f"{file} is not a regular file with one link that only you or root can have written"
            )
    return None
