"""`surefetch.adownload`: the event loop stays free, task cancellation cancels the transfer."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.testing import FaultServer

from support import part_dir, payload

DATA = payload(2 * 1024 * 1024, seed=3)
SHA = hashlib.sha256(DATA).hexdigest()


def test_adownload_keeps_the_loop_running(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("f", DATA) + "?throttle=4000000"
    ticks: list[float] = []
    progress: list[int] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main() -> sf.DownloadResult:
        tick = asyncio.create_task(ticker())
        try:
            return await sf.adownload(
                url, tmp_path / "f", sha256=SHA, progress=lambda d, t: progress.append(d)
            )
        finally:
            tick.cancel()

    result = asyncio.run(main())
    assert result.sha256 == SHA
    assert (tmp_path / "f").read_bytes() == DATA
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 20
    assert max(gaps) < 0.1
    assert progress and progress[-1] == len(DATA)


@pytest.mark.parametrize("query", ["throttle=1000000", "hang=30"])
def test_cancelling_the_task_cancels_the_transfer(
    server: FaultServer, tmp_path: Path, query: str
) -> None:
    url = server.add("f", DATA) + "?" + query
    dest = tmp_path / "f"

    async def main() -> float:
        task = asyncio.create_task(sf.adownload(url, dest))
        await asyncio.sleep(0.4)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    latency = asyncio.run(main())
    assert latency < 0.25
    assert not dest.exists()
    if query.startswith("throttle"):
        assert (part_dir(dest) / "f.part").exists()


def test_adownload_raises_the_engine_errors(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("f", DATA) + "?wrong=1"
    with pytest.raises(sf.ChecksumMismatch):
        asyncio.run(sf.adownload(url, tmp_path / "f", sha256=SHA))
    assert not (tmp_path / "f").exists()


def test_a_cancel_token_works_with_adownload(server: FaultServer, tmp_path: Path) -> None:
    url = server.add("f", DATA) + "?hang=30"
    token = sf.CancelToken()

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.2, token.cancel)
        await sf.adownload(url, tmp_path / "f", cancel=token)

    with pytest.raises(sf.Cancelled):
        asyncio.run(main())
