"""surefetch: downloads that cannot corrupt anything."""

from __future__ import annotations

from surefetch._core import CancelToken, __version__
from surefetch.download import DownloadResult, adownload, download
from surefetch.errors import (
    Cancelled,
    ChecksumMismatch,
    DownloadTimeout,
    HTTPError,
    IntegrityError,
    LockfileError,
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

__all__ = [
    "CancelToken",
    "Cancelled",
    "ChecksumMismatch",
    "DownloadResult",
    "DownloadTimeout",
    "HTTPError",
    "IntegrityError",
    "LockTimeout",
    "LockfileError",
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
]
