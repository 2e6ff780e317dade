"""`surefetch get` as a real child process: output, exit codes, signals."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from surefetch.testing import FaultServer

from support import SUREFETCH, leftovers, part_dir, payload, restore_default_signals, run_cli

DATA = payload(2 * 1024 * 1024 + 7, seed=2)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("model.bin", DATA)


def test_get_prints_the_path(url: str, tmp_path: Path) -> None:
    out = run_cli(["get", url, "--sha256", SHA], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "model.bin")
    assert out.stderr == ""  # not a terminal: no progress bar
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_get_json(url: str, tmp_path: Path) -> None:
    out = run_cli(["get", url, "-o", str(tmp_path / "m"), "--json"])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {
        "path",
        "size",
        "sha256",
        "xxh3_128",
        "resumed_from",
        "bytes_transferred",
        "elapsed_s",
    }
    assert (result["path"], result["size"], result["sha256"]) == (
        str(tmp_path / "m"),
        len(DATA),
        SHA,
    )


def test_quiet_prints_nothing(url: str, tmp_path: Path) -> None:
    out = run_cli(["get", url, "-o", str(tmp_path / "m"), "--quiet", "--no-fsync"])
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_names_from_the_url_stay_in_the_directory(server: FaultServer, tmp_path: Path) -> None:
    out = run_cli(["get", server.url + "/..%2F..%2Fevil?echo_headers=1", "-q"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert leftovers(tmp_path) == ["evil"]


BAD_SHA = "0" * 64


@pytest.mark.parametrize(
    "query, extra, code, words",
    [
        ("?wrong=1", ["--sha256", SHA], 3, "sha256 mismatch"),
        ("", ["--size", "5"], 3, "size mismatch"),
        ("?status=404", [], 4, "HTTP 404"),
        ("?status=503", ["--retries", "1"], 4, "HTTP 503"),
        ("?cut=1000", ["--retries", "1"], 4, "broke"),
        ("?loop=1", [], 4, "redirects"),
        ("?hang=30", ["--read-timeout", "0.3", "--retries", "0"], 5, "sent nothing"),
        ("?throttle=100000", ["--timeout", "0.5"], 5, "did not finish"),
        ("", ["--sha256", "xyz"], 2, "invalid sha256"),
        ("", ["--retries", "-1"], 2, "must be 0 or more"),
        ("", ["--timeout", "0"], 2, "positive"),
    ],
)
def test_failures_exit_with_their_code_and_leave_nothing(
    url: str, tmp_path: Path, query: str, extra: list[str], code: int, words: str
) -> None:
    dest = tmp_path / "out.bin"
    out = run_cli(["get", url + query, "-o", str(dest), *extra])
    assert out.returncode == code, out.stderr
    assert words in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stdout == ""
    assert not dest.exists()


def test_unsupported_scheme_is_a_usage_error(tmp_path: Path) -> None:
    out = run_cli(["get", "file:///etc/passwd", "-o", str(tmp_path / "p")])
    assert out.returncode == 2
    assert "only http and https" in out.stderr
    assert leftovers(tmp_path) == []


def test_missing_url_is_a_usage_error() -> None:
    assert run_cli(["get"]).returncode == 2


def _start(url: str, dest: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [SUREFETCH, "get", url, "-o", str(dest)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=restore_default_signals,
    )


def _wait_for_part(dest: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    part = part_dir(dest) / (dest.name + ".part")
    while not (part.exists() and part.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "sig, code, query",
    [
        (signal.SIGINT, 130, "?throttle=1000000"),
        (signal.SIGTERM, 143, "?throttle=1000000"),
        (signal.SIGINT, 130, "?stall_after=200000"),
        (signal.SIGTERM, 143, "?stall_after=200000"),
    ],
)
def test_signals_stop_at_once_and_keep_the_part(
    url: str, tmp_path: Path, sig: int, code: int, query: str
) -> None:
    dest = tmp_path / "model.bin"
    proc = _start(url + query, dest)
    _wait_for_part(dest, proc)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=10)
    latency = time.monotonic() - sent
    assert proc.returncode == code, stderr
    assert latency < 1.0  # includes interpreter teardown; the in-process bound is tested too
    assert not dest.exists()
    part = part_dir(dest) / "model.bin.part"
    assert f"bytes received are kept in {part}: run the same download again".encode() in stderr
    sidecar = json.loads((part_dir(dest) / "model.bin.part.json").read_text())
    done = sidecar["ranges_done"][0][1]
    assert done > 0
    assert part.read_bytes()[:done] == DATA[:done]


@pytest.mark.parametrize("output", ["new/sub/a.bin", "new/sub/", "many"])
@pytest.mark.parametrize("failure", ["404", "refused", "wrong digest"])
def test_a_failed_get_leaves_no_directory_it_made(
    server: FaultServer, tmp_path: Path, output: str, failure: str
) -> None:
    """As a failed sync: the directories a get made for its file go again (they stayed,
    empty), while one that already existed, and what is in it, stays."""
    body = payload(5000, seed=8)
    good = server.add("g.bin", body)
    url = {
        "404": server.url_for("gone"),
        "refused": "http://127.0.0.1:1/a.bin",
        "wrong digest": good,
    }[failure]
    digest = ["--sha256", "0" * 64] if failure == "wrong digest" else []
    (tmp_path / "kept").mkdir()
    if output == "many":
        pin = f" sha256={'0' * 64}" if digest else ""
        (tmp_path / "kept" / "list").write_text(f"{url} out=a{pin}\n{url} out=b{pin}\n")
        args = ["-i", "kept/list", "-o", "new/sub/"]
    else:
        args = [url, "-o", output, *digest]
    done = run_cli(["get", *args, "--retries", "0"], tmp_path)
    assert done.returncode in (3, 4), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
