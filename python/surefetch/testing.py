"""A fault-injecting HTTP/1.1 server for tests, demos and benchmarks.

`FaultServer` serves byte strings that you `add` under a name, on a thread
in this process, bound to 127.0.0.1 on a free port. It speaks plain HTTP/1.1
with keep-alive, ``Range``/``If-Range``, ``HEAD``, strong ETags and
``Last-Modified``. Misbehaviour is chosen per request by query parameters,
so a test writes ``url + "?cut=1000&times=1"`` (or ``server.url_for("f",
cut=1000, times=1)``) and gets a body cut short once, then a good one::

    with FaultServer() as server:
        url = server.add("data.bin", b"x" * 100_000)
        ...download url + "?throttle=1000000" ...
        assert server.bytes_sent_for("data.bin") == 100_000

Query parameters (combinable; unknown ones answer 400 so typos fail loudly,
except names starting with ``_``, which are ignored and make a URL unique):

Transient faults, applied to every request, or with ``times=N`` only to the
first N requests with the same method and the same path+query (later ones
are served normally; the persistent behaviours below still apply):

``cut=K``
    Headers announce the whole response, then only the first K body bytes
    are sent and the connection is closed (FIN; with ``reset=1`` an RST).
    K counts from the start of this response's body (after a Range).
``length=N``
    ``Content-Length: N`` whatever the body is. The real body is sent in
    full, then the connection is closed: with N bigger than the body the
    client sees a truncated body; with N smaller, the server wrote past the
    length it declared.
``reset=1``
    Close with TCP RST instead of FIN where ``cut`` or ``length`` closes.
``hang=S``
    Send the headers, then stall S seconds before the body.
``hang_headers=S``
    Stall S seconds before sending anything at all.
``stall_after=K&stall=S``
    Send K body bytes, stall S seconds, then send the rest. ``stall``
    alone stalls at byte 0; ``stall_after`` alone stalls until the server
    stops.
``trickle=BPS[&trickle_after=K]``
    Send the first K body bytes (default 0) at full speed, then the rest at
    BPS bytes per second, a tenth of a second's worth at a time (at least
    one byte, at most 16 KiB), however long that takes; the connection is
    dropped within a tenth of a second of the server stopping or of the
    client closing it (or shutting down only its sending half).
``status=CODE``
    Answer CODE with a short text body; ``retry_after=S`` adds
    ``Retry-After: S``.
``ranged_only=1``
    Apply the transient faults only to requests whose ``Range`` starts past
    byte 0 (one range of a parallel transfer, not its first request).
    ``times`` still counts the requests it exempts: with ``times=1``, only
    a first request that is such a range misbehaves.
``wrong=1``
    Same length, wrong bytes: the byte at offset ``size // 2`` of the
    representation is inverted (a Range sees it only if it covers it).

Per-URL counters without ``times``:

``flaky=N[&flaky_status=CODE]``
    The first N requests (same method, same path+query) answer CODE
    (default 503, with ``retry_after`` if given); later ones succeed.

Persistent behaviours (every request):

``throttle=BPS``
    Pace the body at BPS bytes per second (slices of at most 16 KiB).
``redirect=N``
    A chain of N redirects (``redirect=N`` → ``redirect=N-1`` → ... → the
    URL without ``redirect``), every other parameter kept.
``loop=1``
    Redirect to the very same URL, forever.
``redirect_to=URL``
    Redirect to URL (absolute; any scheme), after the ``redirect`` chain.
``redirect_status=301|302|303|307|308``
    The status of those redirects (default 302). Locations are absolute,
    built from the request's ``Host`` header.
``gzip=1``
    Send `gzipped(data)` with ``Content-Encoding: gzip`` whatever the client
    accepts. Ranges, ``Content-Length`` and the ETag (``"<tag>-gzip"``)
    refer to the compressed bytes.
``no_length=1``
    No ``Content-Length``; the body ends when the connection closes.
``chunked=1``
    ``Transfer-Encoding: chunked`` (keep-alive still works).
``no_range=1``
    Ignore ``Range`` (always 200 with the whole body); no ``Accept-Ranges``.
``no_validators=1``
    No ``ETag`` or ``Last-Modified``; ``If-Range`` then never matches.
``weak_etag=1``
    Send the ETag as weak (``W/"..."``); ``If-Range`` then never matches.
``echo_headers=1``
    Answer 200 with a JSON object of the request's headers (names in lower
    case), for any path, even one never added.
``filename=NAME``
    Add ``Content-Disposition: attachment; filename="NAME"``.
``range_shift=N``
    A 206 announces bytes N further on in its ``Content-Range`` than it sends.
``ok_with_range=1``
    A Range that would give a 206 gives ``200 OK`` instead, with the same
    ``Content-Range``, ``Content-Length`` and body (only the ranged bytes)
    and the usual validators (a broken server or proxy seen in the wild).
``ignore_if_range=1``
    Honour ``Range`` whatever ``If-Range`` says, even a validator that does
    not match.
``range_no_validators=1``
    206 answers carry no ``ETag`` and no ``Last-Modified``; 200 answers
    (even those of ``ok_with_range``) keep them.
``range_align=N``
    A 206 (or the 200 of ``ok_with_range``) starts at the requested start
    rounded down to a multiple of N and ends where asked; its
    ``Content-Range`` tells what is sent
    (``bytes=70000-`` with ``range_align=65536`` gives ``bytes
    65536-(SIZE-1)/SIZE``).
``range_whole=1``
    Any ``Range`` (even a malformed or unsatisfiable one) gives 206 with
    ``Content-Range: bytes 0-(SIZE-1)/SIZE`` and the whole body; an
    ``If-Range`` that does not match still gives 200, an empty body still
    416. (``no_range=1`` is the whole body as 200.)
``etag_per_response=1``
    Every answer that carries an ETag carries a new one, never sent before
    by this server (``"<tag>-<serial>"``; weak with ``weak_etag``), as CDNs
    with tokenised URLs do; the bytes and ``Last-Modified`` stay the same.
    ``If-Range`` then never matches, whether it holds an ETag or a date (a
    Range gives 200 with the whole body), unless ``ignore_if_range=1``.
``max_range_end=N[&max_range_status=CODE]``
    A Range ``bytes=a-b`` with b past N, even one the size would clamp, is
    answered CODE (default 500), before any other Range behaviour applies,
    with a short text body, and with 416 also
    ``Content-Range: bytes */SIZE``; ``bytes=a-`` and ``bytes=-n`` are
    answered as usual, and so is any Range that is not honoured anyway
    (``no_range``, an ``If-Range`` that does not match). nginx answers 416
    to ``bytes=0-18446744073709551614``; some servers answer 500 to any end
    past 2**31-1 (``max_range_end=2147483647``).

Normal behaviour: ``Range: bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` give
206 with ``Content-Range``; an end at or beyond the end of the
representation (``bytes=0-18446744073709551614``) is clamped to its last
byte; a start at or beyond the end gives 416 with ``Content-Range: bytes
*/SIZE``; several ranges or a malformed header are ignored (200).
``If-None-Match`` (weak comparison) and ``If-Modified-Since`` (when there is no
``If-None-Match``) answer 304 when the representation matches (RFC 9110 §13.1).
``If-Range`` honours the Range only on an exact match of the strong ETag or
of the ``Last-Modified`` date. An unknown name is 404.

Counters: `FaultServer.bytes_sent` counts the body bytes of 200 and 206
answers written to sockets (not the short text bodies of redirects and
errors, nor a write that failed because the client went away); a byte is
counted before any client can have read it, so a test may assert right
after its download returns. `FaultServer.requests` records every request
before it is answered, `FaultServer.connections` counts the TCP connections
accepted (each before its first request is read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import gzip
import hashlib
import json
import math
import re
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Callable, Final, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["FaultServer", "RecordedRequest", "gzipped"]

_SLICE: Final = 1 << 20
_THROTTLE_SLICE: Final = 16 << 10
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_STOP_JOIN_S: Final = 1.0
_TRICKLE_TICK_S: Final = 0.1
_POSITION_DIGITS: Final = 30
_FAR_POSITION: Final = 10**30
_RANGE: Final = re.compile(r"bytes\s*=\s*(?:(\d+)\s*-\s*(\d*)|-\s*(\d+))", re.ASCII | re.IGNORECASE)


def gzipped(data: bytes) -> bytes:
    """Return the exact bytes the server sends for ``data`` with ``gzip=1``.

    Args:
        data: The artifact's content.
    """
    return gzip.compress(data, compresslevel=6, mtime=0)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, recorded before it was answered.

    Attributes:
        method: ``GET`` or ``HEAD`` (or whatever the client sent).
        target: The raw request target, path and query (``/f.bin?cut=10``).
        name: The percent-decoded path without its leading ``/``.
        query: The raw query string, ``""`` if none.
        headers: The request headers, names in lower case (repeated headers
            joined with ``", "``).
        range: The ``Range`` header, or None.
        time: `time.monotonic` when the request line was read.
    """

    method: str
    target: str
    name: str
    query: str
    headers: dict[str, str]
    range: str | None
    time: float


