"""Every exception surefetch raises.

The tree::

    SurefetchError
    ├── IntegrityError
    │   ├── ChecksumMismatch
    │   └── SizeMismatch
    ├── HTTPError                 (.status)
    ├── NetworkError
    ├── DownloadTimeout           (also a TimeoutError)
    ├── Cancelled
    │   └── SessionCancelled  (a session's cancellation was requested before its process started)
    ├── StorageError              (also an OSError: disk full, I/O error, cross-device rename,
    │                              a directory of surefetch's own that is a symlink or not ours)
    ├── UnsafeDestination         (a name or path that would leave its directory, or .surefetch)
    ├── LockTimeout               (also a TimeoutError)
    ├── LockfileError             (invalid or unsafe lockfile)
    ├── LockfileOutdated          (lockfile missing or would change: --locked, --frozen)
    ├── ManifestError
    ├── SessionNotFound
    └── NotOwner

The native core raises these same classes (``surefetch._core`` imports them
from here), so callers never see a bare ``RuntimeError``.

`redact_url` is what every message that shows a URL goes through.
"""

from __future__ import annotations

import re

__all__ = [
    "Cancelled",
    "ChecksumMismatch",
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
    "UnsafeDestination",
    "redact_url",
    "redact_urls",
]


class SurefetchError(Exception):
    """Base class of every error surefetch raises on purpose."""


class IntegrityError(SurefetchError):
    """The bytes that arrived are not the bytes that were promised."""


class ChecksumMismatch(IntegrityError):
    """A digest of the downloaded bytes differs from the expected one.

    Attributes:
        algorithm: ``"sha256"`` or ``"xxh3_128"``.
        expected: the digest that was asked for (lowercase hex).
        actual: the digest of what arrived (lowercase hex).
    """

    def __init__(
        self, message: str, algorithm: str = "", expected: str = "", actual: str = ""
    ) -> None:
        super().__init__(message)
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual


class SizeMismatch(IntegrityError):
    """The body is longer or shorter than the expected size.

    Attributes:
        expected: the size that was asked for or announced, in bytes.
        actual: the size seen, in bytes (for a body that ran long: where it was stopped).
    """

    def __init__(self, message: str, expected: int = -1, actual: int = -1) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class HTTPError(SurefetchError):
    """The server answered with a status that is not a success (after any retries).

    Attributes:
        status: the HTTP status code.
        url: the URL that answered it.
    """

    def __init__(self, message: str, status: int = 0, url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class NetworkError(SurefetchError):
    """The connection failed (refused, reset, cut short, TLS, too many redirects...)."""


class DownloadTimeout(SurefetchError, TimeoutError):
    """A connect, idle-read or overall timeout expired, or the low-speed limit.

    Attributes:
        kind: ``"connect"``, ``"read"``, ``"overall"`` or ``"low-speed"`` (``""`` when
            raised by other code).
    """

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


class Cancelled(SurefetchError):
    """The transfer's CancelToken was cancelled; its part file is kept for resume."""


class SessionCancelled(Cancelled):
    """The session's cancellation was requested before its process attached to it.

    Raised by ``SessionStore.attach_process``: the process must not start the
    work. The session has been marked cancelled. ``except Cancelled`` catches it.

    Attributes:
        session_id: the id of the cancelled session.
    """

    def __init__(self, message: str, session_id: str = "") -> None:
        super().__init__(message)
        self.session_id = session_id


class StorageError(SurefetchError, OSError):
    """Writing, syncing or renaming on the local filesystem failed.

    Raised with the ``errno`` of the failure (``ENOSPC``, ``EIO``, ``EXDEV``...) and the
    path (``filename``). The message says what the failure left on disk: nearly always the
    part file removed and the final path as it was; when only the fsync of the directory
    after the final rename failed, the file is installed but its durability is unknown.

    Also raised, naming the path, when a directory surefetch keeps its own files
    in (``<dest>/.surefetch``, the cache's ``tmp/``, ``locks/``, ``blobs/``...) is
    a symbolic link, not a directory, or another user's: surefetch never follows
    a link there nor trusts a directory others can change.
    """


class UnsafeDestination(SurefetchError, ValueError):
    """A file name or path would leave the directory it must stay in, or is ``.surefetch``
    (the directory where surefetch keeps part files beside the destination)."""


class LockTimeout(SurefetchError, TimeoutError):
    """Waiting for another process's lock took longer than allowed."""


class LockfileError(SurefetchError):
    """The lockfile is invalid or unsafe (bad TOML, unknown version, a path leaving its place)."""


class LockfileOutdated(SurefetchError):
    """The lockfile is missing, or would change where that is forbidden (``--locked``).

    Not a `LockfileError`: the lockfile is valid, it just does not match the manifest.
    """


class ManifestError(SurefetchError):
    """The manifest is invalid or unsafe."""


class SessionNotFound(SurefetchError):
    """No session with that id exists (for this owner)."""


class NotOwner(SurefetchError):
    """The session exists but belongs to someone else."""


def redact_url(url: str) -> str:
    """`url` with the password of its userinfo replaced: ``https://user:***@host/...``.

    Everything else is kept as it was; a URL without a password comes back
    unchanged, and so does text that is not a URL. Every message that shows a
    URL goes through this (or `redact_urls`).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return url
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return url
    return f"{scheme}://{user}:***@{host}{rest[end:]}"


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URL_WITH_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@]*@[^\s]*")


def redact_urls(text: str) -> str:
    """`text` with `redact_url` applied to every URL in it that carries userinfo."""
    return _URL_WITH_USERINFO.sub(lambda m: redact_url(m[0]), text)
