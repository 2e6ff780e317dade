"""A supervised worker process: runs the jobs assigned to its slot.

Started by the supervisor (:mod:`surefetch.supervisor.slots`) as ``python -m
surefetch.worker --slot w0 --host-id H --parent-pid P`` with the store URL in
``$SUREFETCH_DB`` (``surefetch.worker`` runs this module's :func:`main`). It speaks
JSON lines: commands on stdin, events on the stdout it was started with (its
own fd 1 is pointed at stderr, so a stray print cannot break the protocol).

Commands: ``hello`` (answered with ``hello`` and the pid once the store is
open: the handshake), ``ping`` (``pong``), ``sync`` (pull the slot's jobs from the
store and converge: start the missing ones, stop the ones that are no longer its
own or whose cancellation was requested), ``cancel`` (one job, at once), ``stop``
(cancel every job, keeping its part files, and exit 0).

With ``claim_ttl`` (seconds) and ``jobs_per_worker`` (N) in its ``hello``, the
worker runs N jobs at a time and keeps N more started, ready to run: a job's
download ends, the next one's begins, and the first job's end is committed
meanwhile; each commit that frees a place claims queued jobs for the slot (for
``claim_ttl`` seconds) until it holds 2N, so the worker needs no round trip to
its supervisor to go on. Its ``get`` jobs all run in one engine batch
(`surefetch.streaming.DownloadStream`): connections reused, and the files of jobs
finishing together made durable together (group commit) before their ends are
committed to the store.

Events: ``hello``, ``pong``, ``taken`` (``ids``: jobs a commit claimed and started
for the slot, waiting for a place), ``started`` (a job runs: a crash of the worker
now counts against it), ``finished`` (with ``state``: succeeded, failed or
cancelled).

The worker exits when its supervisor dies: stdin reaches EOF, and the kernel
sends SIGTERM (``PR_SET_PDEATHSIG``). Exit codes: 0 after a stop, 78 for a
configuration it cannot run with (the supervisor does not restart it), 1 for
anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import SimpleQueue
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from surefetch import CancelToken
from surefetch.errors import Cancelled, SessionCancelled, SurefetchError
from surefetch.store import Job, JobQueue, SessionStore
from surefetch.store.jobs import Ending

if TYPE_CHECKING:
    from surefetch.streaming import DownloadStream

__all__ = ["EXIT_CONFIG", "main"]

EXIT_CONFIG = 78  # EX_CONFIG: restarting cannot help
_PR_SET_PDEATHSIG = 1
_STOP_WAIT = 2.0  # seconds the running jobs get to flush their parts on a stop


class _Stop(Exception):
    """Raised in the main thread by SIGTERM."""


@dataclass
class _Running:
    job: Job
    token: CancelToken
    started: bool = False  # the store already marks it running in this worker
    reason: str = ""  # why it was cancelled: "cancel" (by its owner), "stop", "lost"
    done: threading.Event = field(default_factory=threading.Event)


class _GroupCommit:
    """Job state changes of this worker, committed in groups: a job thread asks to start
    or to finish its job and waits; one thread applies, in one transaction
    (`JobQueue.commit_group`), every request made before that transaction got the
    store's write lock (those made while the previous commit ran or while this one
    waited for the lock), and answers them. Small jobs then share commits instead of
    paying one (and its fsync) each. With `hold` set, a transaction that frees a place
    also claims and starts queued jobs for the slot until it holds `hold`; `on_taken`
    gets those jobs (a list) once they are committed."""

    def __init__(
        self,
        queue: JobQueue,
        host: str,
        slot: str,
        pid: int,
        on_taken: Callable[[list[Job]], None],
    ) -> None:
        self.queue, self.host, self.slot, self.pid = queue, host, slot, pid
        self.on_taken = on_taken
        #: How many unfinished jobs the slot is to hold once a commit frees a place (the
        #: commit takes queued ones up to that); 0: it takes none.
        self.hold = 0
        #: Seconds the claim of a job taken holds without a heartbeat.
        self.ttl = 10.0
        self._cond = threading.Condition()
        self._starts: dict[str, Future[Any]] = {}
        self._ends: list[tuple[Ending, Future[Any]]] = []
        threading.Thread(target=self._run, name="job-commits", daemon=True).start()

    def start(self, job_id: str) -> Job | None:
        """`JobQueue.start`, shared with the other jobs starting now."""
        future: Future[Any] = Future()
        with self._cond:
            self._starts[job_id] = future
            self._cond.notify()
        outcome = future.result()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    def complete_later(self, end: Ending, then: Callable[[Future[Any]], None]) -> None:
        """`JobQueue.complete`, shared with the other jobs ending now, without waiting:
        `then` gets the future of its outcome (True: this commit finished the job), on
        the commit thread."""
        future: Future[Any] = Future()
        future.add_done_callback(then)
        with self._cond:
            self._ends.append((end, future))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._starts or self._ends):
                    self._cond.wait()
            self._commit()

    def _take_requests(self) -> tuple[dict[str, Future[Any]], list[tuple[Ending, Future[Any]]]]:
        with self._cond:
            starts, self._starts = self._starts, {}
            ends, self._ends = self._ends, []
        return starts, ends

    def _commit(self) -> None:
        taken: list[tuple[dict[str, Future[Any]], list[tuple[Ending, Future[Any]]]]] = []

        def requests() -> tuple[list[str], list[Ending]]:
            # Called once the commit holds the store's write lock: every request made
            # while it waited for the lock joins this group.
            starts, ends = self._take_requests()
            taken.append((starts, ends))
            return list(starts), [end for end, _ in ends]

        try:
            done = self.queue.commit_group(
                self.host, self.slot, self.pid, requests, hold=self.hold, ttl=self.ttl
            )
        except BaseException as exc:  # the store failed: every waiter gets the error
            starts, ends = taken[0] if taken else self._take_requests()
            for future in starts.values():
                future.set_result(exc)
            for _, future in ends:
                future.set_exception(exc)
            return
        starts, ends = taken[0]
        if done.taken:
            self.on_taken(list(done.taken))
        for job_id, future in starts.items():
            future.set_result(done.started.get(job_id))
        for end, future in ends:
            future.set_result(done.finished.get(end.job_id, False))


class _Runners:
    """The threads that run a worker's jobs: an idle one takes the next job, and a new
    one starts only when none is idle (a thread per job cost a clone, a stack and a
    munmap each: a tenth of a small job's CPU). Daemon threads, as a stopping worker
    does not wait for downloads it has cancelled."""

    def __init__(self, run: Callable[[_Running], None]) -> None:
        self._run = run
        self._jobs: SimpleQueue[_Running] = SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def start(self, entry: _Running) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that thread is to take this job
        self._jobs.put(entry)
        if spawn:
            threading.Thread(target=self._loop, name="job-runner", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._run(self._jobs.get())
            with self._lock:
                self._idle += 1


class _Permits:
    """How many of the worker's jobs run at once (None: no limit); the others wait until
    a place frees or their token is cancelled."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._running = 0
        self._cond = threading.Condition()

    def acquire(self, token: CancelToken) -> bool:
        """Waits for a place; False if `token` was cancelled first."""
        with self._cond:
            while self.limit is not None and self._running >= self.limit:
                if token.cancelled:
                    return False
                self._cond.wait()
            if token.cancelled:
                self._cond.notify()  # the place it may have been woken for: to another
                return False
            self._running += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify()  # one place, one waiter (all of them would only contend)

    def wake(self) -> None:
        """Lets the waiters check their tokens (one was cancelled)."""
        with self._cond:
            self._cond.notify_all()


def _positive(*values: float) -> bool:
    return all(not isinstance(v, bool) and v > 0 for v in values)


class Worker:
    def __init__(self, queue: JobQueue, slot: str, host: str, out: IO[str]) -> None:
        self.queue = queue
        self.slot = slot
        self.host = host
        self.pid = os.getpid()
        self._out = out
        self._out_lock = threading.Lock()
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._stopping = False
        self._permits = _Permits(None)
        self._early_cancels: set[str] = set()  # cancels of jobs not (yet) running here
        self._commits = _GroupCommit(queue, host, slot, self.pid, self._take)
        self._runners = _Runners(self._run)
        self._downloads = _Downloads()

    # -- protocol --

    def send(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}) + "\n"
        with self._out_lock, contextlib.suppress(OSError, ValueError):
            self._out.write(line)
            self._out.flush()

    def handle(self, message: dict[str, Any]) -> bool:
        """Acts on one command; False when the worker should stop."""
        op = message.get("op")
        if op == "ping":
            self.send("pong", seq=message.get("seq"))
        elif op == "hello":
            ttl, jobs = message.get("claim_ttl"), message.get("jobs_per_worker")
            if isinstance(ttl, (int, float)) and isinstance(jobs, int) and _positive(ttl, jobs):
                # Runs `jobs` at a time and holds as many more, started, to run next.
                self._permits = _Permits(jobs)
                self._downloads.jobs = jobs
                self._commits.ttl = float(ttl)
                self._commits.hold = 2 * jobs
            self.send("hello", pid=self.pid, slot=self.slot)
            self.resync()
        elif op == "sync":
            self.resync()
        elif op == "cancel":
            self.cancel(str(message.get("id")), "cancel")
        elif op == "stop":
            self._stopping = True
            self._commits.hold = 0
            return False
        else:
            print(f"surefetch worker {self.slot}: unknown command {op!r}", file=sys.stderr)
        return True

    # -- converging on the store --

    def resync(self) -> None:
        """Runs every unfinished job assigned to this slot; stops the ones that are not."""
        # The jobs running before the store is read: a job this worker takes for itself
        # meanwhile is committed before it runs, so only these can be missing for real.
        with self._lock:
            running = dict(self._running)
        assigned = {job.id: job for job in self.queue.assigned(self.host, self.slot)}
        for job_id in running:
            job = assigned.get(job_id)
            if job is None:
                self.cancel(job_id, "lost")
            elif job.cancel_requested:
                self.cancel(job_id, "cancel")
        for job in assigned.values():
            self._launch(job, started=False)

    def _take(self, jobs: list[Job]) -> None:
        """Runs the jobs a group commit claimed and started for this slot; they wait for
        a place, so the supervisor hears of them as "taken", and of each as "started"
        only once it runs (a crash counts against the jobs that ran, not the waiting)."""
        if self._stopping:
            return
        # Said before any of them can run and say "started": the supervisor hears them
        # in that order.
        self.send("taken", ids=[job.id for job in jobs])
        for job in jobs:
            self._launch(job, started=True)

    def _launch(self, job: Job, started: bool) -> None:
        """Runs ``job`` on a thread of its own (`_Runners`), unless it already runs here;
        ``started``: the store already marks it running here (no start to commit)."""
        entry = _Running(job, CancelToken(), started=started)
        with self._lock:
            if job.id in self._running:
                return
            self._running[job.id] = entry
            if job.id in self._early_cancels:
                self._early_cancels.discard(job.id)
                entry.reason = "cancel"
                entry.token.cancel()
        self._runners.start(entry)

    def cancel(self, job_id: str, reason: str) -> None:
        with self._lock:
            entry = self._running.get(job_id)
            if entry is None and reason == "cancel":
                # Perhaps a job the group commit just took and is about to launch.
                self._early_cancels.add(job_id)
        if entry is not None:
            entry.reason = entry.reason or reason
            entry.token.cancel()
            self._permits.wake()

    def stop_all(self, wait: float) -> None:
        with self._lock:
            entries = list(self._running.values())
        for entry in entries:
            entry.reason = entry.reason or "stop"
            entry.token.cancel()
        self._permits.wake()
        for entry in entries:
            entry.done.wait(wait)

    # -- one job --

    def _run(self, entry: _Running) -> None:
        job = entry.job
        try:
            state, error, result = self._execute(entry)
        except Exception as exc:  # a bug: fail the job rather than rerun it forever
            traceback.print_exc()
            state, error, result = "failed", f"internal error: {exc!r}", None
        if state is None:
            self._forget(entry)
            return

        def committed(future: Future[Any]) -> None:
            # On the commit thread, once the ending is in the store: this runner thread
            # has already gone on to its next job.
            try:
                if future.result():
                    self.send("finished", id=job.id, state=state, error=error)
            except Exception:
                traceback.print_exc()
            finally:
                self._forget(entry)

        try:
            self._commits.complete_later(Ending(job.id, state, error, result), committed)
        except Exception:
            traceback.print_exc()
            self._forget(entry)

    def _forget(self, entry: _Running) -> None:
        """The job ended here (its ending, if any, committed): only now, as a resync in
        between must still see it running here."""
        with self._lock:
            self._running.pop(entry.job.id, None)
        entry.done.set()

    def _execute(self, entry: _Running) -> tuple[str | None, str | None, dict[str, Any] | None]:
        job = entry.job
        try:
            if not entry.started and self._commits.start(job.id) is None:
                return None, None, None
        except SessionCancelled:
            self.send("finished", id=job.id, state="cancelled", error=None)
            return None, None, None
        try:
            if not self._permits.acquire(entry.token):
                raise Cancelled("cancelled while waiting for its turn")
            self.send("started", id=job.id)
            try:
                result = _perform(job, entry.token, self._downloads)
            finally:
                # Before its end is committed: the next job runs while this one's is.
                self._permits.release()
        except Cancelled:
            if entry.reason == "cancel":
                return "cancelled", None, None
            return None, None, None  # stopped or lost: it stays unfinished, parts kept
        except (SurefetchError, OSError, ValueError) as exc:
            return "failed", f"{type(exc).__name__}: {exc}", None
        return "succeeded", None, result


