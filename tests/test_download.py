"""The engine through `surefetch.download`, over real HTTP on loopback, for every fault."""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import os
import pickle
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

import surefetch as sf
from surefetch.download import FROM_OPTIONS
from surefetch.testing import FaultServer, gzipped
from surefetch.transfer import FIELDS, TransferOptions

from support import leftovers, part_dir, payload

DATA = payload(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(DATA).hexdigest()
XXH = xxhash.xxh3_128_hexdigest(DATA)


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("data.bin", DATA)


def test_download_verifies_both_digests_and_leaves_nothing_behind(
    url: str, tmp_path: Path, server: FaultServer
) -> None:
    dest = tmp_path / "data.bin"
    result = sf.download(url, dest, sha256=SHA, xxh3_128=XXH, size=len(DATA))
    assert dest.read_bytes() == DATA
    assert (result.path, result.size, result.sha256, result.xxh3_128) == (
        dest,
        len(DATA),
        SHA,
        XXH,
    )
    assert result.bytes_transferred == len(DATA) == server.bytes_sent
    assert result.resumed_from == 0
    assert leftovers(tmp_path) == ["data.bin"]
    assert not part_dir(dest).exists()


def test_digests_are_computed_without_expectations(url: str, tmp_path: Path) -> None:
    result = sf.download(url, tmp_path / "f")
    assert (result.sha256, result.xxh3_128) == (SHA, XXH)
    assert sf.download(url, tmp_path / "g", compute_sha256=False).sha256 is None


def test_request_headers_are_safe_by_default(server: FaultServer, tmp_path: Path) -> None:
    dest = tmp_path / "headers.json"
    sf.download(server.url_for("any", echo_headers=1), dest, headers={"X-Token": "t"})
    seen = json.loads(dest.read_bytes())
    assert seen["accept-encoding"] == "identity"
    assert seen["x-token"] == "t"
    assert seen["user-agent"].startswith("surefetch/")


def test_small_and_empty_bodies(server: FaultServer, tmp_path: Path) -> None:
    for size in (0, 1, 4096, 1 << 20, (1 << 20) + 1):
        data = payload(size, seed=size)
        result = sf.download(server.add(f"f{size}", data), tmp_path / f"f{size}")
        assert Path(result.path).read_bytes() == data
        assert result.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664 & 0o644)])
