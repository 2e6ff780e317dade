"""Durable records of units of work, and their two-step cancellation.

A :class:`SessionStore` keeps sessions in SQLite (``sqlite:///PATH``, the
default) or PostgreSQL (``postgresql://...``, for several hosts sharing one
store), with the same schema and versioned migrations on both.

Cancelling is two steps:

1. *Request* (:meth:`SessionStore.request_cancel`): the owner asks; the row
   gets ``cancellation_status = 'requested'``, ``cancelled_at`` and
   ``cancelled_by``. Nothing is signalled yet. A session whose process has
   not attached yet stays requested; when a process later calls
   :meth:`SessionStore.attach_process`, the session is marked cancelled and
   :class:`~surefetch.errors.SessionCancelled` is raised, so the work never
   starts.
2. *Enforce* (:class:`CancellationEnforcer`, one per host): finds requested
   sessions whose process runs on its host, claims each one with a
   compare-and-set (so that two enforcers never act on the same session),
   sends SIGTERM to the process group, SIGKILL after the grace period, marks
   the session cancelled and cleans its workspace.

Metadata is never changed by cancellation. Users see only their own sessions:
:meth:`SessionStore.get` and :meth:`SessionStore.list` take the owner.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surefetch.errors import NotOwner, SessionCancelled, SessionNotFound, SurefetchError

if TYPE_CHECKING:
    from surefetch.workspaces import WorkspaceManager

__all__ = [
    "CANCELLATION_STATUSES",
    "FINISHED_STATUSES",
    "STATUSES",
    "UI_STATUSES",
    "CancellationEnforcer",
    "Session",
    "SessionStore",
    "default_db_url",
    "host_id",
]

log = logging.getLogger("surefetch.sessions")

STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
UI_STATUSES = ("in_progress", "needs_review", "done")
CANCELLATION_STATUSES = ("none", "requested", "cancelled")

#: The PostgreSQL channel a cancellation request is announced on (payload: the host).
NOTIFY_CHANNEL = "surefetch_cancel"

_MAX_TITLE = 1000
_MAX_OWNER = 200
_MAX_METADATA_BYTES = 64 * 1024
_FILTERS = ("status", "ui_status", "cancellation_status", "host")
_PG_MIGRATION_LOCK = 0x5355524546  # "SUREF": pg_advisory_xact_lock key for migrations

_COLUMNS = (
    "id, owner, title, metadata, status, ui_status, cancellation_status, cancelled_at, "
    "cancelled_by, host, pid, last_error, created_at, updated_at"
)


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


def host_id() -> str:
    """This machine's host id: ``$SUREFETCH_HOST_ID``, else the hostname."""
    return os.environ.get("SUREFETCH_HOST_ID") or socket.gethostname()


def _now() -> float:
    return time.time()


def _ts(value: float | None) -> _dt.datetime | None:
    if value is None:
        return None
    return _dt.datetime.fromtimestamp(value, tz=_dt.timezone.utc)


