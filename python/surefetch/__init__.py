"""surefetch: downloads that cannot corrupt anything."""

from __future__ import annotations

from surefetch._core import CancelToken, __version__
from surefetch.cache import Cache, CacheEntry
from surefetch.download import DownloadResult, adownload, download
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
    SessionNotFound,
    SizeMismatch,
    StorageError,
    SurefetchError,
    UnsafeDestination,
)
from surefetch.lockfile import sync

__all__ = [
    "Cache",
    "CacheEntry",
    "CancelToken",
    "Cancelled",
    "ChecksumMismatch",
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
    "SessionNotFound",
    "SizeMismatch",
    "StorageError",
    "SurefetchError",
    "UnsafeDestination",
    "__version__",
    "adownload",
    "download",
    "sync",
]
