"""Small file operations shared by the layers above: ownership checks, fsyncs, flock and
byte-range locks, atomic JSON files, and `StorageError`s that say what is on disk."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import struct
import time
from pathlib import Path
from typing import Final

from surefetch.errors import StorageError


def written_only_by_us(st: os.stat_result) -> bool:
    """Whether `st` (an lstat) is a regular file nobody but us (or root) can have written:
    ours or root's, one link, not writable by group or others."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_nlink == 1
        and st.st_uid in (os.getuid(), 0)
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def missing_levels(directory: Path) -> list[Path]:
    """The levels of `directory` that do not exist yet, outermost first: what making it
    creates, for `remove_empty_levels` to take back when what needed it failed."""
    missing = []
    for level in (directory, *directory.parents):
        if str(level) in ("", ".") or os.path.lexists(level):
            break
        missing.append(level)
    return missing[::-1]


def remove_empty_levels(levels: list[Path]) -> None:
    """Removes `levels` (from `missing_levels`), innermost first, while they are empty:
    one that holds anything (another download's file) stays, and so do those above it."""
    for level in reversed(levels):
        try:
            os.rmdir(level)
        except OSError:
            return


def fsync_dir(directory: Path) -> None:
    """fsyncs a directory, so that renames into it survive a power cut (a filesystem
    that cannot sync a directory, EINVAL, has nothing more to do)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def try_flock(path: Path, mode: int = 0o644) -> int | None:
    """An exclusive ``flock`` on the file now at `path`: its descriptor, or None while
    another holder has it. The file is created (`mode` minus the umask) if missing and
    never opened through a symlink (``ELOOP``); another user's lock file is opened
    read-only, which is enough to lock it.

    A holder that unlinks its lock file before releasing it (so that a waiter notices)
    may leave a waiter locking a file no longer at `path`: only the inode at `path`
    counts, so the waiter tries again on the new file. This is the one copy of that
    protocol (the cache's artifact locks, sync's destination lock, the supervisor's
    socket lock).

    Raises:
        OSError: the file cannot be opened or created (``FileNotFoundError`` when its
            directory is gone).
    """
    while True:
        flags = os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, mode)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | flags)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        held = os.fstat(fd)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (32 bytes).
_FLOCK_STRUCT: Final = "hhqqi4x"
RANGE_LOCK_LIMIT: Final = 1 << 62  # offsets below this leave l_start + l_len in range


def try_range_lock(
    path: Path, offset: int, *, create: bool, mode: int = 0o644, share: int = 0
) -> int | None:
    """An exclusive lock on byte `offset` of the file at `path`: a descriptor that holds
    it until closed, or None while another holder has it.

    An open file description lock (``F_OFD_SETLK``): like ``flock``, it belongs to this
    descriptor (so two holders in one process exclude each other too, unlike POSIX
    ``fcntl`` locks), is released by the kernel when its holder dies, and is never
    followed through a symlink; unlike ``flock``, one file holds any number of them, so
    a lock costs no file of its own. It needs the file open for writing: a file this
    call creates (only with `create`; `mode` minus the umask) is also given the
    permission bits `share` (e.g. group read-write where the group shares the cache).

    Raises:
        OSError: the file cannot be opened (``FileNotFoundError``: missing and not
            `create`; ``PermissionError``: this user may not write it; ``ELOOP``: a
            symlink; ``EISDIR``/``EINVAL``: not a regular file).
    """
    fd = open_range_lock_file(path, create=create, mode=mode, share=share)
    try:
        if lock_byte(fd, offset):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def lock_byte(fd: int, offset: int) -> bool:
    """Takes byte `offset` of the file open as `fd` for this open file description
    (``F_OFD_SETLK``, see `try_range_lock`): True when taken, False while another open
    file description holds it. One description holds any number of bytes, all until it
    is closed."""
    if not 0 <= offset < RANGE_LOCK_LIMIT:
        raise ValueError(f"a range lock's offset must be in [0, 2**62), not {offset}")
    request = struct.pack(_FLOCK_STRUCT, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def open_range_lock_file(path: Path, *, create: bool, mode: int = 0o644, share: int = 0) -> int:
    """A descriptor of the file at `path`, open for writing as range locks need (see
    `try_range_lock` for `create`, `mode`, `share` and the errors raised)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    while True:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if not create:
                raise
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                continue  # another process created it meanwhile: open theirs
            if share:
                with contextlib.suppress(OSError):
                    os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | share)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return fd


def write_json_atomic(target: Path, value: object, *, durable: bool, mode: int = 0o644) -> None:
    """Replaces `target` with `value` as JSON (keys sorted), atomically: written to a new
    temporary beside it (``.<stem>.<pid>.<ns>.tmp``, ``O_EXCL | O_NOFOLLOW``, `mode` minus
    the umask), then renamed over it. Readers see the old file or the new one, never a
    part of one.

    Args:
        durable: fsync the file before the rename and the directory after it. Without
            it (the cache's metadata and URL index, which can be recomputed), a crash
            may lose the new content or leave the old one, but nothing partial.

    Raises:
        OSError: the temporary could not be created, written or renamed (it is removed,
            `target` unchanged); with `durable`, also a failed fsync of the directory
            after the rename (`target` then holds the new content).
    """
    temp = target.with_name(f".{target.stem}.{os.getpid()}.{time.time_ns()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, sort_keys=True)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        fsync_dir(target.parent)


# -- what a failed file operation left, as a StorageError ------------------------------


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that filesystem and retry"
    if exc.errno == errno.EIO:
        return "the device reported an I/O error: check the disk"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check the permissions"
    return "check the destination"


def _reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{reason} (os error {exc.errno})" if exc.errno else reason


def storage_error(exc: OSError, what: str) -> StorageError:
    return StorageError(exc.errno or errno.EIO, f"{what}: {_reason(exc)}; {_hint(exc)}")


def not_durable(exc: OSError, done: str, directory: Path, *, many: bool = False) -> StorageError:
    """The error for a directory fsync that failed after the renames it should make
    durable: what they did is in place, only its durability is unknown."""
    its, it = ("their", "them") if many else ("its", "it")
    return StorageError(
        exc.errno or errno.EIO,
        f"{done}, but {its} durability is unknown: syncing the directory {directory} failed: "
        f"{_reason(exc)}; a crash or power loss could still undo {it}: {_hint(exc)}",
    )
