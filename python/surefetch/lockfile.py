"""Manifest → pinned lockfile, and `sync` as a transaction; `verify` checks a destination.

Formats (DESIGN.md "On disk"). The manifest ``surefetch.toml`` holds ``[[artifact]]``
tables with ``name``, ``url`` (http or https) and optional ``sha256``, ``size``, ``path``
and ``executable``. The lockfile ``surefetch.lock`` is written by `sync` only, in one
canonical form: a comment line, ``version = 1``, then one ``[[artifact]]`` per entry sorted
by name, keys in the order ``name, url, size, sha256, xxh3_128, executable, path``
(``executable`` only when true, ``path`` only when the manifest set one). Unknown keys are
errors in both files, so that a typo (``sha265``) never silently weakens a pin. Digests are
lowercase hex (upper case is accepted on reading). A ``path`` is relative, ``/``-separated,
normalised (``a//./b`` → ``a/b``), has no ``..`` component and does not start with
``.surefetch``; an artifact without one is installed at ``<dest>/<name>`` (so the name is
checked the same way). No two artifacts may share a destination, nor may one lie under
another. At sync time, the real path of every target's parent must stay inside the real
path of the destination (a symlink leading out is refused), and a target must not be a
directory. Any of these → `ManifestError` (or `LockfileError` for the lockfile), naming the
file and the artifact; the CLI exits 2.

Resolution. A manifest artifact whose lock entry has the same URL, and whose own
``sha256``/``size`` (if given) agree with that entry, stays pinned: its entry is kept as it
is (only ``executable``/``path`` follow the manifest). A pinned artifact already present at
its target as a regular file with the pinned size, SHA-256 and XXH3-128 (and an executable
bit when asked) needs no fetch at all: that is the warm path. Otherwise it is fetched through
the cache with the pinned digest and size; a mismatch raises `ChecksumMismatch` (or
`SizeMismatch`) naming the artifact, expected and actual values, and "--upgrade". New
artifacts, changed URLs or manifest digests, and everything under ``upgrade=True`` are
re-resolved: fetched with the manifest's digest and size when given, else unpinned. Lock
entries of artifacts no longer in the manifest are dropped; their installed files are left
where they are (sync never deletes a file: the lockfile does not prove that a user did not
change or reuse it).

Transaction. Under an exclusive flock on ``<dest>/.surefetch/sync.lock`` (a second sync
into the same destination waits for the first), stale staging directories left by a killed
sync are removed first. Installed files are checked against their pins on ``jobs`` threads;
every artifact that needs work is fetched through the cache in one batch
(`Cache.fetch_many`: ``jobs`` downloads at a time on the engine's runtime, each bounded by
``timeout_per_item``, made durable in groups before entering the cache), under one shared
`CancelToken`; the first failure cancels the token, the others stop within milliseconds,
and that first error is raised. Each blob is placed in ``<dest>/.surefetch/sync-<random>/``
(mode 0644, or 0755 when executable, under the umask) by ``link_mode`` — a reflink where
the filesystem can, else a kernel copy — and its size and XXH3-128 checked again; then one
``syncfs`` makes all of them durable. Only after every artifact succeeded are the staged
files renamed into place (parents created, directories fsynced),
then the lockfile is written (temporary file in its directory, fsync, rename, fsync of the
directory; skipped when the bytes would be identical), then the staging directory goes.
On any failure, Ctrl+C or SIGTERM the staging directory is removed and neither the
destination nor the lockfile has changed. After a SIGKILL the next sync removes the staging
directory and the temporary lockfile (``.<lock name>.<hex>.tmp``, flocked while in use) it
left. The install step is a series of atomic renames, so even an interruption there leaves
only whole, verified files, and the lockfile is then still the old one; the next sync finds
those files by their digests. When only an fsync of a directory fails after its renames,
the files (or the lockfile) are in place: the lockfile is still written to match them, and
the `StorageError` says that they were installed but that their durability is unknown.

``locked=True`` fails with `LockfileOutdated` (exit 1) before any network access when the
lockfile would change (a new, changed or removed artifact, or a lockfile that is missing or
not in canonical form). ``frozen=True`` reads only the lockfile (missing → `LockfileOutdated`),
installs exactly its entries, verified by their digests, and never writes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Union

from surefetch._fs import LINK_MODES, LinkMode, fsync_dir, place, try_flock
from surefetch.download import CancelToken, fit_name, hash_file, part_dir, sync_filesystem
from surefetch.errors import (
    Cancelled,
    ChecksumMismatch,
    DownloadTimeout,
    LockfileError,
    LockfileOutdated,
    LockTimeout,
    ManifestError,
    SizeMismatch,
    StorageError,
    SurefetchError,
    redact_url,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

if TYPE_CHECKING:
    from surefetch.cache import Cache, CacheEntry

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

StrPath = Union[str, "os.PathLike[str]"]
SyncProgress = Callable[[int, int], Any]
"""Called on the calling thread with (artifacts done, artifacts in total)."""

LOCK_VERSION = 1
STATE_DIR = ".surefetch"
_HEADER = "# Written by `surefetch sync`; do not edit by hand.\n"
_HEX = re.compile(r"[0-9a-fA-F]+")
_MANIFEST_KEYS = frozenset({"name", "url", "sha256", "size", "path", "executable"})
_LOCK_KEYS = frozenset({"name", "url", "size", "sha256", "xxh3_128", "executable", "path"})
_DEST_LOCK_WAIT_S = 300.0
_POLL_S = 0.05


# --- the data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestArtifact:
    """One ``[[artifact]]`` of the manifest, validated and normalised."""

    name: str
    url: str
    sha256: str | None = None
    size: int | None = None
    path: str | None = None
    executable: bool = False

    @property
    def target(self) -> str:
        """Where it goes, relative to the destination: `path`, else `name`."""
        return self.path if self.path is not None else self.name


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: its artifacts in file order."""

    path: Path
    artifacts: tuple[ManifestArtifact, ...]


