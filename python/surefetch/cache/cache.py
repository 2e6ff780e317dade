"""`Cache`, the cache's face: its arguments and documentation, over the store
(`surefetch.cache.store`), the fetches (`surefetch.cache.fetch`) and the maintenance
(`surefetch.cache.maintenance`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from surefetch.cache.fetch import Fetcher, FetchRequest
from surefetch.cache.store import BlobStore, CacheEntry, check_sha256, default_cache_root
from surefetch.download import (
    BatchProgressCallback,
    CancelToken,
    ProgressCallback,
    TransferOptions,
)

if TYPE_CHECKING:
    from surefetch.cache.maintenance import CachedBlob, CleanReport, GcReport, VerifyReport

__all__ = ["Cache"]

StrPath = Union[str, "os.PathLike[str]"]


class Cache:
    """A content-addressed store of verified downloads, safe to share between processes.

    Args:
        root: the cache directory (None: `default_cache_root`). Created on first use.
        lock_timeout: how long a fetch waits for another process's lock, in seconds.

    Raises:
        ValueError: `lock_timeout` is not a positive number.
    """

    def __init__(
        self,
        root: StrPath | None = None,
        *,
        lock_timeout: float = 300.0,
        offline: bool | None = None,
    ) -> None:
        if not lock_timeout > 0:
            raise ValueError(
                f"lock_timeout must be a positive number of seconds, not {lock_timeout}"
            )
        path = Path(os.fspath(root)).expanduser() if root is not None else default_cache_root()
        self._store = BlobStore(path.absolute())
        self.lock_timeout = lock_timeout
        # No network at all: answer from the cache or fail (SUREFETCH_OFFLINE=1).
        self.offline = (
            offline
            if offline is not None
            else os.environ.get("SUREFETCH_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        )

    @property
    def root(self) -> Path:
        """The cache directory."""
        return self._store.root

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    # -- fetch -------------------------------------------------------------------

    def fetch(
        self,
        url: str,
        *,
        sha256: str | None = None,
        size: int | None = None,
        options: TransferOptions | None = None,
        cancel: CancelToken | None = None,
        progress: ProgressCallback | None = None,
        on_wait: Callable[[str], None] | None = None,
        **changes: Any,
    ) -> Path:
        """`fetch_entry` that returns only the blob's path (takes the same arguments)."""
        return self.fetch_entry(
            url,
            sha256=sha256,
            size=size,
            options=options,
            cancel=cancel,
            progress=progress,
            on_wait=on_wait,
            **changes,
        ).path

    def fetch_entry(
        self,
        url: str,
        *,
        sha256: str | None = None,
        size: int | None = None,
        options: TransferOptions | None = None,
        cancel: CancelToken | None = None,
        progress: ProgressCallback | None = None,
        on_wait: Callable[[str], None] | None = None,
        **changes: Any,
    ) -> CacheEntry:
        """The blob of `url`, from the cache when it is there, else downloaded into it.

        With `sha256`, a cached blob is returned at once without any network access,
        and the download (if any) is keyed by the digest; without it the download is
        keyed by the URL, always happens, and the blob lands under its computed
        SHA-256. At most one process downloads a given artifact at a time: the
        others wait for its lock, then use its blob. A part file left by a dead
        download is resumed.

        Args:
            url: an http or https URL.
            sha256: expected SHA-256 (hex); a download that differs raises.
            size: expected size in bytes.
            options: how the download behaves (`TransferOptions`); its ``timeout`` is
                the overall limit in seconds, lock wait included.
            changes: fields of `TransferOptions` (``retries=5``, ``headers=...``,
                ``timeout=60``) that override `options`.
            cancel: a token whose cancellation stops the call, also while waiting.
            progress: called with (bytes done, total or None) during a download.
            on_wait: called once with a description of the holder
                (``"pid 12 on host h (fetching URL since 12:00:01)"``) when the
                call has to wait for another process.

        Returns:
            The `CacheEntry` of the verified blob.

        Raises:
            ChecksumMismatch, SizeMismatch: the bytes are not the ones promised;
                nothing enters the cache.
            HTTPError, NetworkError: the download failed (after retries).
            LockTimeout: another process held the artifact's lock longer than
                `lock_timeout`; the message names it.
            DownloadTimeout: `timeout` expired (while waiting or downloading).
            Cancelled: `cancel` was cancelled.
            StorageError: the cache directory could not be written.
            ValueError: an invalid argument (URL, digest, number), or a netrc file that
                does not parse (read before anything is created).
            TypeError: a keyword that is not a `TransferOptions` field.
        """
        return self._fetcher().entry(
            url,
            sha256=sha256,
            size=size,
            transfer=TransferOptions.of(options, **changes),
            cancel=cancel,
            progress=progress,
            on_wait=on_wait,
        )

    def fetch_many(
        self,
        requests: Sequence[FetchRequest],
        *,
        jobs: int = 8,
        cancel: CancelToken | None = None,
        on_result: Callable[[int, CacheEntry | Exception], Any] | None = None,
        on_wait: Callable[[str], None] | None = None,
        progress: BatchProgressCallback | None = None,
        item_progress: Callable[[int, int, int | None], Any] | None = None,
        options: TransferOptions | None = None,
        **changes: Any,
    ) -> list[CacheEntry | Exception]:
        """`fetch_entry` for many artifacts at once: what is cached is returned at once;
        the rest is downloaded in one `download_many` call (one runtime, `jobs` at a time,
        connections reused per host), made durable in groups, and only then moved into
        the cache; artifacts another process is fetching are waited for afterwards.

        Args:
            requests: what to fetch.
            jobs: downloads in flight at once.
            cancel: a token whose cancellation stops every download (parts kept).
            on_result: called with (index, entry or exception) as each is final.
            on_wait: see `fetch_entry`.
            progress, item_progress: the batch's progress and each request's (by its
                index), as `download_many` reports them.
            options: how each download behaves (`TransferOptions`; its ``timeout`` is
                the seconds allowed to each download).
            changes: fields of `TransferOptions` that override `options`.

        Returns:
            For each request, in order, its `CacheEntry` or the exception it raised.

        Raises:
            StorageError: the cache directory cannot be used.
            ValueError: a netrc file that does not parse (read before anything is created).
            TypeError: a keyword that is not a `TransferOptions` field.
            KeyboardInterrupt: Ctrl+C; every download is cancelled first.
        """
        return self._fetcher().many(
            requests,
            jobs=jobs,
            cancel=cancel,
            on_result=on_result,
            on_wait=on_wait,
            progress=progress,
            item_progress=item_progress,
            transfer=TransferOptions.of(options, **changes),
        )

    def lookup(self, sha256: str) -> CacheEntry | None:
        """The cached blob with this SHA-256, without any network access.

        Args:
            sha256: the digest (hex).

        Returns:
            The entry, or None when absent (or found corrupt and quarantined).

        Raises:
            ValueError: `sha256` is not 64 hex digits.
        """
        digest = check_sha256(sha256)
        with self._store.storage():
            return self._store.lookup(digest, touch=True)

    def recheck(self, sha256: str) -> CacheEntry | None:
        """The cached blob with this SHA-256, hashed again even when its file is trusted
        (`lookup` trusts the cache's own files without reading them).

        Returns:
            The entry, or None when absent, or found corrupt and moved to quarantine.

        Raises:
            ValueError: `sha256` is not 64 hex digits.
            StorageError: a corrupt blob could not be moved to quarantine.
        """
        digest = check_sha256(sha256)
        with self._store.storage():
            return self._store.recheck(digest)

    def close(self) -> None:
        """Closes the cache's catalog database (its SQLite connection); the next use
        opens it again. Until then a process keeps it open, as any SQLite user does."""
        self._store.catalog.close()

    def _fetcher(self) -> Fetcher:
        return Fetcher(self._store, self.lock_timeout, self.offline)

    # -- maintenance -------------------------------------------------------------

    def ls(self) -> list[CachedBlob]:
        """Every blob in the cache, least recently used first."""
        from surefetch.cache import maintenance  # lazily: fetches never need it

        return maintenance.ls(self._store)

    def verify(self, cancel: CancelToken | None = None) -> VerifyReport:
        """Re-hash every blob (SHA-256 and XXH3-128); quarantine those that do not match.

        Args:
            cancel: a token whose cancellation stops the verification.

        An unusable catalog (damaged, or one others could have written) is moved to
        ``quarantine/`` first, and the blobs' records are made again as they are checked
        (the URL index it held is lost: those URLs are downloaded again when next fetched
        without a digest).

        Returns:
            How many blobs were checked, where the mismatched ones went, and where an
            unusable catalog went.

        Raises:
            Cancelled: `cancel` was cancelled.
            StorageError: a mismatched blob could not be moved to quarantine.
        """
        from surefetch.cache import maintenance  # lazily: fetches never need it

        return maintenance.verify(self._store, cancel)

    def gc(self, max_size: int) -> GcReport:
        """Evict least-recently-used blobs until the blobs total at most `max_size` bytes.

        A blob whose artifact lock is held (being fetched or used right now) is kept.

        Args:
            max_size: the size to shrink to, in bytes.

        Returns:
            The evicted blobs, bytes freed and left, and how many were kept in use.

        Raises:
            ValueError: `max_size` is negative.
        """
        from surefetch.cache import maintenance  # lazily: fetches never need it

        return maintenance.gc(self._store, max_size)

    def clean(self, older_than: float = 7 * 86400, *, quarantine: bool = False) -> CleanReport:
        """Remove part files of dead downloads older than `older_than` seconds.

        A part whose download is alive (its artifact lock or engine lock is held) is
        never touched; neither is a young part, which the next fetch of its artifact
        resumes. Stray files in ``tmp/`` and the idle lock files of earlier versions
        (``locks/<key>.lock``) of that age go too.

        Args:
            older_than: minimum age in seconds (by modification time).
            quarantine: also empty ``quarantine/``.

        Returns:
            The files removed, bytes freed, and how many parts were kept as live.

        Raises:
            ValueError: `older_than` is negative.
        """
        from surefetch.cache import maintenance  # lazily: fetches never need it

        return maintenance.clean(self._store, older_than, quarantine=quarantine)
