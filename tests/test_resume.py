"""Resume after any interruption, and parallel ranged connections, through the real engine."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.testing import FaultServer

from support import SUREFETCH, leftovers, part_dir, payload, restore_default_signals, run_cli

SIZE = 4 << 20
DATA = payload(SIZE, seed=3)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("model.bin", DATA)


def _interrupt(url: str, dest: Path, after: int, **options: object) -> None:
    """Starts a throttled download and cancels it once `after` bytes arrived."""
    token = sf.CancelToken()

    def progress(done: int, total: int | None) -> None:
        if done >= after:
            token.cancel()

    with pytest.raises(sf.Cancelled):
        sf.download(url, dest, cancel=token, progress=progress, **options)  # type: ignore[arg-type]


def _sidecar(dest: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((part_dir(dest) / f"{dest.name}.part.json").read_text())
    return data


def _done(dest: Path) -> int:
    ranges = _sidecar(dest)["ranges_done"]
    assert isinstance(ranges, list)
    return sum(end - start for start, end in ranges)


# --- resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [1, 4])
def test_cancel_then_resume_transfers_only_the_rest(
    server: FaultServer, url: str, tmp_path: Path, connections: int
) -> None:
    dest = tmp_path / "model.bin"
    slow = url + f"?throttle={8_000_000 // connections}"  # about half a second either way
    _interrupt(slow, dest, SIZE // 2, connections=connections)
    kept = _done(dest)
    assert kept > SIZE // 4
    server.reset_counters()
    result = sf.download(slow, dest, sha256=SHA, connections=connections)
    assert dest.read_bytes() == DATA
    assert result.resumed_from == kept
    slack = connections * 4096
    assert result.bytes_transferred <= SIZE - kept + slack
    # The cancelled call's throttled server threads may still send a slice each.
    assert server.bytes_sent <= result.bytes_transferred + connections * 16384
    assert leftovers(tmp_path) == ["model.bin"]


def test_resume_false_discards_the_part(server: FaultServer, url: str, tmp_path: Path) -> None:
    dest = tmp_path / "model.bin"
    _interrupt(url + "?throttle=8000000", dest, SIZE // 2)
    server.reset_counters()
    result = sf.download(url + "?throttle=8000000", dest, sha256=SHA, resume=False)
    assert result.resumed_from == 0
    assert result.bytes_transferred == SIZE
    assert SIZE <= server.bytes_sent <= SIZE + 16384  # + a slice of the cancelled call


def test_a_file_changed_on_the_server_starts_over(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    dest = tmp_path / "model.bin"
    _interrupt(url + "?throttle=8000000", dest, SIZE // 2)
    new = payload(SIZE, seed=4)
    server.replace("model.bin", new)
    result = sf.download(url + "?throttle=8000000", dest)
    # If-Range saw another ETag: the whole new file, never a mix of the two versions.
    assert dest.read_bytes() == new
    assert result.resumed_from == 0
    assert result.sha256 == hashlib.sha256(new).hexdigest()


def test_a_changed_file_is_caught_by_last_modified_too(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("dated.bin", DATA, etag=None)
    dest = tmp_path / "dated.bin"
    _interrupt(url + "?throttle=8000000", dest, SIZE // 2)
    assert _sidecar(dest)["etag"] is None and _sidecar(dest)["last_modified"]
    new = payload(SIZE, seed=5)
    server.replace("dated.bin", new, etag=None)
    sf.download(url + "?throttle=8000000", dest)
    assert dest.read_bytes() == new


def _plant_half(dest: Path, url: str, etag: str | None) -> None:
    """A part file and sidecar as an interrupted call leaves them: the first half done."""
    part_dir(dest).mkdir(exist_ok=True)
    part = part_dir(dest) / f"{dest.name}.part"
    part.write_bytes(DATA[: SIZE // 2] + bytes(SIZE - SIZE // 2))
    sidecar = {
        "version": 1,
        "url": url,
        "etag": etag,
        "last_modified": None,
        "size": SIZE,
        "ranges_done": [[0, SIZE // 2]],
    }
    (part_dir(dest) / f"{dest.name}.part.json").write_text(json.dumps(sidecar))


def _head_etag(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as resp:
        return str(resp.headers["ETag"])


def test_a_planted_half_is_resumed(server: FaultServer, url: str, tmp_path: Path) -> None:
    dest = tmp_path / "model.bin"
    _plant_half(dest, url, _head_etag(url))
    server.reset_counters()
    result = sf.download(url, dest, sha256=SHA)
    assert dest.read_bytes() == DATA
    assert result.resumed_from == SIZE // 2
    assert server.bytes_sent == SIZE - SIZE // 2


def test_server_ignoring_range_starts_over(server: FaultServer, url: str, tmp_path: Path) -> None:
    dest = tmp_path / "model.bin"
    ignoring = url + "?no_range=1"
    _plant_half(dest, ignoring, _head_etag(url))
    server.reset_counters()
    result = sf.download(ignoring, dest, sha256=SHA)
    assert dest.read_bytes() == DATA
    assert result.resumed_from == 0
    assert server.bytes_sent == SIZE


@pytest.mark.parametrize(
    "sidecar_text",
    ["", "{", "garbage \x00\x01", '{"version": 1, "url": ', '{"version": 99}', "[]"],
)
def test_a_truncated_or_garbage_sidecar_means_start_over(
    server: FaultServer, url: str, tmp_path: Path, sidecar_text: str
) -> None:
    dest = tmp_path / "model.bin"
    _plant_half(dest, url, _head_etag(url))
    (part_dir(dest) / "model.bin.part.json").write_text(sidecar_text)
    server.reset_counters()
    result = sf.download(url, dest, sha256=SHA)
    assert dest.read_bytes() == DATA
    assert result.resumed_from == 0
    assert server.bytes_sent == SIZE


def test_a_sidecar_for_another_url_or_size_is_not_trusted(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    dest = tmp_path / "model.bin"
    _plant_half(dest, url + "?_other=1", _head_etag(url))
    assert sf.download(url, dest, sha256=SHA).resumed_from == 0
    _plant_half(dest, url, _head_etag(url))
    sidecar = _sidecar(dest)
    sidecar["size"] = SIZE + 1
    (part_dir(dest) / "model.bin.part.json").write_text(json.dumps(sidecar))
    assert sf.download(url, dest, sha256=SHA).resumed_from == 0
    assert dest.read_bytes() == DATA


def test_a_weak_etag_is_never_used_to_resume(server: FaultServer, url: str, tmp_path: Path) -> None:
    dest = tmp_path / "model.bin"
    _interrupt(url + "?throttle=8000000&weak_etag=1", dest, SIZE // 2)
    assert _sidecar(dest)["etag"] is None  # the weak tag was not kept as a validator


def test_a_shifted_content_range_is_never_spliced_in(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    dest = tmp_path / "model.bin"
    shifted = url + "?range_shift=7"
    _plant_half(dest, shifted, _head_etag(url))
    server.reset_counters()
    # Never spliced: the misfit 206 leads to a plain request, whose 200 is the whole file.
    result = sf.download(shifted, dest, connections=1, retries=0)
    assert dest.read_bytes() == DATA
    assert result.resumed_from == 0
    assert [r.range for r in server.requests] == [f"bytes={SIZE // 2}-", None]


def test_a_complete_part_is_verified_without_the_network(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    dest = tmp_path / "model.bin"
    _plant_half(dest, url, _head_etag(url))
    (part_dir(dest) / "model.bin.part").write_bytes(DATA)
    sidecar = _sidecar(dest)
    sidecar["ranges_done"] = [[0, SIZE]]
    (part_dir(dest) / "model.bin.part.json").write_text(json.dumps(sidecar))
    server.reset_counters()
    result = sf.download(url, dest, sha256=SHA)
    assert server.request_count("model.bin") == 0
    assert result.bytes_transferred == 0 and result.resumed_from == SIZE
    assert dest.read_bytes() == DATA


def test_a_corrupt_kept_part_is_caught_by_the_digest(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    dest = tmp_path / "model.bin"
    _plant_half(dest, url, _head_etag(url))
    part = part_dir(dest) / "model.bin.part"
    damaged = bytearray(part.read_bytes())
    damaged[1000] ^= 0xFF
    part.write_bytes(bytes(damaged))
    with pytest.raises(sf.ChecksumMismatch):
        sf.download(url, dest, sha256=SHA)
    assert not dest.exists()
    # The bad part was discarded: the next call starts over and succeeds.
    assert sf.download(url, dest, sha256=SHA).resumed_from == 0
    assert dest.read_bytes() == DATA


# --- parallel connections -----------------------------------------------------------------


def test_n_connections_run_at_once(server: FaultServer, url: str, tmp_path: Path) -> None:
    # (How much faster they are is measured by bench/parallel.py, not here.)
    slow = url + "?throttle=4000000"  # 4 MB/s per connection: one unit takes 0.25 s
    one = sf.download(slow, tmp_path / "one", sha256=SHA, connections=1)
    server.reset_counters()
    four = sf.download(slow, tmp_path / "four", sha256=SHA, connections=4)
    assert one.sha256 == four.sha256 == SHA
    assert (tmp_path / "four").read_bytes() == DATA
    assert server.request_count("model.bin") >= 4
    # Four requests in flight at once: the first four arrive within one unit's time.
    starts = sorted(r.time for r in server.requests)
    assert starts[3] - starts[0] < 0.2, starts
    # The first answer holds the whole file; its connection drops it after its
    # first unit, when one more throttled slice (16 KiB) may be on its way.
    assert four.bytes_transferred == SIZE
    assert SIZE <= server.bytes_sent <= SIZE + 16384


ADAPTIVE = payload(32 << 20, seed=9)


def test_the_default_adds_connections_only_while_they_help(
    server: FaultServer, tmp_path: Path
) -> None:
    """End to end through a real server; the decision rule itself (how many, when) is
    table-tested beside `Ramp` in rust/schedule.rs, free of this machine's timing."""
    url = server.add("adaptive.bin", ADAPTIVE)
    # Unlimited loopback: whatever the ramp tried, the file is whole and no byte was
    # fetched twice (beyond a slice in flight when the first stream was cut).
    fast = sf.download(url, tmp_path / "fast")
    assert (tmp_path / "fast").read_bytes() == ADAPTIVE
    assert fast.bytes_transferred == len(ADAPTIVE)
    assert len(ADAPTIVE) <= server.bytes_sent <= len(ADAPTIVE) + 16384
    # 4 MB/s per connection: each doubling doubles the rate, up to the cap.
    server.reset_counters()
    slow = sf.download(url + "?throttle=4000000", tmp_path / "slow")
    assert (tmp_path / "slow").read_bytes() == ADAPTIVE
    assert slow.bytes_transferred == len(ADAPTIVE)
    # Eight connections carried it (some perhaps kept alive from the first download).
    assert len({r.client_port for r in server.requests}) >= 8
    # The first answer was streamed until connections joined, then cut: no byte
    # crossed the wire twice beyond a slice in flight.
    assert len(ADAPTIVE) <= server.bytes_sent <= len(ADAPTIVE) + 16384


