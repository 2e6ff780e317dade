"""`surefetch sync` and `verify` as real child processes: exit codes, signals, recovery."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import tomli_w

from surefetch.lockfile import read_lockfile
from surefetch.testing import FaultServer

from support import SUREFETCH, leftovers, payload, restore_default_signals, run_cli

SMALL = [payload(4096, seed) for seed in range(5)]
TOOL = payload(9000, 42)


def _write_manifest(root: Path, *entries: Mapping[str, object]) -> Path:
    path = root / "surefetch.toml"
    path.write_text(tomli_w.dumps({"artifact": list(entries)}))
    return path


def _sync_args(root: Path, *extra: str) -> list[str]:
    return [
        "sync",
        "--manifest",
        str(root / "surefetch.toml"),
        "--lock",
        str(root / "surefetch.lock"),
        "--dest",
        str(root / "dest"),
        "--cache",
        str(root / "cache"),
        *extra,
    ]


def _sync(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(_sync_args(root, *extra))


def _standard(server: FaultServer, root: Path, throttle: int | None = None) -> None:
    """Five small artifacts and an executable tool under bin/."""
    for i, data in enumerate(SMALL):
        _serve(server, f"f{i}", data)
    _serve(server, "tool", TOOL)
    entries: list[dict[str, object]] = [
        {"name": f"f{i}", "url": server.url_for(f"f{i}")} for i in range(len(SMALL))
    ]
    entries.append(
        {
            "name": "tool",
            "url": server.url_for("tool", throttle=throttle)
            if throttle
            else server.url_for("tool"),
            "path": "bin/tool",
            "executable": True,
        }
    )
    _write_manifest(root, *entries)


def _serve(server: FaultServer, name: str, data: bytes) -> None:
    with contextlib.suppress(ValueError):  # already served
        server.add(name, data)


def _installed(root: Path) -> list[str]:
    """Files in dest outside surefetch's own state directory."""
    return [f for f in leftovers(root / "dest") if not f.startswith(".surefetch/")]


def _temp_files(root: Path) -> list[str]:
    return [f for f in os.listdir(root) if f.endswith(".tmp")]


def _assert_fully_synced(root: Path) -> None:
    entries = read_lockfile(root / "surefetch.lock").by_name()
    expected = {f"f{i}": data for i, data in enumerate(SMALL)} | {"tool": TOOL}
    assert set(entries) == set(expected)
    for name, data in expected.items():
        entry = entries[name]
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert len(entry.xxh3_128) == 32
    assert (root / "dest" / "bin" / "tool").read_bytes() == TOOL
    assert os.access(root / "dest" / "bin" / "tool", os.X_OK)
    assert leftovers(root / "dest") == sorted([*(f"f{i}" for i in range(5)), "bin/tool"])
    assert _temp_files(root) == []


@pytest.mark.parametrize(
    "throttle, timeout",
    [(None, "0.000000001"), (10_000, "0.3")],
    ids=["1ns", "throttled"],
)
def test_an_interrupted_sync_changes_nothing_and_the_next_one_recovers(
    server: FaultServer, tmp_path: Path, throttle: int | None, timeout: str
) -> None:
    _standard(server, tmp_path, throttle)
    # 1. a sync interrupted by a tiny per-item timeout fails
    out = _sync(tmp_path, "--jobs", "4", "--timeout-per-item", timeout)
    assert out.returncode == 5, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # 2. no temporary file remains, in dest or beside the lockfile
    assert leftovers(tmp_path / "dest") == []
    assert _temp_files(tmp_path) == []
    # 3. the lockfile was not created
    assert not (tmp_path / "surefetch.lock").exists()
    # 4. a second sync succeeds and pins everything
    out = _sync(tmp_path)
    assert out.returncode == 0, out.stderr
    _assert_fully_synced(tmp_path)


def test_one_nanosecond_per_item_keeps_an_existing_lockfile(
    server: FaultServer, tmp_path: Path
) -> None:
    _standard(server, tmp_path)
    assert _sync(tmp_path).returncode == 0
    before = (tmp_path / "surefetch.lock").read_bytes()
    entries = [{"name": "new", "url": server.add("new", b"new")}]
    _write_manifest(tmp_path, *entries)
    out = _sync(tmp_path, "--timeout-per-item", "0.000000001")
    assert out.returncode == 5, out.stderr
    assert "new: " in out.stderr
    assert (tmp_path / "surefetch.lock").read_bytes() == before
    assert not (tmp_path / "dest" / "new").exists()