def _iso(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Session:
    """One session as stored. Times are timezone-aware UTC datetimes.

    ``last_error`` holds why the last enforcement attempt could not act (for
    example a refused signal); it is cleared when the session is marked cancelled.
    """

    id: str
    owner: str
    title: str
    metadata: dict[str, Any]
    status: str
    ui_status: str
    cancellation_status: str
    cancelled_at: _dt.datetime | None
    cancelled_by: str | None
    host: str | None
    pid: int | None
    last_error: str | None
    created_at: _dt.datetime
    updated_at: _dt.datetime

    @property
    def finished(self) -> bool:
        """True once the session reached succeeded, failed or cancelled."""
        return self.status in FINISHED_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """The session as a JSON-ready dict (times in ISO 8601, UTC, ``Z`` suffix)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "title": self.title,
            "metadata": self.metadata,
            "status": self.status,
            "ui_status": self.ui_status,
            "cancellation_status": self.cancellation_status,
            "cancelled_at": _iso(self.cancelled_at),
            "cancelled_by": self.cancelled_by,
            "host": self.host,
            "pid": self.pid,
            "last_error": self.last_error,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _row_to_session(row: Sequence[Any]) -> Session:
    created = _ts(row[12])
    updated = _ts(row[13])
    assert created is not None and updated is not None
    return Session(
        id=row[0],
        owner=row[1],
        title=row[2],
        metadata=json.loads(row[3]),
        status=row[4],
        ui_status=row[5],
        cancellation_status=row[6],
        cancelled_at=_ts(row[7]),
        cancelled_by=row[8],
        host=row[9],
        pid=row[10],
        last_error=row[11],
        created_at=created,
        updated_at=updated,
    )


# --- validation ------------------------------------------------------------------

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _check_text(name: str, value: object, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not empty and not value.strip():
        raise ValueError(f"{name} must not be empty; give a non-blank {name}")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character; remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text ({exc.reason}); fix it") from exc
    return value


def _dump_metadata(metadata: object) -> str:
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (a JSON object), not {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False, sort_keys=False)
        text.encode("ascii")
        json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"metadata must be JSON-serializable text and numbers: {exc}") from exc
    if len(text) > _MAX_METADATA_BYTES:
        raise ValueError(
            f"metadata is {len(text)} bytes as JSON; the limit is {_MAX_METADATA_BYTES}: "
            "keep large data in files and store their paths"
        )
    return text


def _is_session_id(value: object) -> bool:
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


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

    def notify(self, conn: Any, host: str | None) -> None:
        """Announces a cancellation request (PostgreSQL only)."""

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
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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

    def notify(self, conn: Any, host: str | None) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, host or ""))

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


# --- migrations ------------------------------------------------------------------

# Each migration: (version, statements). Same SQL on both backends (SQLite maps the
# type names to its affinities). Append new versions; never edit an applied one.
_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE sessions (
                id TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                title TEXT NOT NULL,
                metadata TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN
                    ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
                ui_status TEXT NOT NULL CHECK (ui_status IN
                    ('in_progress', 'needs_review', 'done')),
                cancellation_status TEXT NOT NULL CHECK (cancellation_status IN
                    ('none', 'requested', 'cancelled')),
                cancelled_at DOUBLE PRECISION,
                cancelled_by TEXT,
                host TEXT,
                pid INTEGER,
                pid_started BIGINT,
                last_error TEXT,
                claimed_by TEXT,
                claim_expires DOUBLE PRECISION,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX sessions_owner_created ON sessions (owner, created_at, id)",
            "CREATE INDEX sessions_cancel_requested ON sessions (host) "
            "WHERE cancellation_status = 'requested'",
            """CREATE TABLE tokens (
                token_hash TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX tokens_owner ON tokens (owner)",
        ),
    ),
    (
        2,
        (
            # Supervised jobs (surefetch.jobs): one per session, the work a worker runs.
            """CREATE TABLE jobs (
                session_id TEXT PRIMARY KEY REFERENCES sessions (id),
                kind TEXT NOT NULL CHECK (kind IN ('get', 'sync')),
                spec TEXT NOT NULL,
                host TEXT,
                worker TEXT,
                claim_expires DOUBLE PRECISION,
                crashes INTEGER NOT NULL DEFAULT 0,
                error TEXT,
                result TEXT,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX jobs_host_worker ON jobs (host, worker)",
            "CREATE INDEX jobs_created ON jobs (created_at)",
            # One row per running supervisor: who holds a host id, and its liveness.
            """CREATE TABLE supervisors (
                host TEXT PRIMARY KEY,
                pid INTEGER NOT NULL,
                pid_started BIGINT,
                hostname TEXT NOT NULL,
                socket TEXT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                heartbeat_at DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
)

SCHEMA_VERSION = _MIGRATIONS[-1][0]


# --- the store -----------------------------------------------------------------------


class SessionStore:
    """Sessions in SQLite or PostgreSQL, with owner-scoped reads and two-step cancellation.

    Thread-safe: connections come from a small internal pool, one per concurrent
    caller. Every state change is a single compare-and-set ``UPDATE``, so racing
    callers (threads, processes, hosts) never both win.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` (the SQLAlchemy
            convention), a bare file path, or ``postgresql://user@host:port/db``.
            ``None`` means :func:`default_db_url`.
        timeout: seconds to wait for a locked SQLite database or a PostgreSQL connection.

    Raises:
        ValueError: the URL is not one of the forms above.
        SurefetchError: the database cannot be opened or migrated, or it was
            written by a newer surefetch.
    """

    def __init__(self, url: str | None = None, *, timeout: float = 10.0) -> None:
        self.url = url if url is not None else default_db_url()
        self._backend = _parse_url(self.url, timeout)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._migrate()

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._backend.name

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SessionStore({self._backend.describe()})"

    def close(self) -> None:
        """Closes the pooled connections. The store can still be used afterwards (it reconnects)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    # -- connections --

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                conn = self._backend.connect()
            except (sqlite3.Error, OSError) as exc:
                raise SurefetchError(
                    f"cannot open the session store ({self._backend.describe()}): {exc}; "
                    "check the path and its permissions, or pass another --db"
                ) from exc
            except Exception as exc:
                if type(exc).__module__.startswith("psycopg"):
                    raise SurefetchError(
                        f"cannot connect to the session store ({self._backend.describe()}): "
                        f"{str(exc).strip()}; check that PostgreSQL is running and the URL "
                        "is right"
                    ) from exc
                raise
        try:
            yield conn
        finally:
            if self._backend.healthy(conn):
                with self._lock:
                    if len(self._idle) < 16:
                        self._idle.append(conn)
                        conn = None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self._backend.sql(sql), tuple(params))

    def _migrate(self) -> None:
        b = self._backend
        with self._conn() as conn, b.transaction(conn):
            b.migration_lock(conn)
            self._execute(
                conn,
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)",
            )
            row = self._execute(conn, "SELECT MAX(version) FROM schema_version").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise SurefetchError(
                    f"the session store ({b.describe()}) has schema version {current}, newer "
                    f"than this surefetch knows ({SCHEMA_VERSION}); upgrade surefetch"
                )
            for version, statements in _MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    self._execute(conn, statement)
                self._execute(
                    conn,
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, _now()),
                )

    def schema_version(self) -> int:
        """The highest migration applied to this database."""
        with self._conn() as conn:
            row = self._execute(conn, "SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0])

    # -- reads --

    def _fetch(self, conn: Any, session_id: str) -> Session | None:
        row = self._execute(
            conn, f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return None if row is None else _row_to_session(row)

    def _require(self, conn: Any, session_id: str) -> Session:
        session = self._fetch(conn, session_id) if _is_session_id(session_id) else None
        if session is None:
            raise SessionNotFound(
                f"no session {session_id!r} in {self._backend.describe()}; "
                "list yours with `surefetch sessions list`"
            )
        return session

    def lookup(self, session_id: str) -> Session | None:
        """Reads a session whatever its owner, for host-side machinery (enforcer, workspaces).

        Never hand the result to a user who does not own it: user-facing reads go
        through :meth:`get` and :meth:`list`.

        Args:
            session_id: the session's id.

        Returns:
            The session, or None if there is none with that id.
        """
        if not _is_session_id(session_id):
            return None
        with self._conn() as conn:
            return self._fetch(conn, session_id)

    def get(self, session_id: str, owner: str) -> Session:
        """Reads one of ``owner``'s sessions.

        Args:
            session_id: the session's id.
            owner: the user asking.

        Raises:
            SessionNotFound: there is no session with that id.
            NotOwner: the session belongs to another user.
        """
        with self._conn() as conn:
            session = self._require(conn, session_id)
        if session.owner != owner:
            raise NotOwner(
                f"session {session_id} belongs to another user; you can only see and "
                "cancel your own sessions (`surefetch sessions list`)"
            )
        return session

    def list(self, owner: str, **filters: Any) -> list[Session]:
        """``owner``'s sessions, newest first.

        Args:
            owner: the user whose sessions to list.
            **filters: any of ``status``, ``ui_status``, ``cancellation_status``,
                ``host`` (each a value to match exactly), and ``limit`` (at most
                that many sessions).

        Raises:
            TypeError: an unknown filter name.
            ValueError: a status value that does not exist, or a negative limit.
        """
        limit = filters.pop("limit", None)
        unknown = sorted(set(filters) - set(_FILTERS))
        if unknown:
            raise TypeError(
                f"unknown session filter(s) {', '.join(unknown)}; use {', '.join(_FILTERS)}"
                " or limit"
            )
        allowed = {
            "status": STATUSES,
            "ui_status": UI_STATUSES,
            "cancellation_status": CANCELLATION_STATUSES,
        }
        where = ["owner = ?"]
        params: list[Any] = [owner]
        for key in _FILTERS:
            value = filters.get(key)
            if value is None:
                continue
            if key in allowed and value not in allowed[key]:
                raise ValueError(f"{key} must be one of {', '.join(allowed[key])}, not {value!r}")
            where.append(f"{key} = ?")
            params.append(value)
        sql = (
            f"SELECT {_COLUMNS} FROM sessions WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, id DESC"
        )
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError(f"limit must be a non-negative int, not {limit!r}")
            sql += " LIMIT ?"
            params.append(limit)
        with self._conn() as conn:
            rows = self._execute(conn, sql, params).fetchall()
        return [_row_to_session(row) for row in rows]

    def pending_cancellations(self, host: str | None = None) -> builtins.list[Session]:
        """Sessions whose cancellation was requested and whose process runs on ``host``.

        Sessions with no process yet are not included: their process is refused when
        it attaches (see :meth:`attach_process`).

        Args:
            host: a host id; None means this machine's (:func:`host_id`).
        """
        host = host if host is not None else host_id()
        with self._conn() as conn:
            rows = self._execute(
                conn,
                f"SELECT {_COLUMNS} FROM sessions WHERE cancellation_status = 'requested' "
                "AND host = ? AND pid IS NOT NULL AND status = 'running' ORDER BY created_at",
                (host,),
            ).fetchall()
        return [_row_to_session(row) for row in rows]

    # -- writes --

    def create(self, owner: str, title: str, metadata: dict[str, Any] | None = None) -> Session:
        """Records a new session (status pending, ui_status in_progress).

        Args:
            owner: the user the session belongs to.
            title: a short human-readable description.
            metadata: a JSON object stored as given and never changed by surefetch.

        Raises:
            TypeError: an argument of the wrong type.
            ValueError: an empty owner or title, text that is too long or not valid
                Unicode, or metadata that is not JSON (NaN, non-string keys...).
        """
        with self._conn() as conn:
            session_id = self._insert(conn, owner, title, metadata)
            session = self._fetch(conn, session_id)
        assert session is not None
        return session

    def _insert(self, conn: Any, owner: str, title: str, metadata: dict[str, Any] | None) -> str:
        """Checks and inserts a new pending session on ``conn``; returns its id."""
        _check_text("owner", owner, _MAX_OWNER)
        _check_text("title", title, _MAX_TITLE)
        text = _dump_metadata(metadata)
        now = _now()
        session_id = uuid.uuid4().hex
        self._execute(
            conn,
            "INSERT INTO sessions (id, owner, title, metadata, status, ui_status, "
            "cancellation_status, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, 'pending', 'in_progress', 'none', ?, ?)",
            (session_id, owner, title, text, now, now),
        )
        return session_id

    def attach_process(self, session_id: str, pid: int, host: str | None = None) -> Session:
        """Records the process running a session and marks it running.

        Call it from the process (or its parent) before starting the work. If the
        session's cancellation was already requested, the session is marked cancelled
        instead and :class:`SessionCancelled` is raised: do not start the work.

        Args:
            session_id: the session's id.
            pid: the process id; its process group is what the enforcer signals when
                the process leads one, else the process alone.
            host: the host id; None means this machine's (:func:`host_id`).

        Raises:
            SessionNotFound: no session with that id.
            SessionCancelled: cancellation was requested (or enforced) before the
                process attached.
            SurefetchError: the session already finished (succeeded or failed).
            ValueError: ``pid`` is not a positive int.
        """
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"pid must be a positive int, not {pid!r}")
        host = host if host is not None else host_id()
        started = _process_start_time(pid) if host == host_id() else None
        now = _now()
        with self._conn() as conn:
            cur = self._execute(
                conn,
                "UPDATE sessions SET status = 'running', pid = ?, pid_started = ?, host = ?, "
                "updated_at = ? WHERE id = ? AND cancellation_status = 'none' "
                "AND status IN ('pending', 'running')",
                (pid, started, host, now, session_id),
            )
            if cur.rowcount == 1:
                session = self._fetch(conn, session_id)
                assert session is not None
                return session
            session = self._require(conn, session_id)
            if session.cancellation_status == "requested" and not session.finished:
                # Nothing runs yet: the request is enforced here, at once.
                self._execute(
                    conn,
                    "UPDATE sessions SET status = 'cancelled', cancellation_status = 'cancelled',"
                    " ui_status = 'needs_review', pid = NULL, pid_started = NULL, "
                    "claimed_by = NULL, claim_expires = NULL, updated_at = ? "
                    "WHERE id = ? AND cancellation_status = 'requested' "
                    "AND status IN ('pending', 'running')",
                    (now, session_id),
                )
                session = self._require(conn, session_id)
        if session.status == "cancelled" or session.cancellation_status != "none":
            raise SessionCancelled(
                f"session {session_id} was cancelled by {session.cancelled_by or 'its owner'} "
                "before its process started; do not run it (start a new session to retry)",
                session_id=session_id,
            )
        raise SurefetchError(
            f"session {session_id} already finished ({session.status}); "
            "start a new session to run the work again"
        )

    def finish(self, session_id: str, status: str) -> bool:
        """Records how a session ended: ``succeeded`` (ui_status done) or ``failed``
        (ui_status needs_review). The pid is cleared.

        A finished session keeps its state: finishing it again changes nothing. A
        session whose cancellation was requested and that reports ``failed`` (its
        process stopped on SIGTERM) is recorded as cancelled.

        Args:
            session_id: the session's id.
            status: ``"succeeded"`` or ``"failed"``.

        Returns:
            True if this call changed the session, False if it had already finished.

        Raises:
            SessionNotFound: no session with that id.
            ValueError: another status (cancellation goes through :meth:`request_cancel`).
        """
        if status not in ("succeeded", "failed"):
            raise ValueError(
                f"finish() takes status 'succeeded' or 'failed', not {status!r}; "
                "to cancel, use request_cancel()"
            )
        now = _now()
        with self._conn() as conn:
            if status == "failed":
                cur = self._execute(
                    conn,
                    "UPDATE sessions SET status = 'cancelled', cancellation_status = 'cancelled',"
                    " ui_status = 'needs_review', pid = NULL, pid_started = NULL, "
                    "claimed_by = NULL, claim_expires = NULL, updated_at = ? "
                    "WHERE id = ? AND cancellation_status = 'requested' "
                    "AND status IN ('pending', 'running')",
                    (now, session_id),
                )
                if cur.rowcount == 1:
                    return True
            if self._end(conn, session_id, status):
                return True
            self._require(conn, session_id)
        return False

    def _end(self, conn: Any, session_id: str, status: str) -> bool:
        """Ends an unfinished session on ``conn`` (a compare-and-set): ``succeeded`` (ui_status
        done), ``failed`` (needs_review) or ``cancelled`` (as :meth:`mark_cancelled`
        describes). The pid and any enforcer claim are cleared. True if it changed the row."""
        now = _now()
        if status == "cancelled":
            cur = self._execute(
                conn,
                "UPDATE sessions SET status = 'cancelled', cancellation_status = 'cancelled', "
                "ui_status = 'needs_review', pid = NULL, pid_started = NULL, last_error = NULL, "
                "claimed_by = NULL, claim_expires = NULL, "
                "cancelled_at = COALESCE(cancelled_at, ?), updated_at = ? "
                "WHERE id = ? AND status IN ('pending', 'running')",
                (now, now, session_id),
            )
        else:
            ui = "done" if status == "succeeded" else "needs_review"
            cur = self._execute(
                conn,
                "UPDATE sessions SET status = ?, ui_status = ?, pid = NULL, pid_started = NULL, "
                "claimed_by = NULL, claim_expires = NULL, updated_at = ? "
                "WHERE id = ? AND status IN ('pending', 'running')",
                (status, ui, now, session_id),
            )
        return bool(cur.rowcount == 1)

    def request_cancel(self, session_id: str, by: str) -> bool:
        """Asks for a session to be cancelled (step one of two).

        Sets cancellation_status ``requested``, ``cancelled_at`` and ``cancelled_by``.
        The enforcer on the session's host then stops its process; a session with no
        process yet is refused when one attaches. Metadata is never touched.

        Args:
            session_id: the session's id.
            by: the user asking; must be the owner.

        Returns:
            True if this call changed anything; False if cancellation was already
            requested or done, or the session had already finished (nothing to cancel;
            its state is kept).

        Raises:
            SessionNotFound: no session with that id.
            NotOwner: the session belongs to another user.
        """
        now = _now()
        with self._conn() as conn:
            cur = self._execute(
                conn,
                "UPDATE sessions SET cancellation_status = 'requested', cancelled_at = ?, "
                "cancelled_by = ?, updated_at = ? WHERE id = ? AND owner = ? "
                "AND cancellation_status = 'none' AND status IN ('pending', 'running')",
                (now, by, now, session_id, by),
            )
            if cur.rowcount == 1:
                row = self._execute(
                    conn, "SELECT host FROM sessions WHERE id = ?", (session_id,)
                ).fetchone()
                self._backend.notify(conn, row[0] if row else None)
                return True
            session = self._require(conn, session_id)
        if session.owner != by:
            raise NotOwner(
                f"session {session_id} belongs to another user; only its owner can cancel it"
            )
        return False

    def mark_cancelled(self, session_id: str) -> bool:
        """Records that a session's process is gone because of cancellation (step two).

        Sets status and cancellation_status ``cancelled``, clears the pid, sets
        ui_status ``needs_review`` and ``cancelled_at`` if it was unset. A
        compare-and-set: only one of several racing callers gets True.

        Args:
            session_id: the session's id.

        Returns:
            True if this call marked it; False if it had already finished.

        Raises:
            SessionNotFound: no session with that id.
        """
        with self._conn() as conn:
            if self._end(conn, session_id, "cancelled"):
                return True
            self._require(conn, session_id)
        return False

    # -- enforcement helpers (host-side) --

    def _claim(self, session_id: str, enforcer: str, ttl: float) -> bool:
        """Claims a requested session for one enforcer until ``ttl`` seconds from now."""
        now = _now()
        with self._conn() as conn:
            cur = self._execute(
                conn,
                "UPDATE sessions SET claimed_by = ?, claim_expires = ? "
                "WHERE id = ? AND cancellation_status = 'requested' AND status = 'running' "
                "AND (claimed_by IS NULL OR claimed_by = ? OR claim_expires < ?)",
                (enforcer, now + ttl, session_id, enforcer, now),
            )
            return bool(cur.rowcount == 1)

    def _release(self, session_id: str, enforcer: str, error: str | None) -> None:
        """Gives a claim back (to retry later), recording why the enforcer could not act."""
        with self._conn() as conn:
            self._execute(
                conn,
                "UPDATE sessions SET claimed_by = NULL, claim_expires = NULL, last_error = ?, "
                "updated_at = ? WHERE id = ? AND claimed_by = ?",
                (error, _now(), session_id, enforcer),
            )

    def _pid_started(self, session_id: str) -> int | None:
        with self._conn() as conn:
            row = self._execute(
                conn, "SELECT pid_started FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # -- users and tokens --

    def add_user(self, name: str) -> str:
        """Creates a new API token for user ``name`` (a user may hold several).

        Only the token's SHA-256 is stored; the token itself is returned once.

        Args:
            name: the user name; sessions created with the token belong to it.

        Returns:
            The new bearer token.

        Raises:
            ValueError: an empty, too long or non-text name.
        """
        _check_text("user name", name, _MAX_OWNER)
        token = secrets.token_urlsafe(32)
        with self._conn() as conn:
            self._execute(
                conn,
                "INSERT INTO tokens (token_hash, owner, created_at) VALUES (?, ?, ?)",
                (_hash_token(token), name, _now()),
            )
        return token

    def authenticate(self, token: str) -> str | None:
        """The user a bearer token belongs to, or None for an unknown token.

        Args:
            token: the token as the client sent it.
        """
        if not isinstance(token, str) or not token or len(token) > 512:
            return None
        digest = _hash_token(token)
        with self._conn() as conn:
            row = self._execute(
                conn, "SELECT token_hash, owner FROM tokens WHERE token_hash = ?", (digest,)
            ).fetchone()
        if row is None or not hmac.compare_digest(str(row[0]), digest):
            return None
        return str(row[1])


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# --- processes -------------------------------------------------------------------------


def _process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to detect pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _process_state(pid: int, started: int | None) -> str:
    """``"gone"`` (no process, a zombie, or a new process reusing the pid) or ``"alive"``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "gone"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "alive"
        return "alive"
    fields = data[data.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return "gone"
    if started is not None:
        try:
            if int(fields[19]) != started:
                return "gone"
        except (IndexError, ValueError):
            pass
    return "alive"


def _signal(pid: int, sig: int) -> str:
    """Signals the process group ``pid`` leads, or only ``pid`` when it leads none.

    Returns ``"sent"``, ``"gone"`` (ESRCH) or ``"refused"`` (EPERM). Never signals
    this process's own group.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return "gone"
    try:
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "refused"
    except OSError as exc:  # pragma: no cover - other errnos are not expected from kill(2)
        if exc.errno == errno.ESRCH:
            return "gone"
        raise
    return "sent"


class CancellationEnforcer:
    """Stops the processes of sessions whose cancellation was requested, on one host.

    For each requested session running on its host it: claims the session
    (compare-and-set, so that racing enforcers act once), sends SIGTERM to the
    process group, waits up to ``grace`` seconds, sends SIGKILL, marks the session
    cancelled and cleans its workspace. A process already gone (ESRCH) is simply
    marked. A refused signal (EPERM) is recorded in ``last_error`` and retried on
    the next round; the session is not marked.

    On PostgreSQL the background thread LISTENs on ``surefetch_cancel`` and wakes
    as soon as a request is made; it also polls every ``interval`` seconds.

    Args:
        store: the session store.
        host: the host id whose sessions to enforce; None means :func:`host_id`.
        interval: seconds between polls of the store.
        grace: seconds between SIGTERM and SIGKILL.
        workspaces: a WorkspaceManager whose workspace for the session is cleaned
            once its process is gone.
    """

    def __init__(
        self,
        store: SessionStore,
        host: str | None = None,
        interval: float = 0.2,
        grace: float = 5.0,
        workspaces: WorkspaceManager | None = None,
    ) -> None:
        if interval <= 0 or not math.isfinite(interval):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if grace < 0 or not math.isfinite(grace):
            raise ValueError(f"grace must be a non-negative number of seconds, not {grace!r}")
        self.store = store
        self.host = host if host is not None else host_id()
        self.interval = interval
        self.grace = grace
        self.workspaces = workspaces
        self._id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refusals: set[str] = set()

    # -- one round --

    def run_once(self) -> list[str]:
        """Acts on every pending session on this host, waiting out the grace period if needed.

        Returns:
            The ids of the sessions this call marked cancelled.
        """
        ttl = self.grace + 30.0
        waiting: dict[str, tuple[int, int | None]] = {}
        gone: list[str] = []
        for session in self.store.pending_cancellations(self.host):
            if session.pid is None or not self.store._claim(session.id, self._id, ttl):
                continue
            started = self.store._pid_started(session.id)
            if _process_state(session.pid, started) == "gone":
                gone.append(session.id)
                continue
            result = _signal(session.pid, signal.SIGTERM)
            if result == "gone":
                gone.append(session.id)
            elif result == "refused":
                self._refused(session.id, session.pid, "SIGTERM")
            else:
                waiting[session.id] = (session.pid, started)
        gone.extend(self._wait(waiting, self.grace))
        if waiting:
            for session_id, (pid, _started) in list(waiting.items()):
                if _signal(pid, signal.SIGKILL) == "refused":
                    self._refused(session_id, pid, "SIGKILL")
                    del waiting[session_id]
            gone.extend(self._wait(waiting, 5.0))
            # SIGKILL was delivered; a process stuck in the kernel still dies on its way out.
            gone.extend(waiting)
        marked: list[str] = []
        for session_id in gone:
            if self.store.mark_cancelled(session_id):
                marked.append(session_id)
            if self.workspaces is not None:
                try:
                    self.workspaces.cleanup(session_id)
                except Exception:
                    log.exception("session %s: cleaning its workspace failed", session_id)
        return marked

    def _refused(self, session_id: str, pid: int, what: str) -> None:
        message = (
            f"{what} to process {pid} was refused (EPERM) for enforcer {self._id} running as "
            f"uid {os.geteuid()}; run the enforcer as the user that runs the session's process"
        )
        # Warn once per session; the retries every round are logged at debug level.
        level = logging.DEBUG if session_id in self._refusals else logging.WARNING
        self._refusals.add(session_id)
        log.log(level, "session %s: %s", session_id, message)
        self.store._release(session_id, self._id, message)

    @staticmethod
    def _wait(waiting: dict[str, tuple[int, int | None]], timeout: float) -> list[str]:
        """Removes from ``waiting`` and returns the sessions whose process is gone in time."""
        deadline = time.monotonic() + timeout
        done: list[str] = []
        pause = 0.001
        while waiting:
            for session_id, (pid, started) in list(waiting.items()):
                if _process_state(pid, started) == "gone":
                    done.append(session_id)
                    del waiting[session_id]
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.02)
        return done

    # -- background thread --

    def start(self) -> CancellationEnforcer:
        """Runs :meth:`run_once` in a daemon thread until :meth:`stop`.

        Returns:
            self, so that ``enforcer = CancellationEnforcer(store).start()`` reads well.

        Raises:
            RuntimeError: already started.
        """
        if self._thread is not None:
            raise RuntimeError("this enforcer is already running; call stop() first")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"surefetch-enforcer-{self.host}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops the background thread and waits for it (up to ``timeout`` seconds)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and self.store.backend == "postgresql":
            # Wake the thread out of its LISTEN wait (other enforcers just poll once more).
            with contextlib.suppress(Exception), self.store._conn() as conn:
                self.store._backend.notify(conn, f"stop:{self._id}")
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> CancellationEnforcer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        pg = self.store.backend == "postgresql"
        # LISTEN before the first round, so that no request falls between the two.
        listener: Any = self._listen() if pg else None
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("cancellation enforcer round failed; retrying")
            if pg:
                listener = self._wait_notify(listener)
            else:
                self._stop.wait(self.interval)
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()

    def _listen(self) -> Any:
        try:
            listener = self.store._backend.connect()
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except Exception as exc:
            log.warning("LISTEN failed (%s); polling every %.2fs instead", exc, self.interval)
            return None
        return listener

    def _wait_notify(self, listener: Any) -> Any:
        """Waits for a NOTIFY or ``interval``; falls back to polling if LISTEN fails."""
        if listener is None or listener.closed or listener.broken:
            listener = self._listen()
            if listener is None:
                self._stop.wait(self.interval)
                return None
            return listener  # (re)connected: run a round at once, a request may have passed
        try:
            for _ in listener.notifies(timeout=self.interval, stop_after=1):
                pass
            # Drain what else arrived, so that one round serves a burst of requests.
            for _ in listener.notifies(timeout=0.0):
                pass
        except Exception as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", exc)
            with contextlib.suppress(Exception):
                listener.close()
            self._stop.wait(self.interval)
            return None
        return listener
