"""A content-addressed download cache with one cross-process lock per artifact.

Layout under the root (``$SUREFETCH_CACHE``, else ``$XDG_CACHE_HOME/surefetch``,
else ``~/.cache/surefetch``)::

    blobs/sha256/<2 hex>/<64 hex>    verified blobs, named by their SHA-256
    meta/<2 hex>/<64 hex>.json       size, xxh3_128 and the last URL of each blob
    locks/<key>.lock                 one flock per artifact (key: sha256-<hex> or url-<hash>)
    tmp/<key>                        downloads in flight; the engine keeps its part
                                     files in tmp/.surefetch/ (resumed by the next fetch)
    quarantine/                      blobs that did not match their digest

A fetch takes the artifact's lock (``flock``, released by the kernel when its
holder dies, so it can never go stale), looks for the blob, and downloads only
when it is missing; the engine verifies the bytes, then the file is renamed into
``blobs/`` and the directory fsynced, so nothing partial is ever visible there.
A waiting process learns whom it waits for from the lock file's content (pid,
host, URL, since when), which the holder writes when it takes the lock.

Trust model (a cache shared by several users): a blob enters ``blobs/`` only
after its digest was verified. A blob file is trusted without re-hashing only
when it is a regular file with one link, owned by the current user or root, and
not writable by group or others; any other file under ``blobs/`` (another user's,
or one another user could have changed) is re-hashed on every use, and moved to
``quarantine/`` when it does not match its name. The same goes for metadata
files, which are otherwise recomputed. Files are created 0644 and directories
0755, minus the umask. A file owned by another user can still be changed by
that user after it was checked: for a cache shared between users who do not
trust each other, give the directories the sticky bit (so that nobody can
replace another's files) and let a trusted account populate it.

The cache's own directories (``tmp/``, ``locks/``, ``blobs/``, ``meta/``,
``quarantine/`` and the levels below them) are never followed through a
symlink: each must be a real directory, and one that belongs to another user
(not root) must not be writable by group or others unless it has the sticky
bit; the root may be a symlink, but the same ownership rule applies to it.
Anything else raises `StorageError` naming the directory. Lock files are opened
with ``O_NOFOLLOW``. No file of the cache holds a password: the URLs in the
metadata and in lock files are redacted (`surefetch.errors.redact_url`).

Timeouts: ``lock_timeout`` bounds each wait for another process's lock and
raises `LockTimeout` naming the holder; the overall ``timeout`` of a fetch
covers the lock wait and the download, and raises `DownloadTimeout` when it is
what ran out (also while waiting, naming the holder too).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from surefetch._fs import fsync_dir, try_flock, write_json_atomic
from surefetch.download import (
    BatchProgressCallback,
    CancelToken,
    DownloadItem,
    DownloadResult,
    ProgressCallback,
    TransferOptions,
    download,
    download_many,
    hash_file,
    sync_filesystem,
)
from surefetch.errors import (
    Cancelled,
    DownloadTimeout,
    LockTimeout,
    NetworkError,
    SizeMismatch,
    StorageError,
    SurefetchError,
    redact_url,
)

__all__ = [
    "Cache",
    "CacheEntry",
    "CachedBlob",
    "CleanReport",
    "FetchRequest",
    "GcReport",
    "VerifyReport",
    "default_cache_root",
]

StrPath = Union[str, "os.PathLike[str]"]

_log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_POLL_S = 0.05
_FILE_MODE = 0o644
_DIR_MODE = 0o755


@dataclass(frozen=True)
class CacheEntry:
    """A verified blob in the cache.

    Attributes:
        path: the blob inside the cache; copy it out, never modify it.
        size: its size in bytes.
        sha256: its SHA-256, lowercase hex.
        xxh3_128: its XXH3-128, lowercase hex, canonical (as ``xxhsum -H2``).
        bytes_transferred: body bytes received for this call (0 from the cache).
    """

    path: Path
    size: int
    sha256: str
    xxh3_128: str
    bytes_transferred: int


@dataclass(frozen=True)
class FetchRequest:
    """One artifact of `Cache.fetch_many`: its URL and, when known, its digest and size."""

    url: str
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class CachedBlob:
    """One blob as `Cache.ls` lists it (``last_used`` in seconds since the epoch)."""

    path: Path
    sha256: str
    size: int
    last_used: float
    url: str | None


@dataclass(frozen=True)
class VerifyReport:
    """What `Cache.verify` found: how many blobs it checked and which it quarantined."""

    checked: int
    quarantined: list[Path]


@dataclass(frozen=True)
class GcReport:
    """What `Cache.gc` did: the blobs it evicted, bytes freed, bytes left, blobs kept in use."""

    evicted: list[Path]
    freed: int
    remaining: int
    in_use: int


@dataclass(frozen=True)
class CleanReport:
    """What `Cache.clean` removed, bytes freed, and how many parts it kept because they live."""

    removed: list[Path]
    freed: int
    live: int


def default_cache_root() -> Path:
    """``$SUREFETCH_CACHE``, else ``$XDG_CACHE_HOME/surefetch``, else ``~/.cache/surefetch``."""
    explicit = os.environ.get("SUREFETCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is to be ignored
        return Path(xdg) / "surefetch"
    return Path.home() / ".cache" / "surefetch"


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
        self._root = (
            Path(os.fspath(root)).expanduser() if root is not None else default_cache_root()
        )
        self._root = self._root.absolute()
        self.lock_timeout = lock_timeout
        # No network at all: answer from the cache or fail (SUREFETCH_OFFLINE=1).
        self.offline = (
            offline
            if offline is not None
            else os.environ.get("SUREFETCH_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        )
        # Directories already checked by `_dir`/`_checked` during a `fetch_many`.
        self._checked_dirs: set[Path] | None = None

    @property
    def root(self) -> Path:
        """The cache directory."""
        return self._root

    def __repr__(self) -> str:
        return f"Cache({str(self._root)!r})"

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
            ValueError: an invalid argument (URL, digest, number).
            TypeError: a keyword that is not a `TransferOptions` field.
        """
        transfer = TransferOptions.of(options, **changes)
        timeout = transfer.timeout
        deadline = time.monotonic() + timeout if timeout is not None else None
        expected = _check_sha256(sha256) if sha256 is not None else None
        key = f"sha256-{expected}" if expected else f"url-{_url_key(url)}"
        with self._storage():
            hit = self._lookup(expected, touch=True) if expected is not None else None
            if hit is not None:  # no lock needed to read an immutable blob
                _check_size(hit, size)
                return hit
            if self.offline:
                return self._offline_entry(url, expected, size)
            with self._locked(key, url, deadline, cancel, on_wait):
                if expected is not None:  # the process we waited for may have fetched it
                    hit = self._lookup(expected, touch=True)
                    if hit is not None:
                        _check_size(hit, size)
                        return hit
                return self._download(
                    url,
                    key,
                    expected,
                    deadline,
                    cancel,
                    on_wait,
                    transfer,
                    size=size,
                    progress=progress,
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
            TypeError: a keyword that is not a `TransferOptions` field.
            KeyboardInterrupt: Ctrl+C; every download is cancelled first.
        """
        transfer = TransferOptions.of(options, **changes)
        results: list[CacheEntry | Exception | None] = [None] * len(requests)
        # Within one batch each directory is checked once, not once per blob.
        self._checked_dirs = set()
        try:
            return self._fetch_many(
                requests,
                results,
                jobs,
                cancel,
                on_result,
                on_wait,
                progress,
                item_progress,
                transfer,
            )
        finally:
            self._checked_dirs = None

    def _fetch_many(
        self,
        requests: Sequence[FetchRequest],
        results: list[CacheEntry | Exception | None],
        jobs: int,
        cancel: CancelToken | None,
        on_result: Callable[[int, CacheEntry | Exception], Any] | None,
        on_wait: Callable[[str], None] | None,
        progress: BatchProgressCallback | None,
        item_progress: Callable[[int, int, int | None], Any] | None,
        transfer: TransferOptions,
    ) -> list[CacheEntry | Exception]:
        def settle(index: int, result: CacheEntry | Exception) -> None:
            results[index] = result
            if on_result is not None:
                on_result(index, result)

        with self._storage(), contextlib.ExitStack() as held:
            batch: list[tuple[int, str, str | None]] = []  # (index, key, expected)
            waiting: list[int] = []
            for index, request in enumerate(requests):
                try:
                    expected = _check_sha256(request.sha256) if request.sha256 else None
                    hit = self._lookup(expected, touch=True) if expected is not None else None
                    if hit is not None:
                        _check_size(hit, request.size)
                        settle(index, hit)
                        continue
                except SurefetchError as exc:
                    settle(index, exc)
                    continue
                if self.offline:
                    try:
                        settle(index, self._offline_entry(request.url, expected, request.size))
                    except SurefetchError as exc:
                        settle(index, exc)
                    continue
                key = f"sha256-{expected}" if expected else f"url-{_url_key(request.url)}"
                fd = _flock_nb(self._dir("locks") / f"{key}.lock")
                if fd is None:  # another process (or an earlier request here) has it
                    waiting.append(index)
                    continue
                held.callback(os.close, fd)
                _write_holder(fd, request.url)
                batch.append((index, key, expected))
            if batch:
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
                entry: CacheEntry | Exception = self.fetch_entry(
                    request.url,
                    sha256=request.sha256,
                    size=request.size,
                    options=transfer,
                    cancel=cancel,
                    on_wait=on_wait,
                )
            except SurefetchError as exc:
                entry = exc
            settle(index, entry)
        return [r for r in results if r is not None]

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
        """Downloads `batch` into tmp/ (durable, in groups), then moves each blob into
        place and syncs the blob directories once for all."""
        items = [
            DownloadItem(requests[i].url, out=key, sha256=expected, size=requests[i].size)
            for i, key, expected in batch
        ]
        placed: list[tuple[int, CacheEntry]] = []

        def one(position: int, result: DownloadResult | Exception) -> None:
            index, _, expected = batch[position]
            if isinstance(result, Exception):
                settle(index, result)
                return
            assert result.sha256 is not None  # computed whenever none was expected
            url = redact_url(requests[index].url)
            info = {"size": result.size, "xxh3_128": result.xxh3_128, "url": url}
            try:
                path = self._place(result.path, result.sha256, info, expected is None)
            except OSError as exc:
                settle(index, exc)
                return
            if expected is None:
                self._write_index(
                    requests[index].url, result.sha256, result.etag, result.last_modified
                )
            entry = CacheEntry(
                path, result.size, result.sha256, result.xxh3_128, result.bytes_transferred
            )
            placed.append((index, entry))

        download_many(
            items,
            self._dir("tmp"),
            jobs=jobs,
            cancel=cancel,
            on_result=one,
            progress=progress,
            item_progress=item_progress,
            options=transfer,
        )
        if placed:
            # The blobs' data was durable before their renames; one syncfs makes the
            # renames (in up to 256 directories) durable too.
            sync_filesystem(self._dir("blobs"))
        for index, entry in placed:
            settle(index, entry)

    def _place(self, tmp: Path, digest: str, info: dict[str, Any], by_url: bool) -> Path:
        """Moves the verified, durable download `tmp` to its blob path, its directory
        synced later by the caller."""
        if not by_url:
            return self._install(tmp, digest, info, sync=False)
        with self._locked(f"sha256-{digest}", info["url"], None, None, None):
            return self._install(tmp, digest, info, sync=False)

    def _download(
        self,
        url: str,
        key: str,
        expected: str | None,
        deadline: float | None,
        cancel: CancelToken | None,
        on_wait: Callable[[str], None] | None,
        transfer: TransferOptions,
        **options: Any,
    ) -> CacheEntry:
        """Downloads into tmp/ (resuming a part left there) and moves the blob into place.

        Without a digest, a blob this URL gave before is revalidated (RFC 9110 §13.1:
        If-None-Match with its strong ETag, else If-Modified-Since): a ``304`` reuses it
        with no body transferred."""
        remaining = _remaining(deadline, url)
        tmp = self._dir("tmp") / key
        cached, etag, modified = (None, None, None) if expected else self._indexed(url)
        if etag is None and modified is None:
            cached = None  # nothing to revalidate it with: download again
        if cached is not None:
            _log.info("revalidating %s (%s)", redact_url(url), etag or modified)
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
        if result.not_modified and cached is not None:
            _log.info("%s not modified: the cached copy is used", redact_url(url))
            return cached
        assert result.sha256 is not None  # computed whenever none was expected
        digest = result.sha256
        info = {"size": result.size, "xxh3_128": result.xxh3_128, "url": redact_url(url)}
        if expected is not None:
            path = self._install(tmp, digest, info)
        else:
            with self._locked(f"sha256-{digest}", url, deadline, cancel, on_wait):
                path = self._install(tmp, digest, info)
            self._write_index(url, digest, result.etag, result.last_modified)
        return CacheEntry(path, result.size, digest, result.xxh3_128, result.bytes_transferred)

    # -- the URL index: revalidation and --offline --------------------------------

    def _index_path(self, url: str) -> Path:
        key = _url_key(url)
        return self._checked("urls", key[:2]) / f"{key}.json"

    def _indexed(self, url: str) -> tuple[CacheEntry | None, str | None, str | None]:
        """The blob this URL gave last time (checked as any lookup), and what revalidates
        it: its strong ETag, else its Last-Modified date (both None when it had neither)."""
        path = self._index_path(url)
        record = _read_json(path) if _trusted_path(path) else {}
        digest = record.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return None, None, None
        entry = self._lookup(digest, touch=True)
        if entry is None:
            return None, None, None
        etag, modified = record.get("etag"), record.get("last_modified")
        if isinstance(etag, str) and not etag.startswith("W/"):
            return entry, etag, None
        if isinstance(modified, str):
            return entry, None, modified
        return entry, None, None

    def _write_index(
        self, url: str, digest: str, etag: str | None, last_modified: str | None
    ) -> None:
        """Records which blob `url` gave, under which validators (best effort: a lost
        record only costs a download)."""
        record = {
            "url": redact_url(url),
            "sha256": digest,
            "etag": etag,
            "last_modified": last_modified,
        }
        key = _url_key(url)
        directory = self._dir("urls", key[:2])
        with contextlib.suppress(OSError):  # best effort
            write_json_atomic(directory / f"{key}.json", record, durable=False, mode=_FILE_MODE)

    def _offline_entry(self, url: str, expected: str | None, size: int | None) -> CacheEntry:
        """What the cache holds for `url` without any network access, or NetworkError."""
        if expected is None:
            entry, _, _ = self._indexed(url)
            if entry is not None:
                _check_size(entry, size)
                return entry
            raise NetworkError(
                f"offline (--offline or SUREFETCH_OFFLINE): {redact_url(url)} was never "
                f"fetched into the cache at {self._root}; fetch it once online (without "
                "--offline or SUREFETCH_OFFLINE)"
            )
        raise NetworkError(
            f"offline (--offline or SUREFETCH_OFFLINE): the cache at {self._root} has no blob "
            f"with sha256 {expected} for {redact_url(url)}; fetch it once online"
        )

    @contextlib.contextmanager
    def _storage(self) -> Iterator[None]:
        """Turns a failure of the cache's own file operations into a `StorageError`."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc, SurefetchError) or exc.errno is None:
                raise
            raise StorageError(
                exc.errno,
                f"cannot use the cache at {self._root}: {exc.strerror} ({exc.filename}); "
                "fix its permissions or use another directory (SUREFETCH_CACHE, --cache)",
            ) from exc

    def lookup(self, sha256: str) -> CacheEntry | None:
        """The cached blob with this SHA-256, without any network access.

        Args:
            sha256: the digest (hex).

        Returns:
            The entry, or None when absent (or found corrupt and quarantined).

        Raises:
            ValueError: `sha256` is not 64 hex digits.
        """
        digest = _check_sha256(sha256)
        with self._storage():
            return self._lookup(digest, touch=True)

    # -- maintenance -------------------------------------------------------------

    def ls(self) -> list[CachedBlob]:
        """Every blob in the cache, least recently used first."""
        found = []
        for path, digest in self._blobs():
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            meta = _read_json(self._meta_path(digest))
            url = _printable(redact_url(meta["url"])) if isinstance(meta.get("url"), str) else None
            found.append(CachedBlob(path, digest, st.st_size, st.st_mtime, url))
        return sorted(found, key=lambda b: (b.last_used, b.sha256))

    def verify(self, cancel: CancelToken | None = None) -> VerifyReport:
        """Re-hash every blob (SHA-256 and XXH3-128); quarantine those that do not match.

        Args:
            cancel: a token whose cancellation stops the verification.

        Returns:
            How many blobs were checked and where the mismatched ones went.

        Raises:
            Cancelled: `cancel` was cancelled.
            StorageError: a mismatched blob could not be moved to quarantine.
        """
        checked = 0
        quarantined: list[Path] = []
        for path, digest in self._blobs():
            try:
                regular = stat.S_ISREG(path.lstat().st_mode)
                size, xxh3, sha = hash_file(path, cancel=cancel) if regular else (0, "", "")
            except FileNotFoundError:
                continue
            checked += 1
            if sha != digest:
                quarantined.append(self._quarantine(path, digest))
                continue
            info = _read_json(self._meta_path(digest))
            if (info.get("size"), info.get("xxh3_128")) != (size, xxh3):
                self._write_meta(digest, {"size": size, "xxh3_128": xxh3})
        return VerifyReport(checked, quarantined)

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
        if max_size < 0:
            raise ValueError(f"max_size must be 0 or more, not {max_size}")
        blobs = self.ls()
        total = sum(b.size for b in blobs)
        evicted: list[Path] = []
        freed = in_use = 0
        for blob in blobs:
            if total <= max_size:
                break
            with self._try_locked(f"sha256-{blob.sha256}") as held:
                if not held:
                    in_use += 1
                    continue
                with contextlib.suppress(FileNotFoundError):
                    blob.path.unlink()
                    evicted.append(blob.path)
                    freed += blob.size
                    total -= blob.size
                with contextlib.suppress(FileNotFoundError):
                    self._meta_path(blob.sha256).unlink()
        return GcReport(evicted, freed, total, in_use)

    def clean(self, older_than: float = 7 * 86400, *, quarantine: bool = False) -> CleanReport:
        """Remove part files of dead downloads older than `older_than` seconds.

        A part whose download is alive (its engine lock is held) is never touched;
        neither is a young part, which the next fetch of its artifact resumes.
        Stray files in ``tmp/`` and idle lock files of that age go too.

        Args:
            older_than: minimum age in seconds (by modification time).
            quarantine: also empty ``quarantine/``.

        Returns:
            The files removed, bytes freed, and how many parts were kept as live.

        Raises:
            ValueError: `older_than` is negative.
        """
        if older_than < 0:
            raise ValueError(f"older_than must be 0 or more seconds, not {older_than}")
        cutoff = time.time() - older_than
        removed: list[tuple[Path, int]] = []
        live = 0
        parts = self._checked("tmp", ".surefetch")
        for base, group in _part_groups(parts).items():
            if _newest_mtime(group) > cutoff:
                continue
            with _try_flock(parts / f"{base}.lock", unlink=True) as ok:
                if not ok:
                    live += 1
                    continue
                removed += _remove(group)
        tmp = self._checked("tmp")
        for stray in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            if stray.is_file() and _newest_mtime([stray]) <= cutoff:
                with self._try_locked(stray.name) as ok:
                    if ok:
                        removed += _remove([stray])
        locks = self._checked("locks")
        for lock in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
            if _newest_mtime([lock]) <= cutoff:
                with _try_flock(lock, unlink=True):
                    pass
        quarantined = self._checked("quarantine")
        if quarantine and quarantined.is_dir():
            removed += _remove(sorted(quarantined.iterdir()))
        with contextlib.suppress(OSError):
            parts.rmdir()  # only when empty
        return CleanReport([p for p, _ in removed], sum(n for _, n in removed), live)

    # -- internals ----------------------------------------------------------------

    def _dir(self, *parts: str) -> Path:
        """``root/parts...``, created 0755 minus the umask, level by level, each
        level checked (`_check_dir`)."""
        checked = self._checked_dirs
        whole = self._root.joinpath(*parts)
        if checked is not None and whole in checked:
            return whole
        path = self._root
        if not path.is_dir():
            path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        _check_dir(path, os.stat(path), root=True)
        for part in parts:
            path = path / part
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=_DIR_MODE)
            _check_dir(path, os.lstat(path))
        if checked is not None:
            checked.add(whole)
        return path

    def _checked(self, *parts: str) -> Path:
        """``root/parts...``, not created; every level of it that exists is checked
        (`_check_dir`)."""
        whole = self._root.joinpath(*parts)
        checked = self._checked_dirs
        if checked is not None and whole in checked:
            return whole
        path = self._root
        try:
            _check_dir(path, os.stat(path), root=True)
            for part in parts:
                path = path / part
                _check_dir(path, os.lstat(path))
        except FileNotFoundError:
            return whole
        if checked is not None:
            checked.add(whole)
        return whole

    def _blob_path(self, digest: str) -> Path:
        return self._checked("blobs", "sha256", digest[:2]) / digest

    def _meta_path(self, digest: str) -> Path:
        return self._checked("meta", digest[:2]) / f"{digest}.json"

    def _blobs(self) -> Iterator[tuple[Path, str]]:
        top = self._checked("blobs", "sha256")
        if not top.is_dir():
            return
        for sub in sorted(top.iterdir()):
            try:
                st = sub.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                _check_dir(sub, st)
                for path in sorted(sub.iterdir()):
                    if _SHA256.fullmatch(path.name) and path.name[:2] == sub.name:
                        yield path, path.name

    def _lookup(self, digest: str, *, touch: bool) -> CacheEntry | None:
        path = self._blob_path(digest)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        if not _trusted(st):
            return self._rehash(path, digest)
        meta = self._meta_path(digest)
        info = _read_json(meta) if _trusted_path(meta) else {}
        xxh3 = info.get("xxh3_128")
        if info.get("size") != st.st_size or not isinstance(xxh3, str):
            size, xxh3, _ = hash_file(path, sha256=False)
            self._write_meta(digest, {"size": size, "xxh3_128": xxh3})
        if touch:
            with contextlib.suppress(OSError):  # another user's blob: LRU order is best effort
                os.utime(path)
        return CacheEntry(path, st.st_size, digest, xxh3, 0)

    def _rehash(self, path: Path, digest: str) -> CacheEntry | None:
        """An untrusted file under blobs/: keep it only if its bytes match its name."""
        try:
            regular = stat.S_ISREG(path.lstat().st_mode)
            size, xxh3, sha = hash_file(path) if regular else (0, "", "")
        except FileNotFoundError:
            return None
        if sha != digest:
            self._quarantine(path, digest)
            return None
        return CacheEntry(path, size, digest, xxh3, 0)

    def _quarantine(self, path: Path, digest: str) -> Path:
        target = self._dir("quarantine") / f"{digest}.{time.time_ns()}"
        try:
            os.rename(path, target)
        except OSError as exc:
            raise StorageError(
                exc.errno,
                f"{path} does not match its digest and cannot be moved to quarantine "
                f"({exc.strerror}); remove it as its owner or as root",
            ) from exc
        with contextlib.suppress(FileNotFoundError):
            self._meta_path(digest).unlink()
        return target

    def _install(self, tmp: Path, digest: str, info: dict[str, Any], *, sync: bool = True) -> Path:
        """Moves the verified download `tmp` to its blob path (or drops it if one is there);
        `sync`: fsync the blob's directory (else the caller makes it durable)."""
        self._write_meta(digest, info)
        if self._lookup(digest, touch=True) is not None:
            tmp.unlink()
            return self._blob_path(digest)
        blob = self._blob_path(digest)
        directory = self._dir("blobs", "sha256", digest[:2])
        os.rename(tmp, blob)
        if sync:
            try:
                fsync_dir(directory)
            except OSError as exc:
                raise StorageError(
                    exc.errno,
                    f"the blob {blob} is in the cache, whole and verified, but its durability is "
                    f"unknown: syncing the directory {directory} failed: {exc.strerror} (os error "
                    f"{exc.errno}); a crash or power loss could still lose it: check the disk",
                ) from exc
        return blob

    def _write_meta(self, digest: str, info: dict[str, Any]) -> None:
        """Writes the metadata atomically; a failure only costs a re-hash later (but a
        directory that is not the cache's own is refused, as everywhere)."""
        try:
            path = self._meta_path(digest)
            old = _read_json(path)
            self._dir("meta", digest[:2])
            value = {**old, **info, "sha256": digest}
            write_json_atomic(path, value, durable=False, mode=_FILE_MODE)
        except StorageError:
            raise
        except OSError:
            pass  # best effort (the temporary is gone: a full disk must not also keep it)

    @contextlib.contextmanager
    def _try_locked(self, key: str) -> Iterator[bool]:
        """Holds the artifact lock `key` if nobody else does; yields whether it does."""
        with _try_flock(self._checked("locks") / f"{key}.lock", unlink=False) as ok:
            yield ok

    @contextlib.contextmanager
    def _locked(
        self,
        key: str,
        url: str,
        deadline: float | None,
        cancel: CancelToken | None,
        on_wait: Callable[[str], None] | None,
    ) -> Iterator[None]:
        """Holds the artifact lock `key`, waiting for its holder if needed."""
        path = self._dir("locks") / f"{key}.lock"
        fd = _wait_for_lock(path, url, deadline, self.lock_timeout, cancel, on_wait)
        try:
            _write_holder(fd, url)
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


