"""`TransferOptions`: how each transfer behaves (connections, resume, timeouts, retries,
low-speed limit, request headers, netrc), with its defaults and checks in one place.

`download`, `download_many`, the cache, `sync`, the pooch downloader and the command
line all take one of these (or its fields as keywords) and hand the engine the same
keywords (`engine_options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from surefetch.credentials import netrc_headers

__all__ = ["TransferOptions"]


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
        ValueError: a field out of range (named in the message).
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
        if self.connections is not None and self.connections < 1:
            raise ValueError(f"connections must be at least 1, not {self.connections}")
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, not {self.retries}")
        for name in ("timeout", "read_timeout", "connect_timeout", "speed_time"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value}")
        if self.speed_limit < 0:
            raise ValueError(
                f"speed_limit must be 0 or more bytes per second, not {self.speed_limit}"
            )
        # A private copy: the caller's mapping may change after the options were checked.
        object.__setattr__(self, "headers", dict(self.headers or {}))

    @classmethod
    def of(cls, options: TransferOptions | None = None, /, **changes: Any) -> TransferOptions:
        """`options` (default: the defaults) with `changes` applied, checked.

        Raises:
            TypeError: a keyword that is not a field.
            ValueError: a field out of range.
        """
        base = options if options is not None else DEFAULT
        return dataclasses.replace(base, **changes) if changes else base

    def engine_options(self, url: str) -> dict[str, Any]:
        """The engine's keywords for a transfer of `url`: every field but `netrc`, whose
        credentials (if any) join the headers as ``Authorization``."""
        headers = netrc_headers(url, self.headers) if self.netrc else dict(self.headers)
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
        }


DEFAULT = TransferOptions()
"""The defaults, which `download`'s keyword defaults are read from."""
