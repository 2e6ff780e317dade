"""Many URLs in one call (`download_many`, `surefetch get URL URL... / -i FILE`):
one runtime, a global limit, per-item results, a group commit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.download import DownloadItem, download_many, parse_items
from surefetch.testing import FaultServer

from support import SUREFETCH, leftovers, part_dir, payload, restore_default_signals, run_cli

SMALL = [payload(4096, seed=i) for i in range(40)]
LARGE = payload((3 << 20) + 123, seed=99)  # over one block: the streaming path


@pytest.fixture
def urls(server: FaultServer) -> list[str]:
    return [server.add(f"f{i}.bin", data) for i, data in enumerate(SMALL)]


def test_many_files_arrive_whole_in_one_call(
    server: FaultServer, urls: list[str], tmp_path: Path
) -> None:
    large = server.add("large.bin", LARGE)
    seen: list[int] = []
    totals: list[tuple[int, int, int, int]] = []
    results = download_many(
        [*urls, large],
        tmp_path / "out",
        jobs=8,
        on_result=lambda index, _: seen.append(index),
        progress=lambda *t: totals.append(t),
    )
    assert sorted(seen) == list(range(len(urls) + 1))
    for i, result in enumerate(results[:-1]):
        assert isinstance(result, sf.DownloadResult)
        assert result.path == tmp_path / "out" / f"f{i}.bin"
        assert result.sha256 == hashlib.sha256(SMALL[i]).hexdigest()
        assert result.path.read_bytes() == SMALL[i]
    assert (tmp_path / "out" / "large.bin").read_bytes() == LARGE
    # Published by rename after the group commit: nothing else is left.
    assert leftovers(tmp_path / "out") == sorted([f"f{i}.bin" for i in range(40)] + ["large.bin"])
    assert totals[-1] == (41, 41, 40 * 4096 + len(LARGE), 40 * 4096 + len(LARGE))


def test_items_fail_alone(server: FaultServer, urls: list[str], tmp_path: Path) -> None:
    results = download_many(
        [
            urls[0],
            f"{server.url}/missing.bin",
            DownloadItem(urls[1], out="checked.bin", sha256="0" * 64),
            DownloadItem(urls[2], out="sized.bin", size=5),
            "ftp://example.org/x",
            "http://u:pw@[::1/x",  # Python cannot even parse it: that item alone fails
            DownloadItem(urls[3], out="good.bin", size=4096),
        ],
        tmp_path,
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds == [
        "DownloadResult",
        "HTTPError",
        "ChecksumMismatch",
        "SizeMismatch",
        "ValueError",
        "ValueError",
        "DownloadResult",
    ]
    assert str(results[5]).startswith("http://u:***@[::1/x is not a usable URL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.bin", "good.bin"]


def test_names_are_checked_before_anything_is_fetched(
    server: FaultServer, urls: list[str], tmp_path: Path
) -> None:
    new = tmp_path / "new" / "dir"  # a refused batch does not create it either
    with pytest.raises(ValueError, match="would both write"):
        download_many([urls[0], urls[0] + "?again=1"], new)
    with pytest.raises(ValueError, match="not a bare file name"):
        download_many([DownloadItem(urls[0], out="../escape.bin")], new)
    with pytest.raises(ValueError, match="is empty: give a file name"):
        download_many([DownloadItem(urls[0], out="")], new)
    with pytest.raises(ValueError, match="is 300 bytes long; a file name has at most 255"):
        download_many([DownloadItem(urls[0], out="x" * 300)], new)
    with pytest.raises(ValueError, match="per item"):
        download_many(urls[:2], new, sha256="0" * 64)
    assert server.requests == []
    assert not (tmp_path / "new").exists()


def test_a_cancel_stops_every_item_and_keeps_their_parts(
    server: FaultServer, tmp_path: Path
) -> None:
    slow = [server.add(f"s{i}.bin", LARGE) + "?throttle=2000000" for i in range(5)]
    token = sf.CancelToken()

    def cancel_soon(*_: int) -> None:
        if not token.cancelled:
            time.sleep(0.3)
            token.cancel()

    started = time.monotonic()
    results = download_many(slow, tmp_path, jobs=3, cancel=token, progress=cancel_soon)
    assert time.monotonic() - started < 3
    assert all(isinstance(r, sf.Cancelled) for r in results)
    assert not any((tmp_path / f"s{i}.bin").exists() for i in range(5))
    assert all((part_dir(tmp_path / "x") / f"s{i}.bin.part").exists() for i in range(3))
    # The two that never started say so, and left nothing.
    assert all("bytes received are kept in" in str(r) for r in results[:3])
    assert all("before this download started" in str(r) for r in results[3:])
    assert not any((part_dir(tmp_path / "x") / f"s{i}.bin.part").exists() for i in (3, 4))


def test_input_files_parse_like_aria2s() -> None:
    sha = "aB" * 32
    text = f"# models\n\nhttp://h/a out=x.bin sha256={sha} size=3  # trailing\nhttp://h/b\n"
    assert parse_items(text.splitlines(), "list") == [
        DownloadItem("http://h/a", out="x.bin", sha256=sha, size=3),
        DownloadItem("http://h/b"),
    ]
    for bad in [
        "http://h/a out",
        "http://h/a color=red",
        "http://h/a size=big",
        "http://h/a size=-1",
        "u out=1 out=2",
        "http://h/a out=",
        "http://h/a sha256=XYZ",
        f"http://h/a sha256={sha}0",
    ]:
        with pytest.raises(ValueError, match="list:1"):
            parse_items([bad], "list")


def test_cli_get_many_reports_each_item_and_exits_with_the_worst(
    server: FaultServer, urls: list[str], tmp_path: Path
) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# a comment\n{urls[0]} out=a.bin\n{urls[1]} sha256={'0' * 64}\n{server.url}/missing.bin\n"
    )
    done = run_cli(["get", urls[2], urls[3], "-i", str(listing), "-o", "out", "--json"], tmp_path)
    assert done.returncode == 4, done.stderr  # 404 (4) is worse than a mismatch (3)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 5
    by_url = {line["url"]: line for line in lines}
    assert by_url[urls[2]]["path"] == "out/f2.bin"
    assert by_url[urls[1]]["exit_code"] == 3 and "mismatch" in by_url[urls[1]]["error"]
    assert by_url[f"{server.url}/missing.bin"]["exit_code"] == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin", "f2.bin", "f3.bin"]
    # From stdin, plain output: one path a line.
    piped = subprocess.run(
        [SUREFETCH, "get", "-i", "-", "-o", str(tmp_path / "piped")],
        input="\n".join(urls[4:7]) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.returncode == 0, piped.stderr
    assert sorted(Path(p).name for p in piped.stdout.split()) == ["f4.bin", "f5.bin", "f6.bin"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sha256", "0" * 64], "per item"),
        (["-i", "missing.txt"], "cannot read missing.txt"),
    ],
)
def test_cli_get_many_usage_errors(
    urls: list[str], tmp_path: Path, args: list[str], message: str
) -> None:
    done = run_cli(["get", urls[0], urls[1], *args], tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_get_many_bad_input_line_is_a_usage_error(urls: list[str], tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text(f"{urls[0]}\n{urls[1]} colour=red\n")
    done = run_cli(["get", "-i", "list.txt"], tmp_path)
    assert done.returncode == 2 and "list.txt:2" in done.stderr


def test_cli_get_many_ctrl_c_exits_130_and_keeps_parts(server: FaultServer, tmp_path: Path) -> None:
    slow = [server.add(f"s{i}.bin", LARGE) + "?throttle=1000000" for i in range(2)]
    child = subprocess.Popen(
        [SUREFETCH, "get", *slow, "-o", str(tmp_path), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=restore_default_signals,
    )
    time.sleep(1.0)
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=10)
    assert time.monotonic() - sent < 2
    assert child.returncode == 130, err
    assert not (tmp_path / "s0.bin").exists()
    assert (tmp_path / ".surefetch" / "s0.bin.part").exists()


def test_cli_get_many_json_lists_the_interrupted_items_too(
    server: FaultServer, tmp_path: Path
) -> None:
    """--json promises one object per item: a Ctrl+C must not drop the unfinished ones."""
    fast = server.add("fast.bin", b"f" * 1000)
    slow = [server.add(f"s{i}.bin", LARGE) + "?throttle=1000000" for i in range(2)]
    child = subprocess.Popen(
        [SUREFETCH, "get", fast, *slow, "-o", str(tmp_path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=restore_default_signals,
    )
    assert child.stdout is not None
    first = json.loads(child.stdout.readline())  # the fast one, done while the rest stream
    child.send_signal(signal.SIGINT)
    rest, err = child.communicate(timeout=10)
    assert child.returncode == 130, err
    assert first["url"] == fast and first["size"] == 1000
    lines = [json.loads(line) for line in rest.splitlines()]
    assert sorted(line["url"] for line in lines) == sorted(slow)
    for line, name in zip(sorted(lines, key=lambda line: line["url"]), ("s0", "s1")):
        # Each says what its part keeps, as the engine found it when it stopped.
        part = tmp_path / ".surefetch" / f"{name}.bin.part"
        assert line["exit_code"] == 130 and line["error"].startswith("interrupted: ")
        assert (f"kept in {part}" in line["error"]) == part.exists()


def test_a_durable_batch_syncs_in_groups_not_per_file(urls: list[str], tmp_path: Path) -> None:
    script = (
        "import sys; from surefetch.download import download_many; "
        "r = download_many(sys.argv[2:], sys.argv[1], jobs=8); "
        "sys.exit(any(isinstance(x, Exception) for x in r))"
    )
    trace = tmp_path / "trace"
    done = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,syncfs",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            script,
            str(tmp_path / "out"),
            *urls,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    calls = trace.read_text().splitlines()
    fsyncs = sum("fsync(" in c or "fdatasync(" in c for c in calls)
    syncfs = sum("syncfs(" in c for c in calls)
    assert len(list((tmp_path / "out").iterdir())) == len(urls)
    # 40 files: a few groups, each one syncfs and one directory fsync — not 40+.
    assert syncfs + fsyncs < len(urls) // 2, calls
    assert syncfs >= 1


def test_killing_a_batch_sync_anywhere_leaves_a_consistent_cache_and_lockfile(
    server: FaultServer, tmp_path: Path
) -> None:
    """SIGKILL a sync of 60 artifacts at random moments: every blob in the cache
    matches its digest, the lockfile is the old one or the new one, and the next
    sync completes."""
    import random

    import tomli_w

    datas = [payload(20_000 + i, seed=500 + i) for i in range(60)]
    entries = [
        {"name": f"a{i}", "url": server.add(f"a{i}", d) + "?throttle=400000"}
        for i, d in enumerate(datas)
    ]
    old = [{"name": "old", "url": server.add("old", b"old bytes")}]
    (tmp_path / "surefetch.toml").write_text(tomli_w.dumps({"artifact": old}))
    args = ["sync", "--dest", "dest", "--cache", "cache", "--jobs", "8", "-q"]
    assert run_cli(args, tmp_path).returncode == 0
    before = (tmp_path / "surefetch.lock").read_bytes()
    (tmp_path / "surefetch.toml").write_text(tomli_w.dumps({"artifact": old + entries}))
    rng = random.Random(7)
    for _ in range(6):
        child = subprocess.Popen(
            [SUREFETCH, *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=restore_default_signals,
        )
        time.sleep(rng.uniform(0.05, 0.6))
        child.kill()
        child.wait(10)
        lock = (tmp_path / "surefetch.lock").read_bytes()
        assert lock == before or b'name = "a59"' in lock
        _assert_the_catalog_matches_the_blobs(tmp_path / "cache")
        checked = run_cli(["cache", "verify", "--cache", "cache"], tmp_path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    done = run_cli(args, tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    for i, data in enumerate(datas):
        assert (tmp_path / "dest" / f"a{i}").read_bytes() == data


def _assert_the_catalog_matches_the_blobs(cache: Path) -> None:
    """Every record of the cache's catalog whose blob is there has its size and XXH3."""
    import sqlite3

    import xxhash

    if not (cache / "catalog.db").exists():
        return
    with contextlib.closing(sqlite3.connect(cache / "catalog.db")) as catalog:
        records = catalog.execute("SELECT sha256, size, xxh3_128 FROM blobs").fetchall()
    for digest, size, xxh3 in records:
        blob = cache / "blobs" / "sha256" / digest[:2] / digest
        if blob.exists():
            data = blob.read_bytes()
            assert (len(data), xxhash.xxh3_128_hexdigest(data)) == (size, xxh3), digest


