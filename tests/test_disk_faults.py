"""Disks that fail, under real processes.

Failures are real: strace makes one chosen system call of a `surefetch` child process
fail with a chosen errno (``-e inject=pwrite64:error=ENOSPC:when=2``, restricted with
``-P`` to one file where the call names a file), and a 1 MiB tmpfs fills up for real.
Whatever fails, the user gets the true error in one line, exit 1, nothing new at the
final path (an existing file there untouched), and no part file on the full disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import surefetch as sf
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
