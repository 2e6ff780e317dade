"""The job queue in the session store, on SQLite and PostgreSQL: claims, fencing, re-queues."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from surefetch.errors import SessionCancelled, SurefetchError
from surefetch.jobs import Job, JobQueue, job_spec
from surefetch.sessions import SCHEMA_VERSION, CancellationEnforcer, SessionStore, host_id
from surefetch.store.jobs import Ending

from session_support import Children, alive, children, store, store_url

__all__ = ["children", "store", "store_url"]  # fixtures, imported for pytest


@pytest.fixture
def queue(store: SessionStore) -> JobQueue:
    return JobQueue(store)


def get_spec(i: int = 0) -> dict[str, str]:
    return {"url": f"http://127.0.0.1:9/f{i}", "dest": f"/tmp/out/f{i}"}


class FakeClock:
    """The queue's clock, moved by hand: claims expire when the test says, without sleeping.

    Its TTLs are seconds long, so a test passes only if the queue reads this clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_job_spec_checks_what_it_runs() -> None:
    assert job_spec("get", {"url": "https://h/x", "dest": "/a/../b", "sha256": "AB" * 32}) == {
        "url": "https://h/x",
        "dest": "/b",
        "sha256": "ab" * 32,
    }
    # "DIR/" stays a directory (as `get -o DIR/`); sync's paths are plain.
    assert job_spec("get", {"url": "https://h/x", "dest": "/a/../b/"})["dest"] == "/b/"
    assert job_spec("sync", {"manifest": "/m", "lock": "/l", "dest": "/d/"})["dest"] == "/d"
    for kind, fields, message in (
        ("get", {"url": "file:///etc/passwd", "dest": "/x"}, "only http:// and https://"),
        ("get", {"url": "http://h/x", "dest": "rel/x"}, "is relative"),
        ("get", {"url": "http://h/x", "dest": "/x", "sha256": "00"}, "64 hex digits"),
        ("get", {"url": "http://h/x", "dest": "/x", "mode": "w"}, "unknown field"),
        ("sync", {"manifest": "/m", "lock": "/l"}, "dest must be a path"),
        ("run", {}, "unknown job kind"),
    ):
        with pytest.raises(ValueError, match=message):
            job_spec(kind, fields)


def test_submit_creates_a_session_of_the_user_and_a_queued_job(queue: JobQueue) -> None:
    q, store = queue, queue.store
    job = q.submit("alice", "get", get_spec())
    assert job.state == "queued" and job.owner == "alice" and job.host is None
    session = store.get(job.id, "alice")
    assert session.status == "pending" and session.metadata["job"] == "get"
    assert [j.id for j in q.list("alice")] == [job.id] and q.list("bob") == []


def test_each_job_is_claimed_once_by_racing_hosts(queue: JobQueue) -> None:
    store_url = queue.store.url
    with SessionStore(store_url) as s:
        q = JobQueue(s)
        ids = {q.submit("u", "get", get_spec(i)).id for i in range(60)}

    def host(n: int) -> list[str]:
        with SessionStore(store_url) as own:
            mine = JobQueue(own)
            got: list[str] = []
            for _ in range(20):
                for claimed in mine.claim(f"h{n}", {"w0": 2, "w1": 1}, ttl=30).values():
                    got.extend(claimed)
            return got

    with ThreadPoolExecutor(4) as pool:
        claims = [job for got in pool.map(host, range(4)) for job in got]
    assert sorted(claims) == sorted(ids)  # every job, none twice


def test_claims_fill_the_least_loaded_slots_oldest_job_first(queue: JobQueue) -> None:
    q = queue
    ids = [q.submit("u", "get", get_spec(i)).id for i in range(5)]
    got = q.claim("h", {"w0": 1, "w1": 3, "w2": 0}, ttl=30)
    # Most free first; ties go to the lower slot.
    assert got == {"w1": [ids[0], ids[1], ids[3]], "w0": [ids[2]]}
    assert [j.id for j in q.assigned("h", "w1")] == [ids[0], ids[1], ids[3]]
    assert [j.id for j in q.list()] == ids