class _Auto:
    """Marker type of the default ETag and Last-Modified: derive them."""


_AUTO: Final = _Auto()


@dataclass
class _Artifact:
    data: bytes
    etag: str | None
    last_modified: int | None
    gzip_cache: bytes | None = None

    def gzip_body(self) -> bytes:
        if self.gzip_cache is None:
            self.gzip_cache = gzipped(self.data)
        return self.gzip_cache


@dataclass(frozen=True)
class _Faults:
    times: int | None = None
    # transient (subject to `times`)
    cut: int | None = None
    length: int | None = None
    reset: bool = False
    hang: float | None = None
    hang_headers: float | None = None
    stall_after: int | None = None
    stall: float | None = None
    trickle: float | None = None
    trickle_after: int = 0
    status: int | None = None
    wrong: bool = False
    ranged_only: bool = False
    # counted
    flaky: int = 0
    flaky_status: int = 503
    retry_after: int | None = None
    # persistent
    throttle: float | None = None
    redirect: int = 0
    loop: bool = False
    redirect_to: str | None = None
    redirect_status: int = 302
    gzip: bool = False
    no_length: bool = False
    chunked: bool = False
    no_range: bool = False
    no_validators: bool = False
    weak_etag: bool = False
    echo_headers: bool = False
    filename: str | None = None
    range_shift: int = 0
    ok_with_range: bool = False
    ignore_if_range: bool = False
    range_no_validators: bool = False
    range_align: int = 1
    range_whole: bool = False
    etag_per_response: bool = False
    max_range_end: int | None = None
    max_range_status: int = 500

    def without_transient(self) -> _Faults:
        return dataclasses.replace(
            self,
            cut=None,
            length=None,
            reset=False,
            hang=None,
            hang_headers=None,
            stall_after=None,
            stall=None,
            trickle=None,
            trickle_after=0,
            status=None,
            wrong=False,
        )


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _parse_count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must not be negative: {value!r}")
    return number


