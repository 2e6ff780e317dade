"""The URL index (``urls/<2 hex>/<key>.json``): which blob each URL gave last time, and
its validators, so that a fetch without a digest revalidates its blob instead of
downloading it again, and ``--offline`` can answer it without any network access."""

from __future__ import annotations

import contextlib

from surefetch._fs import write_json_atomic
from surefetch.cache.store import (
    FILE_MODE,
    SHA256,
    BlobStore,
    CacheEntry,
    check_size,
    read_json,
    trusted_path,
)
from surefetch.errors import NetworkError, redact_url

__all__ = ["indexed", "offline_entry", "url_key", "write_index"]


def url_key(url: str) -> str:
    """The key of a URL in the index and in lock names (``url-<key>``)."""
    import hashlib

    return hashlib.sha256(url.encode()).hexdigest()[:40]


def indexed(store: BlobStore, url: str) -> tuple[CacheEntry | None, str | None, str | None]:
    """The blob this URL gave last time (checked as any lookup), and what revalidates
    it: its strong ETag, else its Last-Modified date (both None when it had neither)."""
    key = url_key(url)
    path = store.checked("urls", key[:2]) / f"{key}.json"
    record = read_json(path) if trusted_path(path) else {}
    digest = record.get("sha256")
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        return None, None, None
    entry = store.lookup(digest, touch=True)
    if entry is None:
        return None, None, None
    etag, modified = record.get("etag"), record.get("last_modified")
    if isinstance(etag, str) and not etag.startswith("W/"):
        return entry, etag, None
    if isinstance(modified, str):
        return entry, None, modified
    return entry, None, None


def write_index(
    store: BlobStore, url: str, digest: str, etag: str | None, last_modified: str | None
) -> None:
    """Records which blob `url` gave, under which validators (best effort: a lost
    record only costs a download)."""
    record = {
        "url": redact_url(url),
        "sha256": digest,
        "etag": etag,
        "last_modified": last_modified,
    }
    key = url_key(url)
    directory = store.directory("urls", key[:2])
    with contextlib.suppress(OSError):  # best effort
        write_json_atomic(directory / f"{key}.json", record, durable=False, mode=FILE_MODE)


def offline_entry(store: BlobStore, url: str, expected: str | None, size: int | None) -> CacheEntry:
    """What the cache holds for `url` without any network access, or NetworkError."""
    if expected is None:
        entry, _, _ = indexed(store, url)
        if entry is not None:
            check_size(entry, size)
            return entry
        raise NetworkError(
            f"offline (--offline or SUREFETCH_OFFLINE): {redact_url(url)} was never "
            f"fetched into the cache at {store.root}; fetch it once online (without "
            "--offline or SUREFETCH_OFFLINE)"
        )
    raise NetworkError(
        f"offline (--offline or SUREFETCH_OFFLINE): the cache at {store.root} has no blob "
        f"with sha256 {expected} for {redact_url(url)}; fetch it once online"
    )