def test_a_resume_with_the_default_adds_connections_for_all_that_is_missing(
    server: FaultServer, tmp_path: Path
) -> None:
    """A part left by eight connections has eight gaps. The default's ramp weighs all of
    them: it judged by the first gap alone, found it too short to be worth more
    connections, and fetched every gap over one (7 s here instead of about 1)."""
    url = server.add("gaps.bin", ADAPTIVE) + "?throttle=4000000"
    token = sf.CancelToken()
    threading.Timer(0.6, token.cancel).start()
    with pytest.raises(sf.Cancelled):
        sf.download(url, tmp_path / "gaps", connections=8, cancel=token)
    gaps = _sidecar(tmp_path / "gaps")["ranges_done"]
    assert isinstance(gaps, list) and len(gaps) > 1  # a range per connection
    server.reset_counters()
    resumed = sf.download(url, tmp_path / "gaps")
    assert (tmp_path / "gaps").read_bytes() == ADAPTIVE
    assert resumed.resumed_from > 0
    assert len({r.client_port for r in server.requests}) >= 4


def test_a_failed_range_is_retried_alone(server: FaultServer, url: str, tmp_path: Path) -> None:
    faulty = url + "?throttle=8000000&ranged_only=1&cut=100000&times=2"
    result = sf.download(faulty, tmp_path / "f", sha256=SHA, connections=4, retries=1)
    assert (tmp_path / "f").read_bytes() == DATA
    # One range broke after 100,000 bytes; only its rest was asked for again, on
    # its own (a probe, three units, one retry), and no byte crossed the wire twice.
    assert server.request_count("model.bin") == 5
    assert result.bytes_transferred == SIZE
    assert SIZE <= server.bytes_sent <= SIZE + 16384  # see the test above


