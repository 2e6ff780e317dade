"""The supervisor's worker processes: one per slot, started, watched and restarted.

A :class:`WorkerPool` runs one loop per :class:`Slot`: spawn the worker
(:mod:`surefetch.supervisor.worker`), wait for its handshake, heartbeat it
until it exits (killing it when it hangs), then restart it after a backoff
delay, or leave the slot stopped after a permanent exit. It speaks to each
worker in JSON lines over the worker's stdin and stdout.

What the jobs make of it (claims, cancels, crash counts) is the supervisor's
business: the pool tells it through :class:`SlotEvents`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from surefetch._log import get_logger
from surefetch._procs import send_signal
from surefetch.supervisor.config import SupervisorConfig
from surefetch.supervisor.control import MAX_LINE, PROTOCOL
from surefetch.supervisor.worker import EXIT_CONFIG

__all__ = ["PERMANENT_EXITS", "Slot", "SlotEvents", "WorkerPool", "describe_exit"]

log = get_logger("surefetch.supervisor")

#: Exit codes after which a worker is not restarted: restarting cannot help.
PERMANENT_EXITS = {2: "usage error", EXIT_CONFIG: "bad configuration"}
#: Seconds a dead worker's last events are waited for before its death is handled.
EVENTS_DRAIN = 1.0


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_exit(code: int) -> str:
    """A process's exit status in words: ``exited 3``, ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"


@dataclass
class Slot:
    """One worker slot: its current process and its restart bookkeeping.

    ``jobs`` (the jobs assigned to it), ``waiting`` (those its worker took and holds,
    not yet running) and ``cancel_on_exit`` (jobs whose cancel is why the supervisor
    stops it) are kept by the supervisor.
    """

    id: str
    state: str = "starting"  # starting, running, backoff, stopping, stopped
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    failures: int = 0  # consecutive, reset after a stable period
    failure_times: deque[float] = field(default_factory=deque)
    degraded: bool = False
    next_restart: float | None = None  # wall-clock time
    last_delay: float = 0.0
    reason: str | None = None  # why it last died, or why it is stopped
    ready_since: float | None = None  # monotonic
    last_pong: float = 0.0
    kill_reason: str | None = None  # set when the supervisor kills it (hung, cancel timeout)
    hello: asyncio.Future[int] | None = None
    last_stderr: str = ""
    jobs: list[str] = field(default_factory=list)
    waiting: set[str] = field(default_factory=set)
    cancel_on_exit: set[str] = field(default_factory=set)
    #: Reads the current worker's events; its end means every event was heard.
    events_read: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The worker's pid while its process lives."""
        return None if self.proc is None or self.proc.returncode is not None else self.proc.pid

    @property
    def running(self) -> bool:
        """True while a worker that answered its handshake runs in this slot."""
        return self.state == "running" and self.pid is not None

    def public_state(self) -> str:
        """The state ``list-workers`` shows: ``degraded`` while a degraded slot retries."""
        if self.degraded and self.state in ("starting", "backoff"):
            return "degraded"
        return self.state

    def to_dict(self) -> dict[str, Any]:
        """The slot for ``ctl list-workers --json``."""
        return {
            "id": self.id,
            "kind": "download",
            "pid": self.pid,
            "state": self.public_state(),
            "restarts": self.restarts,
            "failures": self.failures,
            "degraded": self.degraded,
            "next_restart": _iso(self.next_restart),
            "last_delay_s": round(self.last_delay, 6),
            "reason": self.reason,
            "jobs": list(self.jobs),
        }


class SlotEvents(Protocol):
    """What the supervisor hears from its worker pool."""

    def worker_ready(self, slot: Slot) -> None:
        """A worker answered its handshake: it can take jobs."""

    def jobs_taken(self, slot: Slot, job_ids: list[str]) -> None:
        """A worker took these jobs for itself (started in the store); they wait for a
        place in it until it reports each one started."""

    def job_started(self, slot: Slot, job_id: str) -> None:
        """A worker reported one of its jobs running (the store marks it running)."""

    def job_finished(self, slot: Slot, job_id: str) -> None:
        """A worker reported one of its jobs finished (it recorded how in the store)."""

    async def worker_exited(self, slot: Slot, permanent: bool) -> None:
        """A worker died; ``permanent``: its slot is stopped and will not be restarted.

        ``slot.reason``, ``slot.failures`` and ``slot.degraded`` already account for it.
        """


