"""Helpers shared by the tests: payloads, the CLI as a child process, leftovers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

SUREFETCH = str(Path(sys.executable).parent / "surefetch")


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


def restore_default_signals() -> None:
    """For children: a shell may have started us with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_cli(
    args: Sequence[str],
    cwd: Path | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs the installed `surefetch` command, stdin closed, not on a terminal; `env`:
    variables to set in its environment."""
    return subprocess.run(
        [SUREFETCH, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        preexec_fn=restore_default_signals,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def part_dir(dest: Path) -> Path:
    return dest.parent / ".surefetch"


def leftovers(directory: Path) -> list[str]:
    """Every file under `directory`, relative, sorted (to assert nothing partial remains)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# Root as another user would be: no capability to bypass file permissions (setpriv).
WITHOUT_ROOT_POWERS = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