def _start_sync(root: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SUREFETCH, *_sync_args(root, *extra)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=restore_default_signals,
    )


def _wait_until(condition: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sigkill_during_sync_then_rerun(server: FaultServer, tmp_path: Path) -> None:
    _standard(server, tmp_path, throttle=5_000)
    proc = _start_sync(tmp_path, "--jobs", "8")
    _wait_until(lambda: server.bytes_sent_for("tool") > 0 and server.bytes_sent > 20_000, proc)
    proc.kill()
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "surefetch.lock").exists()
    assert _installed(tmp_path) == []  # staged copies may remain, hidden in .surefetch/
    _standard(server, tmp_path)  # the same artifacts, no longer throttled
    out = _sync(tmp_path)
    assert out.returncode == 0, out.stderr
    _assert_fully_synced(tmp_path)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_leave_the_lockfile_byte_identical(
    server: FaultServer, tmp_path: Path, sig: int, code: int
) -> None:
    _write_manifest(tmp_path, {"name": "old", "url": server.add("old", b"old")})
    assert _sync(tmp_path).returncode == 0
    before = (tmp_path / "surefetch.lock").read_bytes()
    _standard(server, tmp_path, throttle=5_000)
    proc = _start_sync(tmp_path)
    _wait_until(lambda: server.bytes_sent_for("tool") > 0, proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == code, stderr
    assert time.monotonic() - sent < 2.0
    assert (tmp_path / "surefetch.lock").read_bytes() == before
    assert leftovers(tmp_path / "dest") == ["old"]  # staging removed, nothing new installed
    _standard(server, tmp_path)
    assert _sync(tmp_path).returncode == 0


def test_a_second_sync_transfers_zero_bytes(server: FaultServer, tmp_path: Path) -> None:
    _standard(server, tmp_path)
    first = _sync(tmp_path, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["bytes_transferred"] == sum(map(len, SMALL)) + len(TOOL)
    lock = tmp_path / "surefetch.lock"
    before, mtime = lock.read_bytes(), lock.stat().st_mtime_ns
    sent, requests = server.bytes_sent, len(server.requests)
    second = _sync(tmp_path, "--json")
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert set(result) == {
        "installed",
        "unchanged",
        "removed",
        "lockfile_changed",
        "bytes_transferred",
        "elapsed_s",
    }
    assert (result["bytes_transferred"], result["installed"], result["lockfile_changed"]) == (
        0,
        [],
        False,
    )
    assert len(result["unchanged"]) == 6
    assert (server.bytes_sent, len(server.requests)) == (sent, requests)
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == (before, mtime)


def test_lockfile_bytes_are_stable_across_runs(server: FaultServer, tmp_path: Path) -> None:
    _standard(server, tmp_path)
    assert _sync(tmp_path).returncode == 0
    first = (tmp_path / "surefetch.lock").read_bytes()
    (tmp_path / "surefetch.lock").unlink()
    manifest = tmp_path / "surefetch.toml"
    doc = manifest.read_text().split("\n\n")
    manifest.write_text("\n\n".join(reversed(doc)))  # same artifacts, another order
    assert _sync(tmp_path, "--quiet").returncode == 0
    assert (tmp_path / "surefetch.lock").read_bytes() == first


def test_checksum_mismatch_against_the_lock_exits_3_until_upgrade(
    server: FaultServer, tmp_path: Path
) -> None:
    _standard(server, tmp_path)
    assert _sync(tmp_path).returncode == 0
    lock = tmp_path / "surefetch.lock"
    before = lock.read_bytes()
    new = payload(4096, 99)
    server.replace("f1", new)
    (tmp_path / "dest" / "f1").unlink()
    installed = {f: (tmp_path / "dest" / f).read_bytes() for f in _installed(tmp_path)}
    out = run_cli([*_sync_args(tmp_path), "--cache", str(tmp_path / "fresh")])
    assert out.returncode == 3, out.stderr
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "f1: sha256 mismatch" in line
    assert hashlib.sha256(SMALL[1]).hexdigest() in line
    assert hashlib.sha256(new).hexdigest() in line
    assert "--upgrade" in line
    assert lock.read_bytes() == before
    assert {f: (tmp_path / "dest" / f).read_bytes() for f in _installed(tmp_path)} == installed
    out = run_cli([*_sync_args(tmp_path), "--cache", str(tmp_path / "fresh"), "--upgrade"])
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "dest" / "f1").read_bytes() == new


@pytest.mark.parametrize(
    "path, words",
    [("/tmp/escape", "is absolute"), ("../escape", "'..'"), ("link/escape", "leads outside")],
)
def test_path_escapes_exit_2_and_write_nothing(
    server: FaultServer, tmp_path: Path, path: str, words: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "link").symlink_to(outside)
    _write_manifest(
        tmp_path,
        {"name": "ok", "url": server.add("ok", b"ok")},
        {"name": "bad", "url": server.add("bad", b"bad"), "path": path},
    )
    out = _sync(tmp_path)
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and "'bad'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "surefetch.lock").exists()
    assert leftovers(tmp_path / "dest") == []
    assert os.listdir(outside) == []
    assert not Path("/tmp/escape").exists()
    assert server.requests == []


@pytest.mark.parametrize("which", ["surefetch.toml", "surefetch.lock"])
def test_bad_toml_exits_2(tmp_path: Path, which: str) -> None:
    _write_manifest(tmp_path)
    (tmp_path / which).write_text("[[artifact]\nname = ")
    out = _sync(tmp_path)
    assert out.returncode == 2, out.stderr
    assert "invalid TOML" in out.stderr and which in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_locked_and_frozen_exit_codes(server: FaultServer, tmp_path: Path) -> None:
    _standard(server, tmp_path)
    assert _sync(tmp_path, "--locked").returncode == 1
    out = _sync(tmp_path, "--frozen")
    assert out.returncode == 1
    assert "no lockfile" in out.stderr
    assert not (tmp_path / "surefetch.lock").exists()
    assert _sync(tmp_path).returncode == 0
    assert _sync(tmp_path, "--locked").returncode == 0
    _write_manifest(tmp_path, {"name": "other", "url": server.add("other", b"x")})
    out = _sync(tmp_path, "--locked")
    assert out.returncode == 1
    assert "--locked" in out.stderr
    assert _sync(tmp_path, "--locked", "--upgrade").returncode == 2  # usage
    (tmp_path / "dest" / "f0").unlink()
    assert _sync(tmp_path, "--frozen").returncode == 0
    assert (tmp_path / "dest" / "f0").read_bytes() == SMALL[0]
    assert not (tmp_path / "dest" / "other").exists()


def test_verify_reports_every_difference_with_its_exit_code(
    server: FaultServer, tmp_path: Path
) -> None:
    _standard(server, tmp_path)
    assert _sync(tmp_path).returncode == 0
    args = ["verify", "--lock", str(tmp_path / "surefetch.lock"), "--dest", str(tmp_path / "dest")]
    ok = run_cli(args)
    assert (ok.returncode, ok.stderr) == (0, "")
    dest = tmp_path / "dest"
    (dest / "f0").unlink()
    (dest / "bin" / "tool").chmod(0o644)
    out = run_cli(args)
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines() == [
        f"f0: {dest / 'f0'}: missing",
        f"tool: {dest / 'bin' / 'tool'}: not executable",
    ]
    assert "2 difference(s)" in out.stderr
    # The line names every kind found (it said "files are missing" for anything not
    # an integrity failure, and "do not match their digests" for any mix with one).
    assert ": files missing, not executable;" in out.stderr, out.stderr
    (dest / "f1").write_bytes(b"y" * 4096)
    out = run_cli([*args, "--json"])
    assert out.returncode == 3, out.stderr
    assert ": files missing, not matching their digests, not executable;" in out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is False
    assert sorted((d["name"], d["kind"]) for d in report["differences"]) == [
        ("f0", "missing"),
        ("f1", "sha256"),
        ("f1", "xxh3_128"),
        ("tool", "not executable"),
    ]
    assert run_cli(["verify", "--lock", str(tmp_path / "none.lock")]).returncode == 1


def test_one_failing_artifact_stops_the_whole_command_quickly(
    server: FaultServer, tmp_path: Path
) -> None:
    slow = [
        {"name": f"slow{i}", "url": server.add(f"s{i}", payload(1 << 20, i)) + "?throttle=100000"}
        for i in range(7)
    ]
    _write_manifest(tmp_path, *slow, {"name": "missing", "url": server.url_for("missing")})
    started = time.monotonic()
    out = _sync(tmp_path, "--jobs", "8")
    assert time.monotonic() - started < 4.0  # each throttled artifact needs 10 s
    assert out.returncode == 4, out.stderr
    assert "missing: " in out.stderr and "404" in out.stderr
    assert not (tmp_path / "surefetch.lock").exists()
    assert leftovers(tmp_path / "dest") == []


def test_sync_takes_the_network_options_of_get(server: FaultServer, tmp_path: Path) -> None:
    """Headers, retries and timeouts reach every artifact's request (one TransferOptions
    from the flags), as they do for get and fetch."""
    _standard(server, tmp_path)
    done = _sync(tmp_path, "-H", "X-Token: abc", "--retries", "0", "--read-timeout", "5")
    assert done.returncode == 0, done.stderr
    sent = [r for r in server.requests if r.name.startswith(("f", "tool"))]
    assert len(sent) == len(SMALL) + 1
    assert all(r.headers.get("x-token") == "abc" for r in sent)
    bad = _sync(tmp_path, "--retries", "-1")
    assert bad.returncode == 2 and "--retries" in bad.stderr


def test_sync_says_whom_it_waits_for(server: FaultServer, tmp_path: Path) -> None:
    """An artifact another process is fetching into the cache is waited for, and sync
    says for whom (as `fetch` does), then installs it without downloading it again."""
    from cache_support import holder_pid, start_fetch, stop, wait_until

    data = payload(300_000, seed=77)
    sha = hashlib.sha256(data).hexdigest()
    url = server.add("shared.bin", data)
    holder = start_fetch(f"{url}?throttle=300000", tmp_path / "cache", "--sha256", sha)
    try:
        wait_until(lambda: holder_pid(tmp_path / "cache", sha) == holder.pid, "the holder")
        _write_manifest(tmp_path, {"name": "shared.bin", "url": url, "sha256": sha})
        out = run_cli(_sync_args(tmp_path))
    finally:
        stop([holder])
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith(f"surefetch: waiting for pid {holder.pid} on host "), out.stderr
    assert (tmp_path / "dest" / "shared.bin").read_bytes() == data
    assert [r.query for r in server.requests] == ["throttle=300000"]  # the holder's alone


def _with_open_files_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        restore_default_signals()
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    return apply


def test_a_batch_needs_no_open_file_per_artifact(server: FaultServer, tmp_path: Path) -> None:
    """300 artifacts under a limit of 128 open files (the usual limit is 1,024, and
    batches of 10,000 are common): the cache's locks and the engine's blob directories
    take a bounded number of descriptors, not one per artifact."""
    datas = [payload(4096, seed=1000 + i) for i in range(300)]
    for i, data in enumerate(datas):
        _serve(server, f"many{i}", data)
    _write_manifest(
        tmp_path, *({"name": f"m{i}", "url": server.url_for(f"many{i}")} for i in range(300))
    )
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{server.url_for(f'many{i}')} out=g{i}\n" for i in range(300)))
    runs = {
        "sync": [SUREFETCH, *_sync_args(tmp_path, "--jobs", "8")],
        "get": [SUREFETCH, "get", "-i", str(listing), "-o", str(tmp_path / "got") + "/"],
    }
    for what, argv in runs.items():
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            preexec_fn=_with_open_files_limit(128),
        )
        assert done.returncode == 0, (what, done.stderr)
    for i, data in enumerate(datas):
        assert (tmp_path / "dest" / f"m{i}").read_bytes() == data
        assert (tmp_path / "got" / f"g{i}").read_bytes() == data
    assert len(read_lockfile(tmp_path / "surefetch.lock").artifacts) == 300
