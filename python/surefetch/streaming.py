"""Downloads submitted to one engine batch while it runs: a supervisor worker's jobs.

`download_many` runs a list fixed in advance; a worker's jobs arrive one by one, and
each has its own cancel token. A `DownloadStream` keeps one batch of the engine open
for them: at most `jobs` transfers in flight, connections reused per host, and the
group commit of the batch (the files of the items finishing together made durable
with one ``syncfs`` and their directories fsynced once, rather than two fsyncs each).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from surefetch._log import get_logger
from surefetch.download import (
    Batch,
    CancelToken,
    DownloadResult,
    StrPath,
    destination_for,
    result_from_engine,
)
from surefetch.transfer import TransferOptions

__all__ = ["DownloadStream"]

_log = get_logger("surefetch")
_WAIT_S = 0.5  # how long the delivering thread waits for results at a time


class DownloadStream:
    """One engine batch that takes downloads while it runs (thread-safe).

    Args:
        jobs: transfers in flight at once; the others wait, in the order submitted.
    """

    def __init__(self, jobs: int) -> None:
        self._batch = Batch(jobs=jobs, durable=True)
        self._waiting: dict[int, Future[Any]] = {}
        self._broken: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._deliver, name="stream-results", daemon=True).start()

    @property
    def broken(self) -> bool:
        """Whether the engine failed under this stream (every download then fails: make
        a new stream)."""
        return self._broken is not None

    def download(
        self,
        url: str,
        dest: StrPath,
        *,
        sha256: str | None = None,
        cancel: CancelToken | None = None,
        options: TransferOptions | None = None,
    ) -> DownloadResult:
        """`surefetch.download(url, dest, sha256=..., cancel=...)`, run in the batch;
        blocks the calling thread until the download is final (durable).

        Raises:
            What `surefetch.download` raises; `Cancelled` when `cancel` fired first,
            whether or not the transfer had started.
        """
        transfer = TransferOptions.of(options)  # (the defaults, checked once)
        path, _ = destination_for(url, dest)
        fields = {**transfer.engine_options(url), "sha256": sha256}
        future: Future[Any] = Future()
        with self._lock:  # registered before the delivering thread can see its result
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise ValueError("the download stream is closed")
            index = self._batch.submit(url, path, fields, cancel)
            self._waiting[index] = future
        value = future.result()
        if isinstance(value, BaseException):
            raise value
        return result_from_engine(value)

    def close(self) -> None:
        """Takes no more downloads; those under way still finish, and then the thread
        that hands out results ends."""
        with self._lock:
            self._closed = True
        self._batch.close()

    def _deliver(self) -> None:
        while True:
            with self._lock:
                if self._closed and not self._waiting:
                    return
            try:
                got = self._batch.results(_WAIT_S)
            except Exception as exc:  # the engine's runtime broke: fail who waits
                _log.warning("the download batch failed: %s", exc)
                with self._lock:
                    self._broken = exc
                    waiting, self._waiting = self._waiting, {}
                for future in waiting.values():
                    future.set_result(exc)
                return
            for index, value in got:
                with self._lock:
                    waiter = self._waiting.pop(index, None)
                if waiter is not None:
                    waiter.set_result(value)
