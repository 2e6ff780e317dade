"""Helpers for the cache tests: child fetches, lock holders, polling, the on-disk layout."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from surefetch._fs import try_range_lock
from surefetch.cache.locks import lock_place

from support import SUREFETCH, restore_default_signals


def blob_path(root: Path, sha: str) -> Path:
    return root / "blobs" / "sha256" / sha[:2] / sha


def part_path(root: Path, sha: str) -> Path:
    return root / "tmp" / "v2" / ".surefetch" / f"sha256-{sha}.part"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def start_fetch(
    url: str,
    root: Path,
    *args: str,
    umask: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """`surefetch fetch URL --cache ROOT ARGS...` as a child process (pipes for stdout/stderr)."""

    def prepare() -> None:
        restore_default_signals()
        if umask is not None:
            os.umask(umask)

    return subprocess.Popen(
        [SUREFETCH, "fetch", url, "--cache", str(root), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=prepare,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def holder_pid(root: Path, sha: str) -> int | None:
    """The pid that says, in the cache's catalog, that it holds the lock of blob `sha`."""
    try:
        with contextlib.closing(sqlite3.connect(root / "catalog.db", timeout=5)) as db:
            row = db.execute("SELECT pid FROM holders WHERE key = ?", (f"sha256-{sha}",)).fetchone()
    except sqlite3.Error:
        return None
    return int(row[0]) if row is not None else None


def hold_artifact_lock(root: Path, key: str) -> int:
    """Takes the artifact lock `key` of the cache at `root` as another holder would (a
    descriptor of its own: open file description locks exclude each other within one
    process too); the caller closes it."""
    (root / "locks").mkdir(parents=True, exist_ok=True)
    name, offset = lock_place(key)
    fd = try_range_lock(root / "locks" / name, offset, create=True)
    assert fd is not None, f"the lock {key} is already held"
    return fd


def wait_for_download(proc: subprocess.Popen[str], part: Path) -> None:
    """Waits until `proc` has created its part file (a body that fits one block is
    written into it at once when it has all arrived, so it may still be empty)."""

    def started() -> bool:
        assert proc.poll() is None, proc.communicate()
        return part.exists()

    wait_until(started, "the download to start")


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def hold_flock(path: Path) -> subprocess.Popen[str]:
    """A child process that holds an exclusive flock on `path` until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=restore_default_signals,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def dead_url() -> str:
    """An http URL on a loopback port nobody listens on (connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.bin"


def blob_files(root: Path) -> list[Path]:
    top = root / "blobs"
    return sorted(p for p in top.rglob("*") if p.is_file()) if top.exists() else []
