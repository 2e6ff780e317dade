"""The sessions table: its schema, the :class:`Session` record, and the row operations.

The session store (:mod:`surefetch.store.sessions`) and the job queue
(:mod:`surefetch.store.jobs`) both create and end sessions; they do it through
these functions, each a single statement run on the caller's connection, so that
the queue can make them part of its own transactions.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from surefetch.store.checks import MAX_OWNER, MAX_TITLE, check_text, dump_metadata
from surefetch.store.db import Database, Migration, register_migration

__all__ = [
    "CANCELLATION_STATUSES",
    "COLUMNS",
    "FINISHED_STATUSES",
    "NOTIFY_CHANNEL",
    "NOT_A_JOB",
    "STATUSES",
    "UI_STATUSES",
    "Session",
    "cancel_unstarted",
    "end_session",
    "end_sessions",
    "fetch_session",
    "insert_session",
    "requeue_session",
    "row_to_session",
]

STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
UI_STATUSES = ("in_progress", "needs_review", "done")
CANCELLATION_STATUSES = ("none", "requested", "cancelled")

#: The PostgreSQL channel a cancellation request is announced on (payload: the host).
NOTIFY_CHANNEL = "surefetch_cancel"

#: SQL condition on ``sessions``: the session is not a supervised job. Its supervisor
#: enforces a job's cancellation; an enforcer would signal the whole worker.
NOT_A_JOB = "NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.session_id = sessions.id)"

#: The columns a :class:`Session` is read from, in the order :func:`row_to_session` takes.
COLUMNS = (
    "id, owner, title, metadata, status, ui_status, cancellation_status, cancelled_at, "
    "cancelled_by, host, pid, last_error, created_at, updated_at"
)

register_migration(
    Migration(
        version=1,
        step=0,
        owner="surefetch.store.sessions",
        statements=(
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
        ),
    )
)


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


def row_to_session(row: Sequence[Any]) -> Session:
    """A :class:`Session` from a row of :data:`COLUMNS`."""
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


# --- session rows, inside a caller's transaction ----------------------------------------
#
# The job queue creates and ends sessions in its own transactions, with these.


def fetch_session(db: Database, conn: Any, session_id: str) -> Session | None:
    """Reads one session on ``conn``, whatever its owner; None if there is none."""
    row = db.execute(conn, f"SELECT {COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return None if row is None else row_to_session(row)


def insert_session(
    db: Database, conn: Any, owner: str, title: str, metadata: dict[str, Any] | None
) -> str:
    """Checks and inserts a new pending session on ``conn``; returns its id.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an empty owner or title, text that is too long or not valid
            Unicode, or metadata that is not JSON.
    """
    check_text("owner", owner, MAX_OWNER)
    check_text("title", title, MAX_TITLE)
    text = dump_metadata(metadata)
    now = time.time()
    session_id = uuid.uuid4().hex
    db.execute(
        conn,
        "INSERT INTO sessions (id, owner, title, metadata, status, ui_status, "
        "cancellation_status, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, 'pending', 'in_progress', 'none', ?, ?)",
        (session_id, owner, title, text, now, now),
    )
    return session_id


def end_session(db: Database, conn: Any, session_id: str, status: str) -> bool:
    """Ends an unfinished session on ``conn`` (a compare-and-set).

    ``succeeded`` (ui_status done), ``failed`` (needs_review) or ``cancelled`` (as
    :meth:`SessionStore.mark_cancelled` describes). The pid and any enforcer claim
    are cleared.

    Returns:
        True if it changed the row, False if the session had already finished.
    """
    return end_sessions(db, conn, [session_id], status) == 1


def end_sessions(db: Database, conn: Any, session_ids: Sequence[str], status: str) -> int:
    """`end_session` for several sessions in one statement; returns how many it ended."""
    if not session_ids:
        return 0
    now = time.time()
    among = ", ".join("?" for _ in session_ids)
    if status == "cancelled":
        cur = db.execute(
            conn,
            "UPDATE sessions SET status = 'cancelled', cancellation_status = 'cancelled', "
            "ui_status = 'needs_review', pid = NULL, pid_started = NULL, last_error = NULL, "
            "claimed_by = NULL, claim_expires = NULL, "
            "cancelled_at = COALESCE(cancelled_at, ?), updated_at = ? "
            f"WHERE id IN ({among}) AND status IN ('pending', 'running')",
            (now, now, *session_ids),
        )
    else:
        ui = "done" if status == "succeeded" else "needs_review"
        cur = db.execute(
            conn,
            "UPDATE sessions SET status = ?, ui_status = ?, pid = NULL, pid_started = NULL, "
            "claimed_by = NULL, claim_expires = NULL, updated_at = ? "
            f"WHERE id IN ({among}) AND status IN ('pending', 'running')",
            (status, ui, now, *session_ids),
        )
    return int(cur.rowcount)


def requeue_session(db: Database, conn: Any, session_id: str) -> None:
    """Puts a running session back to pending on ``conn``, forgetting its process and host
    (its job goes back to the queue)."""
    db.execute(
        conn,
        "UPDATE sessions SET status = 'pending', pid = NULL, pid_started = NULL, "
        "host = NULL, updated_at = ? WHERE id = ? AND status = 'running'",
        (time.time(), session_id),
    )


def cancel_unstarted(db: Database, conn: Any, session_id: str) -> bool:
    """Marks cancelled a session whose cancellation was requested and that never ran
    to an end (nothing of it runs any more). True if it changed the row."""
    cur = db.execute(
        conn,
        "UPDATE sessions SET status = 'cancelled', cancellation_status = 'cancelled',"
        " ui_status = 'needs_review', pid = NULL, pid_started = NULL, "
        "claimed_by = NULL, claim_expires = NULL, updated_at = ? "
        "WHERE id = ? AND cancellation_status = 'requested' "
        "AND status IN ('pending', 'running')",
        (time.time(), session_id),
    )
    return bool(cur.rowcount == 1)
