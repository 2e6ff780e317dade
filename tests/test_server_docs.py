"""`surefetch serve`'s API pages render in a real headless browser with no network but loopback.

Chromium (Debian's ``chromium``, installed by scripts/system-deps) loads the page
with every request beyond loopback sent to a proxy that refuses it, and dumps the
DOM that Swagger UI (or ReDoc) built. A control run shows that the same setup
leaves FastAPI's default page, whose script comes from a CDN, without a single
operation.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from support import SUREFETCH, restore_default_signals

PATHS = ["/sessions", "/sessions/{session_id}", "/sessions/{session_id}/cancel"]
URL = re.compile(r"https?://[^\s\"'<>)]+")


def chromium() -> str:
    """Debian's browser binary (the launcher script adds flags for a desktop user)."""
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError("chromium is missing: run scripts/system-deps (as root)")


class _Refuse(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline(65536)
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture(scope="module")
def no_internet() -> Iterator[str]:
    """A proxy on loopback that refuses everything: the browser's only way out."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Refuse)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def render(url: str, proxy: str, profile: Path) -> str:
    """The DOM of `url` once its scripts ran (10 s of virtual time), in headless Chromium
    whose requests beyond loopback all go to `proxy`."""
    out = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",  # we run as root in CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--proxy-server={proxy}",  # loopback is never proxied
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `surefetch serve` on a free loopback port; its base URL."""
    db = tmp_path_factory.mktemp("serve") / "sessions.db"
    proc = subprocess.Popen(
        [SUREFETCH, "serve", "--db", f"sqlite:///{db}", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=restore_default_signals,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        line = proc.stderr.readline() if ready else ""
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, f"surefetch serve did not start: {line!r}"
        base = found.group(0)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "surefetch serve does not answer"
            time.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_docs_page_references_only_its_own_server(served: str) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(served + page, timeout=10)
        assert html.status_code == 200
        assert URL.findall(html.text) == [], page
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', html.text)
        assert assets, page
        for asset in assets:
            response = httpx.get(served + asset, timeout=10)
            assert response.status_code == 200, asset
            assert len(response.content) > 100, asset


def test_swagger_ui_renders_the_operations_offline(
    served: str, no_internet: str, tmp_path: Path
) -> None:
    dom = render(served + "/docs", no_internet, tmp_path / "profile")
    assert 'class="swagger-ui"' in dom
    assert "opblock-summary-path" in dom, dom[-2000:]
    shown = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert shown == set(PATHS)
    for method in ("get", "post"):
        assert f"opblock-{method}" in dom
    assert "surefetch sessions" in dom  # the API's title, from /openapi.json


def test_redoc_renders_the_operations_offline(
    served: str, no_internet: str, tmp_path: Path
) -> None:
    dom = render(served + "/redoc", no_internet, tmp_path / "profile")
    for summary in ("Create a session", "List your sessions, newest first", "One of your sessions"):
        assert summary in dom, summary


def test_a_cdn_page_stays_blank_in_the_same_browser(no_internet: str, tmp_path: Path) -> None:
    """The control: FastAPI's default /docs takes Swagger UI from a CDN; here it renders
    nothing, so the assertions above do prove the pages need no internet."""
    app = FastAPI()

    @app.get("/sessions")
    def sessions() -> dict[str, str]:
        return {}

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert any("cdn" in url for url in URL.findall(httpx.get(base + "/docs").text))
        dom = render(base + "/docs", no_internet, tmp_path / "profile")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert 'id="swagger-ui"' in dom
    assert "opblock" not in dom