def test_cancel_stops_every_connection_at_once(url: str, tmp_path: Path) -> None:
    token = sf.CancelToken()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            sf.download(url + "?throttle=500000", tmp_path / "f", connections=4, cancel=token)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.4)
    cancelled = time.monotonic()
    token.cancel()
    thread.join(5)
    assert time.monotonic() - cancelled < 0.25
    assert len(errors) == 1 and isinstance(errors[0], sf.Cancelled)
    assert _done(tmp_path / "f") > 0


# --- real processes, real signals ---------------------------------------------------------


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [SUREFETCH, "get", *args, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=restore_default_signals,
    )


def _wait_for_bytes(server: FaultServer, at_least: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while server.bytes_sent < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_then_resume_from_the_cli(
    server: FaultServer, url: str, tmp_path: Path, sig: int, code: int
) -> None:
    dest = tmp_path / "model.bin"
    slow = url + "?throttle=4000000"
    proc = _start([slow, "-o", str(dest), "-c", "2"])
    _wait_for_bytes(server, SIZE // 3, proc)
    proc.send_signal(sig)
    assert proc.wait(10) == code
    kept = _done(dest)
    assert kept > 0
    done = run_cli(["get", slow, "-o", str(dest), "--sha256", SHA, "--json"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["resumed_from"] == kept
    assert dest.read_bytes() == DATA


def test_parallel_transfer_killed_then_resumed_with_another_n(
    server: FaultServer, url: str, tmp_path: Path
) -> None:
    dest = tmp_path / "model.bin"
    slow = url + "?throttle=2000000"
    proc = _start([slow, "-o", str(dest), "-c", "4"])
    _wait_for_bytes(server, SIZE // 2, proc)
    time.sleep(0.25)  # past a checkpoint (every 100 ms)
    proc.kill()
    proc.wait(10)
    kept = _done(dest)
    assert kept > SIZE // 4
    sent_before = server.bytes_sent
    done = run_cli(["get", slow, "-o", str(dest), "--sha256", SHA, "-c", "2", "--json"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["resumed_from"] == kept
    assert dest.read_bytes() == DATA
    # Only the missing ranges were fetched again (page-aligned, so a little more).
    # (The killed process's 4 throttled answers may each still send a slice.)
    sent = server.bytes_sent - sent_before
    assert result["bytes_transferred"] <= sent <= result["bytes_transferred"] + 4 * 16384
    assert result["bytes_transferred"] <= SIZE - kept + 4 * 4096


def test_kill_at_random_points_never_corrupts_and_bounds_the_retransfer(
    server: FaultServer, tmp_path: Path
) -> None:
    size = 16 << 20
    data = payload(size, seed=7)
    sha = hashlib.sha256(data).hexdigest()
    url = server.add("big.bin", data) + "?throttle=2000000"
    dest = tmp_path / "big.bin"
    rng = random.Random(20261122)
    for _ in range(10):
        n = rng.choice(["1", "2", "4"])
        proc = _start([url, "-o", str(dest), "--sha256", sha, "-c", n])
        # A random point of the transfer: some more bytes on the wire, then SIGKILL.
        _wait_for_bytes(server, server.bytes_sent + rng.randrange(100_000, 1_000_000), proc)
        proc.kill()
        proc.wait(10)
        # Absent or whole and correct: never a partial file at the final path.
        assert not dest.exists() or dest.read_bytes() == data
    done = run_cli(["get", url, "-o", str(dest), "--sha256", sha, "-c", "4", "--json"])
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == data
    assert json.loads(done.stdout)["resumed_from"] > 0
    assert server.bytes_sent <= 1.5 * size, server.bytes_sent / size


@pytest.mark.parametrize("length", ["", "&no_length=1"])
def test_a_cut_that_outlasts_the_retries_says_what_is_kept_and_the_rerun_resumes(
    server: FaultServer, tmp_path: Path, length: str
) -> None:
    """The final error tells the truth about what is on disk (the bytes kept, where) and
    what to do; doing it resumes from there."""
    data = payload(4 << 20, seed=21)
    url = server.add("cut.bin", data)
    dest = tmp_path / "cut.bin"
    with pytest.raises(sf.NetworkError) as failed:
        sf.download(url + "?cut=1000000&times=2" + length, dest, retries=1)
    message = str(failed.value)
    kept = part_dir(dest) / "cut.bin.part"
    assert f"kept in {kept}" in message and "run the same download again to resume" in message
    received = int(message.split("; the ", 1)[1].split(" bytes", 1)[0])
    assert 0 < received < len(data) and not dest.exists()
    again = sf.download(url + "?cut=1000000&times=2" + length, dest, retries=1)
    assert dest.read_bytes() == data and again.resumed_from >= received - 4096
