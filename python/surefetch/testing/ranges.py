"""The ``Range`` header: which bytes a request asks for, read as the server reads it."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["Unsatisfiable", "parse_range", "range_end", "range_starts_past_zero"]

_POSITION_DIGITS: Final = 30
_FAR_POSITION: Final = 10**30
_RANGE: Final = re.compile(r"bytes\s*=\s*(?:(\d+)\s*-\s*(\d*)|-\s*(\d+))", re.ASCII | re.IGNORECASE)


class Unsatisfiable(Exception):
    """The Range starts at or beyond the end of the representation (416)."""


def _position(digits: str) -> int:
    """A byte position from ASCII digits, of any length.

    int() refuses strings of more than 4300 digits; a position that long is
    past the end of anything, so it becomes 10**30.
    """
    digits = digits.lstrip("0")
    if len(digits) > _POSITION_DIGITS:
        return _FAR_POSITION
    return int(digits or "0")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return (first, last) of a single byte range, or None to ignore the header.

    Raises:
        Unsatisfiable: The range is well formed but selects nothing.
    """
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first_s, last_s, suffix_s = match.groups()
    if suffix_s is not None:
        suffix = _position(suffix_s)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    first = _position(first_s)
    last = _position(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        raise Unsatisfiable
    return first, min(last, size - 1)


def range_end(header: str) -> int | None:
    """The last byte position of a valid single ``bytes=a-b`` range, or None."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or not match.group(2):
        return None
    first, last = _position(match.group(1)), _position(match.group(2))
    return last if last >= first else None


def range_starts_past_zero(header: str | None) -> bool:
    """Whether a ``Range`` header starts past byte 0 (a range of a parallel transfer)."""
    start = (header or "").partition("=")[2].partition("-")[0].strip()
    # Not int(start): str.isdigit() accepts "²", which int() refuses.
    return start.isascii() and start.isdigit() and start.strip("0") != ""