class WorkerPool:
    """The worker processes of one supervisor, one per slot (``w0``, ``w1``...).

    Args:
        config: the supervisor's configuration (timings, backoff, worker command).
        host: the host id the workers run jobs for.
        db_url: the store the workers open (``$SUREFETCH_DB`` in their environment).
        events: told of handshakes, finished jobs and deaths.
    """

    def __init__(
        self, config: SupervisorConfig, host: str, db_url: str, events: SlotEvents
    ) -> None:
        self.config = config
        self.host = host
        self.db_url = db_url
        self.events = events
        self.slots = [Slot(f"w{i}") for i in range(config.workers)]
        #: Set by :meth:`stop_all`: no more restarts, no more kills of hung workers.
        self.stopping = False
        self._rng = random.Random()
        self._background: set[asyncio.Task[Any]] = set()

    # -- messages to workers --

    def send(self, slot: Slot, message: Mapping[str, Any]) -> None:
        """Writes one command to the slot's worker, if it has a live one."""
        proc = slot.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError, OSError):
            proc.stdin.write((json.dumps(message) + "\n").encode())

    @staticmethod
    def kill(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
        """Signals a worker's process group (SIGKILL unless told otherwise) while it lives."""
        if proc.returncode is None:
            send_signal(proc.pid, sig)

    async def terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM, then SIGKILL after the stop grace period."""
        self.kill(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.stop_grace)
        except asyncio.TimeoutError:
            self.kill(proc, signal.SIGKILL)
            await proc.wait()

    def stop_worker(self, slot: Slot, reason: str) -> None:
        """Stops the slot's worker in the background (SIGTERM, then SIGKILL); it is restarted
        like one that died, with ``reason`` as the cause."""
        if slot.proc is None:
            return
        slot.kill_reason = reason
        log.warning("worker %s %s; stopping it", slot.id, reason)
        self._spawn_task(self.terminate(slot.proc))

    async def stop_all(self) -> None:
        """Stops every worker: ``stop`` (they cancel their jobs, keeping the parts), then
        SIGTERM and SIGKILL for those still there after the stop grace period."""
        self.stopping = True
        procs = [slot.proc for slot in self.slots if slot.proc is not None]
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.state = "stopping"
                self.send(slot, {"op": "stop"})
        alive = [p for p in procs if p.returncode is None]
        if alive:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in alive], timeout=self.config.stop_grace
            )
            if pending:
                await asyncio.gather(*(self.terminate(p) for p in alive if p.returncode is None))
        for slot in self.slots:
            slot.state = "stopped"

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- one slot's life --

    async def run_slot(self, slot: Slot) -> None:
        """Keeps a worker running in ``slot`` until the pool stops or the slot is stopped."""
        while not self.stopping:
            delay = self.config.backoff.delay(slot.failures, self._rng)
            if delay > 0:
                slot.state = "backoff"
                slot.last_delay = delay
                slot.next_restart = time.time() + delay
                log.warning(
                    "worker %s %s; restarting in %.2fs%s",
                    slot.id,
                    slot.reason,
                    delay,
                    " (degraded)" if slot.degraded else "",
                )
                await asyncio.sleep(delay)
                if self.stopping:
                    return
            outcome = await self._start(slot)
            if outcome == "stopped":
                return
            if outcome == "failed":
                continue
            code = await self._supervise_process(slot)
            if self.stopping:
                return
            if await self._on_exit(slot, code):
                return

    def _worker_command(self, slot: Slot) -> list[str]:
        base = list(self.config.worker_command or (sys.executable, "-m", "surefetch.worker"))
        return [*base, "--slot", slot.id, "--host-id", self.host, "--parent-pid", str(os.getpid())]

    async def _start(self, slot: Slot) -> str:
        """Spawns the slot's worker and waits for its handshake.

        Returns:
            ``"ready"``, ``"failed"`` (to be retried) or ``"stopped"`` (not restarted).
        """
        if slot.proc is not None or slot.failures:
            slot.restarts += 1
        slot.state = "starting"
        slot.next_restart = None
        slot.kill_reason = None
        slot.ready_since = None
        env = dict(os.environ, SUREFETCH_DB=self.db_url, SUREFETCH_HOST_ID=self.host)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._worker_command(slot),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                limit=MAX_LINE,
            )
        except OSError as exc:
            slot.reason = f"could not be started: {exc}"
            self._count_failure(slot)
            return "failed"
        slot.proc = proc
        slot.hello = asyncio.get_running_loop().create_future()
        slot.events_read = self._spawn_task(self._read_events(slot, proc))
        self._spawn_task(self._read_stderr(slot, proc))
        hello = {
            "op": "hello",
            "protocol": PROTOCOL,
            "claim_ttl": self.config.claim_ttl,
            "jobs_per_worker": self.config.jobs_per_worker,
        }
        self.send(slot, hello)
        exited = asyncio.ensure_future(proc.wait())
        try:
            done, _ = await asyncio.wait(
                {slot.hello, exited},
                timeout=self.config.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not exited.done():
                exited.cancel()
        if slot.hello.done() and not slot.hello.cancelled():
            slot.state = "running"
            slot.ready_since = time.monotonic()
            slot.last_pong = slot.ready_since
            slot.reason = None
            log.info("worker %s ready (pid %d)", slot.id, proc.pid)
            self.events.worker_ready(slot)
            return "ready"
        if not done:
            slot.kill_reason = f"did not answer the handshake within {self.config.start_timeout:g}s"
            self.kill(proc)
        code = await proc.wait()
        if self.stopping:
            return "failed"
        return "stopped" if await self._on_exit(slot, code) else "failed"

    async def _supervise_process(self, slot: Slot) -> int:
        """Heartbeats a ready worker until its process exits; returns the exit code."""
        proc = slot.proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())
        seq = 0
        while not exited.done():
            seq += 1
            self.send(slot, {"op": "ping", "seq": seq})
            await asyncio.wait({exited}, timeout=self.config.heartbeat_interval)
            if exited.done():
                break
            now = time.monotonic()
            silent = now - slot.last_pong
            hung = silent > self.config.heartbeat_timeout
            if hung and slot.kill_reason is None and not self.stopping:
                slot.kill_reason = kill = f"hung: no answer to heartbeats for {silent:.1f}s"
                log.warning("worker %s (pid %d) %s; killing it", slot.id, proc.pid, kill)
                self.kill(proc)
            if (
                slot.ready_since is not None
                and now - slot.ready_since >= self.config.stable_after
                and (slot.failures or slot.degraded)
            ):
                log.info("worker %s stable: backoff reset", slot.id)
                slot.failures = 0
                slot.degraded = False
                slot.failure_times.clear()
        return await exited

    async def _on_exit(self, slot: Slot, code: int) -> bool:
        """Records why a worker died. True when the slot must not be restarted."""
        died_at = time.monotonic()
        if slot.events_read is not None:
            # What it said before dying (which jobs ran) decides what its death counts
            # against: hear it all first. Its stdout ends with it (bounded, in case a
            # child of its own still holds the pipe).
            await asyncio.wait({slot.events_read}, timeout=EVENTS_DRAIN)
        slot.state = "backoff"
        detail = f": {slot.last_stderr}" if slot.last_stderr and code != -signal.SIGKILL else ""
        if slot.kill_reason is None and code in PERMANENT_EXITS:
            slot.state = "stopped"
            slot.reason = f"{describe_exit(code)} ({PERMANENT_EXITS[code]}); not restarted{detail}"
            log.error("worker %s %s", slot.id, slot.reason)
            await self.events.worker_exited(slot, permanent=True)
            return True
        stable = (
            slot.ready_since is not None and died_at - slot.ready_since >= self.config.stable_after
        )
        if stable:
            slot.failures = 0
            slot.degraded = False
            slot.failure_times.clear()
        slot.reason = slot.kill_reason or f"{describe_exit(code)}{detail}"
        self._count_failure(slot)
        await self.events.worker_exited(slot, permanent=False)
        return False

    def _count_failure(self, slot: Slot) -> None:
        now = time.monotonic()
        slot.failures += 1
        slot.failure_times.append(now)
        while slot.failure_times and slot.failure_times[0] < now - self.config.degraded_window:
            slot.failure_times.popleft()
        if len(slot.failure_times) >= self.config.degraded_after and not slot.degraded:
            slot.degraded = True
            log.error(
                "worker %s degraded: %d failures in %gs; retrying every %gs",
                slot.id,
                len(slot.failure_times),
                self.config.degraded_window,
                self.config.backoff.cap,
            )

    # -- what workers say --

    async def _read_events(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, ConnectionError):
                break
            if not line:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if slot.proc is not proc or not isinstance(event, dict):
                continue
            kind = event.get("event")
            if kind == "pong":
                slot.last_pong = time.monotonic()
            elif kind == "hello" and slot.hello is not None and not slot.hello.done():
                slot.hello.set_result(int(event.get("pid", proc.pid)))
            elif kind == "taken":
                ids = event.get("ids")
                self.events.jobs_taken(slot, [str(i) for i in ids] if isinstance(ids, list) else [])
            elif kind == "started":
                self.events.job_started(slot, str(event.get("id")))
            elif kind == "finished":
                self.events.job_finished(slot, str(event.get("id")))

    async def _read_stderr(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            try:
                line = await proc.stderr.readline()
            except (ValueError, ConnectionError):
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                slot.last_stderr = text[-500:]
                print(f"[{slot.id} {proc.pid}] {text}", file=sys.stderr, flush=True)
