"""The catalog: the cache's metadata in one SQLite file (``catalog.db``), instead of
two small files per blob. It holds, per blob, its size, XXH3-128 and the last URL it
came from, and per URL, which blob it gave and under which validators.

Everything in it can be recomputed or refetched, so it is best effort: a record that
cannot be read or written costs a re-hash or a download, never a failed fetch, and it
is written without fsync (SQLite's WAL with ``synchronous=NORMAL``). A batch's records
are written in one transaction (`Catalog.deferred`): one write where there were two
file creations and two renames per blob.

The file is used only when nobody but us (or root) can have written it (see
`surefetch._fs.written_only_by_us`), and neither it nor its ``-wal`` and ``-shm``
files are followed through a symlink; otherwise the cache works without it."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from surefetch._fs import written_only_by_us

__all__ = ["BlobRecord", "Catalog", "UrlRecord"]

_log = logging.getLogger("surefetch.cache")

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
"""
_BUSY_TIMEOUT_S = 10.0
# Connections a forked child inherited: kept from the garbage collector (SQLite: a
# connection must not be carried across fork, and that includes closing it there).
_inherited: list[sqlite3.Connection] = []


@dataclass(frozen=True)
class BlobRecord:
    """What the catalog says of a blob: its size in bytes, its XXH3-128 (canonical hex),
    and the URL (redacted) it last came from, if any."""

    size: int
    xxh3_128: str
    url: str | None


@dataclass(frozen=True)
class UrlRecord:
    """Which blob a URL gave last time, and its validators (RFC 9110 §8.8)."""

    url: str
    sha256: str
    etag: str | None
    last_modified: str | None


class Catalog:
    """The catalog at `path`; opened on first use, once per process (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._deferred = threading.local()

    @property
    def path(self) -> Path:
        return self._path

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
        if row is None:
            return None
        url, digest, etag, modified = row
        if not isinstance(url, str) or not isinstance(digest, str):
            return None
        return UrlRecord(
            url,
            digest,
            etag if isinstance(etag, str) else None,
            modified if isinstance(modified, str) else None,
        )

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

    def forget_blob(self, digest: str) -> None:
        """Drops the record of a blob that left the cache (evicted, quarantined)."""
        self._write("DELETE FROM blobs WHERE sha256 = ?", (digest,))

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block, this thread's writes wait and are then made in one
        transaction (a batch's records: one write, not one per blob)."""
        if getattr(self._deferred, "writes", None) is not None:
            yield  # already deferred by an enclosing block
            return
        writes: list[tuple[str, tuple[object, ...]]] = []
        self._deferred.writes = writes
        try:
            yield
        finally:
            self._deferred.writes = None
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

    def _write(self, sql: str, parameters: tuple[object, ...]) -> None:
        pending = getattr(self._deferred, "writes", None)
        if pending is not None:
            pending.append((sql, parameters))
        else:
            self._execute_all([(sql, parameters)])

    def _execute_all(self, writes: list[tuple[str, tuple[object, ...]]]) -> None:
        if not writes:
            return
        with self._lock:
            connection = self._open()
            if connection is None:
                return
            try:
                with connection:  # one transaction
                    for sql, parameters in writes:
                        connection.execute(sql, parameters)
            except sqlite3.Error as exc:
                self._failed("write", exc)

    def _open(self) -> sqlite3.Connection | None:
        """The connection of this process (opened, and the file checked, on first use);
        None when the catalog cannot be used."""
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        if self._connection is not None:  # opened before a fork: never used, nor closed
            _inherited.append(self._connection)  # (closing could disturb the parent's locks)
        self._connection = None
        if not _usable(self._path):
            return None
        try:
            connection = sqlite3.connect(
                self._path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False
            )
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.executescript(_SCHEMA)
            except sqlite3.Error:
                connection.close()
                raise
        except sqlite3.Error as exc:
            self._failed("open", exc)
            return None
        self._connection, self._pid = connection, os.getpid()
        return connection

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        # Best effort: the cache works without its catalog (re-hashing, refetching).
        _log.info("cannot %s the cache's catalog %s: %s", what, self._path, exc)


def _usable(path: Path) -> bool:
    """Whether the catalog's files, those that exist, are regular files that nobody but
    us (or root) can have written, with one link each."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        try:
            st = path.with_name(name).lstat()
        except FileNotFoundError:
            continue
        except OSError:
            return False
        if not written_only_by_us(st):
            return False
    return True