def test_counts_per_state_are_the_owners(queue: JobQueue) -> None:
    q = queue
    mine = [q.submit("u", "get", get_spec(i)).id for i in range(4)]
    q.submit("other", "get", get_spec(9))
    q.claim("h", {"w0": 2}, ttl=30)
    q.start(mine[0], "h", "w0", 4242)
    q.start(mine[1], "h", "w0", 4242)
    assert q.complete(mine[1], "h", "w0", "failed", error="x")
    counts = {"queued": 2, "running": 1, "succeeded": 0, "failed": 1, "cancelled": 0}
    assert q.counts("u") == counts
    assert q.counts() == {**counts, "queued": 3}
    assert sum(q.counts().values()) == len(q.list())


def test_a_worker_only_starts_and_finishes_its_own_jobs(queue: JobQueue) -> None:
    q, store = queue, queue.store
    job = q.submit("u", "get", get_spec())
    q.claim("h", {"w0": 1}, ttl=30)
    assert q.start(job.id, "h", "w1", 4242) is None  # not its slot
    started = q.start(job.id, "h", "w0", 4242)
    assert started is not None and started.state == "running"
    assert not q.complete(job.id, "other", "w0", "succeeded")
    assert q.complete(job.id, "h", "w0", "succeeded", result={"size": 1})
    assert not q.complete(job.id, "h", "w0", "failed")  # finished stays finished
    done = q.get(job.id)
    assert done is not None and done.state == "succeeded" and done.result == {"size": 1}
    assert store.lookup(job.id).ui_status == "done"  # type: ignore[union-attr]


def test_a_group_commit_ends_jobs_and_takes_the_next_ones_up_to_hold(queue: JobQueue) -> None:
    q = queue
    ids = [q.submit("u", "get", get_spec(i)).id for i in range(7)]
    assert q.claim("h", {"w0": 2}, ttl=30) == {"w0": ids[:2]}
    q.start_many(ids[:2], "h", "w0", 4242)
    q.store.request_cancel(ids[2], "u")  # the oldest queued job is never taken

    def requests(starts: list[str], ends: list[Ending]) -> Any:
        return lambda: (starts, ends)

    ended = Ending(ids[0], "succeeded", result={"size": 1})
    done = q.commit_group("h", "w0", 4242, requests([], [ended]), hold=3, ttl=30)
    assert done.finished == {ids[0]: True} and done.started == {}
    # One job still held, so two taken (three held), oldest first, started in this worker.
    assert [j.id for j in done.taken] == ids[3:5]
    assert all((j.state, j.host, j.worker) == ("running", "h", "w0") for j in done.taken)
    assert all(q.store.lookup(j.id).pid == 4242 for j in done.taken)  # type: ignore[union-attr]
    finished = q.get(ids[0])
    assert finished is not None and finished.state == "succeeded" and finished.result == {"size": 1}

    # An ending fenced off (not this slot's job) frees nothing, so nothing is taken.
    other = Ending(ids[5], "failed", error="no")
    done = q.commit_group("h", "w0", 4242, requests([], [other]), hold=10, ttl=30)
    assert done.finished == {ids[5]: False} and done.taken == []
    # Starting jobs frees nothing either; a start that is refused does.
    q.claim("h", {"w1": 1}, ttl=30)
    done = q.commit_group("h", "w1", 4243, requests([ids[5]], []), hold=10, ttl=30)
    assert isinstance(done.started[ids[5]], Job) and done.taken == []
    done = q.commit_group("h", "w1", 4243, requests([ids[1]], []), hold=3, ttl=30)
    assert done.started == {ids[1]: None}  # w0's job
    assert [j.id for j in done.taken] == [ids[6]]  # w1 now holds ids[5] and ids[6]
    # Without hold, a commit only records.
    done = q.commit_group("h", "w1", 4243, requests([], [Ending(ids[6], "failed", "x")]))
    assert done.finished == {ids[6]: True} and done.taken == []
    job = q.get(ids[6])
    assert job is not None and (job.state, job.error) == ("failed", "x")


