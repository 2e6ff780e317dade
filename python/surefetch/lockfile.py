"""The lockfile ``surefetch.lock``: its format, reading it and writing it atomically.

Format (DESIGN.md "On disk"): written by `sync` only, in one canonical form: a comment
line, ``version = 1``, then one ``[[artifact]]`` per entry sorted by name, keys in the
order ``name, url, size, sha256, xxh3_128, executable, path`` (``executable`` only when
true, ``path`` only when the manifest set one); entries are checked as the manifest's are
(`surefetch.manifest`), errors raising `LockfileError`.

This module also keeps the import paths of DESIGN.md: `sync`, `verify`, `SyncResult`,
`Difference` and `SyncProgress` (from `surefetch.transaction`, loaded on first use) and the
manifest's names.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from surefetch._fs import fsync_dir, not_durable, storage_error
from surefetch.download import fit_name
from surefetch.errors import LockfileError, redact_url
from surefetch.manifest import (
    Manifest,
    ManifestArtifact,
    StrPath,
    TableChecker,
    artifact_tables,
    check_targets,
    parse_toml,
    read_manifest,
)

if TYPE_CHECKING:
    from surefetch.transaction import Difference, SyncProgress, SyncResult, sync, verify

__all__ = [
    "Difference",
    "LockedArtifact",
    "Lockfile",
    "Manifest",
    "ManifestArtifact",
    "SyncProgress",
    "SyncResult",
    "read_lockfile",
    "read_manifest",
    "render_lockfile",
    "sync",
    "verify",
    "write_lockfile",
]

LOCK_VERSION = 1
_HEADER = "# Written by `surefetch sync`; do not edit by hand.\n"
_FROM_SYNC = frozenset({"Difference", "SyncProgress", "SyncResult", "sync", "verify"})


def __getattr__(name: str) -> Any:
    # The transaction lives in surefetch.transaction, a layer above this format: loaded on use.
    if name not in _FROM_SYNC:
        raise AttributeError(f"module 'surefetch.lockfile' has no attribute {name!r}")
    value = getattr(importlib.import_module("surefetch.transaction"), name)
    globals()[name] = value
    return value


class LockedArtifact(NamedTuple):
    """One pinned ``[[artifact]]`` of the lockfile."""

    name: str
    url: str
    size: int
    sha256: str
    xxh3_128: str
    executable: bool = False
    path: str | None = None

    @property
    def target(self) -> str:
        """Where it goes, relative to the destination: `path`, else `name`."""
        return self.path if self.path is not None else self.name


class Lockfile(NamedTuple):
    """A validated lockfile: its artifacts sorted by name."""

    artifacts: tuple[LockedArtifact, ...]

    def by_name(self) -> dict[str, LockedArtifact]:
        return {a.name: a for a in self.artifacts}


def parse_lockfile(data: bytes, file: Path) -> Lockfile:
    """Validates the bytes of a lockfile read from `file` (see `read_lockfile`)."""
    doc = parse_toml(data, file, LockfileError, "lockfile")
    version = doc.get("version")
    if version != LOCK_VERSION or isinstance(version, bool):
        raise LockfileError(
            f"{file}: unsupported lockfile version {version!r} (this surefetch writes "
            f"version {LOCK_VERSION}); upgrade surefetch, or delete the lockfile and sync again"
        )
    artifacts = []
    for i, table in enumerate(artifact_tables(doc, file, LockfileError, {"version"})):
        c = TableChecker(LockfileError, file, table, i)
        name = c.text("name")
        raw_path = c.text("path", required=False)
        sha256 = c.digest("sha256", 64, required=True)
        xxh3 = c.digest("xxh3_128", 32, required=True)
        size = c.size(required=True)
        assert name is not None and sha256 is not None and xxh3 is not None and size is not None
        artifacts.append(
            LockedArtifact(
                name=name,
                url=c.url(),
                size=size,
                sha256=sha256,
                xxh3_128=xxh3,
                executable=c.flag("executable"),
                path=None if raw_path is None else c.relative("path", raw_path),
            )
        )
    check_targets(file, LockfileError, artifacts)
    return Lockfile(tuple(sorted(artifacts, key=lambda a: a.name)))


def read_lockfile(path: StrPath = "surefetch.lock") -> Lockfile:
    """Reads and validates a lockfile.

    Args:
        path: the lockfile.

    Returns:
        The `Lockfile`, artifacts sorted by name.

    Raises:
        FileNotFoundError: there is no lockfile at `path`.
        LockfileError: unreadable, not TOML, another version, or an entry is invalid or
            unsafe (the message names the file and the artifact).
    """
    file = Path(os.fspath(path))
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise LockfileError(f"cannot read the lockfile {file}: {exc.strerror or exc}") from exc
    return parse_lockfile(data, file)


def read_lock_bytes(file: Path) -> bytes | None:
    """The lockfile's bytes, or None when there is none."""
    try:
        return file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LockfileError(f"cannot read the lockfile {file}: {exc.strerror or exc}") from exc


