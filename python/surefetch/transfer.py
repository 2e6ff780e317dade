"""`TransferOptions`: how each transfer behaves (connections, resume, timeouts, retries,
low-speed limit, request headers, netrc), with its defaults and checks in one place.

`download`, `download_many`, the cache, `sync`, the pooch downloader and the command
line all take one of these (or its fields as keywords) and hand the engine the same
keywords (`engine_options`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from surefetch.credentials import NetrcFile

__all__ = ["TransferOptions"]

FIELDS = (
    "connections",
    "resume",
    "timeout",
    "read_timeout",
    "connect_timeout",
    "retries",
    "speed_limit",
    "speed_time",
    "headers",
    "netrc",
)
"""The fields of `TransferOptions`, in the order of its arguments."""

MAX_CONNECTIONS = 64
"""The most parallel connections a transfer may ask for."""
MAX_RETRIES = 1000
MAX_SECONDS = 1e9
"""The longest timeout (seconds, ~31 years); longer is no limit: use None."""


class TransferOptions:
    """How each transfer behaves; checked when created.

    Attributes:
        connections: parallel ranged connections (None: automatic: one for files under
            16 MiB or servers without ranges; above, one to eight, added while they
            raise the rate).
        resume: continue a part file left by an interrupted transfer (Range with
            If-Range, RFC 9110 §13.1.5); False discards it.
        timeout: overall limit of one transfer in seconds (None: no limit).
        read_timeout: how long the server may stay silent, in seconds (None: no limit).
        connect_timeout: how long connecting may take, in seconds.
        retries: further attempts after a transient failure (connect error, cut body,
            5xx, 408, 429 honouring Retry-After), with exponential backoff.
        speed_limit: low-speed limit in bytes per second (0: off): slower than that
            for `speed_time` seconds is a stall, retried and resumed (curl's
            ``--speed-limit``/``--speed-time``).
        speed_time: seconds below `speed_limit` that make a stall.
        headers: extra request headers (credentials are dropped on a redirect to
            another host).
        netrc: use the credentials of the URL's host in ``~/.netrc`` (``$NETRC``) when
            the URL has no user and `headers` no ``Authorization``.

    Raises:
        ValueError: a field out of range, or a header that cannot be sent (named in the
            message).
        TypeError: a field of the wrong type.
    """

    __slots__ = (
        "connect_timeout",
        "connections",
        "headers",
        "netrc",
        "read_timeout",
        "resume",
        "retries",
        "speed_limit",
        "speed_time",
        "timeout",
    )
    # Records of the library are plain classes and named tuples, not dataclasses:
    # `dataclasses` imports `inspect`, and making one class costs ~0.4 ms, at every start.

    connections: int | None
    resume: bool
    timeout: float | None
    read_timeout: float | None
    connect_timeout: float
    retries: int
    speed_limit: int
    speed_time: float
    headers: Mapping[str, str]
    netrc: bool

    def __init__(
        self,
        connections: int | None = None,
        resume: bool = True,
        timeout: float | None = None,
        read_timeout: float | None = 30.0,
        connect_timeout: float = 30.0,
        retries: int = 3,
        speed_limit: int = 1024,
        speed_time: float = 30.0,
        headers: Mapping[str, str] | None = None,
        netrc: bool = True,
    ) -> None:
        if connections is not None:
            _whole(connections, "connections", 1, MAX_CONNECTIONS)
        _whole(retries, "retries", 0, MAX_RETRIES)
        _whole(speed_limit, "speed_limit", 0, 2**63 - 1, unit=" bytes per second")
        for name, value in (("timeout", timeout), ("read_timeout", read_timeout)):
            if value is not None:  # None: no limit
                _seconds(value, name)
        _seconds(connect_timeout, "connect_timeout")
        _seconds(speed_time, "speed_time")
        for name, flag in (("resume", resume), ("netrc", netrc)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, not {flag!r}")
        values = (
            connections,
            resume,
            timeout,
            read_timeout,
            connect_timeout,
            retries,
            speed_limit,
            speed_time,
            _checked_headers(headers),  # a read-only copy: the caller's may change later
            netrc,
        )
        for name, field in zip(FIELDS, values):  # (FIELDS is the arguments' order)
            object.__setattr__(self, name, field)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (the keywords that make an equal `TransferOptions`)."""
        return {name: getattr(self, name) for name in FIELDS}

    def __setattr__(self, name: str, value: object) -> None:
        hint = f": use TransferOptions.of(options, {name}=...)" if name in FIELDS else ""
        raise AttributeError(f"TransferOptions are immutable{hint}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("TransferOptions are immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TransferOptions):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  # the headers are a dict

    def __repr__(self) -> str:
        """The fields, header values hidden (they may be credentials)."""
        shown = ", ".join(
            f"headers={ {name: '***' for name in self.headers}!r}"
            if name == "headers"
            else f"{name}={getattr(self, name)!r}"
            for name in FIELDS
        )
        return f"TransferOptions({shown})"

    def __reduce__(self) -> tuple[type[TransferOptions], tuple[object, ...]]:
        fields = {**self.as_dict(), "headers": dict(self.headers)}  # (a proxy does not pickle)
        return TransferOptions, tuple(fields[name] for name in FIELDS)

    @classmethod
    def of(cls, options: TransferOptions | None = None, /, **changes: Any) -> TransferOptions:
        """`options` (default: the defaults) with `changes` applied, checked.

        Raises:
            TypeError: `options` is not a `TransferOptions`, or a keyword is not a field.
            ValueError: a field out of range.
        """
        if options is not None and not isinstance(options, TransferOptions):
            raise TypeError(f"options must be a TransferOptions, not {type(options).__name__}")
        unknown = sorted(set(changes).difference(FIELDS))
        if unknown:
            raise TypeError(
                f"unknown transfer option {unknown[0]!r}: the options are "
                f"{', '.join(sorted(FIELDS))}"
            )
        base = options if options is not None else DEFAULT
        return TransferOptions(**{**base.as_dict(), **changes}) if changes else base

    def check_netrc(self) -> None:
        """Reads the netrc file now (when `netrc` is on), so that a call stops on one that
        does not parse before it creates anything; the parse is kept for its transfers.

        Raises:
            ValueError: the netrc file cannot be read or does not parse.
        """
        if self.netrc:
            NetrcFile()

    def engine_options(self, url: str, netrc_file: NetrcFile | None = None) -> dict[str, Any]:
        """The engine's keywords for a transfer of `url`: every field but `netrc`, whose
        credentials (if any) join the headers as ``Authorization``, and go with the
        transfer for the hosts a redirect may lead to. `netrc_file`: the file as read
        for a batch (default: read now).

        Raises:
            ValueError: the netrc file does not parse.
        """
        if self.netrc:
            found = netrc_file if netrc_file is not None else NetrcFile()
            headers, host_credentials = found.credentials(url, self.headers)
        else:
            headers, host_credentials = dict(self.headers), []
        return {
            "connections": self.connections,
            "resume": self.resume,
            "timeout": self.timeout,
            "read_timeout": self.read_timeout,
            "connect_timeout": self.connect_timeout,
            "retries": self.retries,
            "speed_limit": self.speed_limit,
            "speed_time": self.speed_time,
            "headers": list(headers.items()),
            "host_credentials": host_credentials,
        }


