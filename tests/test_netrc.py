"""Credentials from ~/.netrc ($NETRC), for the matching host only, never printed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.testing import FaultServer

from support import run_cli

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


@pytest.fixture
def netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "netrc"
    path.write_text(
        "machine 127.0.0.1 login alice password s3cret\nmachine other login b password c\n"
    )
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    return path


def _sent(dest: Path) -> dict[str, str]:
    headers: dict[str, str] = json.loads(dest.read_text())
    return headers


def test_the_hosts_entry_is_sent_unless_told_otherwise(
    server: FaultServer, netrc: Path, tmp_path: Path
) -> None:
    url = server.url_for("x", echo_headers=1)
    sf.download(url, tmp_path / "a")
    assert _sent(tmp_path / "a")["authorization"] == BASIC
    sf.download(url, tmp_path / "b", netrc=False)
    assert "authorization" not in _sent(tmp_path / "b")
    sf.download(url, tmp_path / "c", headers={"Authorization": "Bearer mine"})
    assert _sent(tmp_path / "c")["authorization"] == "Bearer mine"
    own = url.replace("http://", "http://bob:pw@")
    sf.download(own, tmp_path / "d")
    assert _sent(tmp_path / "d")["authorization"] == "Basic " + base64.b64encode(b"bob:pw").decode()
    items = [sf.DownloadItem(url, out="1"), sf.DownloadItem(url + "&_=2", out="2")]
    results = sf.download_many(items, tmp_path / "many")
    assert all(_sent(r.path)["authorization"] == BASIC for r in results)  # type: ignore[union-attr]


def test_no_entry_no_header(
    server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "netrc"
    path.write_text("machine example.org login a password b\n")
    monkeypatch.setenv("NETRC", str(path))
    sf.download(server.url_for("x", echo_headers=1), tmp_path / "a")
    assert "authorization" not in _sent(tmp_path / "a")


def _on_localhost(url: str) -> str:
    """`url` under another host name: another host as netrc sees it."""
    return url.replace("://127.0.0.1:", "://localhost:")


def test_never_sent_to_another_host_after_a_redirect(
    server: FaultServer, other_server: FaultServer, netrc: Path, tmp_path: Path
) -> None:
    elsewhere = _on_localhost(other_server.url_for("x", echo_headers=1))
    sf.download(server.url_for("x", redirect_to=elsewhere), tmp_path / "a")
    assert "authorization" not in _sent(tmp_path / "a")
    mine = {"Authorization": "Bearer mine"}
    sf.download(server.url_for("x", redirect_to=elsewhere), tmp_path / "b", headers=mine)
    assert "authorization" not in _sent(tmp_path / "b")


@pytest.mark.parametrize(
    "entries, expected",
    [
        # The entry of the host the redirect leads to (as requests applies netrc again).
        (
            "machine 127.0.0.1 login alice password s3cret\nmachine localhost login c password d\n",
            "c:d",
        ),
        # The default entry stands for any host.
        ("machine 127.0.0.1 login alice password s3cret\ndefault login e password f\n", "e:f"),
    ],
    ids=["its-own-entry", "the-default-entry"],
)
def test_the_entry_of_the_host_a_redirect_leads_to_is_sent_there(
    server: FaultServer,
    other_server: FaultServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    entries: str,
    expected: str,
) -> None:
    path = tmp_path / "netrc"
    path.write_text(entries)
    monkeypatch.setenv("NETRC", str(path))
    elsewhere = _on_localhost(other_server.url_for("x", echo_headers=1))
    start = server.url_for("x", redirect_to=elsewhere)
    sf.download(start, tmp_path / "a")
    assert (
        _sent(tmp_path / "a")["authorization"]
        == "Basic " + base64.b64encode(expected.encode()).decode()
    )
    assert server.requests[-1].headers["authorization"] == BASIC  # the first hop: alice's
    items = [sf.DownloadItem(start, out="1")]
    (result,) = sf.download_many(items, tmp_path / "many")
    assert isinstance(result, sf.DownloadResult), result
    assert _sent(result.path)["authorization"].endswith(
        base64.b64encode(expected.encode()).decode()
    )
    sf.download(start, tmp_path / "off", netrc=False)
    assert "authorization" not in _sent(tmp_path / "off")


def test_the_cli_uses_it_and_never_prints_it(
    server: FaultServer, netrc: Path, tmp_path: Path
) -> None:
    url = server.url_for("x", echo_headers=1)
    done = run_cli(["get", url, "-o", "a.json", "-q"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert _sent(tmp_path / "a.json")["authorization"] == BASIC
    off = run_cli(["get", url, "-o", "b.json", "-q", "--no-netrc"], tmp_path)
    assert off.returncode == 0 and "authorization" not in _sent(tmp_path / "b.json")
    refused = run_cli(["get", server.url_for("x", status=401), "-o", "c"], tmp_path)
    assert refused.returncode == 4
    assert "s3cret" not in refused.stderr + refused.stdout and "alice" not in refused.stderr


def test_a_broken_netrc_is_a_clear_usage_error(
    server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "netrc"
    path.write_text("machine 127.0.0.1 login alice password s3cret\nmachine\n")
    monkeypatch.setenv("NETRC", str(path))
    done = run_cli(["get", server.url_for("x", echo_headers=1), "-o", "a"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr and "--no-netrc" in done.stderr
    assert "s3cret" not in done.stderr
    assert not (tmp_path / "a").exists()


def test_a_changed_netrc_is_read_again(server: FaultServer, netrc: Path, tmp_path: Path) -> None:
    """The parsed file is kept while it is unchanged (a batch asks once per URL)."""
    url = server.url_for("x", echo_headers=1)
    sf.download(url, tmp_path / "a")
    assert _sent(tmp_path / "a")["authorization"] == BASIC
    netrc.write_text("machine 127.0.0.1 login alice password n3w\n")
    sf.download(url, tmp_path / "b")
    assert (
        _sent(tmp_path / "b")["authorization"] == "Basic " + base64.b64encode(b"alice:n3w").decode()
    )
    netrc.unlink()
    sf.download(url, tmp_path / "c")
    assert "authorization" not in _sent(tmp_path / "c")


def test_a_broken_netrc_stops_a_batch_before_it_starts(
    server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch reads the file once, before any item: one clear line, nothing fetched,
    nothing created (not one "unusable URL" per item)."""
    path = tmp_path / "netrc"
    path.write_text("machine 127.0.0.1 login alice password s3cret\nmachine\n")
    monkeypatch.setenv("NETRC", str(path))
    urls = [server.add(f"b{i}", b"b" * 100) for i in range(3)]
    done = run_cli(["get", *urls, "-o", "out/"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and str(path) in done.stderr, done.stderr
    assert "--no-netrc" in done.stderr and "s3cret" not in done.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "surefetch.toml").write_text(
        "".join(f'[[artifact]]\nname = "b{i}"\nurl = "{u}"\n' for i, u in enumerate(urls))
    )
    synced = run_cli(["sync", "--cache", "cache", "--dest", "dest"], tmp_path)
    assert synced.returncode == 2, synced.stderr
    assert synced.stderr.count("\n") == 1 and str(path) in synced.stderr, synced.stderr
    assert not (tmp_path / "surefetch.lock").exists()
    assert not [r for r in server.requests if r.name.startswith("b")]
    (first, *_) = sf.download_many(urls, tmp_path / "plain", netrc=False)
    assert isinstance(first, sf.DownloadResult) and first.size == 100


@pytest.mark.parametrize(
    "text, line",
    [
        ("machine 127.0.0.1 login bob s3cr3tPW\n", 1),  # the password keyword left out
        ("machine 127.0.0.1 login bob password my s3cr3tPW phrase\n", 1),  # spaces in it
        ("machine a login b password c\nmachine\n", 2),  # cut short (netrc said line 3)
    ],
)
def test_a_netrc_that_does_not_parse_is_never_quoted(
    server: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, line: int
) -> None:
    """Python's netrc names the token it choked on, which may be the password: the
    message says where and what an entry looks like, never what the file holds."""
    path = tmp_path / "netrc"
    path.write_text(text)
    monkeypatch.setenv("NETRC", str(path))
    done = run_cli(["get", server.add("q", b"q"), "-o", "q"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and str(path) in done.stderr, done.stderr
    assert "s3cr3tPW" not in done.stderr and "phrase" not in done.stderr, done.stderr
    assert "machine HOST login NAME password SECRET" in done.stderr
    assert f"near line {line};" in done.stderr, done.stderr
