"""`TransferOptions`: how each transfer behaves (connections, resume, timeouts, retries,
low-speed limit, request headers, netrc), with its defaults and checks in one place.

`download`, `download_many`, the cache, `sync`, the pooch downloader and the command
line all take one of these (or its fields as keywords) and hand the engine the same
keywords (`engine_options`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from surefetch.credentials import netrc_credentials

__all__ = ["TransferOptions"]

MAX_CONNECTIONS = 64
"""The most parallel connections a transfer may ask for."""
MAX_RETRIES = 1000
MAX_SECONDS = 1e9
"""The longest timeout (seconds, ~31 years); longer is no limit: use None."""


@dataclass(frozen=True)
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

    connections: int | None = None
    resume: bool = True
    timeout: float | None = None
    read_timeout: float | None = 30.0
    connect_timeout: float = 30.0
    retries: int = 3
    speed_limit: int = 1024
    speed_time: float = 30.0
    headers: Mapping[str, str] = field(default_factory=dict)
    netrc: bool = True

    def __post_init__(self) -> None:
        if self.connections is not None:
            _whole(self.connections, "connections", 1, MAX_CONNECTIONS)
        _whole(self.retries, "retries", 0, MAX_RETRIES)
        _whole(self.speed_limit, "speed_limit", 0, 2**63 - 1, unit=" bytes per second")
        for name in ("timeout", "read_timeout", "connect_timeout", "speed_time"):
            value = getattr(self, name)
            if value is None and name in ("timeout", "read_timeout"):
                continue  # no limit
            _seconds(value, name)
        for name in ("resume", "netrc"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        # A private copy: the caller's mapping may change after the options were checked.
        object.__setattr__(self, "headers", _checked_headers(self.headers))

    @classmethod
    def of(cls, options: TransferOptions | None = None, /, **changes: Any) -> TransferOptions:
        """`options` (default: the defaults) with `changes` applied, checked.

        Raises:
            TypeError: `options` is not a `TransferOptions`, or a keyword is not a field.
            ValueError: a field out of range.
        """
        if options is not None and not isinstance(options, TransferOptions):
            raise TypeError(f"options must be a TransferOptions, not {type(options).__name__}")
        unknown = sorted(set(changes) - FIELDS)
        if unknown:
            raise TypeError(
                f"unknown transfer option {unknown[0]!r}: the options are "
                f"{', '.join(sorted(FIELDS))}"
            )
        base = options if options is not None else DEFAULT
        return dataclasses.replace(base, **changes) if changes else base

    def engine_options(self, url: str) -> dict[str, Any]:
        """The engine's keywords for a transfer of `url`: every field but `netrc`, whose
        credentials (if any) join the headers as ``Authorization``, and go with the
        transfer for the hosts a redirect may lead to."""
        if self.netrc:
            headers, host_credentials = netrc_credentials(url, self.headers)
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


def _checked_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header {name!r}: names and values must be strings, not {value!r}")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid header name {name!r} (RFC 9110 §5.1: a token, no spaces)")
        if _UNSENDABLE.search(value):
            raise ValueError(f"header {name!r}: a value cannot hold CR, LF or NUL")
        checked[name] = value
    return checked


DEFAULT = TransferOptions()
"""The defaults."""

FIELDS = frozenset(f.name for f in dataclasses.fields(TransferOptions))