def _parse_positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be positive: {value!r}")
    return number


def _parse_seconds(value: str) -> float:
    number = float(value)
    if math.isnan(number) or number < 0:
        raise ValueError(f"not a duration in seconds: {value!r}")
    return number


def _parse_rate(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"not a positive rate: {value!r}")
    return number


def _parse_status(value: str) -> int:
    number = int(value)
    if not 200 <= number <= 599:
        raise ValueError(f"not a final HTTP status (200-599): {value!r}")
    return number


def _parse_redirect_status(value: str) -> int:
    number = int(value)
    if number not in _REDIRECT_STATUSES:
        raise ValueError(f"not a redirect status (301, 302, 303, 307, 308): {value!r}")
    return number


def _range_starts_past_zero(header: str | None) -> bool:
    start = (header or "").partition("=")[2].partition("-")[0].strip()
    # Not int(start): str.isdigit() accepts "²", which int() refuses.
    return start.isascii() and start.isdigit() and start.strip("0") != ""


def _parse_header_value(value: str) -> str:
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or ord(c) > 0xFF for c in value):
        raise ValueError(f"not usable in a response header: {value!r}")
    return value


_PARSERS: Final[dict[str, Callable[[str], object]]] = {
    "times": _parse_count,
    "cut": _parse_count,
    "length": _parse_count,
    "reset": _parse_bool,
    "hang": _parse_seconds,
    "hang_headers": _parse_seconds,
    "stall_after": _parse_count,
    "stall": _parse_seconds,
    "trickle": _parse_rate,
    "trickle_after": _parse_count,
    "status": _parse_status,
    "wrong": _parse_bool,
    "flaky": _parse_count,
    "flaky_status": _parse_status,
    "retry_after": _parse_count,
    "throttle": _parse_rate,
    "redirect": _parse_count,
    "loop": _parse_bool,
    "redirect_to": _parse_header_value,
    "redirect_status": _parse_redirect_status,
    "gzip": _parse_bool,
    "no_length": _parse_bool,
    "chunked": _parse_bool,
    "no_range": _parse_bool,
    "no_validators": _parse_bool,
    "weak_etag": _parse_bool,
    "echo_headers": _parse_bool,
    "filename": _parse_header_value,
    "ranged_only": _parse_bool,
    "range_shift": _parse_count,
    "ok_with_range": _parse_bool,
    "ignore_if_range": _parse_bool,
    "range_no_validators": _parse_bool,
    "range_align": _parse_positive,
    "range_whole": _parse_bool,
    "etag_per_response": _parse_bool,
    "max_range_end": _parse_count,
    "max_range_status": _parse_status,
}


