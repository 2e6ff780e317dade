"""Clients of the control socket waiting for jobs to end (``surefetch ctl wait``).

A waiter asks the store for its jobs' states, then sleeps until the supervisor says
that the last of the ones still unfinished has ended (a worker reported it, after
its commit), or that some job may have ended by another way (a cancel, a crash), or
at the latest `RECHECK_S` later (a job ended by another supervisor on a shared
store); then it asks the store again. The store, not the events, has the last word.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from surefetch.store.job_spec import JOB_STATES

__all__ = ["FINISHED_STATES", "RECHECK_S", "Waiters"]

FINISHED_STATES = frozenset(JOB_STATES) - {"queued", "running"}
#: Longest sleep of a waiter between two looks at the store, in seconds.
RECHECK_S = 1.0

#: Reads the states (`JOB_STATES`) of some jobs from the store; absent ones left out.
StatesOf = Callable[[Sequence[str]], Awaitable[dict[str, str]]]


class _Waiter:
    def __init__(self, unfinished: set[str]) -> None:
        self.unfinished = unfinished
        self.reported: set[str] = set()  # said to have ended, not yet read from the store
        self.changed = asyncio.Event()

    def ended(self, job_id: str) -> None:
        if job_id in self.unfinished:
            self.reported.add(job_id)
            if self.all_reported():
                self.changed.set()

    def all_reported(self) -> bool:
        return len(self.reported) == len(self.unfinished)  # reported is within unfinished


class Waiters:
    """The waiting clients of one supervisor (all on its event loop)."""

    def __init__(self) -> None:
        self._waiting: set[_Waiter] = set()

    def ended(self, job_id: str) -> None:
        """Job `job_id` ended, as its worker reported once the store said so."""
        for waiter in self._waiting:
            waiter.ended(job_id)

    def recheck(self) -> None:
        """Some jobs may have ended (cancelled, failed by a crash, or the supervisor is
        stopping): every waiter looks at the store again now."""
        for waiter in self._waiting:
            waiter.changed.set()

    async def wait(
        self,
        job_ids: Sequence[str],
        states_of: StatesOf,
        timeout: float | None,
        stopping: Callable[[], bool],
    ) -> tuple[dict[str, str], bool]:
        """Waits until every job of `job_ids` is finished, at most `timeout` seconds
        (None: no limit), or until `stopping()` is true at a look.

        Returns:
            Each job's state at the last look, and whether all were finished then.

        Raises:
            KeyError: a job that `states_of` does not know (its id is the argument).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # Waiting from before the first look: an end reported during it is not missed.
        waiter = _Waiter(set(job_ids))
        self._waiting.add(waiter)
        try:
            states = await states_of(job_ids)
            for job_id in job_ids:
                if job_id not in states:
                    raise KeyError(job_id)
            while True:
                waiter.unfinished = {
                    i for i in waiter.unfinished if states[i] not in FINISHED_STATES
                }
                waiter.reported &= waiter.unfinished  # those reported during the look
                if not waiter.unfinished or stopping():
                    break
                left = RECHECK_S if deadline is None else min(RECHECK_S, deadline - loop.time())
                if left <= 0:
                    break
                if not waiter.all_reported():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(waiter.changed.wait(), left)
                waiter.changed.clear()
                waiter.reported.clear()  # from here on, only what is reported after the look
                states.update(await states_of(sorted(waiter.unfinished)))
        finally:
            self._waiting.discard(waiter)
        return states, not waiter.unfinished