# --- writing ----------------------------------------------------------------------------------


def render_lockfile(lock: Lockfile) -> str:
    """The canonical text of a lockfile: sorted by name, fixed key order, stable."""
    import tomli_w  # lazily: only a sync that changes something needs it

    entries = []
    for a in sorted(lock.artifacts, key=lambda a: a.name):
        entry: dict[str, Any] = {
            "name": a.name,
            "url": a.url,
            "size": a.size,
            "sha256": a.sha256,
            "xxh3_128": a.xxh3_128,
        }
        if a.executable:
            entry["executable"] = True
        if a.path is not None:
            entry["path"] = a.path
        entries.append(entry)
    return _HEADER + tomli_w.dumps({"version": LOCK_VERSION, "artifact": entries})


def write_lockfile(path: StrPath, lock: Lockfile) -> bool:
    """Writes `lock` to `path` atomically and durably, unless it already holds those bytes.

    The text goes to a new temporary file beside `path`, which is fsynced and renamed
    over `path`; then the directory is fsynced. The file keeps the mode of the one it
    replaces (a new one: 0644 under the umask), made 0600 when a URL in it holds a
    password. The temporary's name fits the filesystem whatever `path`'s name is. The
    writer holds a flock on its temporary file, so that temporary files left by a
    killed writer (and only those) are removed here and by `sync`.

    Args:
        path: the lockfile.
        lock: what to write (rendered by `render_lockfile`).

    Returns:
        True when the file was written, False when it was already identical.

    Raises:
        StorageError: writing, syncing or renaming failed, and `path` is unchanged; or
            (the message says so) the new lockfile is in place but syncing its directory
            failed, so that its durability is unknown.
    """
    file = Path(os.fspath(path))
    data = render_lockfile(lock).encode("utf-8")
    with contextlib.suppress(OSError):
        if file.read_bytes() == data:
            return False
    directory = file.parent
    remove_stale_temporaries(file)
    mode = _lockfile_mode(file, lock)
    try:
        fd, temp = _new_temporary(file, mode)
    except OSError as exc:
        raise storage_error(exc, f"cannot write the lockfile {file}") from exc
    try:
        if mode != 0o644:
            os.fchmod(fd, mode)  # exactly the old mode, not the umask's idea of it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.replace(temp, file)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        os.close(fd)
        if isinstance(exc, OSError):
            raise storage_error(exc, f"cannot write the lockfile {file}") from exc
        raise
    with contextlib.suppress(OSError):
        os.close(fd)  # its data is already synced
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise not_durable(exc, f"the lockfile {file} was written", directory) from exc
    return True


def _lockfile_mode(file: Path, lock: Lockfile) -> int:
    """The mode of the lockfile that replaces `file`: its old one (0644 for a new one),
    without group and other access when a URL holds a password."""
    try:
        mode = stat.S_IMODE(os.stat(file).st_mode)
    except OSError:
        mode = 0o644
    if any(redact_url(a.url) != a.url for a in lock.artifacts):
        mode &= 0o700
    return mode


_TEMPORARY_SUFFIX = ".{}.tmp"


def _temporary_name(file: Path, token: str) -> str:
    """``.<name>.<token>.tmp``, the name cut (with a hash) to fit the filesystem."""
    return fit_name(f".{file.name}", _TEMPORARY_SUFFIX.format(token))


def _temporary_pattern(file: Path) -> re.Pattern[str]:
    stem = _temporary_name(file, "0" * 12).removesuffix(_TEMPORARY_SUFFIX.format("0" * 12))
    return re.compile(re.escape(stem) + r"\.[0-9a-f]{12}\.tmp")


def _new_temporary(file: Path, mode: int = 0o644) -> tuple[int, Path]:
    """Creates a temporary beside `file` (see `_temporary_name`) and holds a flock on it."""
    import fcntl

    while True:
        temp = file.parent / _temporary_name(file, os.urandom(6).hex())
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            now = os.stat(temp, follow_symlinks=False)
        except (BlockingIOError, FileNotFoundError):
            # A cleaner took it for a stale one between our open and our flock.
            os.close(fd)
            continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            os.close(fd)
            raise
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd, temp
        os.close(fd)


def remove_stale_temporaries(file: Path) -> int:
    """Removes the temporary lockfiles a killed writer left beside `file`; a live writer
    holds a flock on its own. Returns how many were removed."""
    import fcntl

    pattern = _temporary_pattern(file)
    removed = 0
    try:
        entries = list(os.scandir(file.parent))
    except OSError:
        return 0
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            now = os.stat(entry.path, follow_symlinks=False)
            if stat.S_ISREG(held.st_mode) and (now.st_dev, now.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass  # held by a live writer, or already gone
        finally:
            os.close(fd)
    return removed
