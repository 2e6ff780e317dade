"""Supervised jobs: the durable queue that supervisors and their workers share.

A job is one session (:mod:`surefetch.store.sessions`) plus what to run: a ``get`` (url,
destination, optional sha256) or a ``sync`` (manifest, lockfile, destination).
The session holds the state; the ``jobs`` row holds the spec and who runs it:

- *queued*: session ``pending`` and no host. Any supervisor may claim it.
- *assigned*: a host and a worker slot (``w0``, ``w1``...) hold it, with a claim
  that the host's supervisor heartbeats. The worker in that slot runs every
  unfinished job assigned to it, so a restarted worker converges on the same set.
  The supervisor claims jobs for its slots; a worker whose commit frees a place in
  its slot claims the next ones itself, in that commit (:meth:`JobQueue.commit_group`).
- *running*: the worker attached its pid to the session.
- finished: the session ``succeeded``, ``failed`` or ``cancelled``; the row keeps
  its host, worker, error and result for listing.

A host whose claims expire (its supervisor went silent) has its unfinished jobs
re-queued, and a worker never finishes a job that is no longer assigned to it
(every write is fenced on the assignment), so a job runs to completion once.
On PostgreSQL, claims take rows with ``FOR UPDATE SKIP LOCKED``; on SQLite, the
write lock serializes them.

A job's cancellation is enforced by the supervisor of the host that runs it (its
worker's token first, signals to the worker as the fallback), never by a
:class:`~surefetch.store.enforcer.CancellationEnforcer`: the session's pid is the
worker's, and the worker runs other jobs too.

Claims and heartbeats are timed by the queue's clock (``time.time`` unless a
test injects another).
"""

from __future__ import annotations

import builtins
import json
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from surefetch._procs import host_id, process_start_time
from surefetch.errors import SessionCancelled
from surefetch.store import supervisors
from surefetch.store.job_spec import JOB_KINDS, JOB_STATES, Ending, GroupOutcome, Job, job_spec
from surefetch.store.job_table import (
    COLUMNS,
    FROM,
    HELD,
    UNFINISHED,
    claim_queued,
    complete_job,
    complete_jobs,
    row_to_job,
    start_jobs,
    take_jobs,
)
from surefetch.store.session_table import insert_session, requeue_session
from surefetch.store.sessions import SessionStore

__all__ = ["JOB_KINDS", "JOB_STATES", "Ending", "GroupOutcome", "Job", "JobQueue", "job_spec"]

_PARSED_FINISHED = 10_000  # finished jobs `JobQueue.list` keeps parsed
_IDS_PER_QUERY = 500  # ids per query of `JobQueue.states` (SQLite before 3.32: 999 at most)