# -- locks ---------------------------------------------------------------------


def _flock_nb(path: Path) -> int | None:
    """A descriptor holding an exclusive flock on the file now at `path`, or None when busy."""
    return try_flock(path, _FILE_MODE)


@contextlib.contextmanager
def _try_flock(path: Path, *, unlink: bool) -> Iterator[bool]:
    """Holds `path`'s flock if free (yields True), else yields False.

    With `unlink`, removes the lock file while still holding it (the engine's
    protocol: a waiter then notices the inode changed). A missing lock file
    counts as free, and is not created.
    """
    if not path.parent.is_dir():
        yield True
        return
    try:
        fd = _flock_nb(path)
    except FileNotFoundError:
        yield True
        return
    if fd is None:
        yield False
        return
    try:
        yield True
        if unlink:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _wait_for_lock(
    path: Path,
    url: str,
    deadline: float | None,
    lock_timeout: float,
    cancel: CancelToken | None,
    on_wait: Callable[[str], None] | None,
) -> int:
    """Polls the flock on `path` until it is ours, the time runs out, or `cancel` fires."""
    started = time.monotonic()
    lock_deadline = started + lock_timeout
    told = False
    while True:
        if cancel is not None and cancel.cancelled:
            raise Cancelled(
                f"cancelled while waiting for {_holder(path)} to finish {redact_url(url)}"
            )
        fd = _flock_nb(path)
        if fd is not None:
            return fd
        now = time.monotonic()
        if not told:
            told = True
            _log.info("waiting for %s (cache lock of %s)", _holder(path), redact_url(url))
            if on_wait is not None:
                on_wait(_holder(path))
        waited = now - started
        if deadline is not None and now >= deadline and deadline <= lock_deadline:
            raise DownloadTimeout(
                f"the timeout ran out after {waited:.1f} s waiting for {_holder(path)} "
                f"to finish {redact_url(url)}; allow more time (timeout / --timeout) or stop "
                "that process"
            )
        if now >= lock_deadline:
            raise LockTimeout(
                f"gave up after {waited:.1f} s waiting for the cache lock on {redact_url(url)}, "
                "held by "
                f"{_holder(path)}; if that process is stuck stop it (its lock goes with it), "
                f"or wait longer (lock_timeout / --lock-timeout)"
            )
        time.sleep(_POLL_S)


