"""The jobs table: its schema, how a row becomes a :class:`Job`, and the row operations.

The job queue (:mod:`surefetch.store.jobs`) runs these on the caller's connection,
inside its own transactions, so that one transaction can claim, start and finish
jobs together (a worker's group commit). Every write to a job a worker runs is
fenced on its assignment: the row must still name the same host and worker slot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from surefetch.errors import SessionCancelled
from surefetch.store.db import Database, Migration, register_migration
from surefetch.store.job_spec import Ending, Job
from surefetch.store.session_table import (
    cancel_unstarted,
    end_session,
    end_sessions,
    fetch_session,
)
from surefetch.store.slot_fill import spread

__all__ = [
    "COLUMNS",
    "FROM",
    "UNFINISHED",
    "claim_queued",
    "complete_job",
    "complete_jobs",
    "fetch_jobs",
    "row_to_job",
    "start_jobs",
    "take_jobs",
]

#: SQL condition on ``s`` (the job's session): the job is not finished.
UNFINISHED = "s.status IN ('pending', 'running')"
#: A job assigned to a host, not known to be finished: a claim comes with each assignment
#: and a job that finishes gives it up (rows of `jobs_host_worker`).
HELD = "j.claim_expires IS NOT NULL"
#: The columns a :class:`Job` is read from (over `FROM`), in the order `row_to_job` takes.
COLUMNS = (
    "j.session_id, j.kind, j.spec, s.owner, s.status, s.cancellation_status, j.host, "
    "j.worker, j.crashes, j.error, j.result, j.created_at"
)
#: A job (``j``) with its session (``s``).
FROM = "jobs j JOIN sessions s ON s.id = j.session_id"

register_migration(
    Migration(
        version=2,
        step=0,
        owner="surefetch.store.jobs",
        statements=(
            # Supervised jobs: one per session, the work a worker runs.
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
        ),
    )
)


register_migration(
    Migration(
        version=3,
        step=0,
        owner="surefetch.store.jobs",
        statements=(
            # The queue, oldest first: a worker's group commit and the supervisor's claim
            # take the next jobs from it in order, instead of reading and sorting every
            # queued job each time (a batch of n jobs cost n² rows).
            "CREATE INDEX jobs_queued ON jobs (created_at, session_id) WHERE host IS NULL",
            # The jobs a host holds (`HELD`): a finished job gives up its claim, so that
            # what a worker holds is found without reading every job it ever ran (each
            # group commit and heartbeat did). It also leaves the queue out.
            "UPDATE jobs SET claim_expires = NULL WHERE session_id IN "
            "(SELECT id FROM sessions WHERE status NOT IN ('pending', 'running'))",
            "DROP INDEX jobs_host_worker",
            "CREATE INDEX jobs_host_worker ON jobs (host, worker) WHERE claim_expires IS NOT NULL",
        ),
    )
)


def row_to_job(row: Sequence[Any]) -> Job:
    """The job a row of `COLUMNS` describes."""
    status = row[4]
    return Job(
        id=row[0],
        kind=row[1],
        spec=json.loads(row[2]),
        owner=row[3],
        state="queued" if status == "pending" else status,
        cancel_requested=row[5] != "none",
        host=row[6],
        worker=row[7],
        crashes=int(row[8]),
        error=row[9],
        result=None if row[10] is None else json.loads(row[10]),
        created_at=float(row[11]),
    )


def fetch_jobs(db: Database, conn: Any, job_ids: Sequence[str]) -> dict[str, Job]:
    """The jobs with these ids that exist, by id."""
    if not job_ids:
        return {}
    placeholders = ", ".join("?" for _ in job_ids)
    rows = db.execute(
        conn, f"SELECT {COLUMNS} FROM {FROM} WHERE j.session_id IN ({placeholders})", job_ids
    ).fetchall()
    return {job.id: job for job in map(row_to_job, rows)}


def claim_queued(
    db: Database, conn: Any, host: str, free: Mapping[str, int], expires: float, pg: bool
) -> dict[str, list[str]]:
    """Assigns queued jobs, oldest first, to ``host``'s slots (`spread` over ``free``),
    with claims that hold until ``expires``. Call it inside a transaction.

    Returns:
        The job ids each slot got (slots that got none are left out).
    """
    wanted = sum(n for n in free.values() if n > 0)
    if wanted <= 0:
        return {}
    lock = " FOR UPDATE OF j SKIP LOCKED" if pg else ""
    rows = db.execute(
        conn,
        f"SELECT j.session_id FROM {FROM} WHERE j.host IS NULL "
        "AND s.status = 'pending' AND s.cancellation_status = 'none' "
        f"ORDER BY j.created_at, j.session_id LIMIT ?{lock}",
        (wanted,),
    ).fetchall()
    got: dict[str, list[str]] = {}
    for (job_id,), slot in zip(rows, spread(free, len(rows))):
        db.execute(
            conn,
            "UPDATE jobs SET host = ?, worker = ?, claim_expires = ? "
            "WHERE session_id = ? AND host IS NULL",
            (host, slot, expires, job_id),
        )
        got.setdefault(slot, []).append(job_id)
    return got


def start_jobs(
    db: Database,
    conn: Any,
    job_ids: Sequence[str],
    host: str,
    worker: str,
    pid: int,
    started_at: float | None,
    now: float,
) -> dict[str, Job | SessionCancelled | None]:
    """Attaches the worker process ``pid`` (started at ``started_at``) to each job still
    assigned to ``host``/``worker``, marking it running. Call it inside a transaction.

    Returns:
        For each id: the job (now running); None when it is no longer this worker's or
        finished; or, when its cancellation was requested first, the `SessionCancelled`
        to raise (its session is then marked cancelled).
    """
    outcome: dict[str, Job | SessionCancelled | None] = {}
    for job_id in job_ids:
        cur = db.execute(
            conn,
            "UPDATE sessions SET status = 'running', pid = ?, pid_started = ?, host = ?, "
            "updated_at = ? WHERE id = ? AND cancellation_status = 'none' "
            "AND status IN ('pending', 'running') AND id IN (SELECT session_id "
            "FROM jobs WHERE session_id = ? AND host = ? AND worker = ?)",
            (pid, started_at, host, now, job_id, job_id, host, worker),
        )
        if cur.rowcount == 1:
            continue
        session = fetch_session(db, conn, job_id)
        mine = db.execute(
            conn,
            "SELECT 1 FROM jobs WHERE session_id = ? AND host = ? AND worker = ?",
            (job_id, host, worker),
        ).fetchone()
        if session is None or session.finished or mine is None:
            outcome[job_id] = None
        elif session.cancellation_status != "none":
            cancel_unstarted(db, conn, job_id)
            outcome[job_id] = SessionCancelled(
                f"session {job_id} was cancelled before its process started",
                session_id=job_id,
            )
        else:
            outcome[job_id] = None
    jobs = fetch_jobs(db, conn, [i for i in job_ids if i not in outcome])
    for job_id in job_ids:
        if job_id not in outcome:
            outcome[job_id] = jobs.get(job_id)
    return outcome


def complete_jobs(
    db: Database, conn: Any, endings: Sequence[Ending], host: str, worker: str, pg: bool
) -> dict[str, bool]:
    """Records how jobs ended, those still unfinished and assigned to ``host``/``worker``
    (a few statements for the whole group). Call it inside a transaction.

    Returns:
        For each job id, True if this call finished the job.

    Raises:
        ValueError: an ending that is not succeeded, failed or cancelled.
    """
    for end in endings:
        if end.status not in ("succeeded", "failed", "cancelled"):
            raise ValueError(f"a job ends succeeded, failed or cancelled, not {end.status!r}")
    if not endings:
        return {}
    ids = [end.job_id for end in endings]
    among = ", ".join("?" for _ in ids)
    lock = " FOR UPDATE OF j" if pg else ""
    mine = {
        row[0]
        for row in db.execute(
            conn,
            f"SELECT j.session_id FROM {FROM} WHERE j.session_id IN ({among}) "
            f"AND j.host = ? AND j.worker = ? AND {HELD} AND {UNFINISHED}{lock}",
            (*ids, host, worker),
        ).fetchall()
    }
    done: dict[str, bool] = {}
    by_status: dict[str, list[str]] = {}
    rows: list[tuple[Any, ...]] = []
    for end in endings:
        finishes = end.job_id in mine and end.job_id not in done
        done[end.job_id] = finishes
        if finishes:
            result = None if end.result is None else json.dumps(end.result)
            rows.append((end.error, result, end.job_id))
            by_status.setdefault(end.status, []).append(end.job_id)
    db.execute_many(
        conn,
        "UPDATE jobs SET error = ?, result = ?, claim_expires = NULL WHERE session_id = ?",
        rows,
    )
    for status, finished in by_status.items():
        end_sessions(db, conn, finished, status)
    return done


def take_jobs(
    db: Database,
    conn: Any,
    host: str,
    worker: str,
    count: int,
    expires: float,
    pid: int,
    started_at: float | None,
    now: float,
    pg: bool,
) -> list[Job]:
    """Claims up to ``count`` queued jobs, oldest first, for ``host``/``worker`` (until
    ``expires``) and starts them in ``pid`` (a few statements for all of them). Call it
    inside a transaction.

    Returns:
        The jobs taken, now running, oldest first.
    """
    if count <= 0:
        return []
    lock = " FOR UPDATE OF j SKIP LOCKED" if pg else ""
    ids = [
        row[0]
        for row in db.execute(
            conn,
            f"SELECT j.session_id FROM {FROM} WHERE j.host IS NULL "
            "AND s.status = 'pending' AND s.cancellation_status = 'none' "
            f"ORDER BY j.created_at, j.session_id LIMIT ?{lock}",
            (count,),
        ).fetchall()
    ]
    if not ids:
        return []
    among = ", ".join("?" for _ in ids)
    db.execute(
        conn,
        "UPDATE jobs SET host = ?, worker = ?, claim_expires = ? "
        f"WHERE session_id IN ({among}) AND host IS NULL",
        (host, worker, expires, *ids),
    )
    db.execute(
        conn,
        "UPDATE sessions SET status = 'running', pid = ?, pid_started = ?, host = ?, "
        f"updated_at = ? WHERE id IN ({among}) AND cancellation_status = 'none' "
        "AND status IN ('pending', 'running')",
        (pid, started_at, host, now, *ids),
    )
    jobs = fetch_jobs(db, conn, ids)
    taken = [jobs.get(job_id) for job_id in ids]
    return [
        job
        for job in taken
        if job is not None and job.state == "running" and (job.host, job.worker) == (host, worker)
    ]


def complete_job(db: Database, conn: Any, end: Ending, host: str, worker: str) -> bool:
    """Records how a job ended, if it is still unfinished and assigned to ``host``/``worker``.

    Returns:
        True if this call finished the job.

    Raises:
        ValueError: an ending that is not succeeded, failed or cancelled.
    """
    if end.status not in ("succeeded", "failed", "cancelled"):
        raise ValueError(f"a job ends succeeded, failed or cancelled, not {end.status!r}")
    result = None if end.result is None else json.dumps(end.result)
    cur = db.execute(
        conn,
        "UPDATE jobs SET error = ?, result = ?, claim_expires = NULL "
        "WHERE session_id = ? AND host = ? "
        "AND worker = ? AND session_id IN "
        "(SELECT id FROM sessions WHERE status IN ('pending', 'running'))",
        (end.error, result, end.job_id, host, worker),
    )
    if cur.rowcount != 1:
        return False
    end_session(db, conn, end.job_id, end.status)
    return True
