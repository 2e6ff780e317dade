"""Servers that get ranges, validators and speed wrong, end to end through the engine.

Each test is one row of the rule in `rust/response.rs` (which responses may be
used) or of the fall-back ladder (parallel → one connection → a plain request),
driven by the fault server's persistent misbehaviours, plus a real nginx.
Whatever the server does, the file at the final path is the right one, or there
is none.
"""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.testing import FaultServer

from nginx_support import Nginx
from support import leftovers, part_dir, payload, run_cli

SMALL = 3 << 20
V1 = payload(SMALL, seed=11)
V2 = payload(SMALL, seed=12)
BIG = 16 << 20
BIG_DATA = payload(BIG, seed=13)
BIG_SHA = hashlib.sha256(BIG_DATA).hexdigest()


def _cut_once(url: str, dest: Path, at: int) -> None:
    """A first call whose one response is cut after `at` bytes: a part is kept."""
    with pytest.raises(sf.NetworkError):
        sf.download(f"{url}&cut={at}&times=1", dest, connections=1, retries=0)
    assert (part_dir(dest) / f"{dest.name}.part.json").exists()


# --- §1: which responses may be used ------------------------------------------------------


def test_a_200_with_content_range_is_never_installed(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("v.bin", V1) + "?ok_with_range=1"
    dest = tmp_path / "v.bin"
    _cut_once(url, dest, 1 << 20)
    earlier = len(server.requests)
    # The resume is answered 200 with only the last 2 MiB: never installed; a plain
    # request (no Range, no If-Range) gets the whole file.
    result = sf.download(f"{url}&cut={1 << 20}&times=1", dest)
    assert dest.read_bytes() == V1
    assert result.size == SMALL
    ranges = [r.range for r in server.requests[earlier:]]
    assert len(ranges) == 2 and ranges[0] is not None and ranges[0].startswith("bytes=")
    assert ranges[1] is None
    assert leftovers(tmp_path) == ["v.bin"]


@pytest.mark.parametrize(
    "quirk",
    ["ignore_if_range=1&range_no_validators=1", "ignore_if_range=1"],
    ids=["206-without-validators", "206-with-another-etag"],
)
def test_a_206_of_another_version_is_never_spliced(
    server: FaultServer, tmp_path: Path, quirk: str
) -> None:
    url = server.add("v.bin", V1) + f"?{quirk}"
    dest = tmp_path / "v.bin"
    _cut_once(url, dest, 1 << 20)
    server.replace("v.bin", V2)
    result = sf.download(f"{url}&cut={1 << 20}&times=1", dest)
    assert dest.read_bytes() == V2  # never 1 MiB of v1 and 2 MiB of v2
    assert result.resumed_from == 0
    assert result.sha256 == hashlib.sha256(V2).hexdigest()


def test_a_206_that_starts_earlier_is_used_and_skips_what_is_held(
    server: FaultServer, tmp_path: Path
) -> None:
    url = server.add("v.bin", V1) + "?range_align=65536"
    dest = tmp_path / "v.bin"
    _cut_once(url, dest, 1_000_000)
    earlier = server.bytes_sent
    result = sf.download(f"{url}&cut=1000000&times=1", dest)
    assert dest.read_bytes() == V1
    kept = result.resumed_from
    assert 0 < kept <= 1_000_000
    assert server.bytes_sent - earlier == SMALL - kept // 65536 * 65536
    assert server.request_count("v.bin") == 2


# --- §2: recover within one call -----------------------------------------------------------


@pytest.mark.parametrize(
    "quirk",
    [
        "range_whole=1",  # every range answered with the whole file as a 206
        "no_range=1",  # ... and as a 200
        "etag_per_response=1",  # tokenised CDN URLs: If-Range never matches
        "etag_per_response=1&ignore_if_range=1",  # ... and 206s carry another ETag
        "max_range_end=2147483647",  # a 500 for any range end past 2**31-1
        "max_range_end=0&max_range_status=416",  # a 416 for any bounded range end
        "max_range_end=9223372036854775807&max_range_status=416",  # nginx: 416 past 2**63-1
        "ok_with_range=1",
        "range_align=65536",
        "redirect=2",
    ],
)
def test_the_default_run_succeeds_whatever_the_ranges_do(
    server: FaultServer, tmp_path: Path, quirk: str
) -> None:
    url = server.add("big.bin", BIG_DATA) + f"?{quirk}"
    dest = tmp_path / "big.bin"
    result = sf.download(url, dest, sha256=BIG_SHA, connections=4)
    assert dest.read_bytes() == BIG_DATA
    assert result.sha256 == BIG_SHA
    # Within one call, and never an unbounded amount of waste.
    assert server.bytes_sent <= 3 * BIG
    assert leftovers(tmp_path) == ["big.bin"]


def test_ranges_are_used_when_they_work(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("big.bin", BIG_DATA)
    sf.download(url + "?max_range_end=2147483647", tmp_path / "f", connections=4)
    ranges = [r.range for r in server.requests]
    assert ranges[0] == "bytes=0-"  # never a huge end
    assert len(ranges) > 4 and all(r is not None for r in ranges)
    assert len({r.client_port for r in server.requests}) >= 4  # four connections carried it
    # The first answer (bytes=0-) is dropped after its unit: what the socket
    # buffers held by then is the only waste.
    assert BIG <= server.bytes_sent < 2 * BIG


def test_a_parallel_transfer_resolves_a_redirect_once(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("big.bin", BIG_DATA)
    sf.download(url + "?redirect=1", tmp_path / "f", connections=4)
    redirected = [r for r in server.requests if "redirect=" in r.query]
    assert len(redirected) == 1
    assert len(server.requests) > 5  # the units went to the resolved URL directly


def test_a_trickle_is_a_stall_that_is_retried_and_resumed(
    server: FaultServer, tmp_path: Path
) -> None:
    url = server.add("v.bin", V1) + "?trickle=1000&trickle_after=1048576&times=1"
    started = time.monotonic()
    result = sf.download(
        url, tmp_path / "v.bin", connections=1, speed_limit=100_000, speed_time=0.5
    )
    assert time.monotonic() - started < 10
    assert (tmp_path / "v.bin").read_bytes() == V1
    assert result.bytes_transferred < SMALL + (64 << 10)  # the retry resumed
    ranges = [r.range for r in server.requests]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")


def test_a_trickle_without_retries_is_a_timeout(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("v.bin", V1) + "?trickle=1000&trickle_after=65536"
    with pytest.raises(sf.DownloadTimeout, match="low-speed limit"):
        sf.download(url, tmp_path / "v.bin", retries=0, speed_limit=100_000, speed_time=0.5)
    assert not (tmp_path / "v.bin").exists()
    proc = run_cli(
        [
            "get",
            url,
            "-o",
            str(tmp_path / "w.bin"),
            "--retries",
            "0",
            "--speed-limit",
            "100000",
            "--speed-time",
            "0.5",
        ]
    )
    assert proc.returncode == 5, proc.stderr
    assert "low-speed limit" in proc.stderr
    assert not (tmp_path / "w.bin").exists()


@pytest.mark.parametrize(
    "fault, options, said",
    [
        # The low-speed window is shorter than the read timeout: a silent body is a stall
        # below the limit (it advised raising the read timeout).
        ("stall_after=65536&stall=5", {"speed_time": 0.5}, "the low-speed limit"),
        ("trickle=1000&trickle_after=65536", {"speed_time": 0.5}, "the low-speed limit"),
        # The read timeout is the shorter: silence is said as such.
        ("stall_after=65536&stall=5", {"read_timeout": 0.4, "speed_time": 30}, "sent nothing"),
    ],
)
def test_a_stall_names_the_limit_it_hit_with_its_value(
    server: FaultServer, tmp_path: Path, fault: str, options: dict[str, float], said: str
) -> None:
    url = server.add("v.bin", V1) + "?" + fault
    with pytest.raises(sf.DownloadTimeout) as caught:
        sf.download(url, tmp_path / "v.bin", retries=0, speed_limit=100_000, **options)  # type: ignore[arg-type]
    message = str(caught.value)
    shorter = min(options.get("read_timeout", 30.0), options["speed_time"])
    assert said in message and f" {shorter:g} s" in message, message
    assert caught.value.kind == ("read" if said == "sent nothing" else "low-speed")


@pytest.mark.parametrize("command", ["fetch", "sync"])
def test_fetch_and_sync_take_the_low_speed_limit_too(
    server: FaultServer, tmp_path: Path, command: str
) -> None:
    """DESIGN lists --speed-limit/--speed-time among the options of every command that
    downloads; only `get` took them (fetch and sync: a usage error)."""
    url = server.add("v.bin", V1) + "?trickle=1000&trickle_after=65536"
    limits = ["--speed-limit", "100000", "--speed-time", "0.5", "--retries", "0"]
    if command == "fetch":
        args = ["fetch", url, "--cache", str(tmp_path / "c"), *limits]
    else:
        (tmp_path / "m.toml").write_text(f'[[artifact]]\nname = "v"\nurl = "{url}"\n')
        args = ["sync", "--manifest", str(tmp_path / "m.toml"), "--lock", str(tmp_path / "l"),
                "--dest", str(tmp_path / "d"), "--cache", str(tmp_path / "c"), *limits]  # fmt: skip
    started = time.monotonic()
    proc = run_cli(args)
    assert proc.returncode == 5, proc.stderr
    assert "low-speed limit" in proc.stderr and " 0.5 s" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 10  # not the default 30 s window


# --- against a real nginx --------------------------------------------------------------------


def test_nginx_gets_parallel_connections(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    size = 40 << 20
    data = payload(size, seed=14)
    (root / "model.bin").write_bytes(data)
    work = tmp_path / "nginx"
    work.mkdir()
    dest = tmp_path / "out" / "model.bin"
    dest.parent.mkdir()
    with Nginx(root, work) as nginx:
        result = sf.download(nginx.url("model.bin"), dest, connections=8)
        log = nginx.log("model.bin")
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
    # nginx logs in order of completion; the first request asked bytes=0-, never a huge end.
    assert [rng for _, _, rng in log].count("bytes=0-") == 1, log
    assert all(status == 206 for _, status, _ in log), log
    # Eight connections at least (the first one reconnects: it drops the rest of its
    # bytes=0- answer after its first unit; a pooled connection may be replaced).
    assert len({serial for serial, _, _ in log}) >= 8, log


# --- secrets --------------------------------------------------------------------------------


def test_a_password_in_the_url_is_never_shown(server: FaultServer, tmp_path: Path) -> None:
    server.add("v.bin", V1)
    base = server.url.replace("http://", "http://user:s3cret@")
    with pytest.raises(sf.HTTPError) as missing:
        sf.download(f"{base}/missing.bin", tmp_path / "m.bin")
    assert "s3cret" not in str(missing.value) and "user:***@" in str(missing.value)
    refused = run_cli(["get", "http://user:s3cret@127.0.0.1:9/x.bin", "-o", str(tmp_path / "x")])
    assert refused.returncode == 4 and "s3cret" not in refused.stderr + refused.stdout
    dest = tmp_path / "v.bin"
    _cut_once(f"{base}/v.bin?_=1", dest, 1 << 20)
    sidecar = (part_dir(dest) / "v.bin.part.json").read_text()
    assert "s3cret" not in sidecar
    # The redacted URL still matches: the part is resumed with the password.
    result = sf.download(f"{base}/v.bin?_=1&cut={1 << 20}&times=1", dest)
    assert result.resumed_from > 0 and dest.read_bytes() == V1


class _Inconsistent(BaseHTTPRequestHandler):
    """The first answer (to ``bytes=0-``) is a 3 MiB ``206`` cut after 1 MiB; a
    resume gets a ``200`` with ``Content-Range``; a plain request a ``200`` of
    2 MiB under the same ETag: nothing here can be the whole file."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        if rng == "bytes=0-":
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{SMALL - 1}/{SMALL}")
            body, length = V1[: 1 << 20], SMALL
        elif rng is not None:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(200)
            self.send_header("Content-Range", f"bytes {start}-{SMALL - 1}/{SMALL}")
            body = V1[start:]
            length = len(body)
        else:
            self.send_response(200)
            body = V1[: 2 << 20]
            length = len(body)
        self.send_header("ETag", '"same"')
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


def test_when_even_a_plain_answer_cannot_be_whole_nothing_is_installed(tmp_path: Path) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Inconsistent)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/v.bin"
        dest = tmp_path / "v.bin"
        dest.write_bytes(b"the user's old file")
        proc = run_cli(["get", url, "-o", str(dest)])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 4, proc.stderr
    assert "even a plain request" in proc.stderr and "nothing was installed" in proc.stderr
    assert dest.read_bytes() == b"the user's old file"


def test_sync_pins_the_whole_file_whatever_the_ranges_do(
    server: FaultServer, tmp_path: Path
) -> None:
    url = server.add("v.bin", V1) + f"?ok_with_range=1&cut={1 << 20}&times=1"
    manifest = tmp_path / "surefetch.toml"
    manifest.write_text(f'[[artifact]]\nname = "v.bin"\nurl = "{url}"\n')
    lock = tmp_path / "surefetch.lock"
    sf.sync(manifest, lock, tmp_path / "dest", cache=tmp_path / "cache")
    assert (tmp_path / "dest" / "v.bin").read_bytes() == V1
    text = lock.read_text()
    assert f"size = {SMALL}" in text
    assert hashlib.sha256(V1).hexdigest() in text


def test_verbose_tells_the_decisions_and_quiet_tells_nothing(
    server: FaultServer, tmp_path: Path
) -> None:
    url = server.add("v.bin", V1).replace("http://", "http://u:s3cret@")
    cut = f"{url}?cut={1 << 20}&times=1&ok_with_range=1"
    told = run_cli(["get", cut, "-o", "a.bin", "--connections", "1", "-v"], tmp_path)
    assert told.returncode == 0, told.stderr
    assert "retry 1 of 3" in told.stderr
    assert "resuming at byte 1048576" in told.stderr
    assert "Content-Range" in told.stderr and "without Range" in told.stderr
    assert "s3cret" not in told.stderr
    quiet = run_cli(["get", cut + "&_=2", "-o", "b.bin", "--connections", "1"], tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
    moved = run_cli(["get", f"{url}?redirect=1", "-o", "c.bin", "-v"], tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert "redirected (302) to" in moved.stderr and "s3cret" not in moved.stderr


# --- found by trying it as a user -----------------------------------------------------------


def test_a_304_nobody_asked_for_is_an_error(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("v.bin", V1) + "?status=304"
    (tmp_path / "y").write_bytes(b"existing")
    with pytest.raises(sf.HTTPError) as refused:
        sf.download(url, tmp_path / "y")
    assert refused.value.status == 304
    assert (tmp_path / "y").read_bytes() == b"existing"
    other = server.add("w.bin", V2) + "?status=304"
    done = run_cli(["get", url, other, "-o", "many/"], tmp_path)
    assert done.returncode == 4 and "internal error" not in done.stderr
    assert not (tmp_path / "many").exists()  # made for the batch, which installed nothing


def test_a_body_without_length_cut_short_of_the_known_size_is_never_installed(
    server: FaultServer, tmp_path: Path
) -> None:
    # The first answer states the size (3 MiB, under the file's ETag) and cannot be
    # used; every plain answer has no length and is cut at 2,000,000 bytes.
    url = server.add("v.bin", V1) + "?ok_with_range=1&no_length=1&cut=2000000"
    done = run_cli(["get", url, "-o", "v.bin", "--retries", "1"], tmp_path)
    assert done.returncode == 4, done.stderr
    assert "without a Content-Length" in done.stderr and "cut" in done.stderr
    assert not (tmp_path / "v.bin").exists()
    # Cut once only: the retry gets it whole.
    fine = sf.download(url + "&times=1", tmp_path / "w.bin")
    assert fine.size == SMALL and (tmp_path / "w.bin").read_bytes() == V1


def test_a_206_without_length_cut_short_is_retried_and_resumed(
    server: FaultServer, tmp_path: Path
) -> None:
    url = server.add("v.bin", V1) + f"?no_length=1&cut={1 << 20}&times=1"
    result = sf.download(url, tmp_path / "v.bin")
    assert (tmp_path / "v.bin").read_bytes() == V1
    assert result.bytes_transferred < SMALL + (64 << 10)  # resumed, not started over


def test_server_names_that_collide_in_a_batch_never_overwrite(
    server: FaultServer, tmp_path: Path
) -> None:
    one, two = server.add("one", V1), server.add("two", V2)
    items = [f"{one}?filename=same.bin", f"{two}?filename=same.bin"]
    results = sf.download_many(items, tmp_path / "d", content_disposition=True)
    kinds = sorted(type(r).__name__ for r in results)
    assert kinds == ["DownloadResult", "ValueError"], results
    (won,) = [r for r in results if isinstance(r, sf.DownloadResult)]
    assert won.path == tmp_path / "d" / "same.bin"
    assert won.path.read_bytes() == (V1 if won.sha256 == hashlib.sha256(V1).hexdigest() else V2)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["same.bin"]
