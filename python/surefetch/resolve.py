"""What `sync` must bring, and bringing it: the plan (pins kept or re-resolved), then
every artifact checked where it is installed or fetched through the cache in one batch and
staged (see `surefetch.transaction` for the transaction around it)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from surefetch._fs import storage_error
from surefetch._log import get_logger
from surefetch.download import CancelToken, TransferOptions, hash_file, sync_filesystem
from surefetch.errors import (
    Cancelled,
    ChecksumMismatch,
    DownloadTimeout,
    LockfileOutdated,
    ManifestError,
    SizeMismatch,
    StorageError,
    SurefetchError,
    redact_url,
)
from surefetch.linking import LinkMode, place_many
from surefetch.lockfile import LockedArtifact, Lockfile, render_lockfile
from surefetch.manifest import Manifest, ManifestArtifact, StrPath

if TYPE_CHECKING:
    from surefetch.cache import Cache, CacheEntry

_log = get_logger("surefetch.cache")

__all__ = [
    "Item",
    "LazyCache",
    "Outcome",
    "Resolver",
    "SyncProgress",
    "check_locked",
    "frozen_plan",
    "installed_matches",
    "plan",
]

SyncProgress = Callable[[int, int], Any]
"""Called on the calling thread with (artifacts done, artifacts in total)."""


def installed_matches(
    target: Path, expected: LockedArtifact, executable: bool, cancel: CancelToken | None
) -> bool:
    """True when `target` is a regular file with exactly the pinned bytes (and mode)."""
    try:
        st = os.lstat(target)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != expected.size:
        return False
    if executable and not st.st_mode & stat.S_IXUSR:
        return False
    try:
        size, xxh3, sha256 = hash_file(target, sha256=True, cancel=cancel)
    except OSError:
        return False
    return (size, xxh3, sha256) == (expected.size, expected.xxh3_128, expected.sha256)


# --- planning ---------------------------------------------------------------------------------


class Item(NamedTuple):
    """One artifact to bring into the destination."""

    position: int  # in the manifest (or the lockfile)
    name: str
    url: str
    target: str
    executable: bool
    path: str | None
    pin: LockedArtifact | None  # the bytes it must be; None: resolve
    sha256: str | None  # the manifest's expectations when resolving
    size: int | None

    def entry(self, sha256: str, xxh3_128: str, size: int) -> LockedArtifact:
        return LockedArtifact(
            self.name, self.url, size, sha256, xxh3_128, self.executable, self.path
        )


def _is_kept(art: ManifestArtifact, old: LockedArtifact | None) -> bool:
    return (
        old is not None
        and old.url == art.url
        and art.sha256 in (None, old.sha256)
        and art.size in (None, old.size)
    )


def plan(
    manifest: Manifest, old: Lockfile | None, upgrade: bool
) -> tuple[list[Item], tuple[str, ...]]:
    pins = old.by_name() if old is not None else {}
    items = []
    for i, art in enumerate(manifest.artifacts):
        previous = pins.get(art.name)
        pin = previous if not upgrade and _is_kept(art, previous) else None
        if pin is not None:
            pin = pin._replace(executable=art.executable, path=art.path)
        items.append(
            Item(
                i,
                art.name,
                art.url,
                art.target,
                art.executable,
                art.path,
                pin,
                art.sha256,
                art.size,
            )
        )
    names = {a.name for a in manifest.artifacts}
    removed = tuple(sorted(n for n in pins if n not in names))
    return items, removed


def frozen_plan(lock: Lockfile) -> list[Item]:
    return [
        Item(i, a.name, a.url, a.target, a.executable, a.path, a, None, None)
        for i, a in enumerate(lock.artifacts)
    ]


def check_locked(
    items: list[Item], removed: tuple[str, ...], old_bytes: bytes | None, lock_path: Path
) -> None:
    """Raises LockfileOutdated when syncing would change the lockfile (no network needed)."""
    if old_bytes is None:
        raise LockfileOutdated(
            f"there is no lockfile at {lock_path}, but --locked forbids creating it: run "
            "`surefetch sync` without --locked, then commit the lockfile"
        )
    changed = sorted(item.name for item in items if item.pin is None)
    if not changed and not removed:
        pinned = Lockfile(tuple(item.pin for item in items if item.pin is not None))
        if render_lockfile(pinned).encode("utf-8") == old_bytes:
            return
    what = ", ".join(
        [*(f"{n} (new or changed)" for n in changed), *(f"{n} (removed)" for n in removed)]
    )
    raise LockfileOutdated(
        f"{lock_path} needs to be updated ({what or 'not in canonical form or paths changed'}), "
        "but --locked forbids it: run `surefetch sync` without --locked, then commit the lockfile"
    )


# --- fetching and staging ---------------------------------------------------------------------


class LazyCache:
    """Builds the `Cache` on first use, so that a warm sync never imports or touches it."""

    def __init__(self, cache: Cache | StrPath | None) -> None:
        self._given = cache
        self._cache: Cache | None = None
        self._lock = threading.Lock()

    def get(self) -> Cache:
        with self._lock:
            if self._cache is None:
                from surefetch.cache import Cache

                given = self._given
                self._cache = given if isinstance(given, Cache) else Cache(given)
            return self._cache

    def release(self) -> None:
        """Closes the cache's catalog if this made the `Cache` (a caller's stays open)."""
        with self._lock:
            if self._cache is not None and self._cache is not self._given:
                self._cache.close()


class Outcome(NamedTuple):
    item: Item
    entry: LockedArtifact
    staged: Path | None  # None: the target already holds these bytes
    bytes_transferred: int


class Resolver:
    """Brings every item to a staged file (or finds it installed): checks installed
    files, fetches the rest through the cache in one batch (`Cache.fetch_many`), places
    each blob in the staging directory (reflink or kernel copy, no fsync), and makes the
    staging directory durable with one `syncfs`. The first failure cancels the rest."""

    def __init__(
        self,
        root: str,
        staging: Path,
        cache: LazyCache,
        token: CancelToken,
        transfer: TransferOptions,
        lock_path: Path,
        link_mode: LinkMode,
        artifact_progress: Callable[[str, int, int | None], Any] | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.root = root
        self.staging = staging
        self.cache = cache
        self.token = token
        self.transfer = transfer
        self.lock_path = lock_path
        self.link_mode = link_mode
        self.artifact_progress = artifact_progress
        self.on_wait = on_wait

    def run(self, items: list[Item], jobs: int, progress: SyncProgress | None) -> list[Outcome]:
        total, done = len(items), 0

        def advance() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        outcomes: list[Outcome] = []
        to_fetch: list[Item] = []
        for item, installed in zip(items, self._installed(items, jobs)):
            if installed and item.pin is not None:
                outcomes.append(Outcome(item, item.pin, None, 0))
                advance()
            else:
                to_fetch.append(item)
        if self.token.cancelled:
            raise Cancelled("the sync was cancelled")
        if not to_fetch:
            return outcomes
        first: list[SurefetchError] = []

        def fetched(index: int, result: CacheEntry | Exception) -> None:
            if isinstance(result, Exception) and not first:
                first.append(self._failure(to_fetch[index], result))
                self.token.cancel()

        from surefetch.cache import FetchRequest

        requests = [
            FetchRequest(
                item.url,
                item.pin.sha256 if item.pin is not None else item.sha256,
                item.pin.size if item.pin is not None else item.size,
            )
            for item in to_fetch
        ]
        on_bytes = self.artifact_progress
        per_item = None
        if on_bytes is not None:

            def per_item(index: int, done: int, total: int | None) -> None:
                on_bytes(to_fetch[index].name, done, total)

        found = self.cache.get().fetch_many(
            requests,
            jobs=jobs,
            options=self.transfer,
            cancel=self.token,
            on_result=fetched,
            on_wait=self.on_wait,
            item_progress=per_item,
        )
        if first:
            raise first[0]
        staged = self._stage_all(to_fetch, found)
        for outcome in staged:
            outcomes.append(outcome)
            advance()
        if any(outcome.staged is not None for outcome in staged):
            try:
                sync_filesystem(self.staging)
            except OSError as exc:
                raise storage_error(exc, f"cannot sync the staged files in {self.staging}") from exc
        return outcomes

    def _installed(self, items: list[Item], jobs: int) -> list[bool]:
        """Whether each pinned item's target already holds its bytes (hashed in parallel)."""
        pinned = [item for item in items if item.pin is not None]
        if not pinned:
            return [False] * len(items)
        from concurrent.futures import ThreadPoolExecutor

        def check(item: Item) -> bool:
            assert item.pin is not None
            target = Path(self.root, item.target)
            return installed_matches(target, item.pin, item.executable, self.token)

        try:
            with ThreadPoolExecutor(max_workers=min(jobs, len(pinned))) as pool:
                checked = list(pool.map(check, pinned))
        except RuntimeError:  # no thread could start (EAGAIN): check them one by one
            checked = [check(item) for item in pinned]
        found = dict(zip((i.position for i in pinned), checked))
        return [found.get(item.position, False) for item in items]

    def _stage_all(self, items: list[Item], found: list[CacheEntry | Exception]) -> list[Outcome]:
        """Places each fetched blob in the staging directory, all in a few calls of the
        engine (`place_many`), and checks what landed; an item whose placing failed is
        settled alone (`_staged`)."""
        outcomes: list[Outcome | None] = []
        # Per link mode: (position, item, blob, its lockfile entry, staged path).
        to_place: dict[LinkMode, list[tuple[int, Item, CacheEntry, LockedArtifact, Path]]] = {}
        for position, (item, entry) in enumerate(zip(items, found)):
            if isinstance(entry, Exception):  # only after a cancel
                raise self._failure(item, entry)
            locked = self._checked_against_pin(item, entry)
            target = Path(self.root, item.target)
            if item.pin is None and installed_matches(target, locked, item.executable, self.token):
                outcomes.append(Outcome(item, locked, None, entry.bytes_transferred))
                continue
            outcomes.append(None)
            link_mode = self.link_mode
            if link_mode == "hardlink" and item.executable:
                link_mode = "auto"  # a hardlink shares the blob's mode; an executable needs its own
            staged = self.staging / str(item.position)
            to_place.setdefault(link_mode, []).append((position, item, entry, locked, staged))
        for link_mode, group in to_place.items():
            placed = place_many(
                [(entry.path, staged, _mode(item)) for _, item, entry, _, staged in group],
                link_mode,
                verify=True,
            )
            for (position, item, entry, locked, staged), attempt in zip(group, placed):
                outcomes[position] = self._staged(item, entry, locked, staged, link_mode, attempt)
        return [outcome for outcome in outcomes if outcome is not None]

    def _checked_against_pin(self, item: Item, found: CacheEntry) -> LockedArtifact:
        """The lockfile entry of `found`, which must match the item's pin (if any)."""
        if item.pin is not None and found.xxh3_128 != item.pin.xxh3_128:
            raise ChecksumMismatch(
                f"{item.name}: xxh3_128 of the download differs from {self.lock_path}: expected "
                f"{item.pin.xxh3_128}, got {found.xxh3_128}; the lockfile is inconsistent: run "
                "`surefetch sync --upgrade` to re-resolve it",
                "xxh3_128",
                item.pin.xxh3_128,
                found.xxh3_128,
            )
        return item.entry(found.sha256, found.xxh3_128, found.size)

    def _staged(
        self,
        item: Item,
        found: CacheEntry,
        entry: LockedArtifact,
        staged: Path,
        link_mode: LinkMode,
        attempt: Placed,
    ) -> Outcome:
        """The item staged, once its placing (`attempt`) is checked; a blob damaged or
        evicted meanwhile is fetched again and placed again, in this call."""
        mended = evictions = 0
        while True:
            try:
                _check_placed(attempt, found.path, staged, entry, link_mode)
                break
            except ChecksumMismatch:
                staged.unlink(missing_ok=True)
                if mended:
                    raise
                mended += 1
                found = self._mended(item, found)
            except _Evicted as exc:
                evictions += 1
                if evictions == _EVICTED_TRIES:
                    raise StorageError(
                        errno.ENOENT,
                        f"{item.name}: its cached copy was evicted (by `surefetch cache gc` in "
                        f"another process) each of {_EVICTED_TRIES} times before it could be "
                        "staged; nothing was installed: sync again once no gc runs",
                        str(exc.blob),
                    ) from None
                # Another process's gc evicted it between its fetch and its staging (an
                # artifact's lock covers its fetch, not what follows).
                _log.info("%s: its cached copy was evicted meanwhile: fetching it again", item.name)
                found = self._fetched_again(item, found)
            attempt = place_many([(found.path, staged, _mode(item))], link_mode, verify=True)[0]
        return Outcome(item, entry, staged, found.bytes_transferred)

    def _fetched_again(self, item: Item, found: CacheEntry) -> CacheEntry:
        """The blob `found` fetched again into the cache (it was evicted or damaged)."""
        try:
            return self.cache.get().fetch_entry(
                item.url,
                sha256=found.sha256,
                size=found.size,
                options=self.transfer,
                cancel=self.token,
                on_wait=self.on_wait,
            )
        except SurefetchError as exc:
            raise self._failure(item, exc) from exc

    def _mended(self, item: Item, found: CacheEntry) -> CacheEntry:
        """The blob `found`, whose copy did not match: when the blob itself no longer
        matches its digest (damaged behind the cache's back), it goes to quarantine and
        the artifact is fetched again, in this call; otherwise the copy changed while it
        was made, and that is the error."""
        cache = self.cache.get()
        if cache.recheck(found.sha256) is not None:
            raise ChecksumMismatch(
                f"{item.name}: the cached copy changed while it was copied; sync again",
                "xxh3_128",
                found.xxh3_128,
                "",
            )
        _log.warning(
            "%s: the cached blob %s did not match its digest (moved to quarantine); "
            "fetching it again",
            item.name,
            found.sha256,
        )
        return self._fetched_again(item, found)

    def _failure(self, item: Item, exc: Exception) -> SurefetchError:
        limit = self.transfer.timeout
        if isinstance(exc, DownloadTimeout) and exc.kind == "overall" and limit:
            received = "are kept in" in str(exc)  # the engine's note, when it kept any
            kept = " (what it received is kept for the next sync)" if received else ""
            return DownloadTimeout(
                f"{item.name}: did not finish within --timeout-per-item {limit:g} s{kept}; "
                "raise the limit or check the server",
                "overall",
            )
        if isinstance(exc, (ChecksumMismatch, SizeMismatch)):
            return self._integrity_error(item, exc)
        if isinstance(exc, SurefetchError):
            return _named(exc, item.name)
        if isinstance(exc, ValueError):
            return ManifestError(f"{item.name}: {exc}")
        return SurefetchError(f"{item.name}: {exc}")

    def _integrity_error(self, item: Item, exc: ChecksumMismatch | SizeMismatch) -> SurefetchError:
        if isinstance(exc, ChecksumMismatch):
            what, expected, actual = exc.algorithm or "sha256", exc.expected, exc.actual
        else:
            what, expected, actual = "size", str(exc.expected), str(exc.actual)
        if item.pin is not None:
            source = f"pinned in {self.lock_path}"
            hint = "if the change is intended, run `surefetch sync --upgrade`"
        else:
            source = "given in the manifest"
            hint = "check the URL, or fix the manifest's digest or size"
        message = (
            f"{item.name}: {what} mismatch: {source} {expected}, downloaded {actual} from "
            f"{redact_url(item.url)}; {hint}"
        )
        if isinstance(exc, ChecksumMismatch):
            return ChecksumMismatch(message, what, expected, actual)
        return SizeMismatch(message, exc.expected, exc.actual)


