"""SessionStore and CancellationEnforcer against a real SQLite file and a real PostgreSQL.

Every test that takes ``store`` runs once per backend. Processes are real (``sleep``
and small Python children in their own process groups) and signals are real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import surefetch
from surefetch.errors import NotOwner, SessionCancelled, SessionNotFound, SurefetchError
from surefetch.sessions import (
    SCHEMA_VERSION,
    CancellationEnforcer,
    Session,
    SessionStore,
    default_db_url,
    host_id,
)
from surefetch.workspaces import WorkspaceManager

from session_support import Children, alive, children, store, store_url, wait_until

__all__ = ["children", "store", "store_url"]  # fixtures, imported for pytest

META = {"kind": "sync", "items": [1, 2.5, None, True], "note": "naïve ☃", "nested": {"a": {}}}


def running(store: SessionStore, proc: subprocess.Popen[bytes], owner: str = "alice") -> Session:
    session = store.create(owner, "job", META)
    return store.attach_process(session.id, proc.pid)


# --- create, get, list ----------------------------------------------------------------


def test_create_sets_the_initial_state(store: SessionStore) -> None:
    s = store.create("alice", "download the model", META)
    assert len(s.id) == 32 and s.owner == "alice" and s.title == "download the model"
    assert (s.status, s.ui_status, s.cancellation_status) == ("pending", "in_progress", "none")
    assert s.metadata == META
    assert s.cancelled_at is None and s.cancelled_by is None and s.pid is None and s.host is None
    assert s.created_at == s.updated_at and s.created_at.tzinfo is not None
    assert store.get(s.id, "alice") == s
    assert store.create("alice", "t").metadata == {}


def test_get_is_scoped_to_the_owner(store: SessionStore) -> None:
    s = store.create("alice", "t")
    with pytest.raises(NotOwner, match="another user"):
        store.get(s.id, "bob")
    with pytest.raises(SessionNotFound, match="sessions list"):
        store.get("0" * 32, "alice")
    with pytest.raises(SessionNotFound):
        store.get("../../etc/passwd", "alice")
    assert isinstance(NotOwner("x"), surefetch.SurefetchError)


def test_list_shows_only_the_owners_sessions_newest_first(store: SessionStore) -> None:
    mine = [store.create("alice", f"a{i}") for i in range(5)]
    store.create("bob", "b")
    listed = store.list("alice")
    assert [s.id for s in listed] == [s.id for s in reversed(mine)]
    assert [s.owner for s in store.list("bob")] == ["bob"]
    assert store.list("carol") == []
    assert len(store.list("alice", limit=2)) == 2


def test_list_filters(store: SessionStore) -> None:
    a = store.create("alice", "a")
    b = store.create("alice", "b")
    store.finish(b.id, "succeeded")
    store.request_cancel(a.id, "alice")
    assert [s.id for s in store.list("alice", status="succeeded")] == [b.id]
    assert [s.id for s in store.list("alice", ui_status="done")] == [b.id]
    assert [s.id for s in store.list("alice", cancellation_status="requested")] == [a.id]
    with pytest.raises(TypeError, match="unknown session filter"):
        store.list("alice", colour="red")
    with pytest.raises(ValueError, match="status must be one of"):
        store.list("alice", status="sleeping")
    with pytest.raises(ValueError, match="limit"):
        store.list("alice", limit=-1)


@pytest.mark.parametrize(
    ("title", "metadata", "error"),
    [
        ("", None, ValueError),
        ("t", {"x": float("nan")}, ValueError),
        ("t", {"x": object()}, ValueError),
        ("t", [1, 2], TypeError),
        ("a\x00b", None, ValueError),
        ("\ud800", None, ValueError),
        ("t", {"k": "\ud800"}, ValueError),
        ("t", {"big": "x" * 70_000}, ValueError),
        ("x" * 1001, None, ValueError),
    ],
)
def test_create_rejects_bad_input(
    store: SessionStore, title: str, metadata: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        store.create("alice", title, metadata)  # type: ignore[arg-type]
    assert store.list("alice") == []


# --- state transitions ---------------------------------------------------------------


def test_full_life_of_a_successful_session(store: SessionStore, children: Children) -> None:
    proc = children.sleep()
    s = store.create("alice", "t", META)
    r = store.attach_process(s.id, proc.pid)
    assert (r.status, r.pid, r.host) == ("running", proc.pid, host_id())
    assert store.finish(s.id, "succeeded") is True
    done = store.get(s.id, "alice")
    assert (done.status, done.ui_status, done.pid) == ("succeeded", "done", None)
    assert store.finish(s.id, "failed") is False  # finished is final
    assert store.get(s.id, "alice").status == "succeeded"
    assert store.request_cancel(s.id, "alice") is False  # nothing to cancel
    assert store.get(s.id, "alice") == done
    with pytest.raises(SurefetchError, match="already finished"):
        store.attach_process(s.id, proc.pid)
    assert done.metadata == META


def test_failed_session_needs_review(store: SessionStore) -> None:
    s = store.create("alice", "t")
    assert store.finish(s.id, "failed") is True
    f = store.get(s.id, "alice")
    assert (f.status, f.ui_status, f.cancellation_status) == ("failed", "needs_review", "none")
    with pytest.raises(ValueError, match="request_cancel"):
        store.finish(s.id, "cancelled")
    with pytest.raises(SessionNotFound):
        store.finish("f" * 32, "failed")


def test_host_id_comes_from_the_environment(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUREFETCH_HOST_ID", "worker-7")
    s = store.create("alice", "t")
    assert store.attach_process(s.id, os.getpid()).host == "worker-7"
    t = store.create("alice", "t")
    assert store.attach_process(t.id, os.getpid(), host="elsewhere").host == "elsewhere"
    with pytest.raises(ValueError, match="pid"):
        store.attach_process(t.id, 0)


# --- cancellation requests ---------------------------------------------------------------


def test_request_cancel_by_the_owner(store: SessionStore) -> None:
    s = store.create("alice", "t", META)
    before = time.time()
    assert store.request_cancel(s.id, "alice") is True
    r = store.get(s.id, "alice")
    assert r.cancellation_status == "requested" and r.cancelled_by == "alice"
    assert r.cancelled_at is not None and r.cancelled_at.timestamp() >= before - 1
    assert r.status == "pending" and r.metadata == META
    # Asking again changes nothing, and says so.
    assert store.request_cancel(s.id, "alice") is False
    assert store.get(s.id, "alice") == r


def test_request_cancel_by_someone_else_or_unknown(store: SessionStore) -> None:
    s = store.create("alice", "t")
    with pytest.raises(NotOwner, match="only its owner"):
        store.request_cancel(s.id, "bob")
    with pytest.raises(SessionNotFound):
        store.request_cancel("deadbeef", "alice")
    assert store.get(s.id, "alice").cancellation_status == "none"


def test_a_process_attaching_after_the_request_does_not_run(store: SessionStore) -> None:
    s = store.create("alice", "t", META)
    assert store.request_cancel(s.id, "alice") is True
    assert store.pending_cancellations(host_id()) == []
    with pytest.raises(SessionCancelled, match="do not run it") as info:
        store.attach_process(s.id, os.getpid())
    assert info.value.session_id == s.id
    assert isinstance(info.value, surefetch.Cancelled)
    c = store.get(s.id, "alice")
    assert (c.status, c.cancellation_status, c.ui_status, c.pid) == (
        "cancelled",
        "cancelled",
        "needs_review",
        None,
    )
    assert c.metadata == META
    with pytest.raises(SessionCancelled):
        store.attach_process(s.id, os.getpid())


def test_fifty_concurrent_requests_change_it_once(store: SessionStore) -> None:
    s = store.create("alice", "t", META)
    barrier = threading.Barrier(50)

    def ask(_: int) -> bool:
        barrier.wait()
        return store.request_cancel(s.id, "alice")

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(ask, range(50)))
    assert results.count(True) == 1 and results.count(False) == 49
    r = store.get(s.id, "alice")
    assert r.cancellation_status == "requested" and r.metadata == META


def test_failure_reported_after_a_request_counts_as_cancelled(store: SessionStore) -> None:
    s = store.create("alice", "t")
    store.attach_process(s.id, os.getpid(), host="other-host")
    store.request_cancel(s.id, "alice")
    assert store.finish(s.id, "failed") is True  # the process stopped on SIGTERM
    assert store.get(s.id, "alice").status == "cancelled"


# --- enforcement ---------------------------------------------------------------------------


def test_enforcer_stops_a_real_process(
    store: SessionStore, children: Children, tmp_path: Path
) -> None:
    cleaned: list[str] = []
    ws = WorkspaceManager(tmp_path / "ws", on_cleaned=lambda sid, path: cleaned.append(sid))
    proc = children.sleep()
    s = running(store, proc)
    ws.create(s.id)
    assert store.pending_cancellations(host_id()) == []
    assert store.request_cancel(s.id, "alice") is True
    assert [p.id for p in store.pending_cancellations(host_id())] == [s.id]
    assert [p.id for p in store.pending_cancellations("another-host")] == []

    enforcer = CancellationEnforcer(store, grace=5.0, workspaces=ws)
    assert enforcer.run_once() == [s.id]
    assert proc.wait(5) == -signal.SIGTERM
    c = store.get(s.id, "alice")
    assert (c.status, c.cancellation_status, c.ui_status, c.pid) == (
        "cancelled",
        "cancelled",
        "needs_review",
        None,
    )
    assert c.cancelled_by == "alice" and c.metadata == META and c.last_error is None
    assert cleaned == [s.id] and not (tmp_path / "ws" / s.id).exists()
    # Nothing left to do; a second round and a late request change nothing.
    assert enforcer.run_once() == []
    assert store.request_cancel(s.id, "alice") is False
    assert store.mark_cancelled(s.id) is False
    assert cleaned == [s.id]


def test_enforcer_kills_the_whole_process_group(store: SessionStore, children: Children) -> None:
    p = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; wait"], start_new_session=True, stdout=subprocess.PIPE
    )
    children.procs.append(p)
    assert p.stdout is not None
    grandchild = int(p.stdout.readline())
    s = running(store, p)
    store.request_cancel(s.id, "alice")
    assert CancellationEnforcer(store, grace=5.0).run_once() == [s.id]
    assert p.wait(5) != 0
    assert wait_until(lambda: not alive(grandchild), 5)


def test_sigkill_after_the_grace_period(store: SessionStore, children: Children) -> None:
    # SIGTERM ignored: `trap '' TERM` is inherited by the exec'd sleep.
    proc = children.spawn(["sh", "-c", "trap '' TERM; echo ready; exec sleep 60"], ready=True)
    s = running(store, proc)
    store.request_cancel(s.id, "alice")
    start = time.monotonic()
    assert CancellationEnforcer(store, grace=0.3).run_once() == [s.id]
    elapsed = time.monotonic() - start
    assert proc.wait(5) == -signal.SIGKILL
    assert 0.3 <= elapsed < 3.0
    assert store.get(s.id, "alice").status == "cancelled"


def test_process_already_gone(store: SessionStore, children: Children) -> None:
    proc = children.sleep()
    s = running(store, proc)
    proc.kill()
    proc.wait()
    store.request_cancel(s.id, "alice")
    start = time.monotonic()
    assert CancellationEnforcer(store, grace=5.0).run_once() == [s.id]
    assert time.monotonic() - start < 1.0
    c = store.get(s.id, "alice")
    assert (c.status, c.cancellation_status, c.pid) == ("cancelled", "cancelled", None)


def test_a_reused_pid_is_not_signalled(store: SessionStore, children: Children) -> None:
    victim = children.sleep()
    s = running(store, victim)
    # Pretend the session's process was an older one with the same pid.
    with store._conn() as conn:
        store._execute(conn, "UPDATE sessions SET pid_started = 1 WHERE id = ?", (s.id,))
    store.request_cancel(s.id, "alice")
    assert CancellationEnforcer(store, grace=1.0).run_once() == [s.id]
    assert victim.poll() is None and alive(victim.pid)


def test_batch_where_some_sessions_have_no_process(store: SessionStore, children: Children) -> None:
    procs = [children.sleep() for _ in range(3)]
    with_pid = [running(store, p) for p in procs]
    without = [store.create("alice", f"queued {i}", META) for i in range(2)]
    for s in with_pid + without:
        assert store.request_cancel(s.id, "alice") is True
    marked = CancellationEnforcer(store, grace=5.0).run_once()
    assert sorted(marked) == sorted(s.id for s in with_pid)
    for p in procs:
        assert p.wait(5) == -signal.SIGTERM
    for s in without:
        r = store.get(s.id, "alice")
        assert (r.status, r.cancellation_status) == ("pending", "requested")
        with pytest.raises(SessionCancelled):
            store.attach_process(s.id, os.getpid())
    assert {s.status for s in store.list("alice")} == {"cancelled"}
    assert all(s.metadata == META for s in store.list("alice"))


def test_enforcer_acts_only_on_its_host(store: SessionStore, children: Children) -> None:
    proc = children.sleep()
    s = store.create("alice", "t")
    store.attach_process(s.id, proc.pid, host="far-away")
    store.request_cancel(s.id, "alice")
    assert CancellationEnforcer(store, host="here", grace=1.0).run_once() == []
    assert proc.poll() is None
    assert CancellationEnforcer(store, host="far-away", grace=5.0).run_once() == [s.id]
    assert proc.wait(5) == -signal.SIGTERM


_COUNT_TERMS = """
import signal, sys, time
log = open(sys.argv[1], "a")
hit = []
def on_term(*_):
    log.write("TERM\\n"); log.flush(); hit.append(time.monotonic())
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while not hit or time.monotonic() - hit[0] < 0.5:
    time.sleep(0.01)
