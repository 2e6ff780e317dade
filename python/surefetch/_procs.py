"""Processes on this machine: host ids, pid start times (against pid reuse), liveness, signals.

Shared by the session store (which records a session's pid), the cancellation
enforcer and the supervisor (which signal processes). Linux: reads ``/proc``.
"""

from __future__ import annotations

import errno
import os

__all__ = ["host_id", "machine_name", "process_start_time", "process_state", "send_signal"]


def host_id() -> str:
    """This machine's host id: ``$SUREFETCH_HOST_ID``, else the hostname."""
    return os.environ.get("SUREFETCH_HOST_ID") or machine_name()


def machine_name() -> str:
    """The machine's own name (its hostname: `uname`'s node name, as gethostname(2)
    returns it on Linux), told apart from the configurable host id."""
    return os.uname().nodename


# This process's own start time (pid, ticks): it cannot change while we run, and a
# worker gives it with each of its group commits.
_own_start: tuple[int, int | None] | None = None


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to detect pid reuse.

    Returns:
        The start time, or None when there is no such process or /proc cannot say.
    """
    global _own_start
    if pid == os.getpid():
        if _own_start is None or _own_start[0] != pid:  # first use, or a forked child
            _own_start = (pid, _read_start_time(pid))
        return _own_start[1]
    return _read_start_time(pid)


def _read_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_state(pid: int, started: int | None) -> str:
    """``"gone"`` (no process, a zombie, or a new process reusing the pid) or ``"alive"``.

    Args:
        pid: the process id.
        started: its start time as :func:`process_start_time` recorded it, or None to
            accept whatever process has that pid now.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "gone"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "alive"
        return "alive"
    fields = data[data.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return "gone"
    if started is not None:
        try:
            if int(fields[19]) != started:
                return "gone"
        except (IndexError, ValueError):
            pass
    return "alive"


def send_signal(pid: int, sig: int) -> str:
    """Signals the process group ``pid`` leads, or only ``pid`` when it leads none.

    Never signals this process's own group.

    Args:
        pid: the process id.
        sig: the signal number.

    Returns:
        ``"sent"``, ``"gone"`` (ESRCH) or ``"refused"`` (EPERM).
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return "gone"
    try:
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        return "refused"
    except OSError as exc:  # pragma: no cover - other errnos are not expected from kill(2)
        if exc.errno == errno.ESRCH:
            return "gone"
        raise
    return "sent"
