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

Modules, one concept each:

- :mod:`~surefetch.testing.faults` — the query parameters, parsed into `Faults`;
- :mod:`~surefetch.testing.ranges` — the ``Range`` header, read as this server reads it;
- :mod:`~surefetch.testing.content` — what is served: artifacts and representations;
- :mod:`~surefetch.testing.state` — what the server and its handlers share;
- :mod:`~surefetch.testing.handler` — answering a request, faults and all;
- :mod:`~surefetch.testing.server` — :class:`FaultServer`.
"""

from __future__ import annotations

from surefetch.testing.content import gzipped
from surefetch.testing.server import FaultServer
from surefetch.testing.state import RecordedRequest

__all__ = ["FaultServer", "RecordedRequest", "gzipped"]
