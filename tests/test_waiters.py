"""`Waiters`, what `ctl wait` sleeps on: woken by the ends the supervisor reports, with
the store (here a dict the test changes, as workers change the real one) as the judge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from surefetch.supervisor.waiters import RECHECK_S, Waiters

T = TypeVar("T")


class Store:
    """Job states, and how many looks the waiters took."""

    def __init__(self, **states: str) -> None:
        self.states = states
        self.looks = 0

    async def states_of(self, ids: Sequence[str]) -> dict[str, str]:
        self.looks += 1
        await asyncio.sleep(0)  # a look takes a turn of the loop, as the store thread does
        return {i: self.states[i] for i in ids if i in self.states}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def test_a_reported_end_wakes_the_waiter_at_once() -> None:
    store = Store(a="running", b="queued", c="succeeded")
    waiters = Waiters()

    async def scenario() -> tuple[dict[str, str], bool, float]:
        started = time.monotonic()
        waiting = asyncio.create_task(
            waiters.wait(["a", "b", "c"], store.states_of, None, lambda: False)
        )
        await asyncio.sleep(0.05)
        store.states["a"] = "succeeded"
        waiters.ended("a")  # one of two: not yet a reason to look
        await asyncio.sleep(0.05)
        store.states["b"] = "failed"
        waiters.ended("b")
        states, done = await waiting
        return states, done, time.monotonic() - started

    states, done, elapsed = run(scenario())
    assert done and states == {"a": "succeeded", "b": "failed", "c": "succeeded"}
    assert elapsed < RECHECK_S / 2  # woken by the report, not by the periodic look
    assert store.looks == 2  # the first look, and one once both were reported


@pytest.mark.parametrize("during_first_look", [True, False])
def test_an_end_is_not_missed_whenever_it_is_reported(during_first_look: bool) -> None:
    store = Store(a="running")
    waiters = Waiters()

    async def states_of(ids: Sequence[str]) -> dict[str, str]:
        seen = await store.states_of(ids)
        if during_first_look and store.looks == 1:  # ends after the read, before the answer
            store.states["a"] = "succeeded"
            waiters.ended("a")
        return seen

    async def scenario() -> tuple[bool, float]:
        started = time.monotonic()
        waiting = asyncio.create_task(waiters.wait(["a"], states_of, None, lambda: False))
        if not during_first_look:
            await asyncio.sleep(0.05)
            store.states["a"] = "succeeded"
            waiters.ended("a")
        _, done = await waiting
        return done, time.monotonic() - started

    done, elapsed = run(scenario())
    assert done and elapsed < RECHECK_S / 2


def test_a_report_the_store_denies_does_not_spin_and_the_timeout_holds() -> None:
    store = Store(a="running")
    waiters = Waiters()

    async def scenario() -> tuple[dict[str, str], bool]:
        waiting = asyncio.create_task(waiters.wait(["a"], store.states_of, 0.3, lambda: False))
        await asyncio.sleep(0.05)
        waiters.ended("a")  # the store still says running
        return await waiting

    states, done = run(scenario())
    assert not done and states == {"a": "running"}
    assert store.looks <= 3  # the first, the report's, the last before the timeout


def test_unknown_jobs_raise_and_stopping_ends_the_wait() -> None:
    store = Store(a="running")
    waiters = Waiters()
    with pytest.raises(KeyError, match="nope"):
        run(waiters.wait(["a", "nope"], store.states_of, None, lambda: False))

    stopping = False

    async def scenario() -> bool:
        nonlocal stopping
        waiting = asyncio.create_task(waiters.wait(["a"], store.states_of, None, lambda: stopping))
        await asyncio.sleep(0.05)
        stopping = True
        waiters.recheck()
        _, done = await waiting
        return done

    started = time.monotonic()
    assert run(scenario()) is False and time.monotonic() - started < RECHECK_S / 2