# RFC 9110 §5.1: a field name is a token; §5.5: a value has no CR, LF or NUL.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSENDABLE = re.compile(r"[\r\n\x00]")


def _whole(value: object, name: str, low: int, high: int, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        of = f" of{unit}" if unit else ""
        raise TypeError(f"{name} must be a whole number{of}, not {value!r}")
    if value < low:
        least = "0 or more" if low == 0 else f"at least {low}"
        raise ValueError(f"{name} must be {least}{unit}, not {value}")
    if value > high:
        raise ValueError(f"{name} must be at most {high}{unit}, not {value}")


def _seconds(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if not 0 < value <= MAX_SECONDS:  # also refuses NaN
        raise ValueError(
            f"{name} must be a positive number of seconds, at most {MAX_SECONDS:g}, not {value}"
        )


def _checked_headers(headers: Mapping[str, str] | None) -> Mapping[str, str]:
    """A read-only copy of `headers`, checked (the caller's mapping may change later, and
    the options are shared: `DEFAULT`). Values are never shown: they may be secrets."""
    if headers is not None and not isinstance(headers, Mapping):
        raise TypeError(
            f"headers must be a mapping of names to values, not {type(headers).__name__}"
        )
    checked: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(
                f"header {name!r}: names and values must be strings, not "
                f"{type(value).__name__ if isinstance(name, str) else type(name).__name__}"
            )
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r} (RFC 9110 §5.1: a token, no spaces)")
        if _UNSENDABLE.search(value):
            raise ValueError(f"header {name!r}: a value cannot hold CR, LF or NUL")
        checked[name] = value
    return MappingProxyType(checked)


DEFAULT = TransferOptions()
"""The defaults."""