def _write_holder(fd: int, url: str) -> None:
    """Tells waiters who holds the lock (best effort: another user's file is read-only).

    Others may read the lock file: the URL's password is not written.
    """
    import socket

    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "url": redact_url(url),
        "since": time.time(),
    }
    with contextlib.suppress(OSError):
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _holder(path: Path) -> str:
    """``pid 12 on host h (fetching URL since 12:00:01)``, from the lock file's content."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            record = json.loads(os.read(fd, 8192) or b"{}")
        finally:
            os.close(fd)
        pid, host = int(record["pid"]), _printable(str(record["host"]))
        url = _printable(redact_url(str(record["url"])))
        since = time.strftime("%H:%M:%S", time.localtime(float(record["since"])))
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return "another process (it has not said which)"
    return f"pid {pid} on host {host} (fetching {url} since {since})"


def _printable(text: str, limit: int = 300) -> str:
    """A lock file is written by other processes: keep it to one short line."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


# -- small helpers -------------------------------------------------------------


def _check_sha256(sha256: str) -> str:
    digest = sha256.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"invalid sha256 {sha256!r}: expected 64 hex digits")
    return digest


def _url_key(url: str) -> str:
    import hashlib

    return hashlib.sha256(url.encode()).hexdigest()[:40]


def _check_size(entry: CacheEntry, size: int | None) -> None:
    if size is not None and entry.size != size:
        raise SizeMismatch(
            f"size mismatch: the cached blob with sha256 {entry.sha256} is {entry.size} bytes, "
            f"not {size}; check the expected size",
            expected=size,
            actual=entry.size,
        )


