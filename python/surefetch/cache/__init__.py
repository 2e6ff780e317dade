"""A content-addressed download cache with a cross-process lock per artifact.

Layout under the root (``$SUREFETCH_CACHE``, else ``$XDG_CACHE_HOME/surefetch``,
else ``~/.cache/surefetch``)::

    blobs/sha256/<2 hex>/<64 hex>    verified blobs, named by their SHA-256
    catalog.db                       SQLite: size, xxh3_128 and the last URL of each
                                     blob; which blob each URL gave, and its validators
    locks/artifacts.NN               the lock table (32 files): one byte-range lock per
                                     artifact (key: sha256-<hex> or url-<hash>)
    tmp/v2/<key>                     downloads in flight; the engine keeps its part
                                     files in tmp/v2/.surefetch/ (resumed by the next fetch)
    quarantine/                      blobs that did not match their digest

A fetch takes the artifact's lock (an open file description lock on one byte of
the lock table, released by the kernel when its holder dies, so it can never go
stale; no file per artifact), looks for the blob, and downloads only when it is
missing; the engine verifies the bytes, then the file is renamed into ``blobs/``
and the directory fsynced, so nothing partial is ever visible there. A waiting
process learns whom it waits for (pid, host, URL, since when) from the catalog,
where the holder says it when it takes the lock. Caches of earlier versions
locked ``locks/<key>.lock`` and downloaded into ``tmp/``; `cache clean` still
tidies both (see `surefetch.cache.locks`).

Trust model (a cache shared by several users): a blob enters ``blobs/`` only
after its digest was verified. A blob file is trusted without re-hashing only
when it is a regular file with one link, owned by the current user or root, and
not writable by group or others; any other file under ``blobs/`` (another user's,
or one another user could have changed) is re-hashed on every use, and moved to
``quarantine/`` when it does not match its name. The same goes for the catalog:
one that is not trusted so is not used (the cache then works without it,
re-hashing blobs and downloading again what it would have revalidated). Caches
written before the catalog kept metadata in ``meta/`` and ``urls/``; those files
are still read, and removed with their blobs. Files are created 0644 and directories
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
metadata and in what lock holders say are redacted (`surefetch.errors.redact_url`).

Timeouts: ``lock_timeout`` bounds each wait for another process's lock and
raises `LockTimeout` naming the holder; the overall ``timeout`` of a fetch
covers the lock wait and the download, and raises `DownloadTimeout` when it is
what ran out (also while waiting, naming the holder too).

Modules, one concept each:

- :mod:`~surefetch.cache.store` — the blob store: paths, lookup, install, quarantine,
  and the checks of the cache's directories and files; :class:`CacheEntry`;
- :mod:`~surefetch.cache.catalog` — the metadata of blobs and URLs, in one SQLite file;
- :mod:`~surefetch.cache.locks` — the artifact locks and what their holders say;
- :mod:`~surefetch.cache.index` — the URL index: revalidation and ``--offline``;
- :mod:`~surefetch.cache.fetch` — fetching one artifact or a batch; :class:`FetchRequest`;
- :mod:`~surefetch.cache.maintenance` — ``ls``, ``verify``, ``gc``, ``clean`` and their
  reports;
- :mod:`~surefetch.cache.cache` — :class:`Cache`, the face over them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from surefetch.cache.cache import Cache
from surefetch.cache.fetch import FetchRequest
from surefetch.cache.store import CacheEntry, default_cache_root

if TYPE_CHECKING:
    from surefetch.cache.maintenance import CachedBlob, CleanReport, GcReport, VerifyReport

# The reports of `ls`, `verify`, `gc` and `clean`, loaded when first asked for: a fetch or
# a sync never needs them (nor the module, ~2 ms of every start).
_MAINTENANCE = frozenset({"CachedBlob", "CleanReport", "GcReport", "VerifyReport"})


def __getattr__(name: str) -> Any:
    if name not in _MAINTENANCE:
        raise AttributeError(f"module 'surefetch.cache' has no attribute {name!r}")
    from surefetch.cache import maintenance

    value = getattr(maintenance, name)
    globals()[name] = value
    return value


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
