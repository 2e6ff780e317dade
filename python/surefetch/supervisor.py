"""The supervisor: runs jobs in worker processes and restarts the ones that die.

``surefetch supervise --socket PATH`` owns N worker processes
(:mod:`surefetch.worker`) and a Unix control socket (mode 0600) speaking JSON
lines; ``surefetch ctl`` is its client (:func:`request`).

- **Desired state lives in the store.** Jobs (:mod:`surefetch.store.jobs`) are
  claimed from the session store and assigned to worker slots. A (re)started
  worker pulls every job assigned to its slot and converges, so nothing is
  replayed and nothing is lost with a process; its downloads resume from their
  part files.
- **Readiness and liveness.** A worker counts as started once it answers the
  handshake (its store is open); a heartbeat catches a hung one, which is killed
  and counted as a failure.
- **Restarts with backoff.** Delays grow from ``initial`` by ``factor`` up to
  ``cap``, each scaled by a random factor in ``[1 - jitter, 1]`` (so the sequence
  still grows), and reset once a worker stayed up ``stable_after`` seconds.
  ``degraded_after`` failures within ``degraded_window`` seconds make the slot
  ``degraded``: it keeps retrying at the cap, and its jobs go to the other
  workers. A worker exiting 78 (bad configuration) or 2 (usage) is not restarted;
  the slot is ``stopped`` with the reason.
- **Cancellation.** A cancel reaches the job's token in its worker first; if the
  worker has not finished the job ``cancel_grace`` seconds later, the worker is
  stopped (SIGTERM, then SIGKILL) and restarted without it.
- **Shutdown.** SIGTERM, SIGINT or ``ctl shutdown``: stop accepting work, stop the
  workers' jobs (their part files are kept), stop the workers (SIGTERM then
  SIGKILL after ``stop_grace``), put their unfinished jobs back in the queue,
  remove the socket. If the supervisor is killed, its workers exit with it
  (parent-death signal, and EOF on their command pipe), and the next supervisor
  with the same host id takes over the unfinished jobs at once.
- **Many hosts.** Supervisors with different host ids can share a PostgreSQL
  store: each job is claimed by one of them, claims are heartbeated, and the jobs
  of a host whose claims expired are re-queued for the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import json
import logging
import math
import os
import pwd
import random
import signal
import socket
import stat
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from surefetch._procs import host_id, send_signal
from surefetch.errors import NotOwner, SessionNotFound, SurefetchError
from surefetch.store import JobQueue, SessionStore
from surefetch.worker import EXIT_CONFIG

__all__ = ["Backoff", "Supervisor", "SupervisorConfig", "request"]

log = logging.getLogger("surefetch.supervisor")

T = TypeVar("T")

PROTOCOL = 1
PERMANENT_EXITS = {2: "usage error", EXIT_CONFIG: "bad configuration"}
_MAX_LINE = 1 << 20


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``initial * factor**(n-1)`` capped at ``cap``, times a random
    factor in ``[1 - jitter, 1]``, for the n-th consecutive failure."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("initial", "cap"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"backoff {name} must be a non-negative number of seconds")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError("backoff factor must be at least 1")
        if not (0 <= self.jitter < 0.5):
            raise ValueError("backoff jitter must be in [0, 0.5) so that delays still grow")

    def delay(self, failures: int, rng: random.Random) -> float:
        if failures <= 0:
            return 0.0
        exponent = min(failures - 1, 64)
        base = min(self.cap, self.initial * self.factor**exponent)
        return base * (1.0 - self.jitter * rng.random())


@dataclass(frozen=True)
class SupervisorConfig:
    """Everything ``surefetch supervise`` can be told. Times are in seconds."""

    socket: Path
    workers: int = 2
    jobs_per_worker: int = 4
    db: str | None = None
    host: str | None = None
    backoff: Backoff = field(default_factory=Backoff)
    stable_after: float = 10.0
    degraded_after: int = 5
    degraded_window: float = 60.0
    start_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    cancel_grace: float = 5.0
    stop_grace: float = 5.0
    claim_ttl: float = 10.0
    poll_interval: float = 0.2
    max_job_crashes: int = 3
    worker_command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.jobs_per_worker < 1:
            raise ValueError("workers and jobs per worker must be at least 1")
        if self.degraded_after < 1 or self.max_job_crashes < 1:
            raise ValueError("degraded-after and max job crashes must be at least 1")
        for name in (
            "stable_after",
            "degraded_window",
            "start_timeout",
            "heartbeat_interval",
            "heartbeat_timeout",
            "cancel_grace",
            "stop_grace",
            "claim_ttl",
            "poll_interval",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number of seconds")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("the heartbeat timeout must be longer than the heartbeat interval")


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"


@dataclass
class _Slot:
    """One worker slot: its current process and its restart bookkeeping."""

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
    cancel_on_exit: set[str] = field(default_factory=set)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None or self.proc.returncode is not None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.state == "running" and self.pid is not None

    def public_state(self) -> str:
        if self.degraded and self.state in ("starting", "backoff"):
            return "degraded"
        return self.state

    def to_dict(self) -> dict[str, Any]:
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


class Supervisor:
    """Runs ``config.workers`` worker processes over the jobs of a session store.

    Use :meth:`run` (blocking; returns the exit code) from a command line, or build
    it with a :class:`SupervisorConfig` in tests and call :meth:`run` in a process.
    """

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.host = config.host or host_id()
        self.socket_path = Path(os.path.abspath(config.socket))
        self.slots = [_Slot(f"w{i}") for i in range(config.workers)]
        self._rng = random.Random()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self._stopping = False
        self._exit_code = 0
        self._stop_requested: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._cancel_deadlines: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._store: SessionStore | None = None
        self._queue: JobQueue | None = None
        self._last_claim_beat = 0.0
        self._full_round = False
        self._background: set[asyncio.Task[Any]] = set()

    # -- entry point --

    def run(self) -> int:
        """Runs until SIGTERM, SIGINT or ``shutdown``; returns the exit code (0, or 130
        after SIGINT).

        Raises:
            SurefetchError: the store cannot be opened, the socket is taken, or another
                supervisor holds this host id.
        """
        self._store = SessionStore(self.config.db)
        self._queue = JobQueue(self._store)
        try:
            self._take_socket_lock()
            try:
                self._queue.register_supervisor(self.host, str(self.socket_path), self.ttl)
                try:
                    asyncio.run(self._main())
                finally:
                    with contextlib.suppress(Exception):
                        self._queue.unregister_supervisor(self.host)
            finally:
                self._release_socket_lock()
        finally:
            self._executor.shutdown(wait=True)
            self._store.close()
        return self._exit_code

    @property
    def ttl(self) -> float:
        return self.config.claim_ttl

    @property
    def queue(self) -> JobQueue:
        assert self._queue is not None
        return self._queue

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a store call on the store thread, keeping the event loop responsive."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        # A previous supervisor with this host id is gone (register_supervisor checked):
        # its unfinished jobs go back to the queue, to be claimed again.
        taken = await self._db(self.queue.requeue_host, self.host)
        if taken:
            log.info("took back %d unfinished job(s) of a previous supervisor", len(taken))
        server = await self._listen()
        for signum, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
            loop.add_signal_handler(signum, self.request_stop, code)
        log.info(
            "supervising %d worker(s) as host %s on %s",
            len(self.slots),
            self.host,
            self.socket_path,
        )
        tasks = [asyncio.create_task(self._run_slot(slot)) for slot in self.slots]
        tasks.append(asyncio.create_task(self._tick_loop()))
        try:
            await self._stop_requested.wait()
        finally:
            self._stopping = True
            server.close()
            await self._stop_workers()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            requeued = await self._db(self.queue.requeue_host, self.host)
            if requeued:
                log.info("put %d unfinished job(s) back in the queue", len(requeued))
            with contextlib.suppress(Exception):
                await self._db(self.queue.unregister_supervisor, self.host)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            self._release_socket_lock()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            log.info("stopped")
            self._stopped.set()
            await asyncio.sleep(0.05)  # lets a `shutdown` client get its answer

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def request_stop(self, code: int = 0) -> None:
        if self._stop_requested is not None and not self._stop_requested.is_set():
            self._exit_code = code
            log.info("stopping: cancelling jobs (their parts are kept), stopping workers")
            self._stop_requested.set()

    # -- the control socket --

    def _take_socket_lock(self) -> None:
        lock_path = str(self.socket_path) + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SurefetchError(
                f"cannot create {lock_path} ({exc.strerror}); choose a --socket in a "
                "directory you can write"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SurefetchError(
                f"another supervisor is running on {self.socket_path}; stop it with "
                f"`surefetch ctl --socket {self.socket_path} shutdown` or choose another --socket"
            ) from None
        self._lock_fd = fd
        if self.socket_path.exists() or self.socket_path.is_symlink():
            mode = self.socket_path.lstat().st_mode
            if not stat.S_ISSOCK(mode):
                raise SurefetchError(
                    f"{self.socket_path} exists and is not a socket; choose another --socket"
                )
            self.socket_path.unlink()  # left by a supervisor that died: we hold the lock

    def _release_socket_lock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(self.socket_path) + ".lock")
        os.close(self._lock_fd)
        self._lock_fd = None

    async def _listen(self) -> asyncio.AbstractServer:
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(
                self._client, path=str(self.socket_path), limit=_MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        return server

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            user = _peer_user(writer.get_extra_info("socket"))
            if user is None:
                await _reply(writer, _error("only the supervisor's own user (or root) may use it"))
                return
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    await _reply(writer, _error("request too long", 2))
                    return
                if not line:
                    return
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    await _reply(writer, _error(f"a request must be one JSON object: {exc}", 2))
                    continue
                await _reply(writer, await self._dispatch(message, user))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, message: Mapping[str, Any], user: str) -> dict[str, Any]:
        op = message.get("op")
        try:
            if op == "list-workers":
                return {"ok": True, "workers": [slot.to_dict() for slot in self.slots]}
            if op == "jobs":
                jobs = await self._db(self.queue.list, user)
                return {"ok": True, "jobs": [job.to_dict(self.host) for job in jobs]}
            if op == "submit":
                return await self._submit(message, user)
            if op == "cancel":
                return await self._cancel(message.get("id"), user)
            if op == "shutdown":
                self.request_stop(0)
                assert self._stopped is not None
                await self._stopped.wait()
                return {"ok": True}
            if op == "ping":
                return {"ok": True, "protocol": PROTOCOL, "host": self.host, "pid": os.getpid()}
        except SurefetchError as exc:
            return _error(str(exc))
        known = "list-workers, jobs, submit, cancel, shutdown"
        return _error(f"unknown request {op!r}; use {known}", 2)

    async def _submit(self, message: Mapping[str, Any], user: str) -> dict[str, Any]:
        """One job (``kind``, ``spec``) or a batch (``jobs``: a list of them), all or none."""
        if self._stopping:
            return _error("the supervisor is shutting down and takes no new jobs; submit later")
        batch = message.get("jobs")
        items = batch if isinstance(batch, list) else [message]
        jobs: list[tuple[str, dict[str, Any]]] = []
        for item in items:
            spec = item.get("spec") if isinstance(item, dict) else None
            if not isinstance(spec, dict):
                return _error("each job to submit needs a kind and a spec object", 2)
            jobs.append((str(item.get("kind")), spec))
        try:
            ids = await self._db(self.queue.submit_many, user, jobs)
        except (ValueError, TypeError) as exc:
            return _error(str(exc), 2)
        self._poke()
        return {"ok": True, "ids": ids} if isinstance(batch, list) else {"ok": True, "id": ids[0]}

    async def _cancel(self, job_id: object, user: str) -> dict[str, Any]:
        if not isinstance(job_id, str):
            return _error("cancel needs a job id", 2)
        assert self._store is not None
        try:
            changed = await self._db(self._store.request_cancel, job_id, user)
        except (SessionNotFound, NotOwner) as exc:
            return _error(str(exc))
        self._poke(full=True)
        return {"ok": True, "changed": changed}

    # -- worker slots --

    async def _run_slot(self, slot: _Slot) -> None:
        while not self._stopping:
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
                if self._stopping:
                    return
            outcome = await self._start(slot)
            if outcome == "stopped":
                return
            if outcome == "failed":
                continue
            code = await self._supervise_process(slot)
            if self._stopping:
                return
            if await self._on_exit(slot, code):
                return

    def _worker_command(self, slot: _Slot) -> list[str]:
        base = list(self.config.worker_command or (sys.executable, "-m", "surefetch.worker"))
        return [*base, "--slot", slot.id, "--host-id", self.host, "--parent-pid", str(os.getpid())]

    async def _start(self, slot: _Slot) -> str:
        """Spawns the slot's worker and waits for its handshake.

        Returns:
            ``"ready"``, ``"failed"`` (to be retried) or ``"stopped"`` (not restarted).
        """
        assert self._store is not None
        if slot.proc is not None or slot.failures:
            slot.restarts += 1
        slot.state = "starting"
        slot.next_restart = None
        slot.kill_reason = None
        slot.ready_since = None
        env = dict(os.environ, SUREFETCH_DB=self._store.url, SUREFETCH_HOST_ID=self.host)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._worker_command(slot),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                limit=_MAX_LINE,
            )
        except OSError as exc:
            slot.reason = f"could not be started: {exc}"
            self._count_failure(slot)
            return "failed"
        slot.proc = proc
        slot.hello = asyncio.get_running_loop().create_future()
        self._spawn_task(self._read_events(slot, proc))
        self._spawn_task(self._read_stderr(slot, proc))
        self._send(slot, {"op": "hello", "protocol": PROTOCOL})
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
            self._poke()
            return "ready"
        if not done:
            slot.kill_reason = f"did not answer the handshake within {self.config.start_timeout:g}s"
            self._kill(proc)
        code = await proc.wait()
        if self._stopping:
            return "failed"
        return "stopped" if await self._on_exit(slot, code) else "failed"

    async def _supervise_process(self, slot: _Slot) -> int:
        """Heartbeats a ready worker until its process exits; returns the exit code."""
        proc = slot.proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())
        seq = 0
        while not exited.done():
            seq += 1
            self._send(slot, {"op": "ping", "seq": seq})
            await asyncio.wait({exited}, timeout=self.config.heartbeat_interval)
            if exited.done():
                break
            now = time.monotonic()
            silent = now - slot.last_pong
            hung = silent > self.config.heartbeat_timeout
            if hung and slot.kill_reason is None and not self._stopping:
                slot.kill_reason = kill = f"hung: no answer to heartbeats for {silent:.1f}s"
                log.warning("worker %s (pid %d) %s; killing it", slot.id, proc.pid, kill)
                self._kill(proc)
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

    async def _on_exit(self, slot: _Slot, code: int) -> bool:
        """Records why a worker died. True when the slot must not be restarted."""
        died_at = time.monotonic()
        slot.state = "backoff"
        detail = f": {slot.last_stderr}" if slot.last_stderr and code != -signal.SIGKILL else ""
        if slot.kill_reason is None and code in PERMANENT_EXITS:
            slot.state = "stopped"
            slot.reason = f"{describe_exit(code)} ({PERMANENT_EXITS[code]}); not restarted{detail}"
            log.error("worker %s %s", slot.id, slot.reason)
            await self._release_jobs(slot)
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
        # Jobs it was told to cancel are done with first: their stop is why it died.
        for job_id in list(slot.cancel_on_exit):
            assert self._store is not None
            await self._db(self._store.mark_cancelled, job_id)
            self._cancel_deadlines.pop(job_id, None)
        slot.cancel_on_exit.clear()
        failed = await self._db(
            self.queue.record_crash, self.host, slot.id, self.config.max_job_crashes
        )
        for job_id in failed:
            log.error("job %s failed: its worker died while running it too often", job_id)
        if slot.degraded:
            await self._release_jobs(slot)
        return False

    def _count_failure(self, slot: _Slot) -> None:
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

    async def _release_jobs(self, slot: _Slot) -> None:
        """Gives a slot's jobs to the other workers (it is degraded or stopped)."""
        ids = await self._db(self.queue.requeue_host, self.host, slot.id)
        slot.jobs = []
        if ids:
            log.warning("worker %s: %d job(s) handed to the other workers", slot.id, len(ids))
            self._poke()

    async def _read_events(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
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
            elif kind == "finished":
                job_id = str(event.get("id"))
                self._cancel_deadlines.pop(job_id, None)
                if job_id in slot.jobs:
                    slot.jobs.remove(job_id)
                self._poke()

    async def _read_stderr(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
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

    def _send(self, slot: _Slot, message: Mapping[str, Any]) -> None:
        proc = slot.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError, OSError):
            proc.stdin.write((json.dumps(message) + "\n").encode())

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
        if proc.returncode is None:
            send_signal(proc.pid, sig)

    # -- the periodic round: claims, cancellations, heartbeats --

    def _poke(self, full: bool = False) -> None:
        """Runs a round soon: a light one (claims) or, after a cancel, a full one."""
        self._full_round = self._full_round or full
        if self._wake is not None:
            self._wake.set()

    async def _tick_loop(self) -> None:
        assert self._wake is not None
        full = True
        while not self._stopping:
            self._wake.clear()
            self._full_round = False
            try:
                await self._tick(full)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervisor round failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
                full = self._full_round
            except asyncio.TimeoutError:
                full = True

    async def _tick(self, full: bool = True) -> None:
        """One round: claims for the free worker slots. A full round (every poll interval,
        and after a cancel) first heartbeats, re-queues and delivers cancellations."""
        q = self.queue
        if full and not await self._housekeeping():
            return
        by_slot: dict[str, list[str]] = {slot.id: [] for slot in self.slots}
        for job in await self._db(q.assigned, self.host):
            by_slot.setdefault(job.worker or "", []).append(job.id)
        for slot in self.slots:
            slot.jobs = by_slot.get(slot.id, [])
        if self._stopping:
            return
        free = {
            slot.id: self.config.jobs_per_worker - len(slot.jobs)
            for slot in self.slots
            if slot.running
        }
        got = await self._db(q.claim, self.host, free, self.ttl)
        for slot in self.slots:
            if slot.id in got:
                slot.jobs.extend(got[slot.id])
                self._send(slot, {"op": "sync"})

    async def _housekeeping(self) -> bool:
        """Heartbeats, re-queues of silent hosts, cancellations. False: stop, the host id
        was taken over."""
        q = self.queue
        now = time.monotonic()
        if now - self._last_claim_beat >= self.ttl / 4:
            self._last_claim_beat = now
            if not await self._db(q.supervisor_heartbeat, self.host):
                log.error("another supervisor took host id %s; stopping", self.host)
                self.request_stop(1)
                return False
            await self._db(q.heartbeat, self.host, self.ttl)
            expired = await self._db(q.requeue_expired, self.host)
            if expired:
                log.warning("re-queued %d job(s) of a silent host", len(expired))
        await self._db(q.cancel_queued)
        await self._deliver_cancels()
        return True

    async def _deliver_cancels(self) -> None:
        requested = await self._db(self.queue.cancel_requested, self.host)
        now = time.monotonic()
        slots = {slot.id: slot for slot in self.slots}
        for job in requested:
            slot = slots.get(job.worker or "")
            if slot is None:
                continue
            if job.state == "queued" or not slot.running:
                # Not running in any process (assigned but not started, or its worker is
                # dead or not ready yet): it never will be, attach refuses it.
                assert self._store is not None
                await self._db(self._store.mark_cancelled, job.id)
                continue
            deadline = self._cancel_deadlines.get(job.id)
            if deadline is None:
                self._cancel_deadlines[job.id] = now + self.config.cancel_grace
                self._send(slot, {"op": "cancel", "id": job.id})
            elif now >= deadline and job.id not in slot.cancel_on_exit and slot.proc is not None:
                slot.cancel_on_exit.add(job.id)
                slot.kill_reason = (
                    f"did not stop job {job.id} within {self.config.cancel_grace:g}s of its cancel"
                )
                log.warning("worker %s %s; stopping it", slot.id, slot.kill_reason)
                self._spawn_task(self._terminate(slot.proc))

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM, then SIGKILL after the stop grace period."""
        self._kill(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.stop_grace)
        except asyncio.TimeoutError:
            self._kill(proc, signal.SIGKILL)
            await proc.wait()

    async def _stop_workers(self) -> None:
        procs = [slot.proc for slot in self.slots if slot.proc is not None]
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                slot.state = "stopping"
                self._send(slot, {"op": "stop"})
        alive = [p for p in procs if p.returncode is None]
        if alive:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in alive], timeout=self.config.stop_grace
            )
            if pending:
                await asyncio.gather(*(self._terminate(p) for p in alive if p.returncode is None))
        for slot in self.slots:
            slot.state = "stopped"


def _error(message: str, exit_code: int = 1) -> dict[str, Any]:
    return {"ok": False, "error": message, "exit": exit_code}


async def _reply(writer: asyncio.StreamWriter, reply: Mapping[str, Any]) -> None:
    writer.write((json.dumps(reply) + "\n").encode())
    await writer.drain()


def _peer_user(sock: socket.socket | None) -> str | None:
    """The name of the user at the other end, if it is this process's user or root."""
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (os.getuid(), 0):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --- the client ---------------------------------------------------------------------------


def request(
    socket_path: str | os.PathLike[str], message: Mapping[str, Any], timeout: float = 30.0
) -> dict[str, Any]:
    """Sends one request to a supervisor and returns its answer.

    Raises:
        SurefetchError: no supervisor listens there, or it closed the connection.
    """
    path = os.fspath(socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise SurefetchError(
                f"no supervisor is listening on {path} ({exc.strerror}); start one with "
                f"`surefetch supervise --socket {path}`"
            ) from None
        except PermissionError:
            raise SurefetchError(
                f"permission denied on {path}: only the supervisor's user may use its socket"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise SurefetchError(f"{path} is not a supervisor's socket") from None
            raise SurefetchError(f"cannot connect to {path}: {exc.strerror}") from None
        sock.sendall((json.dumps(message) + "\n").encode())
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise SurefetchError(
                f"the supervisor on {path} did not answer within {timeout:g}s"
            ) from None
    if not data:
        raise SurefetchError(f"the supervisor on {path} closed the connection without answering")
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise SurefetchError(f"the supervisor on {path} sent an answer that is not an object")
    return reply