def _perform(job: Job, token: CancelToken, downloads: _Downloads) -> dict[str, Any]:
    spec = job.spec
    if job.kind == "get":
        stream = downloads.stream()
        result = stream.download(spec["url"], spec["dest"], sha256=spec.get("sha256"), cancel=token)
        return result.to_dict()
    from surefetch.transaction import sync

    return sync(spec["manifest"], spec["lock"], spec["dest"], cancel=token).to_dict()


class _Downloads:
    """The worker's `get` jobs all run in one engine batch (`DownloadStream`), made on
    first use once the handshake said how many run at once: connections are reused,
    and the files of jobs finishing together are made durable together."""

    def __init__(self) -> None:
        self.jobs = 4
        self._stream: DownloadStream | None = None
        self._lock = threading.Lock()

    def stream(self) -> DownloadStream:
        with self._lock:
            if self._stream is None or self._stream.broken:
                from surefetch.streaming import DownloadStream

                self._stream = DownloadStream(self.jobs)
            return self._stream


# --- process set-up ----------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the supervisor dies, even by SIGKILL; exit at once if it already did."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _protocol_out() -> IO[str]:
    """The events stream: the original stdout. Fd 1 then points at stderr."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="surefetch-worker")
    parser.add_argument("--slot", required=True)
    parser.add_argument("--host-id", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the supervisor's to handle
    signal.signal(signal.SIGTERM, _raise_stop)
    out = _protocol_out()
    prefix = f"surefetch worker {args.slot}"
    try:
        store = SessionStore(os.environ.get("SUREFETCH_DB"))
    except ValueError as exc:
        print(f"{prefix}: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except _Stop:
        return 0
    except SurefetchError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
    worker = Worker(JobQueue(store), args.slot, args.host_id, out)
    try:
        for raw in sys.stdin.buffer:
            try:
                message = json.loads(raw)
            except ValueError:
                print(f"{prefix}: ignoring a line that is not JSON", file=sys.stderr)
                continue
            if not isinstance(message, dict) or not worker.handle(message):
                break
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker.stop_all(_STOP_WAIT)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