class JobQueue:
    """The jobs of a :class:`SessionStore` (same database, same connections).

    Args:
        store: the session store; its migrations create the tables.
        clock: the time claims and heartbeats are measured by, in seconds since the
            epoch; every process sharing the store must agree on it.
    """

    def __init__(self, store: SessionStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.db = store.db
        self.clock = clock
        self._pg = store.backend == "postgresql"
        # Finished jobs never change: `list` parses each once (its spec and result are
        # JSON), the most recently finished `_PARSED_FINISHED` of them kept.
        self._finished: dict[str, Job] = {}
        self._finished_lock = threading.Lock()

    # -- helpers --

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.db.connection() as conn:
            return self.db.execute(conn, sql, params)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> builtins.list[Any]:
        with self.db.connection() as conn:
            return list(self.db.execute(conn, sql, params).fetchall())

    def _jobs(self, rows: Sequence[Sequence[Any]]) -> builtins.list[Job]:
        """The jobs of rows of `COLUMNS`, finished ones parsed once."""
        jobs: builtins.list[Job] = []
        with self._finished_lock:
            known = self._finished
            for row in rows:
                job = known.get(row[0])
                if job is None:
                    job = row_to_job(row)
                    if job.finished:
                        known[job.id] = job
                        if len(known) > _PARSED_FINISHED:
                            del known[next(iter(known))]
                jobs.append(job)
        return jobs

    # -- submitting and reading --

    def submit(self, owner: str, kind: str, spec: Mapping[str, Any]) -> Job:
        """Queues a job and creates its session (owned by ``owner``).

        Raises:
            ValueError: an invalid spec (see :func:`job_spec`), owner or title.
        """
        (job_id,) = self.submit_many(owner, [(kind, spec)])
        job = self.get(job_id)
        assert job is not None
        return job

    def submit_many(
        self, owner: str, jobs: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> builtins.list[str]:
        """Queues several jobs in one transaction: all of them, or none if one is invalid.

        Returns:
            The new jobs' ids (their sessions' ids), in order.

        Raises:
            ValueError: an invalid spec (see :func:`job_spec`), owner or title.
        """
        specs = [(kind, job_spec(kind, fields)) for kind, fields in jobs]
        db = self.db
        ids: builtins.list[str] = []
        with db.transaction() as conn:
            for kind, spec in specs:
                target = spec["url"] if kind == "get" else spec["dest"]
                title = f"{kind} {target}"[:1000]
                job_id = insert_session(db, conn, owner, title, {"job": kind, **spec})
                db.execute(
                    conn,
                    "INSERT INTO jobs (session_id, kind, spec, created_at) VALUES (?, ?, ?, ?)",
                    (job_id, kind, json.dumps(spec), time.time() + len(ids) * 1e-6),
                )
                ids.append(job_id)
        return ids

    def get(self, job_id: str) -> Job | None:
        rows = self._rows(f"SELECT {COLUMNS} FROM {FROM} WHERE j.session_id = ?", (job_id,))
        return row_to_job(rows[0]) if rows else None

    def counts(self, owner: str | None = None) -> dict[str, int]:
        """How many jobs (all, or ``owner``'s) are in each state (`JOB_STATES`): what a
        client waiting for a batch asks, without reading every job."""
        sql = f"SELECT s.status, count(*) FROM {FROM}"
        params: tuple[Any, ...] = ()
        if owner is not None:
            sql += " WHERE s.owner = ?"
            params = (owner,)
        counts = dict.fromkeys(JOB_STATES, 0)
        for status, count in self._rows(sql + " GROUP BY s.status", params):
            state = "queued" if status == "pending" else status
            counts[state] = counts.get(state, 0) + int(count)
        return counts

    def states(self, job_ids: Collection[str], owner: str | None = None) -> dict[str, str]:
        """The state (`JOB_STATES`) of each of `job_ids` that exists (and is ``owner``'s,
        when given): what a client waiting for some jobs asks. Absent ids are left out."""
        ids = builtins.list(job_ids)
        states: dict[str, str] = {}
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            sql = f"SELECT s.id, s.status FROM {FROM} WHERE s.id IN ({', '.join('?' * len(chunk))})"
            params: tuple[Any, ...] = tuple(chunk)
            if owner is not None:
                sql += " AND s.owner = ?"
                params += (owner,)
            for job_id, status in self._rows(sql, params):
                states[job_id] = "queued" if status == "pending" else status
        return states

    def list(
        self, owner: str | None = None, *, state: str | None = None, limit: int | None = None
    ) -> builtins.list[Job]:
        """Jobs (all of them, or ``owner``'s): in submission order, or with ``limit``
        the newest ``limit`` of them, newest first.

        Args:
            owner: whose jobs (None: everyone's).
            state: only jobs in this state (`JOB_STATES`).
            limit: at most this many, the newest.

        Raises:
            ValueError: an unknown state, or a negative limit.
        """
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if owner is not None:
            where.append("s.owner = ?")
            params.append(owner)
        if state is not None:
            if state not in JOB_STATES:
                raise ValueError(f"state must be one of {', '.join(JOB_STATES)}, not {state!r}")
            where.append("s.status = ?")
            params.append("pending" if state == "queued" else state)
        sql = f"SELECT {COLUMNS} FROM {FROM}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if limit is None:
            sql += " ORDER BY j.created_at, j.session_id"
        else:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ValueError(f"limit must be a non-negative int, not {limit!r}")
            sql += " ORDER BY j.created_at DESC, j.session_id DESC LIMIT ?"
            params.append(limit)
        return self._jobs(self._rows(sql, tuple(params)))

    def assigned(self, host: str, worker: str | None = None) -> builtins.list[Job]:
        """Unfinished jobs assigned to ``host`` (and to its slot ``worker`` if given)."""
        sql = f"SELECT {COLUMNS} FROM {FROM} WHERE j.host = ? AND {HELD} AND {UNFINISHED}"
        params: tuple[Any, ...] = (host,)
        if worker is not None:
            sql += " AND j.worker = ?"
            params += (worker,)
        rows = self._rows(sql + " ORDER BY j.created_at, j.session_id", params)
        return [row_to_job(row) for row in rows]

    # -- claiming (supervisor side) --

    def claim(
        self, host: str, free: Mapping[str, int], ttl: float
    ) -> dict[str, builtins.list[str]]:
        """Assigns queued jobs to this host's worker slots, oldest first.

        Args:
            host: this supervisor's host id.
            free: how many more jobs each slot can take.
            ttl: seconds the claim holds without a heartbeat.

        Returns:
            The job ids each slot got (slots that got none are left out).
        """
        if sum(n for n in free.values() if n > 0) <= 0:
            return {}
        with self.db.transaction() as conn:
            return claim_queued(self.db, conn, host, free, self.clock() + ttl, self._pg)

    def heartbeat(self, host: str, ttl: float) -> None:
        """Extends the claims of every unfinished job ``host`` holds."""
        self._run(
            "UPDATE jobs SET claim_expires = ? WHERE host = ? AND claim_expires IS NOT NULL "
            "AND session_id IN (SELECT id FROM sessions WHERE status IN ('pending', 'running'))",
            (self.clock() + ttl, host),
        )

    def requeue_expired(self, host: str) -> builtins.list[str]:
        """Re-queues the unfinished jobs of other hosts whose claims expired."""
        return self._requeue("j.host <> ? AND j.claim_expires < ?", (host, self.clock()))

    def requeue_host(self, host: str, worker: str | None = None) -> builtins.list[str]:
        """Re-queues every unfinished job ``host`` (or one of its slots) holds."""
        if worker is None:
            return self._requeue(f"j.host = ? AND {HELD}", (host,))
        return self._requeue(f"j.host = ? AND j.worker = ? AND {HELD}", (host, worker))

    def _requeue(self, condition: str, params: Sequence[Any]) -> builtins.list[str]:
        lock = " FOR UPDATE OF j SKIP LOCKED" if self._pg else ""
        db = self.db
        with db.transaction() as conn:
            rows = db.execute(
                conn,
                f"SELECT j.session_id FROM {FROM} WHERE {condition} AND {UNFINISHED}{lock}",
                params,
            ).fetchall()
            ids = [row[0] for row in rows]
            for job_id in ids:
                db.execute(
                    conn,
                    "UPDATE jobs SET host = NULL, worker = NULL, claim_expires = NULL "
                    "WHERE session_id = ?",
                    (job_id,),
                )
                requeue_session(db, conn, job_id)
        return ids

    def cancel_queued(self) -> builtins.list[str]:
        """Marks cancelled the queued jobs whose cancellation was requested."""
        rows = self._rows(
            f"SELECT j.session_id FROM {FROM} WHERE j.host IS NULL "
            "AND s.status = 'pending' AND s.cancellation_status = 'requested'"
        )
        return [row[0] for row in rows if self.store.mark_cancelled(row[0])]

    def cancel_requested(self, host: str) -> builtins.list[Job]:
        """Unfinished jobs on ``host`` whose cancellation was requested."""
        rows = self._rows(
            f"SELECT {COLUMNS} FROM {FROM} WHERE j.host = ? AND {HELD} AND {UNFINISHED} "
            "AND s.cancellation_status = 'requested'",
            (host,),
        )
        return [row_to_job(row) for row in rows]

    def record_crash(
        self, host: str, worker: str, limit: int, spared: Collection[str] = ()
    ) -> builtins.list[str]:
        """Counts a worker crash against the jobs it was running, but those in `spared`
        (started in the store, but still waiting for a place in the worker); fails the
        jobs that reach ``limit``.

        Returns:
            The ids of the jobs this call failed.
        """
        running = [
            j for j in self.assigned(host, worker) if j.state == "running" and j.id not in spared
        ]
        failed: builtins.list[str] = []
        for job in running:
            self._run(
                "UPDATE jobs SET crashes = crashes + 1 WHERE session_id = ? AND host = ? "
                "AND worker = ?",
                (job.id, host, worker),
            )
            crashes = job.crashes + 1
            if crashes >= limit:
                times = "once" if crashes == 1 else f"{crashes} times"
                message = f"its worker died {times} while running it; see the supervisor's log"
                if self.complete(job.id, host, worker, "failed", error=message):
                    failed.append(job.id)
        return failed

    # -- running (worker side) --

    def start(self, job_id: str, host: str, worker: str, pid: int) -> Job | None:
        """Attaches the worker process to the job's session, if the job is still its own.

        Returns:
            The job, or None when it is no longer assigned to this worker or finished.

        Raises:
            SessionCancelled: its cancellation was requested first (the session is now
                cancelled; do not run it).
        """
        job = self.get(job_id)
        if job is None or job.finished or (job.host, job.worker) != (host, worker):
            return None
        self.store.attach_process(job_id, pid, host)
        return self.get(job_id)

    def start_many(
        self, job_ids: Sequence[str], host: str, worker: str, pid: int
    ) -> dict[str, Job | SessionCancelled | None]:
        """`start` for many jobs in one transaction (the worker's group commit).

        Returns:
            For each id: the job (now running), None when it is no longer this
            worker's or finished, or the `SessionCancelled` that `start` would raise
            (the session is then marked cancelled).
        """
        if not job_ids:
            return {}
        started_at = process_start_time(pid) if host == host_id() else None
        with self.db.transaction() as conn:
            return start_jobs(self.db, conn, job_ids, host, worker, pid, started_at, self.clock())

    def commit_group(
        self,
        host: str,
        worker: str,
        pid: int,
        requests: Callable[[], tuple[Sequence[str], Sequence[Ending]]],
        *,
        hold: int = 0,
        ttl: float = 10.0,
    ) -> GroupOutcome:
        """A worker's group commit: `start_many` and `complete_many` in one transaction
        and, when that frees a place (a job finished, or one that is not to start: no
        longer the worker's, finished or cancelled), the oldest queued jobs claimed for
        the same slot (for ``ttl`` seconds without a heartbeat) and started until the
        slot holds ``hold`` unfinished jobs: the worker keeps its jobs coming without a
        round trip to its supervisor.

        Args:
            requests: called once the transaction holds the store's write lock; returns
                the ids of the jobs to start and the endings to record. Requests made
                while the commit waited for the lock join it.
            hold: how many unfinished jobs the slot is to hold (0: take none).
            ttl: seconds a claim of a job taken holds without a heartbeat.

        Raises:
            ValueError: an ending that is not succeeded, failed or cancelled.
        """
        db = self.db
        started_at = process_start_time(pid) if host == host_id() else None
        with db.transaction() as conn:
            starts, endings = requests()
            now = self.clock()
            started = start_jobs(db, conn, starts, host, worker, pid, started_at, now)
            finished = complete_jobs(db, conn, endings, host, worker, self._pg)
            freed = any(finished.values()) or not all(
                isinstance(job, Job) for job in started.values()
            )
            taken: builtins.list[Job] = []
            if freed and hold > 0:
                (held,) = db.execute(
                    conn,
                    f"SELECT COUNT(*) FROM {FROM} WHERE j.host = ? AND j.worker = ? "
                    f"AND {HELD} AND {UNFINISHED}",
                    (host, worker),
                ).fetchone()
                room, expires = hold - int(held), now + ttl
                taken = take_jobs(
                    db, conn, host, worker, room, expires, pid, started_at, now, self._pg
                )
        return GroupOutcome(started, finished, taken)

    def complete_many(self, endings: Sequence[Ending], host: str, worker: str) -> dict[str, bool]:
        """`complete` for many jobs in one transaction (the worker's group commit).

        Returns:
            For each job id, True if this call finished it.
        """
        if not endings:
            return {}
        with self.db.transaction() as conn:
            return complete_jobs(self.db, conn, endings, host, worker, self._pg)

    def complete(
        self,
        job_id: str,
        host: str,
        worker: str,
        status: str,
        *,
        error: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> bool:
        """Records how a job ended, if it is still assigned to this worker.

        ``status`` is ``succeeded``, ``failed`` or ``cancelled``. A cancelled job's
        session is marked cancelled (its cancellation was requested).

        Returns:
            True if this call finished the job.
        """
        end = Ending(job_id, status, error, result)
        with self.db.transaction() as conn:
            return complete_job(self.db, conn, end, host, worker)

    # -- supervisors (surefetch.store.supervisors) --

    def register_supervisor(self, host: str, socket_path: str, ttl: float) -> None:
        """Takes ``host`` for this process, unless a live supervisor holds it.

        A row whose heartbeat is older than ``ttl``, or whose process on this machine
        is gone, is taken over.

        Raises:
            SurefetchError: another supervisor with this host id is alive.
        """
        supervisors.register(self.db, host, socket_path, ttl, self.clock())

    def supervisor_heartbeat(self, host: str) -> bool:
        """Refreshes this supervisor's row; False if another process took the host id."""
        return supervisors.heartbeat(self.db, host, self.clock())

    def unregister_supervisor(self, host: str) -> None:
        """Gives ``host`` up, if this process holds it."""
        supervisors.unregister(self.db, host)
