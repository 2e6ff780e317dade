"""The supervisor's control socket: a Unix socket speaking JSON lines.

Framing: each request is one JSON object on one line (at most :data:`MAX_LINE`
bytes), answered by one JSON object on one line; a connection may carry several.
Every answer has ``ok``; a refusal is ``{"ok": false, "error": MESSAGE, "exit":
CODE}`` with the exit code ``surefetch ctl`` should end with (2 for a malformed
request). Requests are ``{"op": ...}`` with ``list-workers``, ``jobs``,
``submit``, ``cancel``, ``wait`` (``ids``, optional ``timeout`` in seconds: answered
once those jobs are finished or the time is up, with ``done`` and ``counts``),
``shutdown`` or ``ping``.

Who may ask: the socket is created mode 0600, and each connection's peer
credentials (``SO_PEERCRED``) are checked: only the supervisor's own user or
root is answered. A second supervisor on the same path is kept out by a
``flock`` on ``PATH.lock``.

:class:`ControlServer` is the supervisor's end, :func:`request` the client's
(``surefetch ctl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from surefetch._fs import try_flock
from surefetch.errors import SurefetchError

__all__ = ["MAX_LINE", "PROTOCOL", "ControlServer", "error_reply", "peer_user", "request"]

#: The protocol version a supervisor reports in its answer to ``ping``.
PROTOCOL = 1
#: The longest line (request, answer or worker event) read, in bytes.
MAX_LINE = 1 << 20
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, with its NUL

#: Answers one request: ``(request, the user asking) -> answer``.
Dispatch = Callable[[Mapping[str, Any], str], Awaitable[dict[str, Any]]]


def error_reply(message: str, exit_code: int = 1) -> dict[str, Any]:
    """A refusal: what went wrong, and the exit code ``ctl`` should end with."""
    return {"ok": False, "error": message, "exit": exit_code}


def peer_user(sock: socket.socket | None) -> str | None:
    """The name of the user at the other end, if it is this process's user or root."""
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (os.getuid(), 0):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


async def _reply(writer: asyncio.StreamWriter, reply: Mapping[str, Any]) -> None:
    writer.write((json.dumps(reply) + "\n").encode())
    await writer.drain()


class ControlServer:
    """The supervisor's end of its control socket.

    Args:
        path: where the socket is created (made absolute).
        dispatch: answers one well-formed request.
    """

    def __init__(self, path: str | os.PathLike[str], dispatch: Dispatch) -> None:
        self.path = Path(os.path.abspath(path))
        self._dispatch = dispatch
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Takes ``PATH.lock``, and removes a socket left at ``PATH`` by a supervisor that died.

        Raises:
            SurefetchError: another supervisor holds the path, the lock cannot be
                created, or something other than a socket is at the path.
        """
        lock_path = Path(str(self.path) + ".lock")
        try:
            fd = try_flock(lock_path, 0o600)
        except OSError as exc:
            raise SurefetchError(
                f"cannot create {lock_path} ({exc.strerror}); choose a --socket in a "
                "directory you can write"
            ) from None
        if fd is None:
            raise SurefetchError(
                f"another supervisor is running on {self.path}; stop it with "
                f"`surefetch ctl --socket {self.path} shutdown` or choose another --socket"
            )
        self._lock_fd = fd
        if self.path.exists() or self.path.is_symlink():
            mode = self.path.lstat().st_mode
            if not stat.S_ISSOCK(mode):
                raise SurefetchError(
                    f"{self.path} exists and is not a socket; choose another --socket"
                )
            self.path.unlink()  # left by a supervisor that died: we hold the lock

    def unlock(self) -> None:
        """Removes and releases ``PATH.lock`` (a no-op when not held)."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(self.path) + ".lock")
        os.close(self._lock_fd)
        self._lock_fd = None

    async def listen(self) -> asyncio.AbstractServer:
        """Creates the socket (mode 0600) and starts answering on it.

        The socket is bound under a temporary name and renamed into place once it
        listens: a client that sees the path can connect (between bind and listen it
        would be refused, as if no supervisor ran)."""
        temporary = f"{self.path}.{os.getpid()}.tmp"
        if len(os.fsencode(temporary)) > _SOCKET_PATH_MAX:
            temporary = str(self.path)  # no room for a longer name: bound in place
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(temporary)
            finally:
                os.umask(old)
            sock.listen(100)
            os.chmod(temporary, 0o600)
            os.rename(temporary, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        return await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)

    def close(self) -> None:
        """Removes the socket, then the lock (once the server stopped listening)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.unlock()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            user = peer_user(writer.get_extra_info("socket"))
            if user is None:
                await _reply(
                    writer, error_reply("only the supervisor's own user (or root) may use it")
                )
                return
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    await _reply(writer, error_reply("request too long", 2))
                    return
                if not line:
                    return
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    await _reply(
                        writer, error_reply(f"a request must be one JSON object: {exc}", 2)
                    )
                    continue
                await _reply(writer, await self._dispatch(message, user))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


# --- the client ---------------------------------------------------------------------------


def request(
    socket_path: str | os.PathLike[str],
    message: Mapping[str, Any],
    timeout: float | None = 30.0,
) -> dict[str, Any]:
    """Sends one request to a supervisor and returns its answer.

    Args:
        socket_path: the supervisor's control socket.
        message: the request, e.g. ``{"op": "jobs"}``.
        timeout: seconds to wait for the answer (None: as long as the connection lasts).

    Raises:
        SurefetchError: no supervisor listens there, it did not answer in time, or it
            closed the connection.
        ValueError: the request is longer than a supervisor takes (`MAX_LINE` bytes).
    """
    path = os.fspath(socket_path)
    line = (json.dumps(message) + "\n").encode()
    if len(line) > MAX_LINE:  # the supervisor would refuse it: nothing is sent
        raise ValueError(
            f"the request is {len(line):,} bytes, and a supervisor takes at most {MAX_LINE:,} "
            "in one: send fewer jobs per submit (several submits)"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise SurefetchError(
                f"no supervisor is listening on {path} ({exc.strerror}); start one with "
                f"`surefetch supervise --socket {path}`"
            ) from None
        except PermissionError:
            raise SurefetchError(
                f"permission denied on {path}: only the supervisor's user may use its socket"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise SurefetchError(f"{path} is not a supervisor's socket") from None
            raise SurefetchError(f"cannot connect to {path}: {exc.strerror}") from None
        # It may go away (stopping) or refuse the request: its answer, if any, says which.
        with contextlib.suppress(ConnectionError):
            sock.sendall(line)
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise SurefetchError(
                f"the supervisor on {path} did not answer within {timeout:g}s"
            ) from None
        except ConnectionError:
            pass  # as an end of the connection: what arrived is judged below
    if not data.endswith(b"\n"):
        data = b""  # half an answer is none
    if not data:
        raise SurefetchError(f"the supervisor on {path} closed the connection without answering")
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise SurefetchError(f"the supervisor on {path} sent an answer that is not an object")
    return reply
