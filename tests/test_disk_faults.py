"""Disks that fail, signals at a chosen system call, and threads that die, under real
processes.

Failures are real: strace makes one chosen system call of a `surefetch` child process
fail with a chosen errno (``-e inject=pwrite64:error=ENOSPC:when=2``, restricted with
``-P`` to one file where the call names a file), and a 1 MiB tmpfs fills up for real.
Whatever fails, the user gets the true error in one line, exit 1, nothing new at the
final path (an existing file there untouched), and no part file on the full disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import tomli_w

import surefetch as sf
from surefetch.lockfile import read_lockfile, verify
from surefetch.testing import FaultServer

from support import SUREFETCH, leftovers, payload, restore_default_signals

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(
    STRACE is None, reason="needs strace (scripts/system-deps installs it)"
)

BIG = payload(4 << 20, seed=61)
OLD = b"the file that was there before\n"
# Slow enough for several checkpoints (every 50 ms: fdatasync, then the sidecar).
SLOW = 16_000_000


def run_traced(
    args: Sequence[str], strace: Sequence[str], timeout: float = 40
) -> subprocess.CompletedProcess[str]:
    """Runs `surefetch ARGS` under ``strace STRACE``; kills the whole group on a hang."""
    assert STRACE is not None
    # -I1: strace itself dies on a signal; -o /dev/null: only the injection matters.
    command = [STRACE, "-I1", "-f", "-qq", "-o", "/dev/null", *strace, SUREFETCH, *args]
    child = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=restore_default_signals,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise AssertionError(
            f"surefetch {' '.join(args)} hung for {timeout} s under {strace}"
        ) from None
    return subprocess.CompletedProcess(command, child.returncode, out, err)


def assert_one_line_warning(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    (line,) = out.stderr.splitlines()
    assert line.startswith("surefetch: warning: "), line
    for needle in needles:
        assert needle in line, line


def assert_one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith("surefetch: error: "), line
    for needle in needles:
        assert needle in line, line
    for bad in ("internal error", "panicked", "stopped unexpectedly", "Traceback"):
        assert bad not in line, line
    return line


def _with_query(url: str, query: dict[str, int]) -> str:
    return f"{url}?{urllib.parse.urlencode(query)}" if query else url


def engine_files(dest: Path) -> list[str]:
    return [f for f in leftovers(dest.parent) if f.startswith(".surefetch/")]


# --- the table: a write of the part, a checkpoint, the sidecar ------------------------------


@dataclass(frozen=True)
class Fault:
    """One failing system call during `surefetch get URL -o DEST`."""

    strace: Callable[[Path], list[str]]
    errno: int
    query: dict[str, int] = field(default_factory=dict)
    options: tuple[str, ...] = ()


def _inject(spec: str) -> Callable[[Path], list[str]]:
    return lambda dest: ["-e", f"inject={spec}"]


def _on_sidecar(spec: str) -> Callable[[Path], list[str]]:
    # The sidecar is written to <name>.part.json.tmp, then renamed over <name>.part.json.
    return lambda dest: [
        "-P",
        str(dest.parent / ".surefetch" / f"{dest.name}.part.json.tmp"),
        "-e",
        f"inject={spec}",
    ]


FAULTS = {
    **{
        f"pwrite-enospc-{n}": Fault(_inject(f"pwrite64:error=ENOSPC:when={n}"), errno.ENOSPC)
        for n in (1, 2, 3, 4)
    },
    **{
        f"pwrite-enospc-{n}-of-4-connections": Fault(
            _inject(f"pwrite64:error=ENOSPC:when={n}"), errno.ENOSPC, options=("-c", "4")
        )
        for n in (1, 3)
    },
    "pwrite-edquot-2": Fault(_inject("pwrite64:error=EDQUOT:when=2"), errno.EDQUOT),
    "pwrite-eio-2": Fault(_inject("pwrite64:error=EIO:when=2"), errno.EIO),
    "checkpoint-fdatasync-eio": Fault(
        _inject("fdatasync:error=EIO:when=1"), errno.EIO, {"throttle": SLOW}
    ),
    "sidecar-write-enospc-first": Fault(_on_sidecar("write:error=ENOSPC:when=1"), errno.ENOSPC),
    "sidecar-write-enospc-checkpoint": Fault(
        _on_sidecar("write:error=ENOSPC:when=2"), errno.ENOSPC, {"throttle": SLOW}
    ),
    "sidecar-rename-exdev-first": Fault(_on_sidecar("rename:error=EXDEV:when=1"), errno.EXDEV),
    "sidecar-rename-exdev-checkpoint": Fault(
        _on_sidecar("rename:error=EXDEV:when=2"), errno.EXDEV, {"throttle": SLOW}
    ),
    "sidecar-rename-enospc-checkpoint": Fault(
        _on_sidecar("rename:error=ENOSPC:when=3"), errno.ENOSPC, {"throttle": SLOW}
    ),
}


@needs_strace
@pytest.mark.parametrize("fault", FAULTS.values(), ids=list(FAULTS))
def test_a_failing_disk_gives_its_own_error(
    fault: Fault, server: FaultServer, tmp_path: Path
) -> None:
    """The error of the stage that failed, never "a stage stopped"; every time (it used
    to depend on a race, so each case runs three times)."""
    server.add("big.bin", BIG)
    url = _with_query(server.url_for("big.bin"), fault.query)
    strerror = os.strerror(fault.errno)
    for attempt in range(3):
        dest = tmp_path / str(attempt) / "big.bin"
        dest.parent.mkdir()
        dest.write_bytes(OLD)
        out = run_traced(["get", url, "-o", str(dest), *fault.options], fault.strace(dest))
        assert out.returncode == 1, out.stderr
        assert_one_line_error(out, strerror, f"(os error {fault.errno})", "part file was removed")
        assert dest.read_bytes() == OLD
        assert engine_files(dest) == []


@needs_strace
def test_a_failed_directory_sync_says_the_file_is_installed(
    server: FaultServer, tmp_path: Path
) -> None:
    url = server.add("big.bin", BIG)
    dest = tmp_path / "big.bin"
    dest.write_bytes(OLD)
    # The only fsync of the destination directory is the one after the final rename.
    out = run_traced(
        ["get", url, "-o", str(dest)], ["-P", str(tmp_path), "-e", "inject=fsync:error=EIO"]
    )
    assert out.returncode == 1, out.stderr
    line = assert_one_line_error(
        out,
        f"installed at {dest}, but its durability is unknown: syncing the directory "
        f"{tmp_path} failed: Input/output error (os error 5)",
    )
    assert "untouched" not in line and "removed" not in line
    assert dest.read_bytes() == BIG
    assert engine_files(dest) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_leaves_no_part(server: FaultServer, tiny_disk: Path) -> None:
    """4 MiB of unknown length (nothing to preallocate) onto 1 MiB: the writes fail."""
    server.add("big.bin", BIG)
    url = server.url_for("big.bin", no_length=1, no_range=1)
    dest = tiny_disk / "big.bin"
    dest.write_bytes(OLD)
    for _ in range(3):
        out = subprocess.run(
            [SUREFETCH, "get", url, "-o", str(dest)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        assert out.returncode == 1, out.stderr
        assert_one_line_error(out, "No space left on device (os error 28)", "free space")
        assert dest.read_bytes() == OLD
        assert engine_files(dest) == []
    # Nothing kept: the space is free again.
    assert shutil.disk_usage(tiny_disk).used < 64 << 10


def test_a_full_disk_raises_storage_error_naming_the_errno_and_path(
    server: FaultServer, tiny_disk: Path
) -> None:
    server.add("big.bin", BIG)
    url = server.url_for("big.bin", no_length=1, no_range=1)
    dest = tiny_disk / "big.bin"
    with pytest.raises(sf.StorageError) as caught:
        sf.download(url, dest)
    assert caught.value.errno == errno.ENOSPC
    assert os.fspath(caught.value.filename) == str(tiny_disk / ".surefetch" / "big.bin.part")
    assert "No space left on device (os error 28)" in str(caught.value)
    assert not dest.exists()
    assert engine_files(dest) == []


# --- sync: the lockfile, and its directory ----------------------------------------------------


def _sync_setup(server: FaultServer, root: Path, count: int = 3, **query: int) -> list[str]:
    names = [f"a{i}" for i in range(count)]
    entries = []
    for i, name in enumerate(names):
        with contextlib.suppress(ValueError):  # already served
            server.add(name, payload(200_000 + i, seed=70 + i))
        entries.append({"name": name, "url": _with_query(server.url_for(name), query)})
    (root / "surefetch.toml").write_text(tomli_w.dumps({"artifact": entries}))
    return names


def _sync_args(root: Path) -> list[str]:
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
    ]


@needs_strace
def test_sync_says_the_lockfile_is_written_when_its_directory_sync_fails(
    server: FaultServer, tmp_path: Path
) -> None:
    _sync_setup(server, tmp_path)
    # Only the lockfile's own directory sync touches tmp_path (dest and cache are below).
    out = run_traced(_sync_args(tmp_path), ["-P", str(tmp_path), "-e", "inject=fsync:error=EIO"])
    assert out.returncode == 1, out.stderr
    assert_one_line_error(
        out,
        f"the lockfile {tmp_path / 'surefetch.lock'} was written, but its durability is "
        f"unknown: syncing the directory {tmp_path} failed: Input/output error (os error 5)",
    )
    assert read_lockfile(tmp_path / "surefetch.lock").artifacts
    assert [p.name for p in tmp_path.glob(".surefetch.lock.*")] == []


@needs_strace
def test_sync_says_the_files_are_installed_when_the_destination_sync_fails(
    server: FaultServer, tmp_path: Path
) -> None:
    names = _sync_setup(server, tmp_path)
    dest = tmp_path / "dest"
    out = run_traced(_sync_args(tmp_path), ["-P", str(dest), "-e", "inject=fsync:error=EIO"])
    assert out.returncode == 1, out.stderr
    assert_one_line_error(out, f"3 artifacts installed in {dest}, but their durability is unknown")
    assert sorted(p.name for p in dest.iterdir() if p.is_file()) == names
    # The lockfile matches what is installed: the next sync has nothing to do.
    again = subprocess.run(
        [SUREFETCH, *_sync_args(tmp_path), "--locked"], capture_output=True, text=True, timeout=30
    )
    assert again.returncode == 0, again.stderr


@needs_strace
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("at", [1, 5], ids=["first-rename", "last-rename"])
def test_a_signal_during_the_install_waits_for_it_and_the_lockfile(
    server: FaultServer, tmp_path: Path, sig: str, at: int
) -> None:
    """A Ctrl+C or SIGTERM that arrives at a rename into the destination (strace sends it
    there) is held back until every artifact is in place and the lockfile matches them:
    never half a sync. The command then stops, says what is done, and exits 0: a non-zero
    exit would say that nothing changed (it exited 130 or 143)."""
    names = _sync_setup(server, tmp_path, count=5)
    dest = tmp_path / "dest"
    # rename(2) is sync's own (the engine's are renameat): the 5 installs, then the lockfile.
    out = run_traced(
        _sync_args(tmp_path), ["-e", "trace=rename", "-e", f"inject=rename:signal={sig}:when={at}"]
    )
    assert out.returncode == 0, out.stderr
    what = "interrupted" if sig == "SIGINT" else "terminated"
    assert_one_line_warning(out, f"{what}, but the install had begun, and was completed first")
    for i, name in enumerate(names):
        assert (dest / name).read_bytes() == payload(200_000 + i, seed=70 + i)
    assert sorted(a.name for a in read_lockfile(tmp_path / "surefetch.lock").artifacts) == names
    assert verify(tmp_path / "surefetch.lock", dest) == []


@needs_strace
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["get", "fetch -o", "sync"])
def test_a_signal_after_the_work_is_done_does_not_undo_its_exit_code(
    server: FaultServer, tmp_path: Path, command: str, sig: str
) -> None:
    """A Ctrl+C or SIGTERM while the command prints its result (strace sends it at that
    write, into a file): the file is installed (and the lockfile written), so the command
    says so in a warning and exits 0 (it exited 130 or 143, or died by the signal with a
    traceback)."""
    names = _sync_setup(server, tmp_path, count=2)
    target = tmp_path / "dest" / names[0]
    args = {
        "get": ["get", server.url_for(names[0]), "-o", str(target)],
        "fetch -o": ["fetch", server.url_for(names[0]), "--cache", str(tmp_path / "c"), "-o",
                     str(target)],
        "sync": _sync_args(tmp_path),
    }[command]  # fmt: skip
    out = tmp_path / "out.txt"
    assert STRACE is not None
    done = subprocess.run(
        [STRACE, "-I1", "-f", "-qq", "-o", "/dev/null", "-P", str(out), "-e",
         f"inject=write:signal={sig}:when=1", "sh", "-c", f'exec "$0" "$@" > {out}',
         SUREFETCH, *args],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=40,
        preexec_fn=restore_default_signals, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    what = "interrupted" if sig == "SIGINT" else "terminated"
    assert_one_line_warning(done, f"{what}, but")
    assert target.read_bytes() == payload(200_000, seed=70)
    if command == "sync":
        assert verify(tmp_path / "surefetch.lock", tmp_path / "dest") == []


@needs_strace
def test_a_signal_while_the_sync_tidies_up_says_the_sync_was_completed(
    server: FaultServer, tmp_path: Path
) -> None:
    """A Ctrl+C after the lockfile is written, while the sync removes its state directory
    (its last step, where strace sends it), is reported as arriving after a completed
    install: it said "interrupted; run the same command again" with everything done."""
    names = _sync_setup(server, tmp_path, count=3)
    dest = tmp_path / "dest"
    state = dest / ".surefetch"
    out = run_traced(_sync_args(tmp_path), ["-P", str(state), "-e", "inject=rmdir:signal=SIGINT"])
    assert out.returncode == 0, out.stderr
    assert_one_line_warning(out, "interrupted, but the install had begun, and was completed first")
    assert sorted(a.name for a in read_lockfile(tmp_path / "surefetch.lock").artifacts) == names
    assert verify(tmp_path / "surefetch.lock", dest) == []
    assert not state.exists()


@needs_strace
@pytest.mark.parametrize("fault", ["signal=SIGINT", "error=ENOSPC"])
def test_a_fault_at_the_staging_directory_leaves_nothing(
    server: FaultServer, tmp_path: Path, fault: str
) -> None:
    """The staging directory's mkdir (the sync's 4th into an existing destination) fails,
    or a Ctrl+C arrives just after it: one line, and no `.surefetch/` left behind (a
    Ctrl+C there left an empty staging directory; a failure was a traceback)."""
    _sync_setup(server, tmp_path, count=3)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = run_traced(_sync_args(tmp_path), ["-e", f"inject=mkdir:{fault}:when=4"])
    if fault.startswith("signal"):
        assert out.returncode == 130, out.stderr
        assert_one_line_error(out, "interrupted")
    else:
        assert out.returncode == 1, out.stderr
        assert_one_line_error(out, "cannot create the staging directory", "No space left")
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "surefetch.lock").exists()


def test_sync_removes_a_temporary_lockfile_a_killed_sync_left(
    server: FaultServer, tmp_path: Path
) -> None:
    _sync_setup(server, tmp_path)
    stale = tmp_path / ".surefetch.lock.0123456789ab.tmp"
    stale.write_text("version = 1\n# cut short by SIGKILL")
    # One that a live writer holds (its flock) stays; so do files that merely look alike.
    live = tmp_path / ".surefetch.lock.ba9876543210.tmp"
    live.write_text("being written")
    unrelated = [
        tmp_path / ".surefetch.lock.notours.tmp",
        tmp_path / ".other.lock.0123456789ab.tmp",
    ]
    for path in unrelated:
        path.write_text("not ours")
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for _ in range(2):  # the second sync changes nothing, and still tidies up
            out = subprocess.run(
                [SUREFETCH, *_sync_args(tmp_path)], capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 0, out.stderr
            assert not stale.exists()
            stale.write_text("another one")
        assert live.exists()
    assert all(path.exists() for path in unrelated)


@needs_strace
def test_a_sync_killed_while_writing_the_lockfile_is_tidied_by_the_next(
    server: FaultServer, tmp_path: Path
) -> None:
    """SIGKILL while the temporary lockfile exists. The second sync only drops an entry:
    everything else is installed, so the only fsync it makes is the temporary lockfile's
    (the first), which is made to take 20 s; the sync is killed during it."""
    _sync_setup(server, tmp_path, count=3)
    first = subprocess.run([SUREFETCH, *_sync_args(tmp_path)], capture_output=True, timeout=30)
    assert first.returncode == 0, first.stderr
    lock = tmp_path / "surefetch.lock"
    before = lock.read_bytes()
    _sync_setup(server, tmp_path, count=2)
    assert STRACE is not None
    delay = ["-e", "inject=fsync:delay_enter=20000000:when=1"]
    child = subprocess.Popen(
        [STRACE, "-I1", "-f", "-qq", "-o", "/dev/null", *delay, SUREFETCH, *_sync_args(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    temps: list[Path] = []
    try:
        deadline = time.monotonic() + 15
        while not temps and time.monotonic() < deadline and child.poll() is None:
            temps = list(tmp_path.glob(".surefetch.lock.*.tmp"))
            time.sleep(0.02)
        time.sleep(0.2)  # well inside the fsync's delay
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert temps, "the sync never stalled with its temporary lockfile"
    assert all(t.exists() for t in temps)
    assert lock.read_bytes() == before
    out = subprocess.run(
        [SUREFETCH, *_sync_args(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.glob(".surefetch.lock.*.tmp")) == []
    assert len(read_lockfile(lock).artifacts) == 2


# --- threads that cannot start, and threads that die -------------------------------------------


@needs_strace
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_a_thread_that_cannot_start_ends_the_call(
    n: int, server: FaultServer, tmp_path: Path
) -> None:
    """EAGAIN from the n-th clone3 (the runtime's workers, then the pipeline threads)."""
    url = server.add("big.bin", BIG)
    dest = tmp_path / "big.bin"
    out = run_traced(["get", url, "-o", str(dest)], ["-e", f"inject=clone3:error=EAGAIN:when={n}"])
    if out.returncode == 0:  # that clone3 was not needed for the download
        assert dest.read_bytes() == BIG
        return
    assert out.returncode == 1, out.stderr
    assert_one_line_error(out, "short of memory or processes")
    assert not dest.exists()


@needs_strace
def test_a_panic_on_a_runtime_thread_ends_sync_instead_of_hanging(
    server: FaultServer, tmp_path: Path
) -> None:
    """A failing epoll_wait makes tokio's I/O driver panic on a worker thread. The
    transfers on that worker would never run again: sync used to hang until killed."""
    _sync_setup(server, tmp_path, count=6, throttle=1_000_000)
    started = time.monotonic()
    out = run_traced(
        [*_sync_args(tmp_path), "--jobs", "4"],
        ["-e", "inject=epoll_wait:error=EBADF:when=1"],
        timeout=30,
    )
    assert time.monotonic() - started < 20
    assert out.returncode == 1, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "internal error: a thread of surefetch's I/O runtime panicked" in lines[0]
    assert "unexpected error when polling the I/O driver" in lines[0]
    assert not (tmp_path / "surefetch.lock").exists()
    assert not (tmp_path / "dest").exists()  # made by this sync, and removed with it


def _readline(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout} s"
    return stream.readline().rstrip("\n")


@needs_strace
def test_after_a_runtime_panic_the_next_call_gets_a_new_runtime(
    server: FaultServer, tmp_path: Path
) -> None:
    """One process: a download on a runtime that panicked fails, then (strace detached,
    so the new runtime's threads are spared) the next download gets a new runtime."""
    server.add("first.bin", BIG)
    first = server.url_for("first.bin", throttle=SLOW)
    second = server.add("second.bin", payload(100_000, seed=3))
    script = f"""
import os, sys
import surefetch as sf
print(os.getpid(), flush=True)
try:
    sf.download({first!r}, {str(tmp_path / "first.bin")!r})
    print("first: ok", flush=True)
except sf.SurefetchError as e:
    print("first:", type(e).__name__, e, flush=True)
sys.stdin.readline()
print("second:", sf.download({second!r}, {str(tmp_path / "second.bin")!r}).size, flush=True)
"""
    assert STRACE is not None
    python = str(Path(SUREFETCH).with_name("python"))
    inject = ["-e", "inject=epoll_wait:error=EBADF:when=1"]
    tracer = subprocess.Popen(
        [STRACE, "-I1", "-f", "-qq", "-o", "/dev/null", *inject, python, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert tracer.stdin is not None and tracer.stdout is not None
    pid, finished = 0, False
    try:
        pid = int(_readline(tracer.stdout, 20))
        first_line = _readline(tracer.stdout, 20)
        assert first_line.startswith("first: SurefetchError internal error: a thread"), first_line
        tracer.terminate()  # strace detaches and exits; python goes on untraced
        tracer.wait(10)
        tracer.stdin.write("go\n")
        tracer.stdin.flush()
        assert _readline(tracer.stdout, 20) == "second: 100000"
        finished = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tracer.pid, signal.SIGKILL)
        if pid and not finished:  # detached from strace, it is no longer in that group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        tracer.wait()