"""


def test_two_enforcers_racing_act_once(
    store: SessionStore, children: Children, tmp_path: Path
) -> None:
    log = tmp_path / "terms.log"
    proc = children.python(_COUNT_TERMS, str(log))
    cleaned: list[str] = []
    ws = WorkspaceManager(tmp_path / "ws", on_cleaned=lambda sid, path: cleaned.append(sid))
    s = running(store, proc)
    ws.create(s.id)
    store.request_cancel(s.id, "alice")
    other = SessionStore(store.url)
    enforcers = [
        CancellationEnforcer(store, grace=5.0, workspaces=ws),
        CancellationEnforcer(other, grace=5.0, workspaces=ws),
    ]
    barrier = threading.Barrier(2)

    def race(e: CancellationEnforcer) -> list[str]:
        barrier.wait()
        return e.run_once()

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(race, enforcers))
    other.close()
    assert sorted(len(r) for r in results) == [0, 1]
    assert proc.wait(5) == 0
    assert log.read_text() == "TERM\n"  # signalled once, by one enforcer
    assert cleaned == [s.id]
    assert store.get(s.id, "alice").status == "cancelled"


_UNPRIVILEGED_ENFORCER = """
import json, logging, os, sys
from surefetch.sessions import CancellationEnforcer, SessionStore
logging.basicConfig()  # the library installs no handler: its warnings go where we say
store = SessionStore(sys.argv[1])
enforcer = CancellationEnforcer(store, host=sys.argv[2], grace=0.5)
store.pending_cancellations(sys.argv[2])  # open the pooled connection while still root
os.setgroups([]); os.setgid(1); os.setuid(1)  # become "daemon"
print(json.dumps(enforcer.run_once()))
"""


def test_a_refused_signal_is_recorded_and_retried(store: SessionStore, children: Children) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.fail("this test needs root and setpriv (util-linux) to run processes as other users")
    # The session's process runs as "nobody"; the first enforcer runs as "daemon".
    proc = children.spawn(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"]
    )
    assert wait_until(lambda: _uid_of(proc.pid) == 65534)
    s = running(store, proc)
    store.request_cancel(s.id, "alice")
    out = subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED_ENFORCER, store.url, host_id()],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout) == []
    assert "EPERM" in out.stderr
    r = store.get(s.id, "alice")
    assert (r.status, r.cancellation_status, r.pid) == ("running", "requested", proc.pid)
    assert r.last_error is not None and "refused (EPERM)" in r.last_error
    assert proc.poll() is None
    # Retried by an enforcer allowed to signal it: now it is done.
    assert CancellationEnforcer(store, grace=5.0).run_once() == [s.id]
    assert proc.wait(5) == -signal.SIGTERM
    c = store.get(s.id, "alice")
    assert (c.status, c.last_error, c.metadata) == ("cancelled", None, META)


def _uid_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


def test_background_enforcer(store: SessionStore, children: Children) -> None:
    # On PostgreSQL the poll interval is long: only LISTEN/NOTIFY can make it in time.
    interval = 5.0 if store.backend == "postgresql" else 0.05
    with CancellationEnforcer(store, interval=interval, grace=5.0):
        time.sleep(0.2)
        proc = children.sleep()
        s = running(store, proc)
        start = time.monotonic()
        store.request_cancel(s.id, "alice")
        assert wait_until(lambda: store.get(s.id, "alice").status == "cancelled", 3.0)
        assert time.monotonic() - start < 1.0
        assert proc.wait(5) == -signal.SIGTERM


def test_enforcer_arguments() -> None:
    with tempfile.TemporaryDirectory() as d:
        s = SessionStore(f"sqlite:///{d}/s.db")
        with pytest.raises(ValueError, match="interval"):
            CancellationEnforcer(s, interval=0)
        with pytest.raises(ValueError, match="grace"):
            CancellationEnforcer(s, grace=-1)
        e = CancellationEnforcer(s).start()
        with pytest.raises(RuntimeError, match="already running"):
            e.start()
        e.stop()
        s.close()


# --- migrations, URLs, tokens ------------------------------------------------------------


def test_migrations_are_idempotent_and_safe_concurrently(store_url: str) -> None:
    def open_store(_: int) -> int:
        s = SessionStore(store_url)
        try:
            return s.schema_version()
        finally:
            s.close()

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(open_store, range(8))) == [SCHEMA_VERSION] * 8
    s = SessionStore(store_url)
    with s._conn() as conn:
        rows = s._execute(conn, "SELECT version FROM schema_version").fetchall()
    assert sorted(r[0] for r in rows) == list(range(1, SCHEMA_VERSION + 1))
    with s._conn() as conn:
        s._execute(conn, "INSERT INTO schema_version VALUES (?, ?)", (SCHEMA_VERSION + 1, 0.0))
    s.close()
    with pytest.raises(SurefetchError, match="upgrade surefetch"):
        SessionStore(store_url)


def test_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    SessionStore("sqlite:///rel/sessions.db").close()
    assert (tmp_path / "rel" / "sessions.db").is_file()
    SessionStore(f"sqlite:///{tmp_path}/abs.db").close()
    assert (tmp_path / "abs.db").is_file()
    with pytest.raises(ValueError, match="names no file"):
        SessionStore("sqlite:///:memory:")
    with pytest.raises(ValueError, match="unsupported"):
        SessionStore("mysql://x/y")
    with pytest.raises(ValueError, match="unsupported SQLite URL"):
        SessionStore("sqlite://host/x.db")
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() != 0:
            with pytest.raises(SurefetchError, match="cannot open"):
                SessionStore("sqlite:///nope/x.db")
    finally:
        os.chmod(tmp_path, 0o700)


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    s = SessionStore(f"sqlite:///{tmp_path}/s.db")
    with s._conn() as conn:
        assert s._execute(conn, "PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_default_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SUREFETCH_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_url() == f"sqlite:///{tmp_path}/surefetch/sessions.db"
    s = SessionStore()
    s.close()
    assert (tmp_path / "surefetch" / "sessions.db").is_file()
    monkeypatch.setenv("SUREFETCH_DB", "postgresql://db/sessions")
    assert default_db_url() == "postgresql://db/sessions"


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(SurefetchError, match="check that PostgreSQL is running"):
        SessionStore("postgresql://nobody@127.0.0.1:1/none", timeout=2)


def test_tokens_are_stored_hashed(store: SessionStore) -> None:
    token = store.add_user("alice")
    assert len(token) >= 40
    assert store.authenticate(token) == "alice"
    assert store.authenticate(token + "x") is None
    assert store.authenticate("") is None
    second = store.add_user("alice")
    assert second != token and store.authenticate(second) == "alice"
    with store._conn() as conn:
        rows = store._execute(conn, "SELECT token_hash, owner FROM tokens").fetchall()
    assert all(token not in r[0] and second not in r[0] and len(r[0]) == 64 for r in rows)
    with pytest.raises(ValueError):
        store.add_user("")