def test_file_mode_is_0644_minus_umask(url: str, tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        sf.download(url, tmp_path / "f")
        sf.download(url, tmp_path / "x", executable=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o755 & ~umask


def test_destination_directory_and_url_names(server: FaultServer, tmp_path: Path) -> None:
    server.add("a b.bin", b"spaced")
    result = sf.download(server.url + "/a%20b.bin", tmp_path)
    assert result.path == tmp_path / "a b.bin"
    escaping = server.url + "/..%2F..%2Fescape.bin?echo_headers=1"
    result = sf.download(escaping, tmp_path)
    assert result.path == tmp_path / "escape.bin"
    assert sf.download.__module__ == "surefetch.download"
    assert sf.download(server.url + "/?echo_headers=1", tmp_path).path == tmp_path / "index"


# --- faults that a retry gets past -------------------------------------------------


def test_cut_body_is_retried_from_where_it_broke(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    result = sf.download(url + "?cut=100000&times=1", tmp_path / "f", sha256=SHA)
    assert result.size == len(DATA)
    assert server.request_count("data.bin") == 2
    # The retry asked for the rest only (from a page boundary, so that writes
    # stay aligned): at most 4 KiB crossed the wire twice.
    assert result.bytes_transferred == server.bytes_sent
    assert len(DATA) <= server.bytes_sent < len(DATA) + 4096
    assert result.resumed_from == 0  # nothing was kept from an earlier call


def test_lying_long_content_length_is_a_truncated_body(url: str, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    sf.download(url + f"?length={len(DATA) + 10}&times=1", dest, sha256=SHA)
    assert dest.read_bytes() == DATA
    with pytest.raises(sf.NetworkError, match=r"broke|closed|Content-Length of"):
        sf.download(url + f"?length={len(DATA) + 10}", tmp_path / "g", retries=1)
    assert not (tmp_path / "g").exists()


def test_lying_short_content_length_is_caught_by_the_digest(url: str, tmp_path: Path) -> None:
    with pytest.raises(sf.ChecksumMismatch):
        sf.download(url + "?length=1000", tmp_path / "f", sha256=SHA, connections=1)
    with pytest.raises(sf.SizeMismatch):
        sf.download(url + "?length=1000", tmp_path / "g", size=len(DATA), connections=1)
    # A range answer whose Content-Length disagrees with its Content-Range is never
    # used; the plain answer that follows contradicts the size that one stated under
    # the same ETag: nothing can be the whole file (issue 11 §1), exit 4.
    with pytest.raises(sf.NetworkError, match="a 200 of 1000 bytes has the validator"):
        sf.download(url + "?length=1000", tmp_path / "h", sha256=SHA)
    assert leftovers(tmp_path) == []


def test_flaky_server(server: FaultServer, url: str, tmp_path: Path) -> None:
    sf.download(url + "?flaky=2", tmp_path / "f", sha256=SHA, retries=2)
    assert server.request_count("data.bin") == 3


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_retryable_statuses(server: FaultServer, url: str, tmp_path: Path, status: int) -> None:
    sf.download(url + f"?flaky=1&flaky_status={status}", tmp_path / "f", sha256=SHA)
    assert server.request_count("data.bin") == 2


def test_retry_after_is_honoured(server: FaultServer, url: str, tmp_path: Path) -> None:
    started = time.monotonic()
    sf.download(url + "?flaky=1&flaky_status=429&retry_after=1", tmp_path / "f", sha256=SHA)
    assert time.monotonic() - started >= 1.0
    assert server.request_count("data.bin") == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 416])
def test_client_errors_are_not_retried(
    server: FaultServer, url: str, tmp_path: Path, status: int
) -> None:
    with pytest.raises(sf.HTTPError) as info:
        sf.download(url + f"?status={status}", tmp_path / "f", retries=3, connections=1)
    assert info.value.status == status
    assert server.request_count("data.bin") == 1
    assert leftovers(tmp_path) == []


def test_server_errors_after_retries(server: FaultServer, url: str, tmp_path: Path) -> None:
    with pytest.raises(sf.HTTPError, match="503") as info:
        sf.download(url + "?status=503", tmp_path / "f", retries=2)
    assert info.value.status == 503
    assert server.request_count("data.bin") == 3
    assert not (tmp_path / "f").exists()


def test_connection_refused_is_a_network_error(tmp_path: Path) -> None:
    with FaultServer() as gone:
        dead_url = gone.url + "/x"
    with pytest.raises(sf.NetworkError, match="could not connect"):
        sf.download(dead_url, tmp_path / "f", retries=1)
    assert leftovers(tmp_path) == []


# --- redirects -------------------------------------------------------------------------


def test_redirect_chains(server: FaultServer, url: str, tmp_path: Path) -> None:
    assert sf.download(url + "?redirect=10", tmp_path / "f", sha256=SHA).size == len(DATA)
    with pytest.raises(sf.NetworkError, match="more than 10 redirects"):
        sf.download(url + "?redirect=11", tmp_path / "g")
    with pytest.raises(sf.NetworkError, match="more than 10 redirects"):
        sf.download(url + "?loop=1", tmp_path / "h")
    assert leftovers(tmp_path) == ["f"]


@pytest.mark.parametrize(
    "target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:,hello", "gopher://h/x"]
)
def test_redirects_to_other_schemes_are_refused(url: str, tmp_path: Path, target: str) -> None:
    with pytest.raises(sf.NetworkError, match="only http and https"):
        sf.download(url + "?redirect_to=" + target, tmp_path / "f")
    assert leftovers(tmp_path) == []


def test_credentials_are_dropped_on_a_cross_host_redirect(
    server: FaultServer, other_server: FaultServer, tmp_path: Path
) -> None:
    secret = {"Authorization": "Bearer s3cret", "Cookie": "c=1", "Proxy-Authorization": "p"}
    elsewhere = other_server.url_for("x", echo_headers=1)
    sf.download(server.url_for("x", redirect_to=elsewhere), tmp_path / "cross", headers=secret)
    seen = json.loads((tmp_path / "cross").read_bytes())
    assert not {"authorization", "cookie", "proxy-authorization"} & set(seen)

    same_host = server.url_for("x", echo_headers=1, redirect=2)
    sf.download(same_host, tmp_path / "same", headers=secret)
    seen = json.loads((tmp_path / "same").read_bytes())
    assert seen["authorization"] == "Bearer s3cret"


def test_other_schemes_are_refused_up_front(tmp_path: Path) -> None:
    for bad in ["file:///etc/passwd", "ftp://h/x", "/etc/passwd", "http://"]:
        with pytest.raises(ValueError):
            sf.download(bad, tmp_path / "f")
    assert leftovers(tmp_path) == []


# --- content ---------------------------------------------------------------------------


def test_gzip_is_stored_as_sent(url: str, tmp_path: Path) -> None:
    compressed = gzipped(DATA)
    result = sf.download(url + "?gzip=1", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == compressed
    assert result.sha256 == hashlib.sha256(compressed).hexdigest()


@pytest.mark.parametrize("query", ["no_length=1", "chunked=1"])
def test_bodies_without_length(url: str, tmp_path: Path, query: str) -> None:
    result = sf.download(url + "?" + query, tmp_path / "f", sha256=SHA)
    assert result.size == len(DATA)
    with pytest.raises(sf.SizeMismatch):
        sf.download(url + "?" + query, tmp_path / "g", size=len(DATA) + 1)
    with pytest.raises(sf.SizeMismatch):
        sf.download(url + "?" + query, tmp_path / "h", size=1000)
    assert leftovers(tmp_path) == ["f"]


def test_wrong_content_never_reaches_the_final_path(url: str, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_bytes(b"the old version")
    with pytest.raises(sf.ChecksumMismatch) as info:
        sf.download(url + "?wrong=1", dest, sha256=SHA)
    assert (info.value.algorithm, info.value.expected) == ("sha256", SHA)
    assert info.value.actual != SHA
    with pytest.raises(sf.ChecksumMismatch, match="xxh3_128"):
        sf.download(url + "?wrong=1", dest, xxh3_128=XXH)
    assert dest.read_bytes() == b"the old version"
    assert leftovers(tmp_path) == ["f"]


def test_size_announced_differently_fails_before_the_body(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(sf.SizeMismatch) as info:
        sf.download(url + "?throttle=1000000", tmp_path / "f", size=len(DATA) - 1)
    assert (info.value.expected, info.value.actual) == (len(DATA) - 1, len(DATA))
    assert time.monotonic() - started < 1
    assert server.bytes_sent < len(DATA) // 2
    assert leftovers(tmp_path) == []


def test_bad_arguments(url: str, tmp_path: Path) -> None:
    for kwargs in [
        {"sha256": "abc"},
        {"xxh3_128": "z" * 32},
        {"connections": 0},
        {"retries": -1},
        {"timeout": 0},
    ]:
        with pytest.raises(ValueError):
            sf.download(url, tmp_path / "f", **kwargs)  # type: ignore[arg-type]
    assert leftovers(tmp_path) == []


# --- timeouts and cancellation ------------------------------------------------------


def test_stalled_server_hits_the_read_timeout(url: str, tmp_path: Path) -> None:
    for query in ["hang=30", "hang_headers=30", "stall_after=100000&stall=30"]:
        started = time.monotonic()
        with pytest.raises(sf.DownloadTimeout, match="sent nothing"):
            sf.download(url + "?" + query, tmp_path / "f", read_timeout=0.3, retries=0)
        assert time.monotonic() - started < 2
    assert not (tmp_path / "f").exists()


def test_a_stall_is_retried(server: FaultServer, url: str, tmp_path: Path) -> None:
    result = sf.download(url + "?hang=30&times=1", tmp_path / "f", read_timeout=0.3, sha256=SHA)
    assert result.size == len(DATA)
    assert server.request_count("data.bin") == 2


def test_overall_timeout(url: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(sf.DownloadTimeout) as info:
        sf.download(url + "?throttle=1000000", tmp_path / "f", timeout=0.5)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 1.5
    assert not (tmp_path / "f").exists()


def _cancel_after(token: sf.CancelToken, delay: float, stamp: list[float]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        stamp.append(time.monotonic())
        token.cancel()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("query", ["throttle=2000000", "hang=30", "hang_headers=30"])
def test_cancel_is_prompt_and_keeps_the_part(url: str, tmp_path: Path, query: str) -> None:
    token = sf.CancelToken()
    stamp: list[float] = []
    thread = _cancel_after(token, 0.4, stamp)
    dest = tmp_path / "f"
    with pytest.raises(sf.Cancelled):
        sf.download(url + "?" + query, dest, cancel=token)
    latency = time.monotonic() - stamp[0]
    thread.join()
    assert latency < 0.25
    assert not dest.exists()
    if query.startswith("throttle"):
        part = part_dir(dest) / "f.part"
        sidecar = json.loads((part_dir(dest) / "f.part.json").read_text())
        assert part.exists()
        assert sidecar["url"] == url + "?" + query
        assert sidecar["size"] == len(DATA)
        done = sidecar["ranges_done"][0][1]
        assert 0 < done < len(DATA)
        assert part.read_bytes()[:done] == DATA[:done]


def test_child_tokens_follow_their_parent(url: str, tmp_path: Path) -> None:
    parent = sf.CancelToken()
    child = parent.child()
    parent.cancel()
    assert child.cancelled
    with pytest.raises(sf.Cancelled):
        sf.download(url, tmp_path / "f", cancel=child)
    lone = sf.CancelToken()
    lone.child().cancel()
    assert not lone.cancelled


def test_a_failing_progress_callback_stops_the_transfer(url: str, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None]] = []

    def progress(done: int, total: int | None) -> None:
        calls.append((done, total))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        sf.download(url + "?throttle=2000000", tmp_path / "f", progress=progress)
    assert len(calls) == 1
    assert not (tmp_path / "f").exists()


def test_progress_is_rate_limited(url: str, tmp_path: Path) -> None:
    calls: list[tuple[float, int, int | None]] = []
    sf.download(
        url + "?throttle=3000000",
        tmp_path / "f",
        progress=lambda done, total: calls.append((time.monotonic(), done, total)),
    )
    elapsed = calls[-1][0] - calls[0][0]
    assert elapsed > 0.7
    assert len(calls) <= elapsed * 10 + 2
    assert calls[-1][1:] == (len(DATA), len(DATA))
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)


def test_two_downloads_to_one_destination(url: str, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            sf.download(url + "?throttle=4000000", dest, sha256=SHA)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 5
    while not (part_dir(dest) / "f.part").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(sf.LockTimeout, match="another process is downloading"):
        sf.download(url, dest)
    thread.join()
    assert errors == []
    assert dest.read_bytes() == DATA


# --- the disk ------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (the tests run as root, in CI too)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("query", ["", "?no_length=1"])
def test_full_disk(url: str, tiny_fs: Path, query: str) -> None:
    dest = tiny_fs / "f"
    with pytest.raises(sf.StorageError, match="free space") as info:
        sf.download(url + query, dest)
    assert info.value.errno == errno.ENOSPC
    assert isinstance(info.value, OSError)
    assert leftovers(tiny_fs) == []


def test_full_disk_keeps_the_old_file(url: str, tiny_fs: Path) -> None:
    dest = tiny_fs / "f"
    dest.write_bytes(b"old")
    with pytest.raises(sf.StorageError):
        sf.download(url + "?no_length=1", dest)
    assert leftovers(tiny_fs) == ["f"]
    assert dest.read_bytes() == b"old"


def test_rename_across_filesystems_never_copies(url: str, tmp_path: Path, tiny_fs: Path) -> None:
    # The part directory on another filesystem than the destination: rename gives EXDEV.
    # (A bind mount, not a symlink: surefetch never follows a symlinked .surefetch.)
    dest_dir = tmp_path / "dest"
    (dest_dir / ".surefetch").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(tiny_fs), str(dest_dir / ".surefetch")], check=True)
    try:
        with pytest.raises(sf.StorageError, match="never falls back to a copy") as info:
            sf.download(url + "?length=1000", dest_dir / "f", compute_sha256=False, connections=1)
    finally:
        subprocess.run(["umount", "-l", str(dest_dir / ".surefetch")], check=True)
    assert info.value.errno == errno.EXDEV
    assert not (dest_dir / "f").exists()
    assert leftovers(tiny_fs) == []


def test_large_files_take_the_direct_write_path(server: FaultServer, tmp_path: Path) -> None:
    # Large enough for O_DIRECT block writes, with an unaligned tail; cut once mid-way.
    data = payload((20 << 20) + 5, seed=20)
    url = server.add("large.bin", data)
    result = sf.download(url + "?cut=7000000&times=1", tmp_path / "large.bin", size=len(data))
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "large.bin").read_bytes() == data

    token = sf.CancelToken()
    stamp: list[float] = []
    thread = _cancel_after(token, 0.5, stamp)
    with pytest.raises(sf.Cancelled):
        sf.download(url + "?throttle=10000000", tmp_path / "cancelled.bin", cancel=token)
    thread.join()
    sidecar = json.loads((tmp_path / ".surefetch" / "cancelled.bin.part.json").read_text())
    done = sidecar["ranges_done"][0][1]
    assert done > 1 << 20
    part = (tmp_path / ".surefetch" / "cancelled.bin.part").read_bytes()
    assert part[:done] == data[:done]


# --- the transfer options: one value, its defaults agreeing with the engine's ----------------


def test_transfer_options_defaults_are_the_engines() -> None:
    """`TransferOptions` (and so `download`'s keyword defaults) and the engine's own
    defaults are one set: a default changed on one side only fails here."""
    from surefetch import _core

    engine = _core.default_options()
    ours = TransferOptions()
    for name in ("connections", "resume", "timeout", "read_timeout", "connect_timeout"):
        assert getattr(ours, name) == engine[name], name
    for name in ("retries", "speed_limit", "speed_time"):
        assert getattr(ours, name) == engine[name], name
    assert tuple(inspect.signature(TransferOptions).parameters) == FIELDS  # the same order
    # download() keeps no defaults of its own: the ones it does not get come from options.
    signature = inspect.signature(sf.download)
    for name in FIELDS:
        assert signature.parameters[name].default is FROM_OPTIONS, name


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("connections", 0, "connections must be at least 1"),
        ("retries", -1, "retries must be 0 or more"),
        ("timeout", 0, "timeout must be a positive number of seconds"),
        ("read_timeout", -1.0, "read_timeout must be a positive number of seconds"),
        ("connect_timeout", 0, "connect_timeout must be a positive number of seconds"),
        ("speed_time", 0, "speed_time must be a positive number of seconds"),
        ("speed_limit", -1, "speed_limit must be 0 or more"),
    ],
)
def test_transfer_options_are_checked_once_wherever_they_enter(
    tmp_path: Path, field: str, value: float, says: str
) -> None:
    """The same check, the same message, from every entry point; nothing is requested."""
    bad: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=says):
        TransferOptions(**bad)
    with pytest.raises(ValueError, match=says):
        sf.download("http://127.0.0.1:9/x", tmp_path / "x", **bad)
    with pytest.raises(ValueError, match=says):
        sf.download_many(["http://127.0.0.1:9/x"], tmp_path, **bad)
    with pytest.raises(ValueError, match=says):
        sf.Cache(tmp_path / "cache").fetch("http://127.0.0.1:9/x", **bad)
    assert not (tmp_path / "x").exists()


