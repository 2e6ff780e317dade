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
import urllib.parse

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
    """The transfer's CancelToken was cancelled; the message says what its part file keeps
    for resume (when it received too little to resume, nothing is kept)."""


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
    """`url` with its secrets replaced by ``***``: the password of its userinfo
    (``https://user:***@host/...``) and the values of query parameters named like
    credentials (``token``, ``access_token``, ``api_key``, ``sig``,
    ``X-Amz-Signature``...: `CREDENTIAL_PARAMETERS`), as in presigned URLs.

    Everything else is kept as it was; a URL without secrets comes back unchanged,
    and so does text that is not a URL. Every message that shows a URL goes through
    this (or `redact_urls`); the engine applies the same rule (``rust/http.rs``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return url
    found = _AUTHORITY_END.search(rest)
    end = found.start() if found is not None else len(rest)
    userinfo, at, host = rest[:end].rpartition("@")
    user, colon, _ = userinfo.partition(":")
    authority = f"{user}:***@{host}" if at and colon else rest[:end]
    return f"{scheme}://{authority}{_redact_query(rest[end:])}"


#: Query parameters whose values are credentials (compared without case).
CREDENTIAL_PARAMETERS = frozenset(
    {
        "access_token",
        "api_key",
        "apikey",
        "auth",
        "client_secret",
        "key",
        "password",
        "passwd",
        "secret",
        "sig",
        "signature",
        "token",
        "x-amz-credential",
        "x-amz-security-token",
        "x-amz-signature",
        "x-goog-credential",
        "x-goog-signature",
    }
)


def _redact_query(tail: str) -> str:
    """The path, query and fragment `tail` of a URL with credential values hidden."""
    before, question, after = tail.partition("?")
    if not question:
        return tail
    query, hash_, fragment = after.partition("#")
    pairs = []
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and value and urllib.parse.unquote(name).lower() in CREDENTIAL_PARAMETERS:
            pair = f"{name}=***"
        elif equals and "://" in (inner := urllib.parse.unquote(value)):
            # A URL in a value (?next=, ?redirect_to=) has its own secrets: shown decoded.
            shown = redact_url(inner)
            if shown != inner:
                pair = f"{name}={shown}"
        pairs.append(pair)
    return f"{before}?{'&'.join(pairs)}{hash_}{fragment}"


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_AUTHORITY_END = re.compile(r"[/?#]")
# A URL in free text, up to white space; what a message puts after it (`)`, `:`...)
# is not part of it.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s]*?(?=[)\]>,;:.'\"]*(?:\s|$))")


def redact_urls(text: str) -> str:
    """`text` with `redact_url` applied to every URL in it."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m[0]), text)