def test_what_a_worker_holds_never_counts_the_jobs_it_finished(queue: JobQueue) -> None:
    """A finished job gives up its claim, so the store finds what a slot holds among its
    unfinished jobs only (not every job it ever ran: each group commit and heartbeat
    read them all); hold, heartbeat and re-queueing see the same jobs as before."""
    q = queue
    ids = [q.submit("u", "get", get_spec(i)).id for i in range(12)]
    assert q.claim("h", {"w0": 2}, ttl=30) == {"w0": ids[:2]}
    q.start_many(ids[:2], "h", "w0", 4242)
    for done_id in ids[:2] + ids[2:8]:
        ending = [Ending(done_id, "succeeded", result={"size": 1})]
        q.commit_group("h", "w0", 4242, lambda e=ending: ([], e), hold=2, ttl=30)  # type: ignore[misc]
    with q.db.connection() as conn:
        held = q.db.execute(
            conn, "SELECT session_id FROM jobs WHERE claim_expires IS NOT NULL"
        ).fetchall()
    assert sorted(row[0] for row in held) == sorted(ids[8:10])
    assert sorted(j.id for j in q.assigned("h", "w0")) == sorted(ids[8:10])
    q.heartbeat("h", ttl=30)
    assert sorted(q.requeue_host("h", "w0")) == sorted(ids[8:10])
    assert {q.get(i).state for i in ids[:8]} == {"succeeded"}  # type: ignore[union-attr]


def test_a_group_commit_reads_its_requests_holding_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with SessionStore(f"sqlite:///{path}") as store:
        q = JobQueue(store)
        job = q.submit("u", "get", get_spec()).id
        q.claim("h", {"w0": 1}, ttl=30)
        refused: list[str] = []

        def requests() -> tuple[list[str], list[Ending]]:
            # Another writer cannot begin now: whatever was asked until this moment is
            # part of this commit.
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                refused.append(str(exc))
            finally:
                other.close()
            return [job], []

        done = q.commit_group("h", "w0", 4242, requests)
        assert refused == ["database is locked"]
        started = done.started[job]
        assert isinstance(started, Job) and started.state == "running"
        assert (tmp_path / "jobs.db-writers").exists()  # where writers queue


def test_cancel_requested_before_start_refuses_the_start(queue: JobQueue) -> None:
    q, store = queue, queue.store
    job = q.submit("u", "get", get_spec())
    q.claim("h", {"w0": 1}, ttl=30)
    assert store.request_cancel(job.id, "u")
    assert [j.id for j in q.cancel_requested("h")] == [job.id]
    with pytest.raises(SessionCancelled):
        q.start(job.id, "h", "w0", 4242)
    cancelled = q.get(job.id)
    assert cancelled is not None and cancelled.state == "cancelled"


def test_queued_cancelled_jobs_are_marked_without_a_worker(queue: JobQueue) -> None:
    q, store = queue, queue.store
    job = q.submit("u", "get", get_spec())
    store.request_cancel(job.id, "u")
    assert q.claim("h", {"w0": 4}, ttl=30) == {}  # never handed out
    assert q.cancel_queued() == [job.id]
    assert q.get(job.id).state == "cancelled"  # type: ignore[union-attr]


def test_expired_claims_of_other_hosts_are_requeued(store: SessionStore) -> None:
    clock = FakeClock()
    q = JobQueue(store, clock=clock)
    ids = [q.submit("u", "get", get_spec(i)).id for i in range(3)]
    q.claim("silent", {"w0": 2}, ttl=5)
    q.start(ids[0], "silent", "w0", 4242)
    q.claim("alive", {"w0": 1}, ttl=30)
    assert q.requeue_expired("alive") == []
    clock.advance(10)
    assert sorted(q.requeue_expired("alive")) == sorted(ids[:2])
    assert q.requeue_expired("silent") == []  # the live host's claim is fresh
    assert q.get(ids[2]).host == "alive"  # type: ignore[union-attr]
    for job_id in ids[:2]:
        job = q.get(job_id)
        assert job is not None and job.state == "queued" and job.host is None
    assert store.lookup(ids[0]).pid is None  # type: ignore[union-attr]
    # The silent host can no longer finish what it lost.
    assert not q.complete(ids[0], "silent", "w0", "succeeded")


