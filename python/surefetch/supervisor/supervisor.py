"""The supervisor: runs jobs in worker processes and restarts the ones that die.

``surefetch supervise --socket PATH`` owns N worker processes
(:mod:`surefetch.supervisor.slots`, :mod:`surefetch.supervisor.worker`) and a
Unix control socket (mode 0600) speaking JSON lines
(:mod:`surefetch.supervisor.control`); ``surefetch ctl`` is its client.

- **Desired state lives in the store.** Jobs (:mod:`surefetch.store.jobs`) are
  claimed from the session store and assigned to worker slots. A (re)started
  worker pulls every job assigned to its slot and converges, so nothing is
  replayed and nothing is lost with a process; its downloads resume from their
  part files. While the queue lasts, a worker takes its next jobs itself, in the
  commits that record its jobs' ends; it runs ``jobs_per_worker`` at a time and
  keeps as many more started, ready to run
  (:mod:`surefetch.supervisor.worker`).
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
- **Cancellation.** The supervisor is its host's enforcer for the jobs it runs
  (a :class:`~surefetch.store.enforcer.CancellationEnforcer` leaves them alone:
  their pid is the worker's). A cancel reaches the job's token in its worker
  first; if the worker has not finished the job ``cancel_grace`` seconds later,
  the worker is stopped (SIGTERM, then SIGKILL) and restarted without it.
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
import functools
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from surefetch._log import get_logger
from surefetch._procs import host_id
from surefetch.errors import NotOwner, SessionNotFound, SurefetchError
from surefetch.store import JobQueue, SessionStore, default_db_url
from surefetch.store.job_spec import JOB_STATES
from surefetch.supervisor.config import SupervisorConfig
from surefetch.supervisor.control import PROTOCOL, ControlServer, error_reply
from surefetch.supervisor.slots import Slot, WorkerPool
from surefetch.supervisor.waiters import Waiters

__all__ = ["Supervisor"]

log = get_logger("surefetch.supervisor")

T = TypeVar("T")


class Supervisor:
    """Runs ``config.workers`` worker processes over the jobs of a session store.

    Use :meth:`run` (blocking; returns the exit code) from a command line, or build
    it with a :class:`SupervisorConfig` in tests and call :meth:`run` in a process.
    """

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.host = config.host or host_id()
        self.db_url = config.db if config.db is not None else default_db_url()
        self.control = ControlServer(config.socket, self._dispatch)
        self.socket_path = self.control.path
        self.workers = WorkerPool(config, self.host, self.db_url, self)
        self.slots = self.workers.slots
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self._stopping = False
        self._exit_code = 0
        self._stop_requested: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._cancel_deadlines: dict[str, float] = {}
        self._store: SessionStore | None = None
        self._queue: JobQueue | None = None
        self._last_claim_beat = 0.0
        self._full_round = False
        self._waiters = Waiters()

    # -- entry point --

    def run(self) -> int:
        """Runs until SIGTERM, SIGINT or ``shutdown``; returns the exit code (0, or 130
        after SIGINT).

        Raises:
            SurefetchError: the store cannot be opened, the socket is taken, or another
                supervisor holds this host id.
        """
        self._store = SessionStore(self.db_url)
        self._queue = JobQueue(self._store)
        try:
            self.control.lock()
            try:
                self._queue.register_supervisor(self.host, str(self.socket_path), self.ttl)
                try:
                    asyncio.run(self._main())
                finally:
                    with contextlib.suppress(Exception):
                        self._queue.unregister_supervisor(self.host)
            finally:
                self.control.unlock()
        finally:
            self._executor.shutdown(wait=True)
            self._store.close()
        return self._exit_code

    @property
    def ttl(self) -> float:
        """Seconds a claim holds without a heartbeat."""
        return self.config.claim_ttl

    @property
    def queue(self) -> JobQueue:
        """The job queue (while :meth:`run` runs)."""
        assert self._queue is not None
        return self._queue

    @property
    def store(self) -> SessionStore:
        """The session store (while :meth:`run` runs)."""
        assert self._store is not None
        return self._store

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
        server = await self.control.listen()
        for signum, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
            loop.add_signal_handler(signum, self.request_stop, code)
        log.info(
            "supervising %d worker(s) as host %s on %s",
            len(self.slots),
            self.host,
            self.socket_path,
        )
        tasks = [asyncio.create_task(self.workers.run_slot(slot)) for slot in self.slots]
        tasks.append(asyncio.create_task(self._tick_loop()))
        try:
            await self._stop_requested.wait()
        finally:
            self._stopping = True
            server.close()
            await self.workers.stop_all()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            requeued = await self._db(self.queue.requeue_host, self.host)
            if requeued:
                log.info("put %d unfinished job(s) back in the queue", len(requeued))
            with contextlib.suppress(Exception):
                await self._db(self.queue.unregister_supervisor, self.host)
            self.control.close()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            log.info("stopped")
            self._stopped.set()
            await asyncio.sleep(0.05)  # lets a `shutdown` client get its answer

    def request_stop(self, code: int = 0) -> None:
        """Stops the supervisor soon; :meth:`run` then returns ``code``."""
        if self._stop_requested is not None and not self._stop_requested.is_set():
            self._exit_code = code
            log.info("stopping: cancelling jobs (their parts are kept), stopping workers")
            self._stop_requested.set()
            self._waiters.recheck()  # they answer that the supervisor stops

    # -- requests on the control socket --

    async def _dispatch(self, message: Mapping[str, Any], user: str) -> dict[str, Any]:
        op = message.get("op")
        try:
            if op == "list-workers":
                return {"ok": True, "workers": [slot.to_dict() for slot in self.slots]}
            if op == "jobs" and message.get("summary"):
                counts = await self._db(functools.partial(self.queue.counts, user))
                return {"ok": True, "counts": counts}
            if op == "jobs":
                state, limit = message.get("state"), message.get("limit")
                try:
                    jobs = await self._db(
                        functools.partial(self.queue.list, user, state=state, limit=limit)
                    )
                except ValueError as exc:
                    return error_reply(str(exc), 2)
                return {"ok": True, "jobs": [job.to_dict(self.host) for job in jobs]}
            if op == "submit":
                return await self._submit(message, user)
            if op == "cancel":
                return await self._cancel(message.get("id"), user)
            if op == "wait":
                return await self._wait(message, user)
            if op == "shutdown":
                self.request_stop(0)
                assert self._stopped is not None
                await self._stopped.wait()
                return {"ok": True}
            if op == "ping":
                return {"ok": True, "protocol": PROTOCOL, "host": self.host, "pid": os.getpid()}
        except SurefetchError as exc:
            return error_reply(str(exc))
        known = "list-workers, jobs, submit, cancel, wait, shutdown"
        return error_reply(f"unknown request {op!r}; use {known}", 2)

    async def _submit(self, message: Mapping[str, Any], user: str) -> dict[str, Any]:
        """One job (``kind``, ``spec``) or a batch (``jobs``: a list of them), all or none."""
        if self._stopping:
            return error_reply(
                "the supervisor is shutting down and takes no new jobs; submit later"
            )
        batch = message.get("jobs")
        items = batch if isinstance(batch, list) else [message]
        jobs: list[tuple[str, dict[str, Any]]] = []
        for item in items:
            spec = item.get("spec") if isinstance(item, dict) else None
            if not isinstance(spec, dict):
                return error_reply("each job to submit needs a kind and a spec object", 2)
            jobs.append((str(item.get("kind")), spec))
        try:
            ids = await self._db(self.queue.submit_many, user, jobs)
        except (ValueError, TypeError) as exc:
            return error_reply(str(exc), 2)
        self._poke()
        return {"ok": True, "ids": ids} if isinstance(batch, list) else {"ok": True, "id": ids[0]}

    async def _cancel(self, job_id: object, user: str) -> dict[str, Any]:
        if not isinstance(job_id, str):
            return error_reply("cancel needs a job id", 2)
        try:
            changed = await self._db(self.store.request_cancel, job_id, user)
        except (SessionNotFound, NotOwner) as exc:
            return error_reply(str(exc))
        self._poke(full=True)
        return {"ok": True, "changed": changed}

    async def _wait(self, message: Mapping[str, Any], user: str) -> dict[str, Any]:
        """Answers once every job of ``ids`` (the user's) is finished, or after
        ``timeout`` seconds (no limit when absent): ``done`` says which, ``counts`` how
        many of those jobs are in each state."""
        ids, timeout = message.get("ids"), message.get("timeout")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return error_reply("wait needs the ids of one or more jobs", 2)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
        ):
            return error_reply(f"timeout must be a number of seconds >= 0, not {timeout!r}", 2)
        wanted = list(dict.fromkeys(ids))

        async def states_of(job_ids: Sequence[str]) -> dict[str, str]:
            return await self._db(self.queue.states, job_ids, user)

        try:
            states, done = await self._waiters.wait(
                wanted, states_of, timeout, self._stop_requested_set
            )
        except KeyError as exc:
            return error_reply(f"no job {exc.args[0]} of yours: see `surefetch ctl jobs`")
        if not done and self._stop_requested_set():
            return error_reply(
                "the supervisor is stopping before the jobs finished; the unfinished ones "
                "go back to the queue and resume when a supervisor runs again"
            )
        counts = dict.fromkeys(JOB_STATES, 0)
        for state in states.values():
            counts[state] += 1
        return {"ok": True, "done": done, "counts": counts}

    def _stop_requested_set(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.is_set()

    # -- what the worker pool tells (SlotEvents) --

    def worker_ready(self, slot: Slot) -> None:
        """A new worker can take jobs: claim some for it soon."""
        self._poke()

    def jobs_taken(self, slot: Slot, job_ids: list[str]) -> None:
        """A worker took jobs for itself; they wait in it for a place."""
        for job_id in job_ids:
            if job_id not in slot.jobs:
                slot.jobs.append(job_id)
            slot.waiting.add(job_id)

    def job_started(self, slot: Slot, job_id: str) -> None:
        """A worker runs a job (perhaps one it took for itself)."""
        if job_id not in slot.jobs:
            slot.jobs.append(job_id)
        slot.waiting.discard(job_id)

    def job_finished(self, slot: Slot, job_id: str) -> None:
        """A worker finished a job. Its place is not claimed for here: the worker took
        the next queued job in the commit that finished this one (if there was one), and
        a submit, a full round or a new worker claims for whatever room is left."""
        self._cancel_deadlines.pop(job_id, None)
        if job_id in slot.jobs:
            slot.jobs.remove(job_id)
        slot.waiting.discard(job_id)
        self._waiters.ended(job_id)

    async def worker_exited(self, slot: Slot, permanent: bool) -> None:
        """A worker died: its cancelled jobs are done, its crash counts against its jobs,
        and a stopped or degraded slot gives its jobs to the others."""
        if permanent:
            await self._release_jobs(slot)
            return
        # Jobs it was told to cancel are done with first: their stop is why it died.
        for job_id in list(slot.cancel_on_exit):
            await self._db(self.store.mark_cancelled, job_id)
            self._cancel_deadlines.pop(job_id, None)
        slot.cancel_on_exit.clear()
        # Only the jobs that ran count the crash: one that waited for a place in the
        # worker cannot have caused it (a poison job must not take the waiting with it).
        waited, slot.waiting = set(slot.waiting), set()
        failed = await self._db(
            self.queue.record_crash, self.host, slot.id, self.config.max_job_crashes, waited
        )
        for job_id in failed:
            log.error("job %s failed: its worker died while running it too often", job_id)
        self._waiters.recheck()
        if slot.degraded:
            await self._release_jobs(slot)

    async def _release_jobs(self, slot: Slot) -> None:
        """Gives a slot's jobs to the other workers (it is degraded or stopped)."""
        ids = await self._db(self.queue.requeue_host, self.host, slot.id)
        slot.jobs = []
        if ids:
            log.warning("worker %s: %d job(s) handed to the other workers", slot.id, len(ids))
            self._poke()

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
                self.workers.send(slot, {"op": "sync"})

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
        for job_id in await self._db(q.cancel_queued):
            self._waiters.ended(job_id)
        await self._deliver_cancels()
        return True

    async def _deliver_cancels(self) -> None:
        """Enforces the cancellations of this host's jobs: the job's token in its worker
        first, then, past the cancel grace period, a stop of the worker."""
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
                await self._db(self.store.mark_cancelled, job.id)
                self._waiters.recheck()
                continue
            deadline = self._cancel_deadlines.get(job.id)
            if deadline is None:
                self._cancel_deadlines[job.id] = now + self.config.cancel_grace
                self.workers.send(slot, {"op": "cancel", "id": job.id})
            elif now >= deadline and job.id not in slot.cancel_on_exit and slot.proc is not None:
                slot.cancel_on_exit.add(job.id)
                self.workers.stop_worker(
                    slot,
                    f"did not stop job {job.id} within {self.config.cancel_grace:g}s of its cancel",
                )
