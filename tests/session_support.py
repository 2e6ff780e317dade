"""Fixtures and helpers shared by the sessions, workspaces, server and CLI tests.

Import the fixtures into a test module (``from session_support import store, store_url``);
the PostgreSQL server behind them is started once per test process (see pgcluster.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from surefetch.sessions import SessionStore

import pgcluster

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty store: a SQLite file, or a fresh schema in the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.db'}"
    return pgcluster.fresh_url()


@pytest.fixture
def store(store_url: str) -> Iterator[SessionStore]:
    """A migrated, empty SessionStore on each backend."""
    s = SessionStore(store_url)
    yield s
    s.close()


def alive(pid: int) -> bool:
    """True while ``pid`` is a live process (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    state = data[data.rfind(b")") + 2 :].split()[0]
    return state not in (b"Z", b"X")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Polls ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class Children:
    """Processes a test starts, each in its own session (process group); killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], *, ready: bool = False) -> subprocess.Popen[bytes]:
        """Starts ``args`` in a new session; with ``ready``, waits for its first output line."""
        proc = subprocess.Popen(
            args,
            start_new_session=True,
            stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        if ready:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, f"{args} exited before it was ready"
        return proc

    def sleep(self, seconds: float = 60) -> subprocess.Popen[bytes]:
        return self.spawn(["sleep", str(seconds)])

    def python(self, code: str, *args: str) -> subprocess.Popen[bytes]:
        """A Python child running ``code``; it must print a line once it is ready."""
        return self.spawn([sys.executable, "-c", code, *args], ready=True)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            proc.wait(10)


@pytest.fixture
def children() -> Iterator[Children]:
    """Starts child processes for a test and kills whatever is left of them afterwards."""
    c = Children()
    yield c
    c.close()
