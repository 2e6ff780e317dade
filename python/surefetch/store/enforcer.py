"""The cancellation enforcer: stops the processes of cancelled sessions, on one host.

One enforcer runs per host, for the sessions that are not supervised jobs
(``surefetch enforce``, or in-process in ``surefetch serve``); a supervisor is
the enforcer of the jobs it runs, and an enforcer never signals a job's worker
(:meth:`~surefetch.store.sessions.SessionStore.pending_cancellations` and the
claim below leave jobs out).

Before acting on a session an enforcer claims it with a compare-and-set on its
row (``claimed_by``, ``claim_expires``), so that two enforcers never act on the
same session; a claim it cannot use is released with the reason in ``last_error``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from surefetch._log import DEBUG, WARNING, get_logger
from surefetch._procs import host_id, process_state, send_signal
from surefetch.store.session_table import NOT_A_JOB, NOTIFY_CHANNEL
from surefetch.store.sessions import SessionStore

if TYPE_CHECKING:
    from surefetch.workspaces import WorkspaceManager

__all__ = ["CancellationEnforcer"]

log = get_logger("surefetch.sessions")


class CancellationEnforcer:
    """Stops the processes of sessions whose cancellation was requested, on one host.

    For each requested session running on its host it: claims the session
    (compare-and-set, so that racing enforcers act once), sends SIGTERM to the
    process group, waits up to ``grace`` seconds, sends SIGKILL, marks the session
    cancelled and cleans its workspace. A process already gone (ESRCH) is simply
    marked. A refused signal (EPERM) is recorded in ``last_error`` and retried on
    the next round; the session is not marked. Supervised jobs are never touched:
    their supervisor enforces them.

    Run it in a background thread (:meth:`start`, :meth:`stop`) or in the
    foreground (:meth:`run`, as ``surefetch enforce`` does). On PostgreSQL the loop
    LISTENs on ``surefetch_cancel`` and wakes as soon as a request is made; it also
    polls every ``interval`` seconds.

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
        self._foreground = False
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
            if session.pid is None or not self._claim(session.id, ttl):
                continue
            started = self._pid_started(session.id)
            if process_state(session.pid, started) == "gone":
                gone.append(session.id)
                continue
            result = send_signal(session.pid, signal.SIGTERM)
            if result == "gone":
                gone.append(session.id)
            elif result == "refused":
                self._refused(session.id, session.pid, "SIGTERM")
            else:
                waiting[session.id] = (session.pid, started)
        gone.extend(self._wait(waiting, self.grace))
        if waiting:
            for session_id, (pid, _started) in list(waiting.items()):
                if send_signal(pid, signal.SIGKILL) == "refused":
                    self._refused(session_id, pid, "SIGKILL")
                    del waiting[session_id]
            gone.extend(self._wait(waiting, 5.0))
            # SIGKILL was delivered; a process stuck in the kernel still dies on its way out.
            gone.extend(waiting)
        marked: list[str] = []
        for session_id in gone:
            if self.store.mark_cancelled(session_id):
                log.info("session %s: its process is gone; marked cancelled", session_id)
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
        level = DEBUG if session_id in self._refusals else WARNING
        self._refusals.add(session_id)
        log.log(level, "session %s: %s", session_id, message)
        self._release(session_id, message)

    # -- claims on the sessions table --

    def _claim(self, session_id: str, ttl: float) -> bool:
        """Claims a requested session for this enforcer until ``ttl`` seconds from now."""
        db = self.store.db
        now = time.time()
        with db.connection() as conn:
            cur = db.execute(
                conn,
                "UPDATE sessions SET claimed_by = ?, claim_expires = ? "
                "WHERE id = ? AND cancellation_status = 'requested' AND status = 'running' "
                f"AND (claimed_by IS NULL OR claimed_by = ? OR claim_expires < ?) AND {NOT_A_JOB}",
                (self._id, now + ttl, session_id, self._id, now),
            )
            return bool(cur.rowcount == 1)

    def _release(self, session_id: str, error: str | None) -> None:
        """Gives a claim back (to retry later), recording why this enforcer could not act."""
        db = self.store.db
        with db.connection() as conn:
            db.execute(
                conn,
                "UPDATE sessions SET claimed_by = NULL, claim_expires = NULL, last_error = ?, "
                "updated_at = ? WHERE id = ? AND claimed_by = ?",
                (error, time.time(), session_id, self._id),
            )

    def _pid_started(self, session_id: str) -> int | None:
        db = self.store.db
        with db.connection() as conn:
            row = db.execute(
                conn, "SELECT pid_started FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @staticmethod
    def _wait(waiting: dict[str, tuple[int, int | None]], timeout: float) -> list[str]:
        """Removes from ``waiting`` and returns the sessions whose process is gone in time."""
        deadline = time.monotonic() + timeout
        done: list[str] = []
        pause = 0.001
        while waiting:
            for session_id, (pid, started) in list(waiting.items()):
                if process_state(pid, started) == "gone":
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
        if self._thread is not None or self._foreground:
            raise RuntimeError("this enforcer is already running; call stop() first")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"surefetch-enforcer-{self.host}", daemon=True
        )
        self._thread.start()
        return self

    def run(self) -> None:
        """Runs :meth:`run_once` in this thread until :meth:`stop` (the foreground loop of
        ``surefetch enforce``; call :meth:`stop` from a signal handler or another thread).

        A round under way is finished first (at most the grace period and 5 s more).
        A :meth:`stop` that came before makes it return at once.

        Raises:
            RuntimeError: already running.
        """
        if self._thread is not None or self._foreground:
            raise RuntimeError("this enforcer is already running; call stop() first")
        self._foreground = True
        try:
            self._loop()
        finally:
            self._foreground = False
            self._stop.clear()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops the background thread and waits for it (up to ``timeout`` seconds), or makes
        :meth:`run` return after its current round (then it only sets a flag, so a signal
        handler may call it)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and self.store.backend == "postgresql":
            # Wake the thread out of its LISTEN wait (other enforcers just poll once more).
            db = self.store.db
            with contextlib.suppress(Exception), db.connection() as conn:
                db.notify(conn, NOTIFY_CHANNEL, f"stop:{self._id}")
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
            listener = self.store.db.connect()
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
