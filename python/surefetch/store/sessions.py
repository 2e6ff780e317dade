"""Durable records of units of work, and the request step of their cancellation.

A :class:`SessionStore` keeps sessions in SQLite (``sqlite:///PATH``, the
default) or PostgreSQL (``postgresql://...``, for several hosts sharing one
store), with the same schema and versioned migrations on both
(:mod:`surefetch.store.db`).

Cancelling is two steps:

1. *Request* (:meth:`SessionStore.request_cancel`): the owner asks; the row
   gets ``cancellation_status = 'requested'``, ``cancelled_at`` and
   ``cancelled_by``. Nothing is signalled yet. A session whose process has
   not attached yet stays requested; when a process later calls
   :meth:`SessionStore.attach_process`, the session is marked cancelled and
   :class:`~surefetch.errors.SessionCancelled` is raised, so the work never
   starts.
2. *Enforce*, on the session's host, by whoever runs its process: the
   supervisor for the jobs it runs (:mod:`surefetch.store.jobs`), a
   :class:`~surefetch.store.enforcer.CancellationEnforcer` for every other
   session (``surefetch enforce``, or the one ``surefetch serve`` runs). Either
   ends with :meth:`SessionStore.mark_cancelled`.

Metadata is never changed by cancellation. Users see only their own sessions:
:meth:`SessionStore.get` and :meth:`SessionStore.list` take the owner.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from surefetch._procs import host_id, process_start_time
from surefetch.errors import NotOwner, SessionCancelled, SessionNotFound, SurefetchError
from surefetch.store import users
from surefetch.store.checks import is_session_id
from surefetch.store.db import Database, default_db_url
from surefetch.store.session_table import (
    CANCELLATION_STATUSES,
    COLUMNS,
    NOT_A_JOB,
    NOTIFY_CHANNEL,
    STATUSES,
    UI_STATUSES,
    Session,
    cancel_unstarted,
    end_session,
    fetch_session,
    insert_session,
    row_to_session,
)

__all__ = ["HISTORY_LIMIT", "SessionStore"]

HISTORY_LIMIT = 100
"""How many of the newest sessions or jobs the faces (CLI, HTTP API) show by default."""

_FILTERS = ("status", "ui_status", "cancellation_status", "host")


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

    Attributes:
        url: the store's URL.
        db: the :class:`~surefetch.store.db.Database` it keeps its rows in, shared with
            the job queue.

    Raises:
        ValueError: the URL is not one of the forms above.
        SurefetchError: the database cannot be opened or migrated, or it was
            written by a newer surefetch.
    """

    def __init__(self, url: str | None = None, *, timeout: float = 10.0) -> None:
        self.url = url if url is not None else default_db_url()
        self.db = Database(self.url, timeout=timeout)
        self.db.migrate()

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.db.backend

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SessionStore({self.db.describe()})"

    def close(self) -> None:
        """Closes the pooled connections. The store can still be used afterwards (it reconnects)."""
        self.db.close()

    def schema_version(self) -> int:
        """The highest migration applied to this database."""
        return self.db.schema_version()

    # Older spellings of ``db.connection()`` and ``db.execute()``, kept for the tests and
    # scripts that reach into the database.
    def _conn(self) -> AbstractContextManager[Any]:
        return self.db.connection()

    def _execute(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.db.execute(conn, sql, params)

    # -- reads --

    def _require(self, conn: Any, session_id: str) -> Session:
        session = fetch_session(self.db, conn, session_id) if is_session_id(session_id) else None
        if session is None:
            raise SessionNotFound(
                f"no session {session_id!r} in {self.db.describe()}; "
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
        if not is_session_id(session_id):
            return None
        with self.db.connection() as conn:
            return fetch_session(self.db, conn, session_id)

    def get(self, session_id: str, owner: str) -> Session:
        """Reads one of ``owner``'s sessions.

        Args:
            session_id: the session's id.
            owner: the user asking.

        Raises:
            SessionNotFound: there is no session with that id.
            NotOwner: the session belongs to another user.
        """
        with self.db.connection() as conn:
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
        params: builtins.list[Any] = [owner]
        for key in _FILTERS:
            value = filters.get(key)
            if value is None:
                continue
            if key in allowed and value not in allowed[key]:
                raise ValueError(f"{key} must be one of {', '.join(allowed[key])}, not {value!r}")
            where.append(f"{key} = ?")
            params.append(value)
        sql = (
            f"SELECT {COLUMNS} FROM sessions WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, id DESC"
        )
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError(f"limit must be a non-negative int, not {limit!r}")
            sql += " LIMIT ?"
            params.append(limit)
        with self.db.connection() as conn:
            rows = self.db.execute(conn, sql, params).fetchall()
        return [row_to_session(row) for row in rows]

    def pending_cancellations(self, host: str | None = None) -> builtins.list[Session]:
        """Sessions whose cancellation was requested and whose process runs on ``host``,
        for its :class:`~surefetch.store.enforcer.CancellationEnforcer`.

        Sessions with no process yet are not included: their process is refused when
        it attaches (see :meth:`attach_process`). Nor are supervised jobs: their
        supervisor stops them, and their pid is the worker's, which runs other jobs.

        Args:
            host: a host id; None means this machine's (:func:`host_id`).
        """
        host = host if host is not None else host_id()
        with self.db.connection() as conn:
            rows = self.db.execute(
                conn,
                f"SELECT {COLUMNS} FROM sessions WHERE cancellation_status = 'requested' "
                f"AND host = ? AND pid IS NOT NULL AND status = 'running' AND {NOT_A_JOB} "
                "ORDER BY created_at",
                (host,),
            ).fetchall()
        return [row_to_session(row) for row in rows]

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
        with self.db.connection() as conn:
            session_id = insert_session(self.db, conn, owner, title, metadata)
            session = fetch_session(self.db, conn, session_id)
        assert session is not None
        return session

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
        started = process_start_time(pid) if host == host_id() else None
        with self.db.connection() as conn:
            cur = self.db.execute(
                conn,
                "UPDATE sessions SET status = 'running', pid = ?, pid_started = ?, host = ?, "
                "updated_at = ? WHERE id = ? AND cancellation_status = 'none' "
                "AND status IN ('pending', 'running')",
                (pid, started, host, time.time(), session_id),
            )
            if cur.rowcount == 1:
                session = fetch_session(self.db, conn, session_id)
                assert session is not None
                return session
            session = self._require(conn, session_id)
            if session.cancellation_status == "requested" and not session.finished:
                # Nothing runs yet: the request is enforced here, at once.
                cancel_unstarted(self.db, conn, session_id)
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
        with self.db.connection() as conn:
            if status == "failed" and cancel_unstarted(self.db, conn, session_id):
                return True
            if end_session(self.db, conn, session_id, status):
                return True
            self._require(conn, session_id)
        return False

    def request_cancel(self, session_id: str, by: str) -> bool:
        """Asks for a session to be cancelled (step one of two).

        Sets cancellation_status ``requested``, ``cancelled_at`` and ``cancelled_by``.
        Whoever runs the session's process on its host then stops it: its supervisor
        for a supervised job, else the cancellation enforcer of that host. A session
        with no process yet is refused when one attaches. Metadata is never touched.

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
        now = time.time()
        with self.db.connection() as conn:
            cur = self.db.execute(
                conn,
                "UPDATE sessions SET cancellation_status = 'requested', cancelled_at = ?, "
                "cancelled_by = ?, updated_at = ? WHERE id = ? AND owner = ? "
                "AND cancellation_status = 'none' AND status IN ('pending', 'running')",
                (now, by, now, session_id, by),
            )
            if cur.rowcount == 1:
                row = self.db.execute(
                    conn, "SELECT host FROM sessions WHERE id = ?", (session_id,)
                ).fetchone()
                self.db.notify(conn, NOTIFY_CHANNEL, (row[0] if row else None) or "")
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
        with self.db.connection() as conn:
            if end_session(self.db, conn, session_id, "cancelled"):
                return True
            self._require(conn, session_id)
        return False

    # -- users and tokens (surefetch.store.users) --

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
        return users.add_user(self.db, name)

    def revoke_token(self, token: str) -> bool:
        """Removes a token `add_user` returned; True when it existed."""
        return users.revoke_token(self.db, token)

    def authenticate(self, token: str) -> str | None:
        """The user a bearer token belongs to, or None for an unknown token.

        Args:
            token: the token as the client sent it.
        """
        return users.authenticate(self.db, token)
