"""WorkspaceManager: real directories, real threads and processes racing on cleanup."""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from surefetch.errors import UnsafeDestination
from surefetch.sessions import SessionStore
from surefetch.workspaces import Workspace, WorkspaceManager

from session_support import store, store_url

__all__ = ["store", "store_url"]  # fixtures, imported for pytest


class Events:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Path]] = []
        self._lock = threading.Lock()

    def __call__(self, session_id: str, path: Path) -> None:
        with self._lock:
            self.calls.append((session_id, path))


def test_create_makes_a_directory_under_root(tmp_path: Path) -> None:
    wm = WorkspaceManager(tmp_path / "root")
    ws = wm.create("abc123")
    assert isinstance(ws, Workspace)
    assert ws.path == tmp_path / "root" / "abc123" and ws.path.is_dir()
    (ws.path / "part").write_bytes(b"x")
    again = wm.create("abc123")
    assert again.path == ws.path and (ws.path / "part").exists()  # idempotent, keeps content
    assert wm.get("abc123") == ws
    assert wm.get("other") is None
    assert wm.session_ids() == ["abc123"]


def test_strategy_none_has_no_directory(tmp_path: Path) -> None:
    events = Events()
    wm = WorkspaceManager(tmp_path, on_cleaned=events)
    ws = wm.create("s1", strategy="none")
    assert ws.path is None and ws.strategy == "none"
    assert wm.cleanup("s1") is False and events.calls == []
    with pytest.raises(ValueError, match="unknown workspace strategy"):
        wm.create("s1", strategy="tmpfs")


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "/etc", "a\x00", "x" * 200, ".meta"])
def test_session_ids_never_leave_the_root(tmp_path: Path, bad: str) -> None:
    wm = WorkspaceManager(tmp_path / "root")
    with pytest.raises(UnsafeDestination, match="stays inside"):
        wm.create(bad)
    assert wm.cleanup(bad) is False  # never raises
    assert not (tmp_path / "x").exists()


def test_cleanup_is_idempotent(tmp_path: Path) -> None:
    events = Events()
    wm = WorkspaceManager(tmp_path, on_cleaned=events)
    ws = wm.create("s1")
    assert ws.path is not None
    (ws.path / "sub").mkdir()
    (ws.path / "sub" / "f").write_bytes(b"data")
    assert wm.cleanup("s1") is True
    assert not ws.path.exists()
    assert wm.cleanup("s1") is False
    assert wm.cleanup("never-existed") is False
    assert events.calls == [("s1", ws.path)]
    assert os.listdir(tmp_path / ".trash") == []
    assert not (tmp_path / ".meta" / "s1.json").exists()


def test_hundred_concurrent_cleanups_from_threads(tmp_path: Path) -> None:
    events = Events()
    wm = WorkspaceManager(tmp_path, on_cleaned=events)
    ws = wm.create("s1")
    assert ws.path is not None
    for i in range(50):
        (ws.path / f"f{i}").write_bytes(b"x" * 1000)
    barrier = threading.Barrier(100)

    def clean(_: int) -> bool:
        barrier.wait()
        return wm.cleanup("s1")

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(clean, range(100)))
    assert results.count(True) == 1
    assert len(events.calls) == 1
    assert not ws.path.exists()


def _clean_in_process(root: str, log: str, barrier: threading.Barrier, threads: int) -> None:
    def on_cleaned(session_id: str, path: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {session_id}\n")

    wm = WorkspaceManager(root, on_cleaned=on_cleaned)
    barrier.wait()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda _: wm.cleanup("s1"), range(threads)))
    with open(log + ".results", "a") as f:
        f.write("".join("1" if r else "0" for r in results) + "\n")


def test_hundred_concurrent_cleanups_from_processes_and_threads(tmp_path: Path) -> None:
    wm = WorkspaceManager(tmp_path / "root")
    wm.create("s1")
    log = str(tmp_path / "events.log")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_clean_in_process, args=(str(tmp_path / "root"), log, barrier, 25))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    results = Path(log + ".results").read_text().split()
    assert len(results) == 4 and sum(len(r) for r in results) == 100
    assert "".join(results).count("1") == 1
    assert len(Path(log).read_text().splitlines()) == 1
    assert not (tmp_path / "root" / "s1").exists()


def test_preserve_on_failure_with_mark_failed(tmp_path: Path) -> None:
    events = Events()
    wm = WorkspaceManager(tmp_path, on_cleaned=events)
    ws = wm.create("s1", preserve_on_failure=True)
    assert ws.preserve_on_failure
    wm.mark_failed("s1")
    assert wm.cleanup("s1") is False and ws.path is not None and ws.path.is_dir()
    assert wm.cleanup("s1", force=True) is True
    assert wm.cleanup("s1", force=True) is False
    assert len(events.calls) == 1
    # Without a failure, a preserved workspace is cleaned like any other.
    wm.create("s2", preserve_on_failure=True)
    assert wm.cleanup("s2") is True


def test_preserve_on_failure_asks_the_store(store: SessionStore, tmp_path: Path) -> None:
    wm = WorkspaceManager(tmp_path, store=store)
    failed = store.create("alice", "f")
    ok = store.create("alice", "o")
    wm.create(failed.id, preserve_on_failure=True)
    wm.create(ok.id, preserve_on_failure=True)
    store.finish(failed.id, "failed")
    store.finish(ok.id, "succeeded")
    assert wm.cleanup(failed.id) is False
    assert wm.cleanup(ok.id) is True
    assert wm.cleanup(failed.id, force=True) is True


def test_cleanup_orphans(store: SessionStore, tmp_path: Path) -> None:
    events = Events()
    wm = WorkspaceManager(tmp_path, on_cleaned=events)
    live = store.create("alice", "running")
    store.attach_process(live.id, os.getpid())
    done = store.create("bob", "done")
    store.finish(done.id, "succeeded")
    cancelled = store.create("alice", "cancelled")
    store.request_cancel(cancelled.id, "alice")
    store.mark_cancelled(cancelled.id)
    kept = store.create("alice", "failed, preserved")
    store.finish(kept.id, "failed")
    pending = store.create("alice", "pending")
    for s in (live, done, cancelled, kept, pending):
        wm.create(s.id, preserve_on_failure=(s is kept))
    wm.create("0123456789abcdef0123456789abcdef")  # no such session
    (tmp_path / ".trash").mkdir(exist_ok=True)
    (tmp_path / ".trash" / "left-over.x").mkdir()  # an interrupted cleanup

    assert wm.cleanup_orphans(store) == 3
    assert sorted(wm.session_ids()) == sorted([live.id, kept.id, pending.id])
    assert sorted(sid for sid, _ in events.calls) == sorted(
        [done.id, cancelled.id, "0123456789abcdef0123456789abcdef"]
    )
    assert os.listdir(tmp_path / ".trash") == []
    assert wm.cleanup_orphans(store) == 0
