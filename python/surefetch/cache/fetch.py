"""Fetching into the cache: one artifact (`Fetcher.entry`), or many through one batch of
the engine (`Fetcher.many`); each download runs under its artifact's lock, into
``tmp/``, and its blob is moved into ``blobs/`` only once verified and durable."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

from surefetch._log import get_logger
from surefetch.cache.index import indexed_many, offline_entry, url_key, write_index
from surefetch.cache.locks import PARTS, BatchLocks, announce, locked, withdraw
from surefetch.cache.store import BlobStore, CacheEntry, check_sha256, check_size
from surefetch.download import (
    BatchProgressCallback,
    CancelToken,
    DownloadItem,
    DownloadResult,
    ProgressCallback,
    TransferOptions,
    download,
    download_many,
)
from surefetch.errors import DownloadTimeout, SurefetchError, redact_url

__all__ = ["FetchRequest", "Fetcher"]

_log = get_logger("surefetch.cache")


class FetchRequest(NamedTuple):
    """One artifact of `Cache.fetch_many`: its URL and, when known, its digest and size."""

    url: str
    sha256: str | None = None
    size: int | None = None


class Fetcher:
    """How one call of `Cache` fetches: into `store`, waiting at most `lock_timeout`
    seconds for another process's lock, or (`offline`) with no network access at all.
    `Cache.fetch_entry` and `Cache.fetch_many` document the behaviour."""

    __slots__ = ("lock_timeout", "offline", "store")

    def __init__(self, store: BlobStore, lock_timeout: float, offline: bool) -> None:
        self.store = store
        self.lock_timeout = lock_timeout
        self.offline = offline

    def entry(
        self,
        url: str,
        *,
        sha256: str | None,
        size: int | None,
        transfer: TransferOptions,
        cancel: CancelToken | None,
        progress: ProgressCallback | None,
        on_wait: Callable[[str], None] | None,
    ) -> CacheEntry:
        """See `Cache.fetch_entry`."""
        timeout = transfer.timeout
        deadline = time.monotonic() + timeout if timeout is not None else None
        expected = check_sha256(sha256) if sha256 is not None else None
        key = f"sha256-{expected}" if expected else _key(url)
        if not self.offline:
            transfer.check_netrc()  # before the cache's directories are made
        store = self.store
        with store.storage():
            hit = store.lookup(expected, touch=True) if expected is not None else None
            if hit is not None:  # no lock needed to read an immutable blob
                check_size(hit, size)
                return hit
            if self.offline:
                return offline_entry(store, url, expected, size)
            with self._locked(key, url, deadline, cancel, on_wait):
                if expected is not None:  # the process we waited for may have fetched it
                    hit = store.lookup(expected, touch=True)
                    if hit is not None:
                        check_size(hit, size)
                        return hit
                return self._download(
                    url, key, expected, deadline, cancel, transfer, size=size, progress=progress
                )

    def many(
        self,
        requests: Sequence[FetchRequest],
        *,
        jobs: int,
        cancel: CancelToken | None,
        on_result: Callable[[int, CacheEntry | Exception], Any] | None,
        on_wait: Callable[[str], None] | None,
        progress: BatchProgressCallback | None,
        item_progress: Callable[[int, int, int | None], Any] | None,
        transfer: TransferOptions,
    ) -> list[CacheEntry | Exception]:
        """See `Cache.fetch_many`."""
        results: list[CacheEntry | Exception | None] = [None] * len(requests)

        def settle(index: int, result: CacheEntry | Exception) -> None:
            results[index] = result
            if on_result is not None:
                on_result(index, result)

        if not self.offline:
            transfer.check_netrc()  # before the cache's directories are made
        store = self.store
        # Within the batch each directory is checked once, and the catalog written once.
        with (
            store.checks_remembered(),
            store.catalog.deferred(),
            store.storage(),
            contextlib.ExitStack() as held,
        ):
            batch: list[tuple[int, str, str | None]] = []  # (index, key, expected)
            waiting: list[int] = []
            locks = held.enter_context(BatchLocks(store))
            for index, request in enumerate(requests):
                try:
                    expected = check_sha256(request.sha256) if request.sha256 else None
                    hit = store.lookup(expected, touch=True) if expected is not None else None
                    if hit is not None:
                        check_size(hit, request.size)
                        settle(index, hit)
                        continue
                except SurefetchError as exc:
                    settle(index, exc)
                    continue
                if self.offline:
                    try:
                        settle(index, offline_entry(store, request.url, expected, request.size))
                    except SurefetchError as exc:
                        settle(index, exc)
                    continue
                key = f"sha256-{expected}" if expected else _key(request.url)
                if not locks.take_if_free(key):  # another process or request has it
                    waiting.append(index)
                    continue
                batch.append((index, key, expected))
            if batch:
                keys = [key for _, key, _ in batch]
                announce(store, [(key, requests[i].url) for i, key, _ in batch])
                held.callback(withdraw, store, keys)
                per_request = None
                if item_progress is not None:
                    report = item_progress

                    def per_request(position: int, done: int, total: int | None) -> None:
                        report(batch[position][0], done, total)

                self._download_batch(
                    requests, batch, jobs, cancel, settle, progress, per_request, transfer
                )
        for index in waiting:
            request = requests[index]
            try:
                entry: CacheEntry | Exception = self.entry(
                    request.url,
                    sha256=request.sha256,
                    size=request.size,
                    transfer=transfer,
                    cancel=cancel,
                    progress=None,
                    on_wait=on_wait,
                )
            except SurefetchError as exc:
                entry = exc
            settle(index, entry)
        return [r for r in results if r is not None]

    def _locked(
        self,
        key: str,
        url: str,
        deadline: float | None,
        cancel: CancelToken | None,
        on_wait: Callable[[str], None] | None,
    ) -> AbstractContextManager[None]:
        return locked(self.store, key, url, deadline, self.lock_timeout, cancel, on_wait)

    def _download_batch(
        self,
        requests: Sequence[FetchRequest],
        batch: list[tuple[int, str, str | None]],
        jobs: int,
        cancel: CancelToken | None,
        settle: Callable[[int, CacheEntry | Exception], None],
        progress: BatchProgressCallback | None,
        item_progress: Callable[[int, int, int | None], Any] | None,
        transfer: TransferOptions,
    ) -> None:
        """Downloads `batch` (part files in tmp/v2/), each verified blob made durable with
        its group and renamed by the engine to its content address (`BlobStore.shards`);
        records each in the catalog as its result arrives."""
        revalidations = self._revalidations(
            [(requests[i].url, expected) for i, _, expected in batch]
        )
        items = [
            DownloadItem(
                requests[i].url,
                out=key,
                sha256=expected,
                size=requests[i].size,
                if_none_match=etag,
                if_modified_since=modified,
            )
            for (i, key, expected), (_, etag, modified) in zip(batch, revalidations)
        ]
        placed: list[tuple[int, CacheEntry]] = []
        evicted: list[int] = []

        def one(position: int, result: DownloadResult | Exception) -> None:
            index = batch[position][0]
            if isinstance(result, Exception):
                settle(index, result)
                return
            cached = revalidations[position][0]
            if result.not_modified and cached is not None:
                kept = self._still_cached(requests[index].url, cached)
                if kept is None:
                    evicted.append(index)  # fetched again once the batch is over
                else:
                    settle(index, kept)
                return
            try:
                entry = self._admit(requests[index].url, result, installed=True)
            except OSError as exc:  # its blob directory was found unusable meanwhile
                settle(index, exc)
                return
            placed.append((index, entry))

        download_many(
            items,
            self.store.directory(*PARTS),
            jobs=jobs,
            cancel=cancel,
            on_result=one,
            progress=progress,
            item_progress=item_progress,
            options=transfer,
            lock_parts=False,  # the artifact locks, held for the batch, cover tmp/v2/<key>
            # The engine renames each verified blob into place, made durable with the
            # group (its data before the rename, the renames in one syncfs).
            install_by_digest=self.store.shards(),
        )
        for index, entry in placed:
            settle(index, entry)
        for index in evicted:  # still under its lock: no revalidation this time
            request = requests[index]
            try:
                fetched: CacheEntry | Exception = self._download(
                    request.url,
                    _key(request.url),
                    None,
                    None,
                    cancel,
                    transfer,
                    revalidate=False,
                    size=request.size,
                )
            except (SurefetchError, OSError) as exc:
                fetched = exc
            settle(index, fetched)

    def _download(
        self,
        url: str,
        key: str,
        expected: str | None,
        deadline: float | None,
        cancel: CancelToken | None,
        transfer: TransferOptions,
        *,
        revalidate: bool = True,
        **options: Any,
    ) -> CacheEntry:
        """Downloads into tmp/ (resuming a part left there) and moves the blob into place.

        Without a digest, a blob this URL gave before is revalidated (RFC 9110 §13.1:
        If-None-Match with its strong ETag, else If-Modified-Since) unless not
        `revalidate`: a ``304`` reuses it with no body transferred, or when it was
        evicted meanwhile, is followed by a plain download."""
        remaining = _remaining(deadline, url)
        tmp = self.store.directory(*PARTS) / key
        cached, etag, modified = (
            self._revalidation(url, expected) if revalidate else (None, None, None)
        )
        try:
            result = download(
                url,
                tmp,
                sha256=expected,
                options=TransferOptions.of(transfer, timeout=remaining),
                cancel=cancel,
                if_none_match=etag,
                if_modified_since=modified,
                **options,
            )
        except DownloadTimeout as exc:
            if exc.kind != "overall" or transfer.timeout is None:
                raise
            # The engine was given what was left of the fetch's timeout: name the timeout
            # the caller gave (it said "within 0.996 s" for --timeout 1).
            raise DownloadTimeout(
                f"{redact_url(url)} was not fetched within {transfer.timeout:g} s (the "
                "timeout counts waiting for another process's download too): raise the timeout",
                "overall",
            ) from None
        if result.not_modified and cached is not None:
            kept = self._still_cached(url, cached)
            if kept is not None:
                return kept
            return self._download(
                url, key, expected, deadline, cancel, transfer, revalidate=False, **options
            )
        return self._admit(url, result, installed=False)

    def _still_cached(self, url: str, cached: CacheEntry) -> CacheEntry | None:
        """The blob a ``304`` said is current, when it is still in the cache; None when
        it left meanwhile (a `gc` in another process evicts by the blob's lock, not the
        URL's that a revalidation holds): the caller then downloads it again."""
        kept = self.store.lookup(cached.sha256, touch=True)
        if kept is None:
            _log.info(
                "%s not modified, but its cached copy was evicted meanwhile: downloading it again",
                redact_url(url),
            )
            return None
        _log.info("%s not modified: the cached copy is used", redact_url(url))
        return kept

    def _revalidation(
        self, url: str, expected: str | None
    ) -> tuple[CacheEntry | None, str | None, str | None]:
        """For a fetch without a digest: the blob `url` gave last time and what revalidates
        it (RFC 9110 §13.1: its strong ETag, else its Last-Modified); all None when
        there is nothing to revalidate (a digest, no blob, no validator)."""
        return self._revalidations([(url, expected)])[0]

    def _revalidations(
        self, fetches: Sequence[tuple[str, str | None]]
    ) -> list[tuple[CacheEntry | None, str | None, str | None]]:
        """`_revalidation` of each (url, expected digest), the index read once for all."""
        unpinned = [url for url, expected in fetches if expected is None]
        found = iter(indexed_many(self.store, unpinned) if unpinned else [])
        revalidations: list[tuple[CacheEntry | None, str | None, str | None]] = []
        for url, expected in fetches:
            cached, etag, modified = (None, None, None) if expected is not None else next(found)
            if cached is None or (etag is None and modified is None):
                revalidations.append((None, None, None))  # nothing to revalidate it with
                continue
            _log.info("revalidating %s (%s)", redact_url(url), etag or modified)
            revalidations.append((cached, etag, modified))
        return revalidations

    def _admit(self, url: str, result: DownloadResult, *, installed: bool) -> CacheEntry:
        """The blob of the verified download `result`, recorded in the catalog and the URL
        index. `installed`: the engine put it at its path already (a batch, see
        `BlobStore.shards`); else it is moved there from `result.path`, its directory
        synced."""
        assert result.sha256 is not None  # computed whenever none was expected
        digest, shown = result.sha256, redact_url(url)
        if installed:
            path = self.store.installed(digest, result.size, result.xxh3_128, shown)
        else:
            path = self.store.install(result.path, digest, result.size, result.xxh3_128, shown)
        # Also when fetched by digest: `--offline URL` and a later fetch without the
        # digest then know the blob (and revalidate it with its validators).
        write_index(self.store, url, digest, result.etag, result.last_modified)
        return CacheEntry(path, result.size, digest, result.xxh3_128, result.bytes_transferred)


def _key(url: str) -> str:
    """The artifact key (lock, part file) of a fetch of `url` without a digest."""
    return f"url-{url_key(url)}"


def _remaining(deadline: float | None, url: str) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadTimeout(
            f"the timeout ran out before {redact_url(url)} could start; allow more time"
        )
    return left
