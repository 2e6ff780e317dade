"""A DownloadStream: downloads submitted while one engine batch runs (a worker's jobs)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.streaming import DownloadStream
from surefetch.testing import FaultServer

from support import leftovers, payload


def test_downloads_from_many_threads_each_get_their_own_result(
    server: FaultServer, tmp_path: Path
) -> None:
    datas = [payload(3_000 + i, seed=80 + i) for i in range(24)]
    urls = [server.add(f"d{i}.bin", d) for i, d in enumerate(datas)]
    stream = DownloadStream(jobs=4)
    results: dict[int, sf.DownloadResult | BaseException] = {}

    def one(i: int) -> None:
        try:
            sha = hashlib.sha256(datas[i]).hexdigest()
            results[i] = stream.download(urls[i], tmp_path / f"d{i}.bin", sha256=sha)
        except BaseException as exc:  # the test reports it
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for i, data in enumerate(datas):
        result = results[i]
        assert isinstance(result, sf.DownloadResult), result
        assert result.path == tmp_path / f"d{i}.bin" and result.path.read_bytes() == data
    assert sorted(leftovers(tmp_path)) == sorted(f"d{i}.bin" for i in range(len(urls)))
    # Into a directory ("DIR/"), and a wrong digest fails that download alone.
    named = stream.download(urls[0], str(tmp_path / "new") + "/")
    assert named.path == tmp_path / "new" / "d0.bin"
    with pytest.raises(sf.ChecksumMismatch):
        stream.download(urls[1], tmp_path / "bad", sha256="0" * 64)
    assert not (tmp_path / "bad").exists()
    stream.close()
    with pytest.raises(ValueError, match="closed"):
        stream.download(urls[0], tmp_path / "late")


def test_a_cancel_ends_a_waiting_download_at_once_and_a_running_one_soon(
    server: FaultServer, tmp_path: Path
) -> None:
    slow = server.add("slow.bin", payload(400_000, seed=7)) + "?throttle=100000"
    stream = DownloadStream(jobs=1)
    running, waiting = sf.CancelToken(), sf.CancelToken()
    errors: dict[str, BaseException] = {}

    def run(name: str, token: sf.CancelToken) -> None:
        try:
            stream.download(slow + f"&_={name}", tmp_path / name, cancel=token)
        except BaseException as exc:  # the test reports it
            errors[name] = exc

    first = threading.Thread(target=run, args=("first", running))
    first.start()
    time.sleep(0.3)
    second = threading.Thread(target=run, args=("second", waiting))
    second.start()
    time.sleep(0.1)
    started = time.monotonic()
    waiting.cancel()  # it never got a place
    second.join(5)
    assert time.monotonic() - started < 1
    assert "nothing of it was written" in str(errors["second"])
    running.cancel()
    first.join(5)
    # A body that fits one block is fetched whole or not at all: nothing is kept of
    # it, and the message does not claim otherwise.
    assert isinstance(errors["first"], sf.Cancelled)
    assert "kept" not in str(errors["first"])
    stream.close()
    assert leftovers(tmp_path) == []
