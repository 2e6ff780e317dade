"""The database behind the store: SQLite or PostgreSQL, pooled connections, migrations.

A :class:`Database` hides what differs between the two backends (connecting,
placeholders, transactions, LISTEN/NOTIFY) behind a few calls, keeps a small
pool of connections, and brings the schema up to date when it opens.

The schema is versioned, one number for the whole database. Each module that
owns tables registers its part of a version with :func:`register_migration`
(``surefetch.store.session_table`` the sessions, ``surefetch.store.users`` the
tokens, ``surefetch.store.job_table`` the jobs, ``surefetch.store.supervisors`` the
supervisors); the parts of one
version are applied in one transaction, in the order of their ``step``. Append
new versions; never edit an applied one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surefetch.errors import SurefetchError

__all__ = ["Database", "Migration", "default_db_url", "known_schema_version", "register_migration"]

_PG_MIGRATION_LOCK = 0x5355524546  # "SUREF": pg_advisory_xact_lock key for migrations
_POOL_SIZE = 16


def default_db_url() -> str:
    """The store used when none is given: ``$SUREFETCH_DB``, else SQLite under the XDG data dir.

    Returns:
        A URL: ``$SUREFETCH_DB`` if set, else
        ``sqlite:////$XDG_DATA_HOME/surefetch/sessions.db`` (``~/.local/share`` when
        ``XDG_DATA_HOME`` is unset or relative).
    """
    env = os.environ.get("SUREFETCH_DB")
    if env:
        return env
    data = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data) if data and os.path.isabs(data) else Path.home() / ".local" / "share"
    return "sqlite:///" + str(base / "surefetch" / "sessions.db")


# --- migrations ------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One owner's part of a schema version.

    Attributes:
        version: the schema version this part belongs to (1, 2, ...).
        step: the order of this part among the parts of its version.
        owner: the module that owns the tables (for messages).
        statements: the SQL, the same on both backends (SQLite maps the type names
            to its affinities).
    """

    version: int
    step: int
    owner: str
    statements: tuple[str, ...]


_MIGRATIONS: dict[tuple[int, int], Migration] = {}


def register_migration(migration: Migration) -> None:
    """Adds a table owner's part of a schema version (called when the owner is imported).

    Registering the same part again is a no-op (a module imported twice).

    Raises:
        ValueError: another part already holds this (version, step).
    """
    key = (migration.version, migration.step)
    held = _MIGRATIONS.get(key)
    if held is not None and held != migration:
        raise ValueError(
            f"migration {migration.version}.{migration.step} of {migration.owner} clashes with "
            f"the one of {held.owner}; give it the next free step or version"
        )
    _MIGRATIONS[key] = migration


def known_schema_version() -> int:
    """The highest schema version registered, the one a database is migrated to."""
    return max((version for version, _step in _MIGRATIONS), default=0)


def _versions() -> list[tuple[int, list[str]]]:
    """The registered statements grouped by version, in order; checks there is no gap."""
    by_version: dict[int, list[str]] = {}
    for (version, _step), migration in sorted(_MIGRATIONS.items()):
        by_version.setdefault(version, []).extend(migration.statements)
    expected = list(range(1, known_schema_version() + 1))
    if sorted(by_version) != expected:
        missing = sorted(set(expected) - set(by_version))
        raise SurefetchError(
            f"schema migration(s) {missing} are not registered: a table owner was not imported "
            "(import surefetch.store, which imports them all)"
        )
    return sorted(by_version.items())


# --- backends ----------------------------------------------------------------------


class _Backend:
    """What differs between SQLite and PostgreSQL: connecting, placeholders, migrations."""

    name = ""

    def connect(self) -> Any:
        raise NotImplementedError

    def sql(self, text: str) -> str:
        return text

    def healthy(self, conn: Any) -> bool:
        """True when ``conn`` can go back to the pool (open, no transaction left open)."""
        return not bool(getattr(conn, "in_transaction", False))

    @contextlib.contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    def migration_lock(self, conn: Any) -> None:
        """Called first inside the migration transaction; serializes concurrent migrators."""

    def notify(self, conn: Any, channel: str, payload: str) -> None:
        """Announces an event to LISTENing connections (PostgreSQL only)."""

    def describe(self) -> str:
        raise NotImplementedError


