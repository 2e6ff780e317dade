"""A real nginx for tests, in the foreground on a free loopback port.

Its access log records each request's connection serial number, so a test can
count the TCP connections a download really opened.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

_START_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_binary() -> str:
    """nginx's path; `scripts/system-deps` installs it, so its absence is an error."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise RuntimeError("nginx is missing: run scripts/system-deps (the tests need it)")
    return found


class Nginx:
    """nginx serving `root` at `url(name)`; `connections_for(name)` reads its access log."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.work = work
        self.port = _free_port()
        self.access_log = work / "access.log"
        self.error_log = work / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _config(self) -> str:
        temp = "\n".join(
            f"    {kind}_temp_path {self.work}/tmp-{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""user root;
daemon off;
worker_processes 1;
pid {self.work}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 256; }}
http {{
    log_format conn '$connection $status "$http_range" $request_uri';
    access_log {self.access_log} conn;
    default_type application/octet-stream;
    sendfile on;
{temp}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
"""

    def __enter__(self) -> Nginx:
        conf = self.work / "nginx.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", f"{self.work}/", "-c", str(conf), "-e", str(self.error_log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self._errors()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("HEAD", "/")
                conn.getresponse().read()
                conn.close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {self._errors()}") from None
                time.sleep(0.05)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _errors(self) -> str:
        try:
            return self.error_log.read_text()[-2000:]
        except OSError:
            return "(no error log)"

    def log(self, name: str) -> list[tuple[int, int, str]]:
        """(connection serial, status, Range header) of each request for `name`."""
        entries = []
        # nginx writes a request's line after its response (a client may have dropped a
        # connection before nginx finished it): wait until the log stops growing.
        lines, deadline = -1, time.monotonic() + 3
        while time.monotonic() < deadline:
            now = len(self.access_log.read_text().splitlines())
            if now == lines:
                break
            lines = now
            time.sleep(0.1)
        for line in self.access_log.read_text().splitlines():
            serial, status, rest = line.split(" ", 2)
            rng, uri = rest.rsplit(" ", 1)
            if uri.lstrip("/").split("?")[0] == name:
                entries.append((int(serial), int(status), rng.strip('"')))
        return entries
