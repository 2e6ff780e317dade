"""surefetch: downloads that cannot corrupt anything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from surefetch._core import CancelToken, __version__
from surefetch.download import (
    DownloadItem,
    DownloadResult,
    TransferOptions,
    adownload,
    download,
    download_many,
)
from surefetch.errors import (
    Cancelled,
    ChecksumMismatch,
    DownloadTimeout,
    HTTPError,
    IntegrityError,
    LockfileError,
    LockfileOutdated,
    LockTimeout,
    ManifestError,
    NetworkError,
    NotOwner,
    SessionCancelled,
    SessionNotFound,
    SizeMismatch,
    StorageError,
    SurefetchError,
    UnsafeDestination,
)

if TYPE_CHECKING:
    from surefetch.cache import Cache, CacheEntry
    from surefetch.transaction import sync

# The library logs its decisions to the `surefetch` logger (the engine's to
# `surefetch.engine`) and installs no handler of its own; `logging` is imported when a
# record can reach someone (`surefetch._log`).

# The cache and the lockfile are imported on first use, so that processes that only
# download (a supervisor's workers, restarted often) start faster.
_LAZY = {
    "Cache": "surefetch.cache",
    "CacheEntry": "surefetch.cache",
    "sync": "surefetch.transaction",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'surefetch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Cache",
    "CacheEntry",
    "CancelToken",
    "Cancelled",
    "ChecksumMismatch",
    "DownloadItem",
    "DownloadResult",
    "DownloadTimeout",
    "HTTPError",
    "IntegrityError",
    "LockTimeout",
    "LockfileError",
    "LockfileOutdated",
    "ManifestError",
    "NetworkError",
    "NotOwner",
    "SessionCancelled",
    "SessionNotFound",
    "SizeMismatch",
    "StorageError",
    "SurefetchError",
    "TransferOptions",
    "UnsafeDestination",
    "__version__",
    "adownload",
    "download",
    "download_many",
    "sync",
]