@dataclass(frozen=True)
class LockedArtifact:
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


@dataclass(frozen=True)
class Lockfile:
    """A validated lockfile: its artifacts sorted by name."""

    artifacts: tuple[LockedArtifact, ...]

    def by_name(self) -> dict[str, LockedArtifact]:
        return {a.name: a for a in self.artifacts}


@dataclass(frozen=True)
class SyncResult:
    """What a `sync` did. Names are sorted."""

    installed: tuple[str, ...]
    """Artifacts moved into place by this sync."""
    unchanged: tuple[str, ...]
    """Artifacts that were already at their target, verified."""
    removed: tuple[str, ...]
    """Lock entries dropped because their artifact left the manifest (files are kept)."""
    lockfile_changed: bool
    bytes_transferred: int
    elapsed: float

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form: lists of names, counts, ``elapsed_s``."""
        return {
            "installed": list(self.installed),
            "unchanged": list(self.unchanged),
            "removed": list(self.removed),
            "lockfile_changed": self.lockfile_changed,
            "bytes_transferred": self.bytes_transferred,
            "elapsed_s": round(self.elapsed, 6),
        }


@dataclass(frozen=True)
class Difference:
    """One way an installed file differs from its lock entry.

    `kind` is ``missing``, ``not a file``, ``size``, ``sha256``, ``xxh3_128`` or
    ``not executable``; `integrity` is true for the last three but one (a file whose bytes
    are not the pinned ones).
    """

    name: str
    path: Path
    kind: str
    expected: str | None = None
    actual: str | None = None

    @property
    def integrity(self) -> bool:
        return self.kind in ("size", "sha256", "xxh3_128")

    def __str__(self) -> str:
        text = f"{self.name}: {self.path}: {self.kind}"
        if self.expected is not None:
            text += f" (expected {self.expected}, found {self.actual})"
        return text


# --- reading and validating -------------------------------------------------------------------


class _Checker:
    """Turns one TOML table into checked values, raising `error` that names file and entry."""

    def __init__(self, error: type[SurefetchError], file: Path, table: object, index: int) -> None:
        self.error = error
        self.file = file
        self.where = f"artifact #{index + 1}"
        if not isinstance(table, dict):
            self.fail("must be a table ([[artifact]])")
        self.table: dict[str, Any] = table
        name = table.get("name")
        if isinstance(name, str) and name:
            self.where = f"artifact {name!r}"
        unknown = sorted(set(table) - self.allowed())
        if unknown:
            self.fail(f"unknown key {unknown[0]!r}")

    def allowed(self) -> frozenset[str]:
        return _MANIFEST_KEYS if self.error is ManifestError else _LOCK_KEYS

    def fail(self, problem: str) -> NoReturn:
        raise self.error(f"{self.file}: {self.where}: {problem}")

    def text(self, key: str, required: bool = True) -> str | None:
        value = self.table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            self.fail(f"{key!r} must be a non-empty string")
        if any(ord(c) < 32 for c in value):
            self.fail(f"{key!r} must not contain control characters")
        return value

    def url(self) -> str:
        url = self.text("url")
        assert url is not None
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            self.fail(f"url {redact_url(url)!r} must be an http or https URL")
        return url

    def digest(self, key: str, digits: int, required: bool) -> str | None:
        value = self.table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) != digits:
            self.fail(f"{key!r} must be {digits} hex digits")
        return value.lower()

    def size(self, required: bool) -> int | None:
        value = self.table.get("size")
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail("'size' must be a whole number of bytes, 0 or more")
        return value

    def flag(self, key: str) -> bool:
        value = self.table.get(key, False)
        if not isinstance(value, bool):
            self.fail(f"{key!r} must be true or false")
        return value

    def relative(self, key: str, value: str) -> str:
        problem = _path_problem(value)
        if problem:
            self.fail(f"{key} {value!r} {problem}")
        return "/".join(p for p in value.split("/") if p not in ("", "."))


def _path_problem(value: str) -> str | None:
    """Why `value` is not a safe relative path inside the destination (None if it is)."""
    if value.startswith("/"):
        return "is absolute; use a path relative to the destination"
    if "\\" in value:
        return "contains a backslash; separate directories with /"
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if not parts:
        return "names no file"
    if ".." in parts:
        return "contains '..'; it must stay inside the destination"
    if parts[0] == STATE_DIR:
        return f"is inside {STATE_DIR}/, which surefetch reserves"
    return None


def _load_toml(path: Path, error: type[SurefetchError], what: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    return _parse_toml(data, path, error, what)


def _parse_toml(data: bytes, path: Path, error: type[SurefetchError], what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{path}: invalid TOML in the {what}: {exc}") from exc


def _artifact_tables(
    doc: dict[str, Any], path: Path, error: type[SurefetchError], allowed: set[str]
) -> list[Any]:
    unknown = sorted(set(doc) - allowed - {"artifact"})
    if unknown:
        raise error(f"{path}: unknown top-level key {unknown[0]!r}")
    tables = doc.get("artifact", [])
    if not isinstance(tables, list):
        raise error(f"{path}: 'artifact' must be an array of tables ([[artifact]])")
    return tables


def _check_targets(
    file: Path, error: type[SurefetchError], entries: Sequence[ManifestArtifact | LockedArtifact]
) -> None:
    names: set[str] = set()
    targets: dict[str, str] = {}
    for entry in entries:
        if entry.name in names:
            raise error(f"{file}: artifact {entry.name!r} appears twice; names must be unique")
        names.add(entry.name)
        if entry.path is None:
            problem = _path_problem(entry.name)
            if problem:
                raise error(
                    f"{file}: artifact {entry.name!r}: with no 'path', the name is the file "
                    f"name, and it {problem}; set 'path'"
                )
        target = entry.target
        if target in targets:
            raise error(
                f"{file}: artifacts {targets[target]!r} and {entry.name!r} are both installed "
                f"at {target!r}"
            )
        targets[target] = entry.name
    for target, name in targets.items():
        parts = target.split("/")
        for i in range(1, len(parts)):
            above = "/".join(parts[:i])
            if above in targets:
                raise error(
                    f"{file}: artifact {name!r} at {target!r} lies under the file of "
                    f"artifact {targets[above]!r} ({above!r})"
                )


def read_manifest(path: StrPath = "surefetch.toml") -> Manifest:
    """Reads and validates a manifest.

    Args:
        path: the manifest file.

    Returns:
        The `Manifest`, artifacts in file order.

    Raises:
        ManifestError: missing, unreadable, not TOML, or an entry is invalid or unsafe
            (the message names the file and the artifact).
    """
    file = Path(os.fspath(path))
    try:
        doc = _load_toml(file, ManifestError, "manifest")
    except FileNotFoundError:
        raise ManifestError(
            f"no manifest at {file}: create it with [[artifact]] entries, or pass --manifest"
        ) from None
    artifacts = []
    for i, table in enumerate(_artifact_tables(doc, file, ManifestError, set())):
        c = _Checker(ManifestError, file, table, i)
        name = c.text("name")
        raw_path = c.text("path", required=False)
        assert name is not None
        artifacts.append(
            ManifestArtifact(
                name=name,
                url=c.url(),
                sha256=c.digest("sha256", 64, required=False),
                size=c.size(required=False),
                path=None if raw_path is None else c.relative("path", raw_path),
                executable=c.flag("executable"),
            )
        )
    _check_targets(file, ManifestError, artifacts)
    return Manifest(path=file, artifacts=tuple(artifacts))


def _parse_lockfile(data: bytes, file: Path) -> Lockfile:
    doc = _parse_toml(data, file, LockfileError, "lockfile")
    version = doc.get("version")
    if version != LOCK_VERSION or isinstance(version, bool):
        raise LockfileError(
            f"{file}: unsupported lockfile version {version!r} (this surefetch writes "
            f"version {LOCK_VERSION}); upgrade surefetch, or delete the lockfile and sync again"
        )
    artifacts = []
    for i, table in enumerate(_artifact_tables(doc, file, LockfileError, {"version"})):
        c = _Checker(LockfileError, file, table, i)
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
    _check_targets(file, LockfileError, artifacts)
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
    return _parse_lockfile(data, file)


def _read_lock_bytes(file: Path) -> bytes | None:
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
    _remove_stale_temporaries(file)
    mode = _lockfile_mode(file, lock)
    try:
        fd, temp = _new_temporary(file, mode)
    except OSError as exc:
        raise _storage_error(exc, f"cannot write the lockfile {file}") from exc
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
            raise _storage_error(exc, f"cannot write the lockfile {file}") from exc
        raise
    with contextlib.suppress(OSError):
        os.close(fd)  # its data is already synced
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise _not_durable(exc, f"the lockfile {file} was written", directory) from exc
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
        temp = file.parent / _temporary_name(file, secrets.token_hex(6))
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


def _remove_stale_temporaries(file: Path) -> int:
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


def _storage_error(exc: OSError, what: str) -> StorageError:
    return StorageError(exc.errno or errno.EIO, f"{what}: {_reason(exc)}; {_hint(exc)}")


def _not_durable(exc: OSError, done: str, directory: Path, *, many: bool = False) -> StorageError:
    """The error for a directory fsync that failed after the renames it should make
    durable: what they did is in place, only its durability is unknown."""
    its, it = ("their", "them") if many else ("its", "it")
    return StorageError(
        exc.errno or errno.EIO,
        f"{done}, but {its} durability is unknown: syncing the directory {directory} failed: "
        f"{_reason(exc)}; a crash or power loss could still undo {it}: {_hint(exc)}",
    )


# --- the destination --------------------------------------------------------------------------


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _safe_target(
    root: str, target: str, file: Path, name: str, error: type[SurefetchError]
) -> Path:
    """The absolute target path, refusing symlinks that lead out of `root` and directories."""
    full = Path(root, target)
    parent = os.path.realpath(full.parent)
    if not _inside(root, parent):
        raise error(
            f"{file}: artifact {name!r}: {target!r} leads outside the destination {root} "
            f"(through a symlink, to {parent}); remove the symlink or change 'path'"
        )
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(full).st_mode):
            raise error(
                f"{file}: artifact {name!r}: {full} is a directory; move it away or change 'path'"
            )
    return full


def _installed_matches(
    target: Path, expected: LockedArtifact, executable: bool, cancel: CancelToken | None
) -> bool:
    """True when `target` is a regular file with exactly the pinned bytes (and mode)."""
    try:
        st = os.lstat(target)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != expected.size:
        return False
    if executable and not st.st_mode & stat.S_IXUSR:
        return False
    try:
        size, xxh3, sha256 = hash_file(target, sha256=True, cancel=cancel)
    except OSError:
        return False
    return (size, xxh3, sha256) == (expected.size, expected.xxh3_128, expected.sha256)


@contextlib.contextmanager
def _dest_lock(state: Path, cancel: CancelToken) -> Iterator[None]:
    """Holds an exclusive flock on ``<state>/sync.lock``; removes the file when done."""
    path = state / "sync.lock"
    deadline = time.monotonic() + _DEST_LOCK_WAIT_S
    while True:
        try:
            fd = try_flock(path, 0o600)
        except FileNotFoundError:  # a finishing sync removed the empty state dir: recreate
            part_dir(state.parent)
            continue
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise StorageError(
                errno.ELOOP,
                f"{path} is a symbolic link, which surefetch never follows among its own "
                "files: remove it",
                str(path),
            ) from exc
        if fd is not None:
            break
        if cancel.cancelled:
            raise Cancelled("sync cancelled while waiting for another sync")
        if time.monotonic() > deadline:
            raise LockTimeout(
                f"another surefetch sync has been installing into {state.parent} for "
                f"{_DEST_LOCK_WAIT_S:.0f} s; wait for it to finish, or stop it"
            )
        time.sleep(_POLL_S)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _remove_stale_staging(state: Path) -> None:
    """Staging dirs left by a killed sync (we hold the destination's lock: none is live)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(state):
            if entry.name.startswith("sync-") and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One artifact to bring into the destination."""

    index: int
    name: str
    url: str
    target: str
    executable: bool
    path: str | None
    pin: LockedArtifact | None  # the bytes it must be; None: resolve
    sha256: str | None  # the manifest's expectations when resolving
    size: int | None

    def entry(self, sha256: str, xxh3_128: str, size: int) -> LockedArtifact:
        return LockedArtifact(
            self.name, self.url, size, sha256, xxh3_128, self.executable, self.path
        )


def _is_kept(art: ManifestArtifact, old: LockedArtifact | None) -> bool:
    return (
        old is not None
        and old.url == art.url
        and art.sha256 in (None, old.sha256)
        and art.size in (None, old.size)
    )


def _plan(
    manifest: Manifest, old: Lockfile | None, upgrade: bool
) -> tuple[list[_Item], tuple[str, ...]]:
    pins = old.by_name() if old is not None else {}
    items = []
    for i, art in enumerate(manifest.artifacts):
        previous = pins.get(art.name)
        pin = previous if not upgrade and _is_kept(art, previous) else None
        if pin is not None:
            pin = replace(pin, executable=art.executable, path=art.path)
        items.append(
            _Item(
                i,
                art.name,
                art.url,
                art.target,
                art.executable,
                art.path,
                pin,
                art.sha256,
                art.size,
            )
        )
    names = {a.name for a in manifest.artifacts}
    removed = tuple(sorted(n for n in pins if n not in names))
    return items, removed


def _frozen_plan(lock: Lockfile) -> list[_Item]:
    return [
        _Item(i, a.name, a.url, a.target, a.executable, a.path, a, None, None)
        for i, a in enumerate(lock.artifacts)
    ]


def _check_locked(
    items: list[_Item], removed: tuple[str, ...], old_bytes: bytes | None, lock_path: Path
) -> None:
    """Raises LockfileOutdated when syncing would change the lockfile (no network needed)."""
    if old_bytes is None:
        raise LockfileOutdated(
            f"there is no lockfile at {lock_path}, but --locked forbids creating it: run "
            "`surefetch sync` without --locked, then commit the lockfile"
        )
    changed = sorted(item.name for item in items if item.pin is None)
    if not changed and not removed:
        pinned = Lockfile(tuple(item.pin for item in items if item.pin is not None))
        if render_lockfile(pinned).encode("utf-8") == old_bytes:
            return
    what = ", ".join(
        [*(f"{n} (new or changed)" for n in changed), *(f"{n} (removed)" for n in removed)]
    )
    raise LockfileOutdated(
        f"{lock_path} needs to be updated ({what or 'not in canonical form or paths changed'}), "
        "but --locked forbids it: run `surefetch sync` without --locked, then commit the lockfile"
    )


# --- fetching and staging ---------------------------------------------------------------------


class _LazyCache:
    """Builds the `Cache` on first use, so that a warm sync never imports or touches it."""

    def __init__(self, cache: Cache | StrPath | None) -> None:
        self._given = cache
        self._cache: Cache | None = None
        self._lock = threading.Lock()

    def get(self) -> Cache:
        with self._lock:
            if self._cache is None:
                from surefetch.cache import Cache

                given = self._given
                self._cache = given if isinstance(given, Cache) else Cache(given)
            return self._cache


@dataclass(frozen=True)
class _Outcome:
    item: _Item
    entry: LockedArtifact
    staged: Path | None  # None: the target already holds these bytes
    bytes_transferred: int


class _Resolver:
    """Brings every item to a staged file (or finds it installed): checks installed
    files, fetches the rest through the cache in one batch (`Cache.fetch_many`), places
    each blob in the staging directory (reflink or kernel copy, no fsync), and makes the
    staging directory durable with one `syncfs`. The first failure cancels the rest."""

    def __init__(
        self,
        root: str,
        staging: Path,
        cache: _LazyCache,
        token: CancelToken,
        timeout: float | None,
        lock_path: Path,
        link_mode: LinkMode,
        artifact_progress: Callable[[str, int, int | None], Any] | None = None,
    ) -> None:
        self.root = root
        self.staging = staging
        self.cache = cache
        self.token = token
        self.timeout = timeout
        self.lock_path = lock_path
        self.link_mode = link_mode
        self.artifact_progress = artifact_progress

    def run(self, items: list[_Item], jobs: int, progress: SyncProgress | None) -> list[_Outcome]:
        total, done = len(items), 0

        def advance() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        outcomes: list[_Outcome] = []
        to_fetch: list[_Item] = []
        for item, installed in zip(items, self._installed(items, jobs)):
            if installed and item.pin is not None:
                outcomes.append(_Outcome(item, item.pin, None, 0))
                advance()
            else:
                to_fetch.append(item)
        if self.token.cancelled:
            raise Cancelled("the sync was cancelled")
        if not to_fetch:
            return outcomes
        first: list[SurefetchError] = []

        def fetched(index: int, result: CacheEntry | Exception) -> None:
            if isinstance(result, Exception) and not first:
                first.append(self._failure(to_fetch[index], result))
                self.token.cancel()

        from surefetch.cache import FetchRequest

        requests = [
            FetchRequest(
                item.url,
                item.pin.sha256 if item.pin is not None else item.sha256,
                item.pin.size if item.pin is not None else item.size,
            )
            for item in to_fetch
        ]
        on_bytes = self.artifact_progress
        per_item = None
        if on_bytes is not None:

            def per_item(index: int, done: int, total: int | None) -> None:
                on_bytes(to_fetch[index].name, done, total)

        found = self.cache.get().fetch_many(
            requests,
            jobs=jobs,
            timeout=self.timeout,
            cancel=self.token,
            on_result=fetched,
            item_progress=per_item,
        )
        if first:
            raise first[0]
        staged_any = False
        for item, entry in zip(to_fetch, found):
            if isinstance(entry, Exception):  # only after a cancel
                raise self._failure(item, entry)
            outcome = self._stage(item, entry)
            staged_any = staged_any or outcome.staged is not None
            outcomes.append(outcome)
            advance()
        if staged_any:
            try:
                sync_filesystem(self.staging)
            except OSError as exc:
                raise _storage_error(
                    exc, f"cannot sync the staged files in {self.staging}"
                ) from exc
        return outcomes

    def _installed(self, items: list[_Item], jobs: int) -> list[bool]:
        """Whether each pinned item's target already holds its bytes (hashed in parallel)."""
        pinned = [item for item in items if item.pin is not None]
        if not pinned:
            return [False] * len(items)
        from concurrent.futures import ThreadPoolExecutor

        def check(item: _Item) -> bool:
            assert item.pin is not None
            target = Path(self.root, item.target)
            return _installed_matches(target, item.pin, item.executable, self.token)

        with ThreadPoolExecutor(max_workers=min(jobs, len(pinned))) as pool:
            found = dict(zip((i.index for i in pinned), pool.map(check, pinned)))
        return [found.get(item.index, False) for item in items]

    def _stage(self, item: _Item, found: CacheEntry) -> _Outcome:
        entry = item.entry(found.sha256, found.xxh3_128, found.size)
        if item.pin is not None and found.xxh3_128 != item.pin.xxh3_128:
            raise ChecksumMismatch(
                f"{item.name}: xxh3_128 of the download differs from {self.lock_path}: expected "
                f"{item.pin.xxh3_128}, got {found.xxh3_128}; the lockfile is inconsistent: run "
                "`surefetch sync --upgrade` to re-resolve it",
                "xxh3_128",
                item.pin.xxh3_128,
                found.xxh3_128,
            )
        target = Path(self.root, item.target)
        if item.pin is None and _installed_matches(target, entry, item.executable, self.token):
            return _Outcome(item, entry, None, found.bytes_transferred)
        staged = self.staging / str(item.index)
        link_mode = self.link_mode
        if link_mode == "hardlink" and item.executable:
            link_mode = "auto"  # a hardlink shares the blob's mode; an executable needs its own
        _stage(found.path, staged, entry, item.executable, link_mode)
        return _Outcome(item, entry, staged, found.bytes_transferred)

    def _failure(self, item: _Item, exc: Exception) -> SurefetchError:
        if isinstance(exc, DownloadTimeout) and exc.kind == "overall" and self.timeout:
            return DownloadTimeout(
                f"{item.name}: did not finish within --timeout-per-item {self.timeout:g} s "
                "(its part file is kept for the next sync); raise the limit or check the server",
                "overall",
            )
        if isinstance(exc, (ChecksumMismatch, SizeMismatch)):
            return self._integrity_error(item, exc)
        if isinstance(exc, SurefetchError):
            return _named(exc, item.name)
        if isinstance(exc, ValueError):
            return ManifestError(f"{item.name}: {exc}")
        return SurefetchError(f"{item.name}: {exc}")

    def _integrity_error(self, item: _Item, exc: ChecksumMismatch | SizeMismatch) -> SurefetchError:
        if isinstance(exc, ChecksumMismatch):
            what, expected, actual = exc.algorithm or "sha256", exc.expected, exc.actual
        else:
            what, expected, actual = "size", str(exc.expected), str(exc.actual)
        if item.pin is not None:
            source = f"pinned in {self.lock_path}"
            hint = "if the change is intended, run `surefetch sync --upgrade`"
        else:
            source = "given in the manifest"
            hint = "check the URL, or fix the manifest's digest or size"
        message = (
            f"{item.name}: {what} mismatch: {source} {expected}, downloaded {actual} from "
            f"{redact_url(item.url)}; {hint}"
        )
        if isinstance(exc, ChecksumMismatch):
            return ChecksumMismatch(message, what, expected, actual)
        return SizeMismatch(message, exc.expected, exc.actual)


def _named(exc: SurefetchError, name: str) -> SurefetchError:
    """`exc` with the artifact's name in front of its message (errno-style OSErrors, with
    two arguments, keep theirs)."""
    args = exc.args
    if len(args) == 1 and isinstance(args[0], str) and not args[0].startswith(f"{name}: "):
        exc.args = (f"{name}: {args[0]}",)
    return exc


def _stage(
    blob: Path, staged: Path, entry: LockedArtifact, executable: bool, link_mode: LinkMode
) -> None:
    """Places the cache blob in the staging dir (reflink, kernel copy or, when asked,
    hardlink; made durable later with the whole group) and checks what landed there."""
    mode = 0o755 if executable else 0o644
    try:
        how = place(blob, staged, mode, link_mode)
    except OSError as exc:
        raise _storage_error(exc, f"{entry.name}: cannot stage {staged} ({link_mode})") from exc
    if how == "hardlink":
        return  # the same inode as the verified blob
    size, xxh3, _ = hash_file(staged, sha256=False)
    if (size, xxh3) != (entry.size, entry.xxh3_128):
        raise ChecksumMismatch(
            f"{entry.name}: the cached copy changed while it was copied (xxh3_128 "
            f"{xxh3}, expected {entry.xxh3_128}); run `surefetch cache verify`, then sync again",
            "xxh3_128",
            entry.xxh3_128,
            xxh3,
        )


# --- installing -------------------------------------------------------------------------------


def _install(
    root: str, outcomes: Sequence[_Outcome], file: Path, error: type[SurefetchError]
) -> StorageError | None:
    """Renames every staged file into place, then fsyncs the directories that changed.

    Returns the error of a directory fsync that failed (the files are in place then, but
    their durability is unknown), for the caller to raise once the lockfile matches them.
    """
    touched: set[Path] = set()
    staged = [o for o in outcomes if o.staged is not None]
    for installed, outcome in enumerate(staged):
        item = outcome.item
        target = Path(root, item.target)
        assert outcome.staged is not None
        try:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            _safe_target(root, item.target, file, item.name, error)  # again, now it exists
            os.replace(outcome.staged, target)
        except OSError as exc:
            what = f"{item.name}: cannot install {target}"
            if installed:
                what += (
                    f" ({installed} of {len(staged)} artifacts were already installed, whole and "
                    "verified; the lockfile is unchanged)"
                )
            raise _storage_error(exc, what) from exc
        directory = target.parent
        while _inside(root, str(directory)) and directory not in touched:
            touched.add(directory)
            directory = directory.parent
    for directory in sorted(touched, key=lambda p: -len(p.parts)):
        try:
            fsync_dir(directory)
        except OSError as exc:
            many = len(staged) != 1
            done = f"{len(staged)} artifact{'s' if many else ''} installed in {root}"
            return _not_durable(exc, done, directory, many=many)
    return None


# --- sync -------------------------------------------------------------------------------------


def _check_arguments(
    jobs: int, timeout_per_item: float | None, locked: bool, frozen: bool, upgrade: bool
) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be 1 or more, not {jobs!r}")
    if timeout_per_item is not None and not timeout_per_item > 0:
        raise ValueError(
            f"timeout_per_item must be a positive number of seconds, not {timeout_per_item}"
        )
    if upgrade and (locked or frozen):
        flag = "--locked" if locked else "--frozen"
        raise ValueError(f"--upgrade changes the lockfile, which {flag} forbids; pass only one")


def sync(
    manifest: StrPath = "surefetch.toml",
    lock: StrPath = "surefetch.lock",
    dest: StrPath = ".",
    jobs: int = 4,
    timeout_per_item: float | None = None,
    locked: bool = False,
    frozen: bool = False,
    upgrade: bool = False,
    cache: Cache | StrPath | None = None,
    cancel: CancelToken | None = None,
    progress: SyncProgress | None = None,
    link_mode: LinkMode = "auto",
    artifact_progress: Callable[[str, int, int | None], Any] | None = None,
) -> SyncResult:
    """Brings `dest` to exactly what the manifest (through the lockfile) pins: all or nothing.

    See the module documentation for resolution, merging and the transaction.

    Args:
        manifest: the manifest (not read with `frozen`).
        lock: the lockfile; created or updated only when every artifact succeeded.
        dest: the destination directory (created when missing).
        jobs: artifacts fetched in parallel.
        timeout_per_item: seconds allowed to download each artifact (None: no limit).
        locked: fail if the lockfile would change.
        frozen: install exactly the lockfile's entries; ignore the manifest.
        upgrade: re-resolve every artifact instead of keeping the pins.
        cache: a `Cache`, or the root directory of one (None: ``$SUREFETCH_CACHE`` or XDG).
        cancel: a token whose cancellation stops the sync within milliseconds.
        progress: called with (artifacts done, total) on the calling thread.
        link_mode: how a cached blob enters the destination: ``auto`` (a reflink where
            the filesystem can, else a kernel copy), ``reflink``, ``copy`` or
            ``hardlink`` (see `surefetch._fs`: an installed hardlink *is* the cache's
            blob).
        artifact_progress: called with (artifact name, bytes done, total or None) while
            artifacts download (about ten times a second, on the calling thread).

    Returns:
        A `SyncResult`.

    Raises:
        ManifestError: the manifest is missing, invalid or unsafe.
        LockfileError: the lockfile is invalid or unsafe.
        LockfileOutdated: `locked` and the lockfile would change; `frozen` and no lockfile.
        ChecksumMismatch, SizeMismatch: an artifact is not what its pin or the manifest says.
        HTTPError, NetworkError: a download failed after its retries.
        DownloadTimeout: an artifact took longer than `timeout_per_item`.
        Cancelled: `cancel` was cancelled.
        LockTimeout: another sync into `dest` (or a download of the same blob) took too long.
        StorageError: staging, installing or writing the lockfile failed.
        ValueError: an invalid argument.
        KeyboardInterrupt: Ctrl+C; nothing was changed.
    """
    started = time.monotonic()
    _check_arguments(jobs, timeout_per_item, locked, frozen, upgrade)
    if link_mode not in LINK_MODES:
        raise ValueError(f"link_mode must be one of {', '.join(LINK_MODES)}, not {link_mode!r}")
    lock_path = Path(os.fspath(lock))
    old_bytes = _read_lock_bytes(lock_path)
    old = _parse_lockfile(old_bytes, lock_path) if old_bytes is not None else None
    removed: tuple[str, ...] = ()
    error: type[SurefetchError]
    if frozen:
        if old is None:
            raise LockfileOutdated(
                f"there is no lockfile at {lock_path}, and --frozen installs only what it "
                "pins: run `surefetch sync` without --frozen to create it"
            )
        items, source, error = _frozen_plan(old), lock_path, LockfileError
    else:
        man = read_manifest(manifest)
        items, removed = _plan(man, old, upgrade)
        source, error = man.path, ManifestError
        if locked:
            _check_locked(items, removed, old_bytes, lock_path)
    root = _prepare_dest(Path(os.fspath(dest)))
    for item in items:
        _safe_target(root, item.target, source, item.name, error)
    token = cancel.child() if cancel is not None else CancelToken()
    state = Path(root, STATE_DIR)
    try:
        part_dir(root)  # a real directory of ours, as the engine's part files need
    except StorageError:
        raise
    except OSError as exc:
        raise _storage_error(exc, f"cannot create {state}") from exc
    try:
        with _dest_lock(state, token):
            _remove_stale_staging(state)
            _remove_stale_temporaries(lock_path)
            staging = state / f"sync-{secrets.token_hex(8)}"
            staging.mkdir(mode=0o700)
            try:
                resolver = _Resolver(
                    root,
                    staging,
                    _LazyCache(cache),
                    token,
                    timeout_per_item,
                    lock_path,
                    link_mode,
                    artifact_progress,
                )
                outcomes = resolver.run(items, jobs, progress)
                not_durable = _install(root, outcomes, source, error)
                changed = False
                if not frozen:
                    new = Lockfile(tuple(sorted((o.entry for o in outcomes), key=lambda a: a.name)))
                    changed = write_lockfile(lock_path, new)
                if not_durable is not None:
                    raise not_durable
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        with contextlib.suppress(OSError):
            state.rmdir()  # only when empty: part files of other downloads stay
    return SyncResult(
        installed=tuple(sorted(o.item.name for o in outcomes if o.staged is not None)),
        unchanged=tuple(sorted(o.item.name for o in outcomes if o.staged is None)),
        removed=removed,
        lockfile_changed=changed,
        bytes_transferred=sum(o.bytes_transferred for o in outcomes),
        elapsed=time.monotonic() - started,
    )


def _prepare_dest(dest: Path) -> str:
    try:
        dest.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise _storage_error(exc, f"cannot create the destination {dest}") from exc
    return os.path.realpath(dest)


# --- verify -----------------------------------------------------------------------------------


def verify(lock: StrPath = "surefetch.lock", dest: StrPath = ".") -> list[Difference]:
    """Checks every file the lockfile pins against what is installed in `dest`.

    Args:
        lock: the lockfile.
        dest: the destination directory sync installed into.

    Returns:
        Every difference found (empty when everything matches), in lockfile order; a file
        with another size is not hashed.

    Raises:
        LockfileOutdated: there is no lockfile.
        LockfileError: the lockfile is invalid or unsafe.
    """
    lock_path = Path(os.fspath(lock))
    try:
        locked = read_lockfile(lock_path)
    except FileNotFoundError:
        raise LockfileOutdated(
            f"there is no lockfile at {lock_path}: run `surefetch sync` first, or pass --lock"
        ) from None
    root = os.path.realpath(os.fspath(dest))
    found: list[Difference] = []
    for entry in locked.artifacts:
        target = _safe_target(root, entry.target, lock_path, entry.name, LockfileError)
        found.extend(_differences(entry, target))
    return found


def _differences(entry: LockedArtifact, target: Path) -> list[Difference]:
    def diff(kind: str, expected: object = None, actual: object = None) -> Difference:
        shown = (None, None) if expected is None else (str(expected), str(actual))
        return Difference(entry.name, target, kind, *shown)

    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return [diff("missing")]
    if not stat.S_ISREG(st.st_mode):
        return [diff("not a file")]
    out = []
    if st.st_size != entry.size:
        out.append(diff("size", entry.size, st.st_size))
    else:
        _, xxh3, sha256 = hash_file(target, sha256=True)
        if sha256 != entry.sha256:
            out.append(diff("sha256", entry.sha256, sha256))
        if xxh3 != entry.xxh3_128:
            out.append(diff("xxh3_128", entry.xxh3_128, xxh3))
    if entry.executable and not st.st_mode & stat.S_IXUSR:
        out.append(diff("not executable"))
    return out
