"""Runs one command and prints its wall time, peak RSS and exit status: `S KIB STATUS`.

    python -I -S bench/spawn.py PROGRAM [ARG...]

Why not measure from bench/run.py directly: on Linux a child's `ru_maxrss` includes the
high-water mark of the memory it had before `exec`, which is its parent's (fork copies it,
vfork and posix_spawn share it). Spawned from the harness, every tool would report at least
the harness's own peak (about 40 MiB). Spawned from this small process (`-I -S`: no site,
about 8 MiB), a tool's peak RSS is its own, or 8 MiB when it stays below that.

The command's stdout goes to /dev/null; its stderr is this process's stderr. Keep imports to
the built-in modules: every import raises the floor.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    argv = sys.argv[1:]
    if not argv:
        print("usage: spawn.py PROGRAM [ARG...]", file=sys.stderr)
        return 2
    null = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=null)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    print(f"{seconds:.6f} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
