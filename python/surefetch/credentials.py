"""Credentials from ``~/.netrc`` (or ``$NETRC``), as curl ``-n``, requests and pip use them.

The entry for a URL's host (else the ``default`` entry) becomes an
``Authorization: Basic`` header for that request — unless the URL carries its own
user, or the caller set ``Authorization``. The engine drops the header on a redirect
to another host (``rust/http.rs``), so the password never leaves its host, and sends
there that host's own entry, if any (`netrc_credentials`; requests does the same).
No password is ever printed or logged.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import netrc

__all__ = ["NetrcFile", "netrc_credentials"]

# The last netrc file parsed: its path, (mtime, ctime, size, inode) then, its entries.
_last: tuple[str, tuple[int, int, int, int], netrc.netrc] | None = None


def _netrc_path() -> str:
    """``$NETRC`` if set, else ``~/.netrc`` (a string, not a Path: asked once per
    download, a worker's every job)."""
    return os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")


class NetrcFile:
    """The netrc file (``$NETRC``, else ``~/.netrc``) as read once: a batch reads it once
    for all its URLs.

    Raises:
        ValueError: the netrc file does not parse (the message says where; it never
            contains a password).
    """

    __slots__ = ("_by_host", "_found")

    def __init__(self) -> None:
        self._found = _read(_netrc_path())
        self._by_host = _by_host(self._found)

    def credentials(
        self, url: str, headers: Mapping[str, str] | None
    ) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """`headers`, plus ``Authorization`` from the netrc entry of `url`'s host when
        there is one and nothing else authenticates the request; and ``(host,
        Authorization value)`` for each machine of the netrc file (``("", value)`` for
        its ``default`` entry), for the engine to use on the host a redirect leads to
        when it leaves the origin (where requests, too, applies netrc again)."""
        return _with_entry(url, headers, self._found), list(self._by_host)


def netrc_credentials(
    url: str, headers: Mapping[str, str] | None
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """`NetrcFile.credentials` of `url`, the file read now.

    Raises:
        ValueError: the netrc file does not parse.
    """
    return NetrcFile().credentials(url, headers)


def _with_entry(
    url: str, headers: Mapping[str, str] | None, found: netrc.netrc | None
) -> dict[str, str]:
    result = dict(headers or {})
    if found is None or any(name.lower() == "authorization" for name in result):
        return result
    parts = urllib.parse.urlsplit(url)
    if parts.username or not parts.hostname:
        return result
    entry = found.authenticators(parts.hostname)
    if entry is None:
        return result
    login, _, password = entry
    result["Authorization"] = _basic(login, password)
    return result


def _by_host(found: netrc.netrc | None) -> list[tuple[str, str]]:
    if found is None:
        return []
    return [
        ("" if host == "default" else host, _basic(login, password))  # netrc's name for it
        for host, (login, _, password) in found.hosts.items()
    ]


def _basic(login: str, password: str | None) -> str:
    import base64

    token = base64.b64encode(f"{login}:{password or ''}".encode()).decode("ascii")
    return f"Basic {token}"


def _read(path: str) -> netrc.netrc | None:
    """The netrc file at `path`, parsed once for as long as it does not change (a batch
    asks once per URL); None when there is none.

    Raises:
        ValueError: it cannot be read or parsed; the message says where and what to do.
    """
    global _last
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not stat.S_ISREG(st.st_mode):
        return None
    version = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
    if _last is not None and _last[0] == path and _last[1] == version:
        return _last[2]
    import netrc  # only when there is a file: most runs have none

    try:
        parsed = netrc.netrc(path)
    except netrc.NetrcParseError as exc:
        # Not exc.msg: it quotes the token it choked on, which may be a password.
        line = _line(path, exc.lineno)
        raise ValueError(
            f"{exc.filename or path}: cannot parse it (near line {line}; an entry is "
            "`machine HOST login NAME password SECRET`): fix it, or turn it off (--no-netrc; "
            "in Python, netrc=False)"
        ) from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    _last = (path, version, parsed)
    return parsed


def _line(path: str, lineno: int | None) -> int | None:
    """`lineno` as netrc counts it, within the file (at its end, netrc counts the line
    after the last one)."""
    if lineno is None:
        return None
    try:
        with open(path, "rb") as file:
            lines = len(file.read().splitlines())
    except OSError:
        return lineno
    return max(1, min(lineno, lines))


def _unreadable(path: str, exc: OSError) -> ValueError:
    return ValueError(f"cannot read {path}: {exc.strerror}; or turn it off (--no-netrc)")
