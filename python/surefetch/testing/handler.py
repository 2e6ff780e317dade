"""The request handler: `HTTPServer` and its handler, which apply a request's faults."""

from __future__ import annotations

import email.utils
import json
import math
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from surefetch.testing.content import Representation, representation
from surefetch.testing.faults import Faults, parse_faults
from surefetch.testing.ranges import Unsatisfiable, parse_range, range_end, range_starts_past_zero
from surefetch.testing.state import ServerState

__all__ = ["HTTPServer"]

_SLICE: Final = 1 << 20
_THROTTLE_SLICE: Final = 16 << 10
_TRICKLE_TICK_S: Final = 0.1
_POLL_S: Final = 0.05


class HTTPServer(ThreadingHTTPServer):
    """The listening socket of a `FaultServer`, a thread per connection.

    Args:
        address: (host, port) to bind; ``host`` is also the ``Host`` of
            redirects when a request has none.
        state: What the handlers share with the `FaultServer`.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], state: ServerState) -> None:
        self.state = state
        self.host = address[0]
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # http.server.HTTPServer.server_bind calls socket.getfqdn, which can block on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        # accept() waits at most this long: a connection reset between select() and
        # accept() would otherwise block the serving thread, and stop() with it.
        self.socket.settimeout(_POLL_S)

    def serve_until_stopped(self) -> None:
        """Serve until ``state.stopping`` is set, noticing it within about `_POLL_S`.

        Unlike `serve_forever`, it needs no `shutdown` (which waits without a
        bound) to end: `FaultServer.stop` sets the event and joins with a bound.
        """
        while not self.state.stopping.is_set():
            self.handle_request()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or self.state.stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Abort(Exception):
    """Raised inside the handler to drop the connection (stop, or a fault)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "surefetch-faultserver"

    @property
    def _state(self) -> ServerState:
        return cast(HTTPServer, self.server).state

    def setup(self) -> None:
        super().setup()
        self._state.track(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self._state.untrack(self.connection, threading.current_thread())

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
        state = self._state
        split = urlsplit(self.path)
        name = unquote(split.path).lstrip("/")
        number = state.record(
            self.command,
            self.path,
            name,
            split.query,
            _lower_headers(self),
            client_port=self.client_address[1],
        )
        try:
            faults = parse_faults(split.query)
        except ValueError as exc:
            self._send_text(400, f"{exc}\n", head)
            return
        if faults.times is not None and number > faults.times:
            faults = faults.without_transient()
        if faults.ranged_only and not range_starts_past_zero(self.headers.get("Range")):
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
            rep = Representation(echo, "application/json", None, None, ranges=False)
        else:
            artifact = state.lookup(name)
            if artifact is None:
                self._send_text(404, f"no such file: {name!r}\n", head)
                return
            serial = state.next_etag_serial() if faults.etag_per_response else None
            rep = representation(artifact, faults, serial)
        self._send_representation(name, rep, faults, head)

    def _location(self, path: str, query: str, faults: Faults) -> str | None:
        server = cast(HTTPServer, self.server)
        host = self.headers.get("Host") or f"{server.host}:{server.server_port}"
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
        self, name: str, rep: Representation, faults: Faults, head: bool
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
            end = range_end(range_header)
            if faults.max_range_end is not None and end is not None and end > faults.max_range_end:
                self._refuse_range(faults.max_range_end, faults.max_range_status, size, head)
                return
            try:
                if faults.range_whole and size > 0:
                    wanted: tuple[int, int] | None = (0, size - 1)
                else:
                    wanted = parse_range(range_header, size)
            except Unsatisfiable:
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

    def _not_modified(self, rep: Representation, faults: Faults) -> bool:
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

    def _if_range_holds(self, rep: Representation, faults: Faults) -> bool:
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
        self, name: str, body: memoryview, faults: Faults, chunked: bool, flip: int | None
    ) -> None:
        state = self._state
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
            state.count(name, stop - pos)
            try:
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(piece))
                    self.wfile.write(piece)
                    self.wfile.write(b"\r\n")
                else:
                    self.wfile.write(piece)
            except OSError:
                state.count(name, pos - stop)
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
            if self._state.stopping.wait(timeout):
                raise _Abort
            return
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._state.stopping.wait(min(remaining, _TRICKLE_TICK_S)) or self._client_gone():
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


def _http_date(timestamp: int) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)