def _parse_faults(query: str) -> _Faults:
    """Parse a query string into faults; raise ValueError naming the culprit."""
    values: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key.startswith("_"):
            continue
        parser = _PARSERS.get(key)
        if parser is None:
            known = ", ".join(sorted(_PARSERS))
            raise ValueError(f"unknown fault parameter {key!r} (known: {known})")
        try:
            values[key] = parser(value)
        except ValueError as exc:
            raise ValueError(f"bad value for {key!r}: {exc}") from None
    faults = _Faults(**values)
    if faults.stall_after is not None and faults.stall is None:
        faults = dataclasses.replace(faults, stall=math.inf)
    if faults.stall is not None and faults.stall_after is None:
        faults = dataclasses.replace(faults, stall_after=0)
    return faults


def _quote_etag(tag: str) -> str:
    if tag.startswith(('"', 'W/"')):
        return tag
    return f'"{tag}"'


class _Unsatisfiable(Exception):
    """The Range starts at or beyond the end of the representation (416)."""


def _position(digits: str) -> int:
    """A byte position from ASCII digits, of any length.

    int() refuses strings of more than 4300 digits; a position that long is
    past the end of anything, so it becomes 10**30.
    """
    digits = digits.lstrip("0")
    if len(digits) > _POSITION_DIGITS:
        return _FAR_POSITION
    return int(digits or "0")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return (first, last) of a single byte range, or None to ignore the header.

    Raises:
        _Unsatisfiable: The range is well formed but selects nothing.
    """
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first_s, last_s, suffix_s = match.groups()
    if suffix_s is not None:
        suffix = _position(suffix_s)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size - 1
    first = _position(first_s)
    last = _position(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        raise _Unsatisfiable
    return first, min(last, size - 1)


def _range_end(header: str) -> int | None:
    """The last byte position of a valid single ``bytes=a-b`` range, or None."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or not match.group(2):
        return None
    first, last = _position(match.group(1)), _position(match.group(2))
    return last if last >= first else None