def _remaining(deadline: float | None, url: str) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DownloadTimeout(
            f"the timeout ran out before {redact_url(url)} could start; allow more time"
        )
    return left


def _trusted(st: os.stat_result) -> bool:
    """A file nobody but us (or root) can have written: ours, one link, not group/other-writable."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
        and st.st_uid in (os.getuid(), 0)
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _check_dir(path: Path, st: os.stat_result, *, root: bool = False) -> None:
    """Refuses a directory of the cache's own that is a symlink (`root`, which the
    user chose, may be one: `st` is then the target's), not a directory, or another
    user's that group or others can write without the sticky bit."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        code, problem = errno.ELOOP, "is a symbolic link, which the cache never follows"
    elif not stat.S_ISDIR(mode):
        code, problem = errno.ENOTDIR, "is not a directory"
    elif (
        st.st_uid not in (os.geteuid(), 0)
        and mode & (stat.S_IWGRP | stat.S_IWOTH)
        and not mode & stat.S_ISVTX
    ):
        code = errno.EPERM
        problem = (
            f"belongs to another user (uid {st.st_uid}) and others can write to it without "
            "the sticky bit, so nothing in it can be trusted"
        )
    else:
        return
    what = "the cache directory" if root else "a directory of the cache"
    fix = (
        "fix its owner or permissions (chmod +t, or go-w)"
        if code == errno.EPERM
        else "remove it (the cache recreates it)"
    )
    raise StorageError(
        code,
        f"{what} {path} {problem}: {fix}, or use another cache (--cache DIR, SUREFETCH_CACHE)",
        str(path),
    )


def _trusted_path(path: Path) -> bool:
    try:
        return _trusted(path.lstat())
    except FileNotFoundError:
        return False


def _read_json(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            value = json.loads(f.read(65536))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _newest_mtime(paths: list[Path]) -> float:
    newest = 0.0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            newest = max(newest, path.lstat().st_mtime)
    return newest


_PART = re.compile(r"(.+)\.part(?:\.json(?:\.tmp)?)?")


def _part_groups(parts: Path) -> dict[str, list[Path]]:
    """The engine's files in `parts` by download: ``<name>.part``, ``.part.json``, ``.json.tmp``."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(parts.iterdir()) if parts.is_dir() else []:
        match = _PART.fullmatch(path.name)
        if match:
            groups.setdefault(match[1], []).append(path)
    return groups


def _remove(paths: list[Path]) -> list[tuple[Path, int]]:
    """Removes those of `paths` that are files; returns them with their sizes."""
    gone = []
    for path in paths:
        try:
            size = path.lstat().st_size
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        gone.append((path, size))
    return gone
