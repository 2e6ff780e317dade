"""`surefetch fetch` and `surefetch cache ls|verify|gc|clean` as real child processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from surefetch.testing import FaultServer

from cache_support import (
    blob_files,
    blob_path,
    dead_url,
    holder_pid,
    part_path,
    start_fetch,
    stop,
    wait_for_download,
    wait_until,
)
from support import SUREFETCH, WITHOUT_ROOT_POWERS, payload, run_cli

DATA = payload(400_000, seed=5)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("model.bin", DATA)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_eight_processes_fetching_one_artifact_transfer_it_once(
    server: FaultServer, url: str, root: Path
) -> None:
    # 2 s at this rate: the others start (~0.2 s each) while the first one downloads
    procs = [start_fetch(f"{url}?throttle=200000", root, "--sha256", SHA) for _ in range(8)]
    try:
        results = [proc.communicate(timeout=30) for proc in procs]
    finally:
        stop(procs)
    assert [proc.returncode for proc in procs] == [0] * 8, results
    assert {out.strip() for out, _ in results} == {str(blob_path(root, SHA))}
    assert server.request_count("model.bin") == 1
    assert server.bytes_sent_for("model.bin") == len(DATA)
    waited = [err for _, err in results if "surefetch: waiting for pid " in err]
    assert waited, results
    assert f"fetching {url}?throttle=200000 since " in waited[0]
    assert blob_path(root, SHA).read_bytes() == DATA


def test_a_cached_fetch_never_opens_a_connection(server: FaultServer, url: str, root: Path) -> None:
    first = run_cli(["fetch", url, "--sha256", SHA, "--cache", str(root), "--json"])
    assert first.returncode == 0, first.stderr
    entry = json.loads(first.stdout)
    assert entry == {
        "path": str(blob_path(root, SHA)),
        "size": len(DATA),
        "sha256": SHA,
        "xxh3_128": entry["xxh3_128"],
        "bytes_transferred": len(DATA),
    }
    again = run_cli(["fetch", dead_url(), "--sha256", SHA, "--cache", str(root), "--json"])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {**entry, "bytes_transferred": 0}
    assert server.request_count("model.bin") == 1


def test_a_wrong_digest_exits_3_and_caches_nothing(url: str, root: Path) -> None:
    out = run_cli(["fetch", url, "--sha256", "0" * 64, "--cache", str(root)])
    assert out.returncode == 3, out.stderr
    assert "sha256 mismatch" in out.stderr and len(out.stderr.splitlines()) == 1
    assert out.stdout == ""
    assert blob_files(root) == []


def test_a_lock_wait_timeout_exits_1_naming_the_holder(url: str, root: Path) -> None:
    holder = start_fetch(f"{url}?throttle=100000", root, "--sha256", SHA)
    try:
        wait_until(lambda: holder_pid(root, SHA) == holder.pid, "the holder")
        out = run_cli(
            ["fetch", url, "--sha256", SHA, "--cache", str(root), "--lock-timeout", "0.3"]
        )
    finally:
        stop([holder])
    assert out.returncode == 1, out.stderr
    waiting, error = out.stderr.splitlines()
    assert waiting.startswith(f"surefetch: waiting for pid {holder.pid} on host ")
    assert error.startswith("surefetch: error: gave up after 0.3 s waiting for the cache lock")
    assert f"pid {holder.pid}" in error and "--lock-timeout" in error


def test_ctrl_c_while_waiting_exits_130(url: str, root: Path) -> None:
    holder = start_fetch(f"{url}?throttle=100000", root, "--sha256", SHA)
    waiter = None
    try:
        wait_until(lambda: holder_pid(root, SHA) == holder.pid, "the holder")
        waiter = start_fetch(url, root, "--sha256", SHA)
        assert waiter.stderr is not None
        assert waiter.stderr.readline().startswith("surefetch: waiting for pid ")
        sent = time.monotonic()
        waiter.send_signal(signal.SIGINT)
        waiter.wait(10)
        assert time.monotonic() - sent < 1
        assert waiter.returncode == 130
    finally:
        stop([holder] + ([waiter] if waiter else []))


def test_cache_verify_exits_3_on_a_corrupted_blob(
    server: FaultServer, url: str, root: Path
) -> None:
    assert run_cli(["fetch", url, "--sha256", SHA, "--cache", str(root)]).returncode == 0
    ok = run_cli(["cache", "verify", "--cache", str(root), "--json"])
    assert (ok.returncode, json.loads(ok.stdout)) == (
        0,
        {"checked": 1, "quarantined": [], "not_quarantined": [], "catalog_quarantined": []},
    )
    blob_path(root, SHA).write_bytes(DATA[:-1] + b"\0")
    bad = run_cli(["cache", "verify", "--cache", str(root)])
    assert bad.returncode == 3, bad.stderr
    assert bad.stdout == "checked 1 blob, 1 did not match\n"
    assert "1 blob(s) did not match their digest" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1
    assert len(list((root / "quarantine").iterdir())) == 1
    again = run_cli(["fetch", url, "--sha256", SHA, "--cache", str(root)])
    assert again.returncode == 0, again.stderr
    assert blob_path(root, SHA).read_bytes() == DATA
    assert server.request_count("model.bin") == 2


def _as_another_user(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`surefetch ARGS` bound by file permissions as another user would be (root here)."""
    return subprocess.run(
        [*WITHOUT_ROOT_POWERS, SUREFETCH, *args], capture_output=True, text=True, timeout=30
    )