@dataclass(frozen=True)
class _Representation:
    body: bytes
    content_type: str
    etag: str | None
    last_modified: int | None
    encoding: str | None = None
    ranges: bool = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: FaultServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, which can block on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or self.owner._stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Abort(Exception):
    """Raised inside the handler to drop the connection (stop, or a fault)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "surefetch-faultserver"

    @property
    def _owner(self) -> FaultServer:
        return cast(_HTTPServer, self.server).owner

    def setup(self) -> None:
        super().setup()
        self._owner._track(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self._owner._untrack(self.connection, threading.current_thread())

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, _Abort):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- the request ---------------------------------------------------

    def _serve(self, head: bool) -> None:
        owner = self._owner
        split = urlsplit(self.path)
        name = unquote(split.path).lstrip("/")
        number = owner._record(self, name, split.query)
        try:
            faults = _parse_faults(split.query)
        except ValueError as exc:
            self._send_text(400, f"{exc}\n", head)
            return
        if faults.times is not None and number > faults.times:
            faults = faults.without_transient()
        if faults.ranged_only and not _range_starts_past_zero(self.headers.get("Range")):
            faults = faults.without_transient()
        if faults.hang_headers:
            self._pause(faults.hang_headers)
        if number <= faults.flaky:
            self._send_text(faults.flaky_status, None, head, faults.retry_after)
            return
        if faults.status is not None:
            self._send_text(faults.status, None, head, faults.retry_after)
            return
        location = self._location(split.path, split.query, faults)
        if location is not None:
            self.send_response(faults.redirect_status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if faults.echo_headers:
            echo = json.dumps(_lower_headers(self), sort_keys=True).encode() + b"\n"
            rep = _Representation(echo, "application/json", None, None, ranges=False)
        else:
            artifact = owner._lookup(name)
            if artifact is None:
                self._send_text(404, f"no such file: {name!r}\n", head)
                return
            serial = owner._next_etag_serial() if faults.etag_per_response else None
            rep = _representation(artifact, faults, serial)
        self._send_representation(name, rep, faults, head)

    def _location(self, path: str, query: str, faults: _Faults) -> str | None:
        host = self.headers.get("Host") or f"{self._owner.host}:{self._owner.port}"
        if faults.loop:
            return urlunsplit(("http", host, path, query, ""))
        if faults.redirect > 0:
            pairs = []
            for key, value in parse_qsl(query, keep_blank_values=True):
                if key == "redirect":
                    if faults.redirect == 1:
                        continue
                    value = str(faults.redirect - 1)
                pairs.append((key, value))
            return urlunsplit(("http", host, path, urlencode(pairs), ""))
        return faults.redirect_to

    def _send_representation(
        self, name: str, rep: _Representation, faults: _Faults, head: bool
    ) -> None:
        if self._not_modified(rep, faults):
            self.send_response(304)
            if rep.etag is not None:
                self.send_header("ETag", rep.etag)
            self.end_headers()
            return
        size = len(rep.body)
        status, first, last, ranged = 200, 0, size - 1, False
        range_header = self.headers.get("Range") if rep.ranges and not faults.no_range else None
        if range_header is not None and self._if_range_holds(rep, faults):
            end = _range_end(range_header)
            if faults.max_range_end is not None and end is not None and end > faults.max_range_end:
                self._refuse_range(faults.max_range_end, faults.max_range_status, size, head)
                return
            try:
                if faults.range_whole and size > 0:
                    wanted: tuple[int, int] | None = (0, size - 1)
                else:
                    wanted = _parse_range(range_header, size)
            except _Unsatisfiable:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if wanted is not None:
                first, last = wanted
                first -= first % faults.range_align
                status, ranged = (200 if faults.ok_with_range else 206), True
        body = memoryview(rep.body)[first : last + 1]

        chunked = faults.chunked and self.request_version != "HTTP/1.0"
        close_delimited = faults.no_length or (faults.chunked and not chunked)
        declared = len(body) if faults.length is None else faults.length
        lying = faults.length is not None and not (chunked or close_delimited)
        self.send_response(status)
        self.send_header("Content-Type", rep.content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif close_delimited:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(declared))
        if ranged:
            shift = faults.range_shift
            self.send_header("Content-Range", f"bytes {first + shift}-{last + shift}/{size}")
        if rep.ranges and not faults.no_range:
            self.send_header("Accept-Ranges", "bytes")
        if not faults.no_validators and not (status == 206 and faults.range_no_validators):
            if rep.etag is not None:
                self.send_header("ETag", rep.etag)
            if rep.last_modified is not None:
                self.send_header("Last-Modified", _http_date(rep.last_modified))
        if rep.encoding is not None:
            self.send_header("Content-Encoding", rep.encoding)
            self.send_header("Vary", "Accept-Encoding")
        if faults.filename is not None:
            self.send_header("Content-Disposition", f'attachment; filename="{faults.filename}"')
        self.end_headers()
        if head:
            return

        flip = len(rep.body) // 2 - first if faults.wrong and rep.body else None
        self._send_body(name, body, faults, chunked, flip)
        if faults.cut is not None or (lying and declared != len(body)):
            self._drop(faults.reset)
        elif close_delimited:
            self.close_connection = True

    def _refuse_range(self, limit: int, code: int, size: int, head: bool) -> None:
        """Answer like a server that cannot serve a range ending past byte ``limit``."""
        reason = self.responses.get(code, ("",))[0]
        text = f"{code} {reason}: this server refuses ranges ending past byte {limit}\n"
        unsatisfied = f"bytes */{size}" if code == 416 else None
        self._send_text(code, text, head, content_range=unsatisfied)

    def _not_modified(self, rep: _Representation, faults: _Faults) -> bool:
        """RFC 9110 §13.1.2/§13.1.3: If-None-Match (weak comparison), else
        If-Modified-Since, on a representation with validators."""
        if faults.no_validators or faults.etag_per_response:
            return False
        match = self.headers.get("If-None-Match")
        if match is not None:
            tags = {t.strip().removeprefix("W/") for t in match.split(",")}
            return rep.etag is not None and ("*" in tags or rep.etag.removeprefix("W/") in tags)
        since = self.headers.get("If-Modified-Since")
        if since is None or rep.last_modified is None:
            return False
        try:
            when = email.utils.parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
        return rep.last_modified <= int(when.timestamp())

    def _if_range_holds(self, rep: _Representation, faults: _Faults) -> bool:
        condition = self.headers.get("If-Range")
        if condition is None or faults.ignore_if_range:
            return True
        if faults.no_validators or faults.etag_per_response:
            return False
        condition = condition.strip()
        if condition.startswith(('"', "W/")):
            return rep.etag is not None and not rep.etag.startswith("W/") and condition == rep.etag
        if rep.last_modified is None:
            return False
        try:
            when = email.utils.parsedate_to_datetime(condition)
        except (TypeError, ValueError):
            return False
        return int(when.timestamp()) == rep.last_modified

    # -- writing ---------------------------------------------------------

    def _send_body(
        self, name: str, body: memoryview, faults: _Faults, chunked: bool, flip: int | None
    ) -> None:
        owner = self._owner
        end = len(body) if faults.cut is None else min(faults.cut, len(body))
        rate = faults.throttle
        step = _SLICE if rate is None else max(1, min(_THROTTLE_SLICE, int(rate / 20)))
        stall_at = faults.stall_after if faults.stall is not None else None
        trickle = faults.trickle
        trickle_at = faults.trickle_after if trickle is not None else None
        watch_client = False
        if faults.hang:
            self._pause(faults.hang)
        paced_from, paced_pos = time.monotonic(), 0
        pos = 0
        while True:
            if stall_at is not None and pos == stall_at:
                stall_at = None
                self._pause(cast(float, faults.stall))
                paced_from, paced_pos = time.monotonic(), pos
            if trickle is not None and trickle_at is not None and pos >= trickle_at:
                # From here on, a tick's worth at a time, for as long as it takes.
                trickle_at, rate, watch_client = None, trickle, True
                step = max(1, min(_THROTTLE_SLICE, int(trickle * _TRICKLE_TICK_S)))
                paced_from, paced_pos = time.monotonic(), pos
            if pos >= end:
                break
            stop = min(end, pos + step)
            for boundary in (stall_at, trickle_at):
                if boundary is not None and pos < boundary < stop:
                    stop = boundary
            piece: memoryview | bytearray = body[pos:stop]
            if flip is not None and pos <= flip < stop:
                piece = bytearray(piece)
                piece[flip - pos] ^= 0xFF
            # Counted before the write so that a client that has read the bytes
            # sees them counted; taken back if the write fails.
            owner._count(name, stop - pos)
            try:
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(piece))
                    self.wfile.write(piece)
                    self.wfile.write(b"\r\n")
                else:
                    self.wfile.write(piece)
            except OSError:
                owner._count(name, pos - stop)
                raise
            pos = stop
            if rate is not None and pos < end:
                delay = paced_from + (pos - paced_pos) / rate - time.monotonic()
                if delay > 0:
                    self._pause(delay, watch_client)
        if chunked and faults.cut is None:
            self.wfile.write(b"0\r\n\r\n")

    def _send_text(
        self,
        status: int,
        text: str | None,
        head: bool,
        retry_after: int | None = None,
        content_range: str | None = None,
    ) -> None:
        if text is None:
            text = f"{status} {self.responses.get(status, ('',))[0]}\n"
        body = b"" if status in (204, 304) else text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if content_range is not None:
            self.send_header("Content-Range", content_range)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _pause(self, seconds: float, watch_client: bool = False) -> None:
        """Wait, or drop the connection at once if the server stops meanwhile.

        With ``watch_client``, also drop it within a tick of the client
        closing its end (a client that only shuts down its writing half
        counts as gone).
        """
        if not watch_client:
            timeout = None if math.isinf(seconds) else seconds
            if self._owner._stopping.wait(timeout):
                raise _Abort
            return
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._owner._stopping.wait(min(remaining, _TRICKLE_TICK_S)) or self._client_gone():
                raise _Abort

    def _client_gone(self) -> bool:
        """Whether the client closed or reset the connection; reads nothing it sent."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def _drop(self, reset: bool) -> None:
        """Close the connection after this response; with ``reset`` by an RST."""
        self.close_connection = True
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Closed for real when finish() closes rfile, before the server's
            # shutdown(SHUT_WR) could send a FIN.
            self.connection.close()


