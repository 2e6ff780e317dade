"""The supervisors table: which live supervisor holds each host id of a store.

A supervisor registers its host id when it starts and heartbeats its row while it
runs (:class:`~surefetch.store.jobs.JobQueue` calls these for it); a second live
supervisor with the same id is refused, a silent or dead one is taken over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from surefetch._procs import machine_name, process_start_time, process_state
from surefetch.errors import SurefetchError
from surefetch.store.db import Database, Migration, register_migration

__all__ = ["heartbeat", "register", "unregister"]

register_migration(
    Migration(
        version=2,
        step=1,
        owner="surefetch.store.supervisors",
        statements=(
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
    )
)


def register(db: Database, host: str, socket_path: str, ttl: float, now: float) -> None:
    """Takes ``host`` for this process, unless a live supervisor holds it.

    A row whose heartbeat is older than ``ttl`` seconds before ``now``, or whose
    process on this machine is gone, is taken over.

    Raises:
        SurefetchError: another supervisor with this host id is alive.
    """
    pid = os.getpid()
    machine = machine_name()
    with db.transaction() as conn:
        row = db.execute(
            conn,
            "SELECT pid, pid_started, hostname, socket, heartbeat_at FROM supervisors "
            "WHERE host = ?",
            (host,),
        ).fetchone()
        if row is not None and not _gone(row, machine, now, ttl):
            raise SurefetchError(
                f"another supervisor (pid {row[0]} on {row[2]}, socket {row[3]}) holds host "
                f"id {host!r} in this store; stop it, or give this one another --host-id"
            )
        db.execute(conn, "DELETE FROM supervisors WHERE host = ?", (host,))
        db.execute(
            conn,
            "INSERT INTO supervisors (host, pid, pid_started, hostname, socket, "
            "started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (host, pid, process_start_time(pid), machine, socket_path, now, now),
        )


def heartbeat(db: Database, host: str, now: float) -> bool:
    """Refreshes this process's row for ``host``; False if another process took the host id."""
    with db.connection() as conn:
        cur = db.execute(
            conn,
            "UPDATE supervisors SET heartbeat_at = ? WHERE host = ? AND pid = ? AND hostname = ?",
            (now, host, os.getpid(), machine_name()),
        )
        return bool(cur.rowcount == 1)


def unregister(db: Database, host: str) -> None:
    """Gives ``host`` up, if this process holds it."""
    with db.connection() as conn:
        db.execute(
            conn,
            "DELETE FROM supervisors WHERE host = ? AND pid = ? AND hostname = ?",
            (host, os.getpid(), machine_name()),
        )


def _gone(row: Sequence[Any], machine: str, now: float, ttl: float) -> bool:
    pid, started, hostname, _socket, heartbeat_at = row
    if float(heartbeat_at) < now - ttl:
        return True
    if hostname != machine:
        return False
    if int(pid) == os.getpid():
        return True
    return process_state(int(pid), None if started is None else int(started)) == "gone"
