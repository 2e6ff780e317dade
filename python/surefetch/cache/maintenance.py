"""Keeping the cache: list its blobs (`ls`), re-hash them (`verify`), evict the least
recently used (`gc`), and remove what dead downloads left (`clean`); `Cache` documents
each, and the reports they return are here."""

from __future__ import annotations

import contextlib
import re
import stat
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from surefetch.cache.locks import PARTS, flocked_if_free, locked_if_free
from surefetch.cache.store import BlobStore, printable, read_json
from surefetch.download import CancelToken, hash_file
from surefetch.errors import StorageError, redact_url

__all__ = [
    "CachedBlob",
    "CleanReport",
    "GcReport",
    "VerifyReport",
    "clean",
    "gc",
    "ls",
    "verify",
]


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
    """What `Cache.verify` found: how many blobs it checked and which it quarantined
    (`not_quarantined`: those that did not match either but could not be moved, in a
    cache this user may not change); `catalog`: where it moved an unusable catalog
    (its blob records were then made again; its URL index is lost), `catalog_problem`
    why, when it could not."""

    checked: int
    quarantined: list[Path]
    catalog: list[Path] = field(default_factory=list)
    catalog_problem: str | None = None
    not_quarantined: list[Path] = field(default_factory=list)


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


def ls(store: BlobStore) -> list[CachedBlob]:
    """See `Cache.ls`."""
    found = []
    for path, digest in store.blobs():
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        record = store.catalog.blob(digest)
        if record is not None:
            url = record.url
        else:
            legacy = read_json(store.legacy_meta_path(digest)).get("url")
            url = legacy if isinstance(legacy, str) else None
        url = printable(redact_url(url)) if url is not None else None
        found.append(CachedBlob(path, digest, st.st_size, st.st_mtime, url))
    return sorted(found, key=lambda b: (b.last_used, b.sha256))


def verify(store: BlobStore, cancel: CancelToken | None = None) -> VerifyReport:
    """See `Cache.verify`."""
    checked = 0
    quarantined: list[Path] = []
    not_quarantined: list[Path] = []
    moved, problem = _replace_an_unusable_catalog(store)
    for path, digest in store.blobs():
        try:
            regular = stat.S_ISREG(path.lstat().st_mode)
            size, xxh3, sha = hash_file(path, cancel=cancel) if regular else (0, "", "")
        except FileNotFoundError:
            continue
        checked += 1
        if sha != digest:
            try:
                quarantined.append(store.quarantine(path, digest))
            except StorageError:
                not_quarantined.append(path)
            continue
        record = store.catalog.blob(digest)
        if record is None or (record.size, record.xxh3_128) != (size, xxh3):
            store.record(digest, size, xxh3)
    return VerifyReport(checked, quarantined, moved, problem, not_quarantined)


def _replace_an_unusable_catalog(store: BlobStore) -> tuple[list[Path], str | None]:
    """Moves an unusable catalog to quarantine/ (a new one is then made as the blobs are
    verified); returns where it went, or why it could not be used and stays."""
    problem = store.catalog.problem()
    if problem is None:
        return [], None
    try:
        return store.catalog.set_aside(store.directory("quarantine")), None
    except OSError as exc:
        return [], f"{problem}; it could not be moved to quarantine: {exc.strerror}"


def gc(store: BlobStore, max_size: int) -> GcReport:
    """See `Cache.gc`."""
    if max_size < 0:
        raise ValueError(f"max_size must be 0 or more, not {max_size}")
    blobs = ls(store)
    total = sum(b.size for b in blobs)
    evicted: list[Path] = []
    freed = in_use = 0
    for blob in blobs:
        if total <= max_size:
            break
        with locked_if_free(store, f"sha256-{blob.sha256}") as held:
            if not held:
                in_use += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                blob.path.unlink()
                evicted.append(blob.path)
                freed += blob.size
                total -= blob.size
            store.forget(blob.sha256)
    return GcReport(evicted, freed, total, in_use)


def clean(store: BlobStore, older_than: float, *, quarantine: bool) -> CleanReport:
    """See `Cache.clean`."""
    if older_than < 0:
        raise ValueError(f"older_than must be 0 or more seconds, not {older_than}")
    cutoff = time.time() - older_than
    removed: list[tuple[Path, int]] = []
    live = 0
    locks = store.checked("locks")

    def legacy_lock_free(key: str) -> AbstractContextManager[bool]:
        return flocked_if_free(locks / f"{key}.lock", unlink=False)

    # This version's downloads (under the lock table), then those of caches before it.
    for where, artifact_free in (
        (PARTS, partial(locked_if_free, store)),
        (("tmp",), legacy_lock_free),
    ):
        gone, kept = _clean_downloads(store.checked(*where), artifact_free, cutoff)
        removed += gone
        live += kept
    for lock in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        if _newest_mtime([lock]) <= cutoff:  # a lock file of a cache before the table
            with flocked_if_free(lock, unlink=True):
                pass
    quarantined = store.checked("quarantine")
    if quarantine and quarantined.is_dir():
        removed += _remove(sorted(quarantined.iterdir()))
    return CleanReport([p for p, _ in removed], sum(n for _, n in removed), live)


def _clean_downloads(
    tmp: Path, artifact_free: Callable[[str], AbstractContextManager[bool]], cutoff: float
) -> tuple[list[tuple[Path, int]], int]:
    """Removes the downloads in `tmp` that nobody has touched since `cutoff` and whose
    locks are free: the engine's part files (in ``.surefetch/``) and finished downloads
    not yet moved into ``blobs/``. Returns what it removed and how many live parts it kept."""
    removed: list[tuple[Path, int]] = []
    live = 0
    parts = tmp / ".surefetch"
    for base, group in _part_groups(parts).items():
        if _newest_mtime(group) > cutoff:
            continue
        # A batch of the cache downloads under the artifact lock alone (no engine lock).
        with (
            artifact_free(base) as artifact_is_free,
            flocked_if_free(parts / f"{base}.lock", unlink=True) as part_is_free,
        ):
            if not (artifact_is_free and part_is_free):
                live += 1
                continue
            removed += _remove(group)
    for stray in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        if stray.is_file() and _newest_mtime([stray]) <= cutoff:
            with artifact_free(stray.name) as ok:
                if ok:
                    removed += _remove([stray])
    with contextlib.suppress(OSError):
        parts.rmdir()  # only when empty
    return removed, live


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