def test_a_reader_that_goes_away_ends_the_command(urls: list[str], tmp_path: Path) -> None:
    # `surefetch get ... --json | head -1`: the first line is read, then the pipe closes;
    # the command stops, and says so in one line (not a traceback).
    child = subprocess.Popen(
        [SUREFETCH, "get", *urls[:30], "-o", str(tmp_path / "out"), "--json", "--jobs", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=restore_default_signals,
    )
    assert child.stdout is not None and child.stderr is not None
    assert json.loads(child.stdout.readline())["path"]
    child.stdout.close()
    err = child.stderr.read().decode()
    code = child.wait(30)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    if code == 1:  # it had more to say when the pipe closed (else it had finished)
        assert err.count("\n") == 1 and "stdout's reader went away" in err, err


def _close_stdout() -> None:
    os.close(1)


@pytest.mark.parametrize("closed", [False, True], ids=["full", "closed"])
@pytest.mark.parametrize("left", [True, False], ids=["items-left", "all-ended"])
def test_an_output_that_cannot_be_written_stops_the_batch(
    server: FaultServer, urls: list[str], tmp_path: Path, left: bool, closed: bool
) -> None:
    """stdout on a full disk (`> /dev/full`) or closed (`>&-`) during a batch: it stops
    there. With items left undone (a slow one), exit 1 and one line; when every item had
    ended, the exit code is the items', with a warning. (It exited 1 with every file
    installed: the engine still installed the group in flight after the stop, unreported.)"""
    slow = server.add("slow.bin", payload(400_000, 9)) + "?throttle=100000"
    (tmp_path / "list").write_text(f"{urls[0]}\n")  # a batch of one: its line is the last
    args = [urls[0], slow] if left else ["-i", str(tmp_path / "list")]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [SUREFETCH, "get", *args, "-o", str(tmp_path / "out") + "/", "--json", "--jobs", "2"],
            stdout=None if closed else full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            timeout=30,
            check=False,
            preexec_fn=_close_stdout if closed else None,
        )
    (line,) = done.stderr.splitlines()
    why = "it is closed" if closed else "No space left on device"
    assert f"cannot write to stdout: {why}" in line, line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f0.bin"]
    if left:
        assert done.returncode == 1
        assert line.startswith("surefetch: error: ") and "stopped there" in line, line
    else:
        assert done.returncode == 0
        assert line.startswith("surefetch: warning: ") and "every item ended" in line, line


