"""The progress bar on a real terminal (a pseudo-terminal): it names the file, fits the width."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import tomli_w
from tqdm.utils import disp_len

from surefetch.lockfile import sync
from surefetch.testing import FaultServer

from support import SUREFETCH, payload, restore_default_signals

DATA = payload(1024 * 1024, seed=6)
THROTTLE = 2_000_000  # bytes/s: about half a second, the bar is redrawn several times
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_terminal(
    args: Sequence[str], columns: int, cwd: Path | None = None, timeout: float = 30
) -> tuple[int, str, list[str]]:
    """Runs the CLI with stderr on a pseudo-terminal `columns` wide; returns the exit
    code, stdout, and every state the terminal line went through (escapes removed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [SUREFETCH, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**env, "TERM": "xterm", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
        preexec_fn=restore_default_signals,
    )
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    states = [ANSI.sub("", s) for s in re.split(r"[\r\n]", screen.decode("utf-8", "replace"))]
    return code, stdout, [s for s in states if s.strip()]


def test_get_names_the_file(server: FaultServer, tmp_path: Path) -> None:
    server.add("model.bin", DATA)
    url = server.url_for("model.bin", throttle=THROTTLE)
    code, stdout, states = run_on_terminal(["get", url], columns=100, cwd=tmp_path)
    assert code == 0, states
    assert stdout.strip() == str(tmp_path / "model.bin")
    drawn = [s for s in states if s.startswith("model.bin: ")]
    assert drawn, states
    assert any("%|" in s and s.rstrip().endswith("B/s]") for s in drawn), drawn
    assert all(disp_len(s) <= 100 for s in states)


def test_get_names_the_output_file(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("model.bin", DATA)
    code, _, states = run_on_terminal(["get", url, "-o", str(tmp_path / "renamed.bin")], 100)
    assert code == 0, states
    assert any(s.startswith("renamed.bin: ") for s in states), states


def test_a_long_name_is_cut_to_the_terminal_width(server: FaultServer, tmp_path: Path) -> None:
    name = "a-very-long-name-" + "x" * 150 + "-part-00001-of-00042.safetensors"
    server.add(name, DATA)
    url = server.url_for(name, throttle=THROTTLE)
    code, _, states = run_on_terminal(["get", url], columns=100, cwd=tmp_path)
    assert code == 0, states
    assert (tmp_path / name).read_bytes() == DATA
    assert states and all(disp_len(s) <= 100 for s in states), states
    # Cut in the middle: its start and its extension stay, and the numbers stay whole.
    drawn = [s for s in states if s.startswith("a-very-long-name-")]
    assert drawn, states
    assert all("…" in s and ".safetensors: " in s for s in drawn), drawn
    assert any("%|" in s and s.rstrip().endswith("B/s]") for s in drawn), drawn


@pytest.mark.parametrize("columns", [40, 60, 80, 132])
def test_the_bar_never_wraps(server: FaultServer, tmp_path: Path, columns: int) -> None:
    name = "n" * 120 + ".bin"
    server.add(name, DATA)
    url = server.url_for(name, throttle=THROTTLE)
    code, _, states = run_on_terminal(["get", url], columns, tmp_path)
    assert code == 0, states
    assert any(s.startswith("nnnnnnnn") for s in states), states
    assert all(disp_len(s) <= columns for s in states), states


def test_quiet_draws_nothing(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("model.bin", DATA)
    code, stdout, states = run_on_terminal(["get", url, "-q"], columns=100, cwd=tmp_path)
    assert (code, stdout, states) == (0, "", [])


def test_fetch_names_the_file(server: FaultServer, tmp_path: Path) -> None:
    server.add("weights.bin", DATA)
    url = server.url_for("weights.bin", throttle=THROTTLE)
    args = ["fetch", url, "--cache", str(tmp_path / "cache")]
    code, stdout, states = run_on_terminal(args, columns=100)
    assert code == 0, states
    assert Path(stdout.strip()).read_bytes() == DATA
    drawn = [s for s in states if s.startswith("weights.bin: ")]
    assert any("%|" in s and s.rstrip().endswith("B/s]") for s in drawn), states


def test_sync_names_the_artifacts(server: FaultServer, tmp_path: Path) -> None:
    for name in ("first", "second"):
        server.add(f"{name}.bin", DATA)
    artifacts = [
        {"name": f"{name}.dat", "url": server.url_for(f"{name}.bin", throttle=THROTTLE)}
        for name in ("first", "second")
    ]
    (tmp_path / "surefetch.toml").write_text(tomli_w.dumps({"artifact": artifacts}))
    args = [
        "sync",
        "--manifest", str(tmp_path / "surefetch.toml"),
        "--lock", str(tmp_path / "surefetch.lock"),
        "--dest", str(tmp_path / "dest"),
        "--cache", str(tmp_path / "cache"),
        "--jobs", "1",
    ]  # fmt: skip
    code, stdout, states = run_on_terminal(args, columns=100)
    assert code == 0, states
    assert "2 installed" in stdout
    for name in ("first.dat", "second.dat"):
        drawn = [s for s in states if re.match(rf"[0-2]/2 {re.escape(name)}: ", s)]
        assert any("%|" in s for s in drawn), (name, states)
    assert all(disp_len(s) <= 100 for s in states), states


def test_sync_reports_each_artifacts_bytes(server: FaultServer, tmp_path: Path) -> None:
    """What sync's bar is fed with: `artifact_progress` (name, bytes done, total)."""
    artifacts = [
        {"name": name, "url": server.add(f"{name}.bin", DATA[: 1000 * (i + 1)])}
        for i, name in enumerate(("one", "two", "three"))
    ]
    (tmp_path / "surefetch.toml").write_text(tomli_w.dumps({"artifact": artifacts}))
    seen: dict[str, list[tuple[int, int | None]]] = {}

    def record(name: str, done: int, total: int | None) -> None:
        seen.setdefault(name, []).append((done, total))

    sync(
        tmp_path / "surefetch.toml",
        tmp_path / "surefetch.lock",
        tmp_path / "dest",
        cache=tmp_path / "cache",
        artifact_progress=record,
    )
    assert {name: calls[-1] for name, calls in seen.items()} == {
        "one": (1000, 1000),
        "two": (2000, 2000),
        "three": (3000, 3000),
    }