_EVICTED_TRIES = 3


class _Evicted(Exception):
    """The cache blob to stage is gone: another process's `gc` evicted it."""

    def __init__(self, blob: Path) -> None:
        super().__init__(str(blob))
        self.blob = blob


def _named(exc: SurefetchError, name: str) -> SurefetchError:
    """`exc` with the artifact's name in front of its message (errno-style OSErrors, with
    two arguments, keep theirs)."""
    args = exc.args
    if len(args) == 1 and isinstance(args[0], str) and not args[0].startswith(f"{name}: "):
        exc.args = (f"{name}: {args[0]}",)
    return exc


#: What `place_many` did for one item: how and what landed, or the error it met.
Placed = tuple[str, "tuple[int, str] | None"] | OSError


def _mode(item: Item) -> int:
    return 0o755 if item.executable else 0o644


# What a link mode the user asked for cannot do here, by errno (the cure is another mode).
_UNLINKABLE = {
    ("hardlink", errno.EXDEV): "the cache ({cache}) is on another filesystem",
    ("reflink", errno.EXDEV): "the cache ({cache}) is on another filesystem",
    **{
        ("reflink", code): "this filesystem cannot clone files"
        for code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY)
    },
}


def _check_placed(
    attempt: Placed, blob: Path, staged: Path, entry: LockedArtifact, link_mode: LinkMode
) -> None:
    """Checks that placing the cache blob in the staging dir (reflink, kernel copy or,
    when asked, hardlink; made durable later with the whole group) worked, and that what
    landed there has the entry's size and XXH3-128 (a hardlink too: it is the blob, and
    a blob damaged in the cache is then quarantined and fetched again)."""
    if isinstance(attempt, OSError):
        # The blob was missing when the engine placed it (another process's gc evicted
        # it), even if another fetch has brought it back since.
        named = attempt.filename is not None and os.fspath(attempt.filename) == os.fspath(blob)
        missing = named or not os.path.lexists(blob)
        if isinstance(attempt, FileNotFoundError) and missing:
            raise _Evicted(blob) from attempt
        why = _UNLINKABLE.get((link_mode, attempt.errno or 0))
        if why is not None:
            raise StorageError(
                attempt.errno,
                f"{entry.name}: cannot stage {staged} as a {link_mode}: "
                f"{why.format(cache=blob.parent)}; use --link-mode auto or copy",
            ) from attempt
        raise storage_error(
            attempt, f"{entry.name}: cannot stage {staged} ({link_mode})"
        ) from attempt
    _, landed = attempt
    if landed is not None and landed != (entry.size, entry.xxh3_128):
        xxh3 = landed[1]
        raise ChecksumMismatch(
            f"{entry.name}: the cached copy changed while it was copied (xxh3_128 "
            f"{xxh3}, expected {entry.xxh3_128}); run `surefetch cache verify`, then sync again",
            "xxh3_128",
            entry.xxh3_128,
            xxh3,
        )