def test_heartbeats_keep_claims_alive(store: SessionStore) -> None:
    clock = FakeClock()
    q = JobQueue(store, clock=clock)
    job = q.submit("u", "get", get_spec())
    q.claim("h", {"w0": 1}, ttl=20)
    for _ in range(4):
        clock.advance(10)
        q.heartbeat("h", ttl=20)
        assert q.requeue_expired("other") == []
    assert q.get(job.id).host == "h"  # type: ignore[union-attr]
    clock.advance(30)  # no heartbeat for longer than the ttl: the claim lapses
    assert q.requeue_expired("other") == [job.id]


def test_record_crash_fails_a_job_at_the_limit(queue: JobQueue) -> None:
    q = queue
    job = q.submit("u", "get", get_spec())
    q.claim("h", {"w0": 1}, ttl=30)
    q.start(job.id, "h", "w0", 4242)
    assert q.record_crash("h", "w0", limit=2) == []
    assert q.record_crash("h", "w0", limit=2) == [job.id]
    failed = q.get(job.id)
    assert failed is not None and failed.state == "failed" and "died 2 times" in str(failed.error)


def test_a_host_id_is_held_by_one_live_supervisor(queue: JobQueue) -> None:
    q, store = queue, queue.store
    q.register_supervisor("h", "/run/a.sock", ttl=30)
    assert q.supervisor_heartbeat("h")
    # This very process again (a restart in place) takes it over; a live other one would not.
    q.register_supervisor("h", "/run/a.sock", ttl=30)
    with store._conn() as conn:
        store._execute(conn, "UPDATE supervisors SET pid = 1, pid_started = NULL WHERE host = 'h'")
    with pytest.raises(SurefetchError, match="holds host id 'h'"):
        q.register_supervisor("h", "/run/b.sock", ttl=30)
    assert not q.supervisor_heartbeat("h")  # pid 1 holds it now, not us
    with store._conn() as conn:
        store._execute(conn, "UPDATE supervisors SET heartbeat_at = 0 WHERE host = 'h'")
    q.register_supervisor("h", "/run/b.sock", ttl=30)  # silent past the ttl: taken over
    q.unregister_supervisor("h")


def test_a_version_1_store_is_migrated_and_keeps_its_sessions(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    with SessionStore(f"sqlite:///{path}") as s:
        old = s.create("u", "from before").id
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE jobs; DROP TABLE supervisors; DELETE FROM schema_version WHERE version > 1;"
    )
    conn.close()
    with SessionStore(f"sqlite:///{path}") as s:
        assert s.schema_version() == SCHEMA_VERSION == 3
        assert s.get(old, "u").title == "from before"
        assert JobQueue(s).submit("u", "get", get_spec()).state == "queued"


def test_a_batch_is_queued_whole_or_not_at_all(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="only http:// and https://"):
        queue.submit_many("u", [("get", get_spec(0)), ("get", {"url": "ftp://h/x", "dest": "/x"})])
    assert queue.list() == []
    ids = queue.submit_many("u", [("get", get_spec(i)) for i in range(3)])
    assert [j.id for j in queue.list("u")] == ids  # in the order given
    assert queue.claim("h", {"w0": 3}, ttl=30) == {"w0": ids}


def test_an_enforcer_never_signals_a_jobs_worker(queue: JobQueue, children: Children) -> None:
    q, store = queue, queue.store
    worker = children.sleep()  # stands for the worker process running the job
    job = q.submit("u", "get", get_spec())
    q.claim(host_id(), {"w0": 1}, ttl=30)
    assert q.start(job.id, host_id(), "w0", worker.pid) is not None
    plain = store.attach_process(store.create("u", "not a job").id, children.sleep().pid)
    assert store.request_cancel(job.id, "u") and store.request_cancel(plain.id, "u")
    assert [s.id for s in store.pending_cancellations()] == [plain.id]
    assert CancellationEnforcer(store, grace=5.0).run_once() == [plain.id]
    assert alive(worker.pid)  # left to its supervisor
    assert q.get(job.id).state == "running"  # type: ignore[union-attr]
    assert [j.id for j in q.cancel_requested(host_id())] == [job.id]
