"""The URL index (in the catalog, `surefetch.cache.catalog`): which blob each URL gave
last time, and its validators, so that a fetch without a digest revalidates its blob instead of
downloading it again, and ``--offline`` can answer it without any network access."""

from __future__ import annotations

from collections.abc import Sequence

from surefetch._digests import sha256
from surefetch.cache.catalog import UrlRecord, url_record
from surefetch.cache.store import (
    SHA256,
    BlobStore,
    CacheEntry,
    check_size,
    read_json,
    trusted_path,
)
from surefetch.errors import NetworkError, redact_url

__all__ = ["indexed_many", "offline_entry", "url_key", "write_index"]


def url_key(url: str) -> str:
    """The key of a URL in the index and in lock names (``url-<key>``)."""
    return sha256(url.encode()).hexdigest()[:40]


def indexed_many(
    store: BlobStore, urls: Sequence[str]
) -> list[tuple[CacheEntry | None, str | None, str | None]]:
    """For each of `urls`: the blob it gave last time (checked as any lookup), and what
    revalidates it: its strong ETag, else its Last-Modified date (both None when it had
    neither). The catalog is read in a few queries for them all."""
    keys = [url_key(url) for url in urls]
    records = store.catalog.urls(keys)
    legacy = store.has_legacy_index()
    return [
        _revalidation(store, records.get(key) or (_legacy_record(store, key) if legacy else None))
        for key in keys
    ]


def _revalidation(
    store: BlobStore, record: UrlRecord | None
) -> tuple[CacheEntry | None, str | None, str | None]:
    if record is None or not SHA256.fullmatch(record.sha256):
        return None, None, None
    entry = store.lookup(record.sha256, touch=True)
    if entry is None:
        return None, None, None
    if record.etag is not None and not record.etag.startswith("W/"):
        return entry, record.etag, None
    return entry, None, record.last_modified


def _record(store: BlobStore, key: str) -> UrlRecord | None:
    """The catalog's record of the URL `key`, else that of a cache's older index file."""
    return store.catalog.url(key) or _legacy_record(store, key)


def _legacy_record(store: BlobStore, key: str) -> UrlRecord | None:
    """The record of the URL `key` in the index files of caches before the catalog."""
    path = store.checked("urls", key[:2]) / f"{key}.json"
    legacy = read_json(path) if trusted_path(path) else {}
    fields = ("url", "sha256", "etag", "last_modified")
    return url_record(*(legacy.get(field) for field in fields))


def write_index(
    store: BlobStore, url: str, digest: str, etag: str | None, last_modified: str | None
) -> None:
    """Records which blob `url` gave, under which validators (best effort: a lost
    record only costs a download)."""
    store.catalog.put_url(url_key(url), UrlRecord(redact_url(url), digest, etag, last_modified))


def offline_entry(store: BlobStore, url: str, expected: str | None, size: int | None) -> CacheEntry:
    """What the cache holds for `url` without any network access, or NetworkError saying
    why it holds nothing for it."""
    shown = redact_url(url)
    offline = "offline (--offline or SUREFETCH_OFFLINE)"
    if expected is not None:
        raise NetworkError(
            f"{offline}: the cache at {store.root} has no blob with sha256 {expected} for "
            f"{shown}; fetch it once online"
        )
    record = _record(store, url_key(url))
    digest = record.sha256 if record is not None and SHA256.fullmatch(record.sha256) else None
    entry = store.lookup(digest, touch=True) if digest is not None else None
    if entry is not None:
        check_size(entry, size)
        return entry
    if digest is not None:
        why = (
            f"the blob it gave (sha256 {digest}) is no longer in the cache at {store.root} "
            "(removed by `cache gc` or `cache verify`)"
        )
    elif (problem := store.catalog.problem()) is not None:
        why = (
            f"the cache's catalog, which records what each URL gave, cannot be used "
            f"({problem}); `surefetch cache verify` replaces it"
        )
    else:
        why = f"it was never fetched into the cache at {store.root}"
    raise NetworkError(
        f"{offline}: nothing to answer {shown} with: {why}; fetch it once online (without "
        "--offline or SUREFETCH_OFFLINE)"
    )
