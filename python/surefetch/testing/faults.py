"""The faults a request asks for: `Faults`, parsed from its query string by `parse_faults`.

The parameters and what each does are listed in the package's doc
(:mod:`surefetch.testing`); the handler applies them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Final
from urllib.parse import parse_qsl

from surefetch.errors import CREDENTIAL_PARAMETERS

__all__ = ["Faults", "parse_faults"]

_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Faults:
    """The faults of one request: one field per query parameter, unset ones at their defaults."""

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

    def without_transient(self) -> Faults:
        """A copy without the transient faults, for a request that ``times`` or
        ``ranged_only`` exempts."""
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


def parse_faults(query: str) -> Faults:
    """Parse a query string into faults; raise ValueError naming the culprit."""
    values: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key.startswith("_") or key.lower() in CREDENTIAL_PARAMETERS:
            continue  # a cache-buster, or a token, as presigned URLs carry: not a fault
        parser = _PARSERS.get(key)
        if parser is None:
            known = ", ".join(sorted(_PARSERS))
            raise ValueError(f"unknown fault parameter {key!r} (known: {known})")
        try:
            values[key] = parser(value)
        except ValueError as exc:
            raise ValueError(f"bad value for {key!r}: {exc}") from None
    faults = Faults(**values)
    if faults.stall_after is not None and faults.stall is None:
        faults = dataclasses.replace(faults, stall=math.inf)
    if faults.stall is not None and faults.stall_after is None:
        faults = dataclasses.replace(faults, stall_after=0)
    return faults