def test_cache_verify_where_it_may_not_move_a_bad_blob_exits_3_naming_it(
    url: str, root: Path
) -> None:
    """A cache this user may only read: a blob that does not match is named, with what
    to do, and the exit is still 3 (integrity), not "cannot use the cache"."""
    assert run_cli(["fetch", url, "--sha256", SHA, "--cache", str(root)]).returncode == 0
    blob = blob_path(root, SHA)
    blob.write_bytes(DATA[:-1] + b"\0")
    read_only = [root, blob.parent]
    for directory in read_only:
        directory.chmod(0o555)
    try:
        bad = _as_another_user(["cache", "verify", "--cache", str(root)])
    finally:
        for directory in read_only:
            directory.chmod(0o755)
    assert bad.returncode == 3, bad.stderr
    assert bad.stdout == "checked 1 blob, 1 did not match\n"
    (line,) = bad.stderr.splitlines()
    assert str(blob) in line and "could not be moved to quarantine" in line, line
    assert blob.exists() and not (root / "quarantine").exists()


def test_gc_where_the_lock_tables_may_not_be_written_warns_once(
    server: FaultServer, root: Path
) -> None:
    """Lock table files this user may not open for writing: gc takes their artifacts as
    in use (it cannot tell) and says so in one line for all the tables, not one each."""
    for i in range(40):  # enough artifacts for their locks to fall in many table files
        data = payload(1_000, seed=500 + i)
        u = server.add(f"g{i}", data)
        sha = hashlib.sha256(data).hexdigest()
        assert run_cli(["fetch", u, "--sha256", sha, "--cache", str(root)]).returncode == 0
    tables = sorted((root / "locks").glob("artifacts.*"))
    assert len(tables) > 1
    for table in tables:
        table.chmod(0o444)
    try:
        done = _as_another_user(["cache", "gc", "--max-size", "0", "--cache", str(root)])
    finally:
        for table in tables:
            table.chmod(0o644)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "lock table" in line]
    assert len(warnings) == 1, done.stderr
    assert "artifacts.*" in warnings[0] and "taken as in use" in warnings[0]
    blobs = [p for p in (root / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert len(blobs) == 40  # nothing was evicted


def test_cache_ls_and_gc(server: FaultServer, root: Path) -> None:
    shas = []
    for i in range(3):
        data = payload(100_000, seed=20 + i)
        shas.append(hashlib.sha256(data).hexdigest())
        u = server.add(f"f{i}", data)
        assert run_cli(["fetch", u, "--sha256", shas[-1], "--cache", str(root)]).returncode == 0
        os.utime(blob_path(root, shas[-1]), (1000 + i, 1000 + i))
    listed = json.loads(run_cli(["cache", "ls", "--cache", str(root), "--json"]).stdout)
    assert [b["sha256"] for b in listed["blobs"]] == shas
    assert listed["blobs"][0]["url"] == server.url_for("f0")
    assert listed["blobs"][0]["last_used"] == "1970-01-01T00:16:40Z"
    gc = run_cli(["cache", "gc", "--max-size", "195K", "--cache", str(root), "--json"])
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout) == {
        "evicted": [str(blob_path(root, shas[0])), str(blob_path(root, shas[1]))],
        "freed": 200_000,
        "remaining": 100_000,
        "in_use": 0,
    }
    text = run_cli(["cache", "ls", "--cache", str(root)])
    assert text.stdout.split() == [shas[2], "100000", "1970-01-01T00:16:42Z", server.url_for("f2")]


def test_cache_clean_removes_dead_parts_by_age(url: str, root: Path) -> None:
    child = start_fetch(f"{url}?throttle=100000", root, "--sha256", SHA)
    try:
        wait_for_download(child, part_path(root, SHA))
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        stop([child])
    young = run_cli(["cache", "clean", "--cache", str(root), "--older-than", "1h"])
    assert (young.returncode, young.stdout) == (0, "removed 0 files (0 bytes)\n")
    assert part_path(root, SHA).exists()
    old = run_cli(["cache", "clean", "--cache", str(root), "--older-than", "0s", "--json"])
    assert old.returncode == 0, old.stderr
    assert str(part_path(root, SHA)) in json.loads(old.stdout)["removed"]
    assert not part_path(root, SHA).exists()


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_modes_follow_the_umask(
    url: str, root: Path, umask: int, file_mode: int, dir_mode: int
) -> None:
    proc = start_fetch(url, root, "--sha256", SHA, umask=umask)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
    assert {name for name, mode in modes.items() if mode not in (file_mode, dir_mode)} == set()
    assert modes[str(blob_path(root, SHA).relative_to(root))] == file_mode
    assert [mode for name, mode in modes.items() if name.startswith("locks/artifacts.")] == [
        file_mode
    ]
    assert modes["blobs/sha256"] == dir_mode
    assert modes["catalog.db"] == file_mode


def test_the_cache_directory_from_the_environment_or_the_option(url: str, tmp_path: Path) -> None:
    env = {**os.environ, "SUREFETCH_CACHE": str(tmp_path / "env")}
    for extra, where in (
        ([], tmp_path / "env"),
        (["--cache", str(tmp_path / "opt")], tmp_path / "opt"),
    ):
        out = subprocess.run(
            [SUREFETCH, "fetch", url, "--sha256", SHA, *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert (out.returncode, out.stdout.strip()) == (0, str(blob_path(where, SHA))), out.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["cache", "gc", "--max-size", "lots"], "expected a size"),
        (["cache", "gc"], "--max-size"),
        (["cache", "clean", "--older-than", "1y"], "expected an age"),
        (["fetch", "http://127.0.0.1:1/x", "--sha256", "xyz"], "invalid sha256"),
        (["fetch", "http://127.0.0.1:1/x", "--lock-timeout", "0"], "positive"),
    ],
)
def test_usage_errors_exit_2(args: list[str], words: str, root: Path) -> None:
    out = run_cli([*args, "--cache", str(root)])
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", [["ls"], ["ls", "--json"], ["verify"], ["gc", "0"]])
def test_a_reader_that_went_away_is_not_blamed_on_the_cache(
    url: str, root: Path, command: list[str]
) -> None:
    """`surefetch cache ls --json | head -c 10`: stdout closes; that is not the cache's fault,
    and the command ends with its own exit code."""
    assert run_cli(["fetch", url, "--cache", str(root), "-q"]).returncode == 0
    if command[0] == "gc":
        command = ["gc", "--max-size", "0"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [SUREFETCH, "cache", *command, "--cache", str(root)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_damaged_catalog_is_named_once_and_verify_replaces_it(url: str, root: Path) -> None:
    assert run_cli(["fetch", url, "--cache", str(root), "--sha256", SHA, "-q"]).returncode == 0
    (root / "catalog.db").write_bytes(b"not a database" * 1000)
    fetched = run_cli(["fetch", url, "--cache", str(root), "-q"])
    assert fetched.returncode == 0, fetched.stderr
    warning = [line for line in fetched.stderr.splitlines() if "catalog" in line]
    assert len(warning) == 1 and "surefetch cache verify" in warning[0], fetched.stderr
    assert warning[0].startswith(f"surefetch: the cache's catalog {root / 'catalog.db'}")
    verified = run_cli(["cache", "verify", "--cache", str(root), "--json"])
    assert verified.returncode == 0, verified.stderr
    (moved,) = json.loads(verified.stdout)["catalog_quarantined"]
    assert (
        Path(moved).parent == root / "quarantine"
        and Path(moved).read_bytes()[:14] == b"not a database"
    )
    listed = run_cli(["cache", "ls", "--cache", str(root), "--json"])
    assert listed.returncode == 0 and "catalog" not in listed.stderr, listed.stderr
    assert [b["sha256"] for b in json.loads(listed.stdout)["blobs"]] == [SHA]


def test_a_catalog_another_process_keeps_busy_delays_nothing(url: str, root: Path) -> None:
    """The catalog is best effort: while another process holds it (an exclusive SQLite
    transaction) a fetch neither waits for it nor misses a Ctrl+C; what it would have
    recorded is dropped (the next use hashes the blob again)."""
    root.mkdir(parents=True)
    busy = sqlite3.connect(root / "catalog.db", isolation_level=None)
    busy.execute("PRAGMA journal_mode=WAL")
    busy.execute("CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY)")
    busy.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        out = run_cli(["fetch", url, "--sha256", SHA, "--cache", str(root), "--timeout", "5"])
        took = time.monotonic() - started
        slow = start_fetch(f"{url}?throttle=100000", root, "--sha256", "0" * 64)
        time.sleep(0.5)
        sent = time.monotonic()
        slow.send_signal(signal.SIGINT)
        slow.wait(10)
        interrupted_after = time.monotonic() - sent
    finally:
        busy.execute("ROLLBACK")
        busy.close()
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).read_bytes() == DATA
    assert took < 4, took  # it used to wait 10 s per write
    assert slow.returncode == 130 and interrupted_after < 1, interrupted_after


@pytest.mark.parametrize("blobs", [1, 80])
def test_a_listing_that_cannot_be_written_blames_stdout_not_the_cache(
    server: FaultServer, tmp_path: Path, blobs: int
) -> None:
    """`cache ls > /dev/full`: one line that says stdout could not be written, exit 1,
    whether the output fills the buffer mid-listing (80 blobs) or only at the end. (It
    used to say that the cache could not be used.)"""
    import surefetch as sf
    from surefetch.cache import FetchRequest

    cache = sf.Cache(tmp_path / "cache")
    urls = [server.add(f"l{blobs}-{i}", payload(100, i)) for i in range(blobs)]
    fetched = cache.fetch_many([FetchRequest(u) for u in urls])
    assert all(not isinstance(r, Exception) for r in fetched)
    listed = run_cli(["cache", "ls", "--cache", str(tmp_path / "cache")])
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == blobs
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [SUREFETCH, "cache", "ls", "--cache", str(tmp_path / "cache")],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "cannot write to stdout: No space left on device" in done.stderr
    assert "cache" not in done.stderr.split("stdout", 1)[1], done.stderr


@pytest.mark.parametrize(
    "output, blocker, why",
    [
        ("new/deeper/a.bin", None, None),
        ("file/x/y/a.bin", "file", "is not a directory"),
        ("dangling/a.bin", "dangling", "is a symbolic link that leads nowhere"),
    ],
)
def test_fetch_o_makes_missing_directories_or_names_what_is_in_the_way(
    url: str, root: Path, tmp_path: Path, output: str, blocker: str | None, why: str | None
) -> None:
    """As `get -o` does; a failure named the deepest directory, not the file in the way."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    done = run_cli(["fetch", url, "--cache", str(root), "-o", output, "-q"], tmp_path)
    if blocker is None:
        assert done.returncode == 0, done.stderr
        assert (tmp_path / output).read_bytes() == DATA
        return
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert f"{blocker} {why}" in line and "the cached copy is fine" in line, line