class _SQLite(_Backend):
    name = "sqlite"

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._wal_done = False

    def connect(self) -> sqlite3.Connection:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if not self._wal_done:
            self._enable_wal(conn)
            self._wal_done = True
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a new database to WAL needs an exclusive lock, and SQLite reports
        # "database is locked" at once, without its busy handler, when several
        # processes open the same new file together: retry until the busy timeout.
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    @contextlib.contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        with self._writers_turn():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _writers_turn(self) -> Iterator[None]:
        """Holds this database's writers' lock (``flock`` on ``<path>-writers``) for a
        transaction. SQLite's own busy handler sleeps 1, 2, 5, 10... up to 100 ms between
        tries, so writers of several processes that contend (a supervisor and its
        workers) lose most of their time asleep; on this lock the kernel wakes the next
        writer as soon as one is done. Without the file (a read-only directory, another
        user's file), the busy handler alone serializes the writers, as before."""
        fd: int | None = None
        if self.path != ":memory:" and not self.path.startswith("file:"):
            try:
                fd = os.open(self.path + "-writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no lock file here: the busy handler serializes the writers
                if fd is not None:
                    os.close(fd)
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def describe(self) -> str:
        return f"SQLite database {self.path}"


class _Postgres(_Backend):
    name = "postgresql"

    def __init__(self, url: str, connect_timeout: float) -> None:
        try:
            import psycopg  # noqa: F401  (fail early with a clear message when missing)
        except ImportError as exc:
            raise SurefetchError(
                f"PostgreSQL session stores need psycopg ({exc}): pip install 'surefetch[postgres]'"
            ) from None

        self.url = url
        self.connect_timeout = connect_timeout

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
        )

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def healthy(self, conn: Any) -> bool:
        from psycopg import pq

        return bool(
            not (conn.closed or conn.broken)
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
        )

    @contextlib.contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            yield

    def migration_lock(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))

    def notify(self, conn: Any, channel: str, payload: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def describe(self) -> str:
        import psycopg.conninfo

        try:
            info = psycopg.conninfo.conninfo_to_dict(self.url)
        except Exception:
            return "PostgreSQL database"
        return (
            f"PostgreSQL database {info.get('dbname', '?')} on "
            f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"
        )


def missing_sqlite_file(url: str) -> str | None:
    """The file a ``sqlite:///`` `url` names when there is nothing there yet (a command
    that only reads then has nothing to read, and creates nothing); None otherwise.

    Raises:
        ValueError: the URL is not one of the forms `Database` accepts.
    """
    backend = _parse_url(url, 0.0)
    if isinstance(backend, _SQLite) and not os.path.lexists(backend.path):
        return backend.path
    return None


def _parse_url(url: str, busy_timeout: float) -> _Backend:
    if not isinstance(url, str) or not url:
        raise ValueError("a session store URL is required, e.g. sqlite:////path/sessions.db")
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise ValueError(
                f"unsupported SQLite URL {url!r}: use sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db"
            )
        path = url[len("sqlite:///") :].split("?", 1)[0]
        if not path or path == ":memory:":
            raise ValueError(
                f"{url!r} names no file: a session store must be a file that several "
                "processes can open; use sqlite:////absolute/path.db"
            )
        return _SQLite(path, busy_timeout)
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return _Postgres("postgresql://" + url[len(prefix) :], busy_timeout)
    if "://" not in url:
        return _SQLite(url, busy_timeout)  # a bare filesystem path
    raise ValueError(
        f"unsupported session store URL {url!r}: use sqlite:///PATH or postgresql://HOST/DB"
    )


# --- the database --------------------------------------------------------------------


class Database:
    """One store database: a pool of connections to it, and its migrations.

    Thread-safe: connections come from a small internal pool, one per concurrent
    caller. Write SQL with ``?`` placeholders; :meth:`execute` adapts them.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` (the SQLAlchemy
            convention), a bare file path, or ``postgresql://user@host:port/db``.
        timeout: seconds to wait for a locked SQLite database or a PostgreSQL connection.

    Raises:
        ValueError: the URL is not one of the forms above.
        SurefetchError: PostgreSQL was asked for and psycopg is not installed.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self._backend = _parse_url(url, timeout)
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._backend.name

    def describe(self) -> str:
        """The database for messages, e.g. ``SQLite database /path/sessions.db``."""
        return self._backend.describe()

    def close(self) -> None:
        """Closes the pooled connections. The database can still be used (it reconnects)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    # -- connections --

    def connect(self) -> Any:
        """A new connection of its own, outside the pool (for LISTEN); the caller closes it.

        Raises:
            SurefetchError: the database cannot be opened or reached.
        """
        try:
            return self._backend.connect()
        except (sqlite3.Error, OSError) as exc:
            raise SurefetchError(
                f"cannot open the session store ({self.describe()}): {exc}; "
                "check the path and its permissions, or pass another --db"
            ) from exc
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg"):
                raise SurefetchError(
                    f"cannot connect to the session store ({self.describe()}): "
                    f"{str(exc).strip()}; check that PostgreSQL is running and the URL is right"
                ) from exc
            raise

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A pooled connection in autocommit mode, for the duration of the ``with``.

        Raises:
            SurefetchError: the database cannot be opened or reached.
        """
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self.connect()
        try:
            yield conn
        finally:
            if self._backend.healthy(conn):
                with self._lock:
                    if len(self._idle) < _POOL_SIZE:
                        self._idle.append(conn)
                        conn = None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A pooled connection inside one transaction: committed at the end of the ``with``,
        rolled back if it raises. On SQLite the write lock is taken at once."""
        with self.connection() as conn, self._backend.transaction(conn):
            yield conn

    def execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        """Runs one statement on ``conn`` and returns its cursor.

        Args:
            conn: a connection from :meth:`connection` or :meth:`transaction`.
            sql: the statement, with ``?`` placeholders.
            params: the values of the placeholders.
        """
        return conn.execute(self._backend.sql(sql), tuple(params))

    def execute_many(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Runs one statement on ``conn`` once for each row of placeholder values."""
        if not rows:
            return
        values = [tuple(row) for row in rows]
        if isinstance(conn, sqlite3.Connection):
            conn.executemany(self._backend.sql(sql), values)
        else:
            with conn.cursor() as cur:
                cur.executemany(self._backend.sql(sql), values)

    def notify(self, conn: Any, channel: str, payload: str) -> None:
        """Announces ``payload`` on ``channel`` to LISTENing connections (PostgreSQL only;
        a no-op on SQLite)."""
        self._backend.notify(conn, channel, payload)

    # -- schema --

    def migrate(self) -> None:
        """Applies the registered migrations this database does not have yet.

        Safe when several processes open the same new database together.

        Raises:
            SurefetchError: the database cannot be opened, or it was migrated by a newer
                surefetch.
        """
        latest = known_schema_version()
        versions = _versions()
        with self.transaction() as conn:
            self._backend.migration_lock(conn)
            self.execute(
                conn,
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)",
            )
            row = self.execute(conn, "SELECT MAX(version) FROM schema_version").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > latest:
                raise SurefetchError(
                    f"the session store ({self.describe()}) has schema version {current}, newer "
                    f"than this surefetch knows ({latest}); upgrade surefetch"
                )
            for version, statements in versions:
                if version <= current:
                    continue
                for statement in statements:
                    self.execute(conn, statement)
                self.execute(
                    conn,
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )

    def schema_version(self) -> int:
        """The highest migration applied to this database."""
        with self.connection() as conn:
            row = self.execute(conn, "SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0])
