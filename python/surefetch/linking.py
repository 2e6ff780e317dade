"""Putting a verified cache blob at a new path without writing its bytes twice.

Link modes (uv's ``--link-mode``, in short):

- ``reflink``: a copy-on-write clone (``FICLONE``: btrfs, XFS, bcachefs, ...): no
  data is copied, and the two files are independent from then on. Fails where the
  filesystem cannot clone.
- ``copy``: ``copy_file_range`` — the kernel copies (and may clone or share extents
  itself); never a read/write loop through Python.
- ``auto`` (the default): ``reflink`` where the filesystem can, else ``copy``.
- ``hardlink``: the same inode as the cache's blob. Nothing is copied, but the
  installed file *is* the blob: editing it in place changes the cache's copy too
  (``surefetch cache verify`` then quarantines it), and its mode is the blob's. Only
  when asked, and never for an executable artifact (that needs its own mode).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

from surefetch._fs import fsync_dir
from surefetch.download import engine_place_many

__all__ = ["LINK_MODES", "LinkMode", "install", "place", "place_many"]

LinkMode = Literal["auto", "reflink", "hardlink", "copy"]
LINK_MODES: Final = ("auto", "reflink", "hardlink", "copy")


def place(blob: Path, target: Path, mode: int, link_mode: LinkMode = "auto") -> str:
    """Creates `target` (which must not exist) with the bytes of `blob`.

    Args:
        blob: the verified source file.
        target: the new file (a clone or copy), or a hardlink to `blob`.
        mode: the permission bits of a clone or copy, minus the umask.
        link_mode: see the module documentation.

    Returns:
        What was done: ``"reflink"``, ``"copy"`` or ``"hardlink"``.

    Raises:
        OSError: the file could not be created, cloned (``reflink``), linked or copied;
            a partly written `target` is removed.
        ValueError: an unknown `link_mode`.
    """
    placed = place_many([(blob, target, mode)], link_mode, verify=False)[0]
    if isinstance(placed, OSError):
        raise placed
    return placed[0]


# Items placed per call of the engine, between which Ctrl+C is seen (each a few µs).
_PLACE_GROUP: Final = 256


def place_many(
    items: Sequence[tuple[Path, Path, int]], link_mode: LinkMode, *, verify: bool
) -> list[tuple[str, tuple[int, str] | None] | OSError]:
    """`place` for each `(blob, target, mode)`, in the engine, a group at a time.

    Args:
        items: what to place where, as for `place`.
        link_mode: see the module documentation.
        verify: hash what lands (a hardlink too: it is the blob, which may have been
            damaged in the cache).

    Returns:
        Per item: what was done with, when `verify`, the new file's (size in bytes,
        XXH3-128), else None; or the `OSError` that item met (the others are placed
        all the same).

    Raises:
        ValueError: an unknown `link_mode`.
    """
    if link_mode not in LINK_MODES:
        raise ValueError(f"link mode must be one of {', '.join(LINK_MODES)}, not {link_mode!r}")
    placed: list[tuple[str, tuple[int, str] | None] | OSError] = []
    for start in range(0, len(items), _PLACE_GROUP):
        group = items[start : start + _PLACE_GROUP]
        placed.extend(engine_place_many(group, link_mode, verify=verify))
    return placed


def install(blob: Path, target: Path, mode: int, link_mode: LinkMode = "auto") -> str:
    """Puts the bytes of `blob` at `target` atomically and durably: placed (see `place`)
    under a temporary name beside `target`, fsynced, renamed over `target`, and the
    directory fsynced. Whatever was at `target` stays until the rename.

    Returns:
        What `place` did.

    Raises:
        OSError: as `place`, or the fsync or rename failed (nothing at `target` changed).
    """
    temp = target.with_name(f".{target.name[:200]}.{os.urandom(6).hex()}.surefetch-tmp")
    how = place(blob, temp, mode, link_mode)
    try:
        if how != "hardlink":
            fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_dir(target.parent)
    return how
