"""Checks of what callers ask the store to keep: names, titles, metadata, session ids."""

from __future__ import annotations

import json
import re

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_OWNER",
    "MAX_TITLE",
    "check_text",
    "dump_metadata",
    "is_session_id",
]

MAX_TITLE = 1000
MAX_OWNER = 200
MAX_METADATA_BYTES = 64 * 1024

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def check_text(name: str, value: object, limit: int, *, empty: bool = False) -> str:
    """Returns ``value`` if it is text fit to store, else raises.

    Args:
        name: what the value is, for messages (``"owner"``, ``"title"``...).
        value: the value to check.
        limit: the most characters it may have.
        empty: whether a blank value is allowed.

    Raises:
        TypeError: not a str.
        ValueError: blank (unless allowed), too long, with a NUL, or not valid Unicode.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not empty and not value.strip():
        raise ValueError(f"{name} must not be empty; give a non-blank {name}")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character; remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text ({exc.reason}); fix it") from exc
    return value


def dump_metadata(metadata: object) -> str:
    """A session's metadata as the JSON text to store (None is an empty object).

    Raises:
        TypeError: not a dict.
        ValueError: not JSON (NaN, non-string keys...) or larger than 64 KiB as JSON.
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (a JSON object), not {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False, sort_keys=False)
        text.encode("ascii")
        json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"metadata must be JSON-serializable text and numbers: {exc}") from exc
    if len(text) > MAX_METADATA_BYTES:
        raise ValueError(
            f"metadata is {len(text)} bytes as JSON; the limit is {MAX_METADATA_BYTES}: "
            "keep large data in files and store their paths"
        )
    return text


def is_session_id(value: object) -> bool:
    """True when ``value`` has the shape of a session id (so it is worth looking up)."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None
