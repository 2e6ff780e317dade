"""`FaultServer`: the server's life cycle, its URLs, its content and its counters.

The requests themselves are answered by :mod:`surefetch.testing.handler`;
what the two share is a :class:`~surefetch.testing.state.ServerState`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Final
from urllib.parse import quote, urlencode

from surefetch.testing.content import AUTO, Auto
from surefetch.testing.handler import HTTPServer
from surefetch.testing.state import RecordedRequest, ServerState

__all__ = ["FaultServer"]

_STOP_JOIN_S: Final = 1.0


class FaultServer:
    """An HTTP/1.1 server on a thread, misbehaving on request (see :mod:`surefetch.testing`).

    The socket is bound when the object is created (so `url` is known at
    once); `start` begins serving. Use it as a context manager, or call
    `stop`, which returns within about a second even with stalled requests.

    Args:
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()  # guards _thread and the start/stop transitions
        self._state = ServerState()
        self._thread: threading.Thread | None = None
        self._httpd = HTTPServer((host, port), self._state)
        self.host = host
        self.port = self._httpd.server_port

    # -- life cycle ----------------------------------------------------------

    def start(self) -> FaultServer:
        """Start serving on a daemon thread; return self. Calling it again does nothing.

        Raises:
            RuntimeError: The server was already stopped.
        """
        with self._lock:
            if self._state.stopping.is_set():
                raise RuntimeError("this FaultServer was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._httpd.serve_until_stopped,
                    name=f"FaultServer:{self.port}",
                    daemon=True,
                )
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: end stalls, close every connection, free the port. Idempotent.

        Returns within about a second: threads still running then (daemon
        threads, their connections shut down) are left to end by themselves.
        """
        with self._lock:
            if self._state.stopping.is_set():
                return
            self._state.stopping.set()
            thread = self._thread
        deadline = time.monotonic() + _STOP_JOIN_S
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        connections, handlers = self._state.open_connections()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
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
        etag: str | Auto | None = AUTO,
        last_modified: float | Auto | None = AUTO,
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
        self._state.add(name, data, etag, last_modified)
        return self.url_for(name)

    def replace(
        self,
        name: str,
        data: bytes,
        *,
        etag: str | Auto | None = AUTO,
        last_modified: float | Auto | None = AUTO,
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
        self._state.replace(name, data, etag, last_modified)
        return self.url_for(name)

    # -- counters ---------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Body bytes of 200/206 answers written to sockets so far, all paths together."""
        return self._state.bytes_sent()

    def bytes_sent_for(self, name: str) -> int:
        """Body bytes of 200/206 answers written so far for ``/name``."""
        return self._state.bytes_sent_for(name.lstrip("/"))

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        return self._state.requests()

    def request_count(self, name: str, method: str | None = None) -> int:
        """How many requests for ``/name`` (any query) arrived, optionally of one method."""
        return self._state.request_count(name.lstrip("/"), method)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (a keep-alive connection counts once)."""
        return self._state.accepted()

    def reset_counters(self) -> None:
        """Forget recorded requests, byte and connection counts, the ``times``/``flaky`` counts."""
        self._state.reset_counters()