def _lower_headers(handler: BaseHTTPRequestHandler) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in handler.headers.items():
        lowered = key.lower()
        headers[lowered] = f"{headers[lowered]}, {value}" if lowered in headers else value
    return headers


def _representation(artifact: _Artifact, faults: _Faults, serial: int | None) -> _Representation:
    body, etag, encoding = artifact.data, artifact.etag, None
    if faults.gzip:
        body, encoding = artifact.gzip_body(), "gzip"
        if etag is not None:
            etag = etag[:-1] + '-gzip"'
    if etag is not None and serial is not None:
        etag = f'{etag[:-1]}-{serial}"'
    if etag is not None and faults.weak_etag and not etag.startswith("W/"):
        etag = "W/" + etag
    return _Representation(body, "application/octet-stream", etag, artifact.last_modified, encoding)


def _http_date(timestamp: int) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


class FaultServer:
    """An HTTP/1.1 server on a thread, misbehaving on request (see the module doc).

    The socket is bound when the object is created (so `url` is known at
    once); `start` begins serving. Use it as a context manager, or call
    `stop`, which returns within about a second even with stalled requests.

    Args:
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._artifacts: dict[str, _Artifact] = {}
        self._requests: list[RecordedRequest] = []
        self._seen: dict[tuple[str, str], int] = {}
        self._bytes_sent = 0
        self._bytes_by_name: dict[str, int] = {}
        self._accepted = 0
        self._etag_serial = 0
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._thread: threading.Thread | None = None
        self._httpd = _HTTPServer((host, port), self)
        self.host = host
        self.port = self._httpd.server_port

    # -- life cycle ----------------------------------------------------------

    def start(self) -> FaultServer:
        """Start serving on a daemon thread; return self. Calling it again does nothing.

        Raises:
            RuntimeError: The server was already stopped.
        """
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("this FaultServer was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._httpd.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name=f"FaultServer:{self.port}",
                    daemon=True,
                )
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: end stalls, close every connection, free the port. Idempotent."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            thread = self._thread
        if thread is not None:
            self._httpd.shutdown()
            thread.join()
        with self._lock:
            connections = list(self._connections)
            handlers = list(self._handlers)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        deadline = time.monotonic() + _STOP_JOIN_S
        for handler in handlers:
            handler.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- content -----------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, ``http://HOST:PORT`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    def url_for(self, name: str, *, host: str | None = None, **params: object) -> str:
        """Return the URL of ``name`` with fault parameters, e.g. ``url_for("f", cut=10)``.

        Args:
            name: An artifact name (need not have been added).
            host: Host name to put in the URL instead of the bound one,
                e.g. ``"localhost"`` to reach this server under another name.
            **params: Query parameters; True becomes ``1``, False ``0``.
        """
        url = f"http://{host or self.host}:{self.port}/{quote(name.lstrip('/'))}"
        if params:
            pairs = [(k, int(v) if isinstance(v, bool) else v) for k, v in params.items()]
            url += "?" + urlencode(pairs)
        return url

    def add(
        self,
        name: str,
        data: bytes,
        *,
        etag: str | _Auto | None = _AUTO,
        last_modified: float | _Auto | None = _AUTO,
    ) -> str:
        """Serve ``data`` at ``/name`` and return its full URL.

        Args:
            name: Path without the leading ``/``; may contain ``/``.
            data: The content.
            etag: Defaults to a strong ETag derived from the content (its
                SHA-256); None sends none; a bare string gets quoted.
            last_modified: Unix time of ``Last-Modified``; defaults to now;
                None sends none.

        Raises:
            ValueError: ``name`` is already served (use `replace`).
        """
        name = name.lstrip("/")
        with self._lock:
            if name in self._artifacts:
                raise ValueError(f"{name!r} is already served; use replace() to change it")
            self._artifacts[name] = _make_artifact(data, etag, last_modified, None)
        return self.url_for(name)

    def replace(
        self,
        name: str,
        data: bytes,
        *,
        etag: str | _Auto | None = _AUTO,
        last_modified: float | _Auto | None = _AUTO,
    ) -> str:
        """Change the content at ``/name``, as when a file changes on the server.

        By default the new ETag derives from the new content and the new
        ``Last-Modified`` is now, but always at least a second after the
        previous one, so that an ``If-Range`` date no longer matches.
        Responses already in flight finish with the old content.

        Args:
            name: A name given to `add` before.
            data: The new content.
            etag: As for `add`.
            last_modified: As for `add`.

        Raises:
            KeyError: ``name`` is not served.
        """
        name = name.lstrip("/")
        with self._lock:
            old = self._artifacts[name]
            self._artifacts[name] = _make_artifact(data, etag, last_modified, old)
        return self.url_for(name)

    # -- counters ---------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Body bytes of 200/206 answers written to sockets so far, all paths together."""
        with self._lock:
            return self._bytes_sent

    def bytes_sent_for(self, name: str) -> int:
        """Body bytes of 200/206 answers written so far for ``/name``."""
        with self._lock:
            return self._bytes_by_name.get(name.lstrip("/"), 0)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def request_count(self, name: str, method: str | None = None) -> int:
        """How many requests for ``/name`` (any query) arrived, optionally of one method."""
        name = name.lstrip("/")
        with self._lock:
            return sum(
                1
                for r in self._requests
                if r.name == name and (method is None or r.method == method)
            )

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (a keep-alive connection counts once)."""
        with self._lock:
            return self._accepted

    def reset_counters(self) -> None:
        """Forget recorded requests, byte and connection counts, the ``times``/``flaky`` counts."""
        with self._lock:
            self._accepted = 0
            self._requests.clear()
            self._seen.clear()
            self._bytes_sent = 0
            self._bytes_by_name.clear()

    # -- for the handler ------------------------------------------------------

    def _record(self, handler: BaseHTTPRequestHandler, name: str, query: str) -> int:
        """Record a request; return its 1-based number for (method, target)."""
        headers = _lower_headers(handler)
        record = RecordedRequest(
            method=handler.command,
            target=handler.path,
            name=name,
            query=query,
            headers=headers,
            range=headers.get("range"),
            time=time.monotonic(),
        )
        key = (handler.command, handler.path)
        with self._lock:
            self._requests.append(record)
            number = self._seen.get(key, 0) + 1
            self._seen[key] = number
        return number

    def _next_etag_serial(self) -> int:
        """A number never returned before by this server (not reset by reset_counters)."""
        with self._lock:
            self._etag_serial += 1
            return self._etag_serial

    def _lookup(self, name: str) -> _Artifact | None:
        with self._lock:
            return self._artifacts.get(name)

    def _count(self, name: str, sent: int) -> None:
        with self._lock:
            self._bytes_sent += sent
            self._bytes_by_name[name] = self._bytes_by_name.get(name, 0) + sent

    def _track(self, connection: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._accepted += 1
            self._connections.add(connection)
            self._handlers.add(thread)
        if self._stopping.is_set():
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def _untrack(self, connection: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._handlers.discard(thread)


def _make_artifact(
    data: bytes,
    etag: str | _Auto | None,
    last_modified: float | _Auto | None,
    previous: _Artifact | None,
) -> _Artifact:
    data = bytes(data)
    if isinstance(etag, _Auto):
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    elif etag is not None:
        etag = _quote_etag(etag)
    stamp: int | None
    if isinstance(last_modified, _Auto):
        stamp = int(time.time())
        if previous is not None and previous.last_modified is not None:
            stamp = max(stamp, previous.last_modified + 1)
    else:
        stamp = None if last_modified is None else int(last_modified)
    return _Artifact(data, etag, stamp)
