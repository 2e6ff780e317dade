"""A throwaway PostgreSQL cluster for the tests and benchmarks.

``shared_url()`` returns the URL of a server for this process: ``$SUREFETCH_TEST_PG_URL``
if set, else a cluster started once (initdb + pg_ctl, trust auth, 127.0.0.1, a free
port, a temporary directory) and stopped at exit. When euid is 0 the cluster runs
as the ``postgres`` user (initdb refuses root). Missing PostgreSQL binaries raise
``RuntimeError`` with what to install: a test that needs PostgreSQL fails, never skips.
``fresh_url()`` gives each caller its own empty schema in that server.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

__all__ = ["PgCluster", "fresh_url", "shared_url"]


def _pg_bin() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found in /usr/lib/postgresql/*/bin "
        "or PATH: install them (`apt-get install -y postgresql`, or run scripts/system-deps), "
        "or point SUREFETCH_TEST_PG_URL at a running server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One PostgreSQL server in a temporary directory, reachable at ``self.url``."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="surefetch-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.url = ""
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)

    def _run(self, *args: str) -> None:
        proc = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed (exit {proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}\n{tail}"
            )

    def start(self) -> PgCluster:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        for attempt in range(5):
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} "
                f"-c unix_socket_directories={self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                "-c shared_buffers=64MB"
            )
            try:
                self._run(
                    str(self.bin / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data),
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.root / "server.log"),
                    "-o",
                    options,
                )
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return self

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                [*self._as, str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)


_lock = threading.Lock()
_shared: list[str] = []


def shared_url() -> str:
    """The URL of this process's PostgreSQL server (started on first use).

    Raises:
        RuntimeError: PostgreSQL binaries missing, or the server would not start.
    """
    env = os.environ.get("SUREFETCH_TEST_PG_URL")
    if env:
        return env
    with _lock:
        if not _shared:
            cluster = PgCluster()
            try:
                cluster.start()
            except BaseException:
                cluster.stop()
                raise
            atexit.register(cluster.stop)
            _shared.append(cluster.url)
        return _shared[0]


def fresh_url() -> str:
    """A URL whose connections use a new, empty schema of the shared server."""
    import psycopg

    base = shared_url()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
