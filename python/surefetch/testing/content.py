"""What the server serves: an `Artifact` as added, and the `Representation` one response sends.

An artifact is the content given to `FaultServer.add` with its validators;
`representation` applies the faults that change the bytes or the validators
(``gzip``, ``weak_etag``, ``etag_per_response``) to give what a response sends.
"""

from __future__ import annotations

import gzip
import hashlib
import time
from dataclasses import dataclass
from typing import Final

from surefetch.testing.faults import Faults

__all__ = [
    "AUTO",
    "Artifact",
    "Auto",
    "Representation",
    "gzipped",
    "make_artifact",
    "representation",
]


def gzipped(data: bytes) -> bytes:
    """Return the exact bytes the server sends for ``data`` with ``gzip=1``.

    Args:
        data: The artifact's content.
    """
    return gzip.compress(data, compresslevel=6, mtime=0)


class Auto:
    """Marker type of the default ETag and Last-Modified: derive them."""


AUTO: Final = Auto()


@dataclass
class Artifact:
    """Content served under a name, with its validators (None: not sent)."""

    data: bytes
    etag: str | None
    last_modified: int | None
    gzip_cache: bytes | None = None

    def gzip_body(self) -> bytes:
        """`gzipped` of the data, compressed once."""
        if self.gzip_cache is None:
            self.gzip_cache = gzipped(self.data)
        return self.gzip_cache


def make_artifact(
    data: bytes,
    etag: str | Auto | None,
    last_modified: float | Auto | None,
    previous: Artifact | None,
) -> Artifact:
    """The artifact `FaultServer.add` and `FaultServer.replace` store (see their Args).

    ``previous`` is the artifact it replaces, or None: a derived
    ``Last-Modified`` is always at least a second after the previous one.
    """
    data = bytes(data)
    if isinstance(etag, Auto):
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    elif etag is not None:
        etag = _quote_etag(etag)
    stamp: int | None
    if isinstance(last_modified, Auto):
        stamp = int(time.time())
        if previous is not None and previous.last_modified is not None:
            stamp = max(stamp, previous.last_modified + 1)
    else:
        stamp = None if last_modified is None else int(last_modified)
    return Artifact(data, etag, stamp)


def _quote_etag(tag: str) -> str:
    if tag.startswith(('"', 'W/"')):
        return tag
    return f'"{tag}"'


@dataclass(frozen=True)
class Representation:
    """What one response sends: the bytes, their type and validators; ``ranges``: Range applies."""

    body: bytes
    content_type: str
    etag: str | None
    last_modified: int | None
    encoding: str | None = None
    ranges: bool = True


def representation(artifact: Artifact, faults: Faults, serial: int | None) -> Representation:
    """The representation of ``artifact`` under ``faults``; ``serial`` makes its ETag unique."""
    body, etag, encoding = artifact.data, artifact.etag, None
    if faults.gzip:
        body, encoding = artifact.gzip_body(), "gzip"
        if etag is not None:
            etag = etag[:-1] + '-gzip"'
    if etag is not None and serial is not None:
        etag = f'{etag[:-1]}-{serial}"'
    if etag is not None and faults.weak_etag and not etag.startswith("W/"):
        etag = "W/" + etag
    return Representation(body, "application/octet-stream", etag, artifact.last_modified, encoding)
