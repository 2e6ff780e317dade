"""What a `FaultServer` and its request handlers share: `ServerState`.

The artifacts served, the requests recorded and the counters, the connections
open, and whether the server is stopping; one lock guards them all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

from surefetch.testing.content import Artifact, Auto, make_artifact

__all__ = ["RecordedRequest", "ServerState"]


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
        client_port: The client's port: requests with the same one came on the same
            connection (a keep-alive connection reused, even from before a reset).
    """

    method: str
    target: str
    name: str
    query: str
    headers: dict[str, str]
    range: str | None
    time: float
    client_port: int = 0


class ServerState:
    """The state of one server, safe to use from any thread.

    Attributes:
        stopping: Set once the server stops; whatever waits on it ends.
    """

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._artifacts: dict[str, Artifact] = {}
        self._requests: list[RecordedRequest] = []
        self._seen: dict[tuple[str, str], int] = {}
        self._bytes_sent = 0
        self._bytes_by_name: dict[str, int] = {}
        self._accepted = 0
        self._etag_serial = 0
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()

    # -- content -----------------------------------------------------------

    def add(
        self, name: str, data: bytes, etag: str | Auto | None, last_modified: float | Auto | None
    ) -> None:
        """Serve ``data`` at ``/name`` (no leading ``/``), as `FaultServer.add` says.

        Raises:
            ValueError: ``name`` is already served.
        """
        with self._lock:
            if name in self._artifacts:
                raise ValueError(f"{name!r} is already served; use replace() to change it")
            self._artifacts[name] = make_artifact(data, etag, last_modified, None)

    def replace(
        self, name: str, data: bytes, etag: str | Auto | None, last_modified: float | Auto | None
    ) -> None:
        """Change the content at ``/name``, as `FaultServer.replace` says.

        Raises:
            KeyError: ``name`` is not served.
        """
        with self._lock:
            old = self._artifacts[name]
            self._artifacts[name] = make_artifact(data, etag, last_modified, old)

    def lookup(self, name: str) -> Artifact | None:
        """The artifact served at ``/name``, or None."""
        with self._lock:
            return self._artifacts.get(name)

    # -- records and counters ----------------------------------------------

    def record(
        self,
        method: str,
        target: str,
        name: str,
        query: str,
        headers: dict[str, str],
        client_port: int = 0,
    ) -> int:
        """Record a request; return its 1-based number for (method, target).

        Args:
            method: The request's method.
            target: The raw request target.
            name: The percent-decoded path without its leading ``/``.
            query: The raw query string.
            headers: The request headers, names in lower case.
            client_port: The client's port (which connection it came on).
        """
        record = RecordedRequest(
            method=method,
            target=target,
            name=name,
            query=query,
            headers=headers,
            range=headers.get("range"),
            time=time.monotonic(),
            client_port=client_port,
        )
        key = (method, target)
        with self._lock:
            self._requests.append(record)
            number = self._seen.get(key, 0) + 1
            self._seen[key] = number
        return number

    def requests(self) -> list[RecordedRequest]:
        """A copy of every request recorded so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def request_count(self, name: str, method: str | None) -> int:
        """How many requests for ``/name`` (any query) were recorded, optionally of one method."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if r.name == name and (method is None or r.method == method)
            )

    def next_etag_serial(self) -> int:
        """A number never returned before by this state (not reset by reset_counters)."""
        with self._lock:
            self._etag_serial += 1
            return self._etag_serial

    def count(self, name: str, sent: int) -> None:
        """Count ``sent`` body bytes for ``/name`` (negative to take back a failed write)."""
        with self._lock:
            self._bytes_sent += sent
            self._bytes_by_name[name] = self._bytes_by_name.get(name, 0) + sent

    def bytes_sent(self) -> int:
        """Body bytes counted so far, all names together."""
        with self._lock:
            return self._bytes_sent

    def bytes_sent_for(self, name: str) -> int:
        """Body bytes counted so far for ``/name``."""
        with self._lock:
            return self._bytes_by_name.get(name, 0)

    def accepted(self) -> int:
        """Connections tracked so far."""
        with self._lock:
            return self._accepted

    def reset_counters(self) -> None:
        """Forget recorded requests, byte and connection counts, the per-target request numbers."""
        with self._lock:
            self._accepted = 0
            self._requests.clear()
            self._seen.clear()
            self._bytes_sent = 0
            self._bytes_by_name.clear()

    # -- connections ---------------------------------------------------------

    def track(self, connection: socket.socket, thread: threading.Thread) -> None:
        """Count and remember a new connection and its handler thread; shut it down at
        once if the server is stopping."""
        with self._lock:
            self._accepted += 1
            self._connections.add(connection)
            self._handlers.add(thread)
        if self.stopping.is_set():
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def untrack(self, connection: socket.socket, thread: threading.Thread) -> None:
        """Forget a connection whose handler is done with it."""
        with self._lock:
            self._connections.discard(connection)
            self._handlers.discard(thread)

    def open_connections(self) -> tuple[list[socket.socket], list[threading.Thread]]:
        """The connections tracked and not yet forgotten, and their handler threads."""
        with self._lock:
            return list(self._connections), list(self._handlers)