@pytest.mark.parametrize("jobs", ["1", "8"])
def test_the_exit_code_of_a_stopped_batch_matches_what_it_installed(
    server: FaultServer, tmp_path: Path, jobs: str
) -> None:
    """A batch whose output is lost stops, but the group in flight may still be installed
    by then: the exit code follows what is on disk, 0 only when every file is (it was
    1 with all ten installed, those not being reported after the stop)."""
    urls = [server.add(f"s{i}.bin", payload(3000, 30 + i)) for i in range(10)]
    done = subprocess.run(
        [SUREFETCH, "get", *urls, "-o", str(tmp_path / "out") + "/", "--jobs", jobs],
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
        check=False,
        preexec_fn=_close_stdout,
    )
    installed = sorted(p.name for p in (tmp_path / "out").iterdir())
    (line,) = done.stderr.splitlines()
    if installed == sorted(f"s{i}.bin" for i in range(10)):
        assert done.returncode == 0 and line.startswith("surefetch: warning: "), done.stderr
    else:
        assert done.returncode == 1 and line.startswith("surefetch: error: "), done.stderr


def test_items_start_in_their_order(server: FaultServer, tmp_path: Path) -> None:
    """With jobs=1 the items run one after the other in the order given (as aria2c -j 1
    and curl -Z --parallel-max 1 do)."""
    urls = [server.add(f"o{i}.bin", bytes([i]) * 1000) for i in range(12)]
    for _ in range(3):
        server.reset_counters()
        results = sf.download_many(urls, tmp_path / "out", jobs=1)
        assert not any(isinstance(r, Exception) for r in results)
        assert [r.name for r in server.requests] == [f"o{i}.bin" for i in range(12)]


def test_json_lines_arrive_as_items_end_through_a_pipe(server: FaultServer, tmp_path: Path) -> None:
    """`get A B --json | consumer`: A's line arrives when A ends, not when the batch does
    (stdout to a pipe is block-buffered: each line is flushed, as the plain paths are)."""
    fast = server.add("fast.bin", b"f" * 1000)
    server.add("slow.bin", payload(300_000, 3))
    slow = server.url_for("slow.bin", throttle=100_000)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.Popen(
        [SUREFETCH, "get", fast, slow, "-o", str(tmp_path / "out") + "/", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=restore_default_signals,
    )
    assert child.stdout is not None
    try:
        first = json.loads(child.stdout.readline())
        assert first["url"] == fast and child.poll() is None  # the slow one still runs
    finally:
        code = child.wait(30)
    assert code == 0
