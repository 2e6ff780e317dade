"""Proxies from the environment, by curl's rules, through real proxies on loopback.

The fault server is also a forward proxy for plain http (a proxied request names the
whole URL, ``GET http://host/path``, and the server serves by path whatever the host), so
a URL on a host that does not exist downloads only through it. A small CONNECT proxy
stands in for https proxies, and a closed port for a proxy that is down.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.testing import FaultServer

from support import SUREFETCH, payload, restore_default_signals

DATA = payload(300_000, seed=81)
PROXY_VARS = [
    *("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"),
    *("all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY", "REQUEST_METHOD"),
]
# A host that never resolves (RFC 6761): reachable only through a proxy.
NOWHERE = "surefetch-test.invalid"


@pytest.fixture(autouse=True)
def _no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class ConnectProxy:
    """Answers every CONNECT with `status`, and records the request lines."""

    def __init__(self, status: str = "403 Forbidden") -> None:
        self.status = status
        self.lines: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.lines.append(head.split(b"\r\n", 1)[0].decode())
                reply = f"HTTP/1.1 {self.status}\r\nContent-Length: 0\r\n\r\n"
                conn.sendall(reply.encode())

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def connect_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


def get(url: str, dest: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`surefetch get` with exactly these proxy variables."""
    clean = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    return subprocess.run(
        [SUREFETCH, "get", url, "-o", str(dest), "--retries", "0"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        preexec_fn=restore_default_signals,
        env={**clean, **env},
    )


def test_a_forward_proxy_carries_plain_http(server: FaultServer, tmp_path: Path) -> None:
    server.add("f.bin", DATA)
    out = get(f"http://{NOWHERE}/f.bin", tmp_path / "f.bin", {"http_proxy": server.url})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert server.requests[0].target == f"http://{NOWHERE}/f.bin"


def test_proxy_credentials_go_to_the_proxy(server: FaultServer, tmp_path: Path) -> None:
    server.add("f.bin", DATA)
    proxy = server.url.replace("http://", "http://user:s3cret@")
    out = get(f"http://{NOWHERE}/f.bin", tmp_path / "f.bin", {"http_proxy": proxy})
    assert out.returncode == 0, out.stderr
    # Basic base64("user:s3cret")
    assert server.requests[0].headers["proxy-authorization"] == "Basic dXNlcjpzM2NyZXQ="


@pytest.mark.parametrize("name", ["NO_PROXY", "no_proxy"])
@pytest.mark.parametrize("value", ["*", " * ", "localhost, *"])
@pytest.mark.parametrize("proxy_var", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_no_proxy_star_means_no_proxy_at_all(
    name: str, value: str, proxy_var: str, server: FaultServer, tmp_path: Path, closed_port: int
) -> None:
    """curl: `*` matches every host; reqwest alone still proxied IP addresses."""
    url = server.add("f.bin", DATA)
    env = {proxy_var: f"http://127.0.0.1:{closed_port}", name: value}
    out = get(url, tmp_path / "f.bin", env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "f.bin").read_bytes() == DATA


def test_no_proxy_lists_hosts_and_ranges(
    server: FaultServer, tmp_path: Path, closed_port: int
) -> None:
    url = server.add("f.bin", DATA)
    dead = f"http://127.0.0.1:{closed_port}"
    for listed in ["127.0.0.1", "127.0.0.0/8", "example.org,127.0.0.1"]:
        out = get(url, tmp_path / "f.bin", {"http_proxy": dead, "no_proxy": listed})
        assert out.returncode == 0, (listed, out.stderr)
    out = get(url, tmp_path / "f.bin", {"http_proxy": dead, "no_proxy": "10.0.0.0/8"})
    assert out.returncode == 4, out.stderr
    assert "could not connect to the proxy" in out.stderr


def test_lower_case_wins_over_upper_case(
    server: FaultServer, tmp_path: Path, closed_port: int
) -> None:
    """curl reads http_proxy (and https_proxy, all_proxy, no_proxy) before upper case."""
    server.add("f.bin", DATA)
    env = {"http_proxy": server.url, "HTTP_PROXY": f"http://127.0.0.1:{closed_port}"}
    out = get(f"http://{NOWHERE}/f.bin", tmp_path / "f.bin", env)
    assert out.returncode == 0, out.stderr
    # no_proxy (lower) is the list in force, not NO_PROXY.
    env = {
        "all_proxy": f"http://127.0.0.1:{closed_port}",
        "no_proxy": "127.0.0.1",
        "NO_PROXY": "example.org",
    }
    out = get(server.url_for("f.bin"), tmp_path / "g.bin", env)
    assert out.returncode == 0, out.stderr


def test_upper_case_http_proxy_is_ignored_in_cgi(
    server: FaultServer, tmp_path: Path, closed_port: int
) -> None:
    """In a CGI program HTTP_PROXY may come from a client's Proxy: header (httpoxy)."""
    url = server.add("f.bin", DATA)
    dead = f"http://127.0.0.1:{closed_port}"
    out = get(url, tmp_path / "f.bin", {"HTTP_PROXY": dead, "REQUEST_METHOD": "GET"})
    assert out.returncode == 0, out.stderr
    out = get(url, tmp_path / "f.bin", {"HTTP_PROXY": dead})
    assert out.returncode == 4, out.stderr


def test_a_proxy_that_is_down_is_named_without_its_password(
    tmp_path: Path, closed_port: int
) -> None:
    proxy = f"http://user:s3cret@127.0.0.1:{closed_port}"
    out = get(f"https://{NOWHERE}/f.bin", tmp_path / "f.bin", {"HTTPS_PROXY": proxy})
    assert out.returncode == 4, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(
        f"surefetch: error: could not connect to the proxy http://user:***@127.0.0.1:"
        f"{closed_port} (from HTTPS_PROXY) for https://{NOWHERE}/f.bin: Connection refused"
    ), lines[0]
    assert "s3cret" not in out.stderr
    assert not (tmp_path / "f.bin").exists()


def test_a_proxy_that_refuses_the_tunnel_is_named(
    connect_proxy: ConnectProxy, tmp_path: Path
) -> None:
    proxy = f"127.0.0.1:{connect_proxy.port}"  # no scheme: http://, as curl reads it
    out = get(f"https://{NOWHERE}/f.bin", tmp_path / "f.bin", {"https_proxy": proxy})
    assert out.returncode == 4, out.stderr
    assert connect_proxy.lines == [f"CONNECT {NOWHERE}:443 HTTP/1.1"]
    assert (
        f"the proxy http://127.0.0.1:{connect_proxy.port} (from https_proxy) did not open "
        f"a connection to https://{NOWHERE}/f.bin"
    ) in out.stderr, out.stderr


def test_a_proxy_asking_for_credentials_says_so(server: FaultServer, tmp_path: Path) -> None:
    server.add("f.bin", DATA)
    out = get(f"http://{NOWHERE}/f.bin?status=407", tmp_path / "f.bin", {"http_proxy": server.url})
    assert out.returncode == 4, out.stderr
    assert "HTTP 407" in out.stderr and "the proxy wants credentials" in out.stderr


def test_an_unsupported_proxy_is_refused_not_bypassed(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("f.bin", DATA)
    out = get(url, tmp_path / "f.bin", {"ALL_PROXY": "socks5://u:s3cret@127.0.0.1:1080"})
    assert out.returncode == 2, out.stderr
    assert "socks5://" in out.stderr and "ALL_PROXY" in out.stderr
    assert "s3cret" not in out.stderr
    assert server.requests == []


def test_one_process_follows_its_changing_environment(
    server: FaultServer, tmp_path: Path, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared HTTP client is per proxy setting: a change of the environment between
    calls is seen by the next call."""
    url = server.add("f.bin", DATA)
    dest = tmp_path / "f.bin"
    assert sf.download(url, dest, retries=0).size == len(DATA)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(sf.NetworkError, match="could not connect to the proxy"):
        sf.download(url, dest, retries=0)
    monkeypatch.setenv("NO_PROXY", "*")
    assert sf.download(url, dest, retries=0).size == len(DATA)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", server.url)
    assert sf.download(f"http://{NOWHERE}/f.bin", dest, retries=0).size == len(DATA)
    monkeypatch.delenv("HTTP_PROXY")
    with pytest.raises(sf.NetworkError, match=f"could not connect to http://{NOWHERE}/f.bin"):
        sf.download(f"http://{NOWHERE}/f.bin", dest, retries=0)