def test_transfer_options_value_and_keywords_combine(server: FaultServer, tmp_path: Path) -> None:
    """A `TransferOptions` value is honoured by every entry point, and a keyword that
    differs from its default overrides its field; an unknown keyword is a TypeError,
    never silently dropped."""
    url = server.add("h.bin", b"h" * 100)
    opts = TransferOptions(headers={"X-Token": "abc"}, retries=0)
    sf.download(url, tmp_path / "h.bin", options=opts)
    sf.download_many([url], tmp_path / "many", options=opts)
    sf.Cache(tmp_path / "cache").fetch(url, options=opts)
    sf.download(url, tmp_path / "other.bin", options=opts, headers={"X-Token": "mine"})
    sent = [r.headers.get("x-token") for r in server.requests if r.name == "h.bin"]
    assert sent == ["abc", "abc", "abc", "mine"]
    # An explicit keyword wins even when it equals the default (retries=3 over 0).
    flaky = server.add("flaky.bin", b"f" * 100)
    done = sf.download(f"{flaky}?flaky=2", tmp_path / "flaky.bin", options=opts, retries=3)
    assert done.size == 100
    with pytest.raises(sf.HTTPError):
        server.reset_counters()
        sf.download(f"{flaky}?flaky=2", tmp_path / "again.bin", options=opts)
    with pytest.raises(TypeError, match="unknown transfer option 'retires'"):
        sf.download_many([url], tmp_path / "t", retires=2)
    with pytest.raises(TypeError, match="options must be a TransferOptions"):
        sf.download(url, tmp_path / "d", options={"retries": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sf.Cache(tmp_path / "cache").fetch(url, retires=2)
    assert not (tmp_path / "t" / "h.bin").exists()


def test_transfer_options_are_a_value() -> None:
    """Immutable, equal by fields, shown by fields, pickled whole (a worker process gets
    the same options), and `of` checks what it changes."""
    opts = TransferOptions(retries=0, headers={"X-Token": "abc"})
    with pytest.raises(AttributeError, match="immutable"):
        opts.retries = 5
    assert opts == TransferOptions(retries=0, headers={"X-Token": "abc"})
    assert opts != TransferOptions(retries=0)
    assert "retries=0" in repr(opts) and "'X-Token': '***'" in repr(opts)
    assert pickle.loads(pickle.dumps(opts)) == opts
    assert TransferOptions.of(opts, retries=2) == TransferOptions(
        retries=2, headers={"X-Token": "abc"}
    )
    with pytest.raises(ValueError, match="retries must be 0 or more"):
        TransferOptions.of(opts, retries=-1)
    headers = {"X-Token": "abc"}
    kept = TransferOptions(headers=headers)
    headers["X-Token"] = "changed"
    assert kept.headers == {"X-Token": "abc"}  # a private copy
    with pytest.raises(TypeError):  # read-only: the shared defaults cannot be changed
        TransferOptions.of().headers["X-Leak"] = "polluted"  # type: ignore[index]
    assert dict(TransferOptions().headers) == {}
    secret = TransferOptions(headers={"Authorization": "Bearer SECRETTOKEN"})
    assert "SECRETTOKEN" not in repr(secret) and "'Authorization': '***'" in repr(secret)
    with pytest.raises(TypeError, match="not int") as refused:
        TransferOptions(headers={"X-Key": 12345})  # type: ignore[dict-item]
    assert "12345" not in str(refused.value)
    with pytest.raises(TypeError, match="a mapping"):
        TransferOptions(headers=[("A", "b")])  # type: ignore[arg-type]


def test_warm_up_starts_the_engine_in_the_background(url: str, tmp_path: Path) -> None:
    """`warm_up` (called by a sync before it reads its manifest) returns at once and the
    runtime's threads come up on their own; a download then uses them."""
    script = f"""
import os, sys, time
from surefetch.download import download, warm_up
def io_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{{task}}/comm") as comm:
                names.append(comm.read().strip())
        except FileNotFoundError:
            pass
    return names.count("surefetch-io")
assert io_threads() == 0
warm_up()
warm_up()  # again, at once: still one runtime
deadline = time.monotonic() + 10
while io_threads() < min(os.cpu_count() or 2, 2) and time.monotonic() < deadline:
    time.sleep(0.005)
started = io_threads()
download({url!r}, {str(tmp_path / "a")!r})
print(started, io_threads())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    started, after = map(int, done.stdout.split())
    assert started >= 2 and after == started  # the download ran on the warmed runtime
    assert (tmp_path / "a").read_bytes() == DATA
