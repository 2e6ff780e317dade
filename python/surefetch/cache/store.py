"""The blob store: where the cache keeps verified blobs (their metadata is in its
catalog, `surefetch.cache.catalog`), how a blob is looked up, installed and
quarantined, and the checks of the cache's own directories and files (the layout and
the trust model are in the package's documentation)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from surefetch._fs import fsync_dir, written_only_by_us
from surefetch.cache.catalog import Catalog
from surefetch.download import SHA256_HEX, hash_file
from surefetch.errors import SizeMismatch, StorageError, SurefetchError, redact_url

__all__ = [
    "FILE_MODE",
    "SHA256",
    "BlobStore",
    "CacheEntry",
    "check_sha256",
    "check_size",
    "default_cache_root",
    "printable",
    "read_json",
    "trusted_path",
]

SHA256 = SHA256_HEX
_XXH3_128 = re.compile(r"[0-9a-f]{32}")
FILE_MODE = 0o644
_DIR_MODE = 0o755
# The directories under blobs/sha256, by the first two hex digits of their blobs' digests.
_SHARDS = frozenset(f"{i:02x}" for i in range(256))


class CacheEntry(NamedTuple):
    """A verified blob in the cache.

    Attributes:
        path: the blob inside the cache; copy it out, never modify it.
        size: its size in bytes.
        sha256: its SHA-256, lowercase hex.
        xxh3_128: its XXH3-128, lowercase hex, canonical (as ``xxhsum -H2``).
        bytes_transferred: body bytes received for this call (0 from the cache).
    """

    path: Path
    size: int
    sha256: str
    xxh3_128: str
    bytes_transferred: int


def default_cache_root() -> Path:
    """``$SUREFETCH_CACHE``, else ``$XDG_CACHE_HOME/surefetch``, else ``~/.cache/surefetch``."""
    explicit = os.environ.get("SUREFETCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec: a relative value is to be ignored
        return Path(xdg) / "surefetch"
    return Path.home() / ".cache" / "surefetch"


class BlobStore:
    """The files of the cache at `root` (absolute): blobs, metadata, and the cache's own
    directories, each checked (`_check_dir`) before it is used."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self.catalog = Catalog(root / "catalog.db")
        # Directories (by their parts below the root) that exist and were checked by
        # `directory`/`checked` within `checks_remembered`; the root is ().
        self._checked_dirs: dict[tuple[str, ...], Path] | None = None

    @property
    def root(self) -> Path:
        """The cache directory."""
        return self._root

    @contextlib.contextmanager
    def checks_remembered(self) -> Iterator[None]:
        """Within the block (a batch) each directory is checked once, not once per blob."""
        self._checked_dirs = {}
        try:
            yield
        finally:
            self._checked_dirs = None

    @contextlib.contextmanager
    def storage(self) -> Iterator[None]:
        """Turns a failure of the cache's own file operations into a `StorageError`."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc, SurefetchError) or exc.errno is None:
                raise
            raise StorageError(
                exc.errno,
                f"cannot use the cache at {self._root}: {exc.strerror} ({exc.filename}); "
                "fix its permissions or use another directory (SUREFETCH_CACHE, --cache)",
            ) from exc

    def directory(self, *parts: str) -> Path:
        """``root/parts...``, created 0755 minus the umask, level by level, each
        level checked (`_check_dir`)."""
        return self._walk(parts, create=True)

    def checked(self, *parts: str) -> Path:
        """``root/parts...``, not created; every level of it that exists is checked
        (`_check_dir`)."""
        try:
            return self._walk(parts, create=False)
        except FileNotFoundError:  # not remembered: the batch may create it
            return self._root.joinpath(*parts)

    def _walk(self, parts: tuple[str, ...], *, create: bool) -> Path:
        """``root/parts...``, each level checked (`_check_dir`) and, with `create`, made
        when missing; within a batch (`checks_remembered`) each level only once.

        Raises:
            FileNotFoundError: a level is missing (without `create`).
        """
        checked = self._checked_dirs
        if checked is not None:
            known = checked.get(parts)
            if known is not None:
                return known
        path = self._root
        if checked is None or () not in checked:
            if create and not path.is_dir():
                path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            _check_dir(path, os.stat(path), root=True)
            if checked is not None:
                checked[()] = path
        for level in range(1, len(parts) + 1):
            path = path / parts[level - 1]
            if checked is not None and parts[:level] in checked:
                continue  # a level an earlier call of the batch checked
            if create:
                with contextlib.suppress(FileExistsError):
                    path.mkdir(mode=_DIR_MODE)
            _check_dir(path, os.lstat(path))
            if checked is not None:
                checked[parts[:level]] = path
        return path

    def blob_path(self, digest: str) -> Path:
        return self.checked("blobs", "sha256", digest[:2]) / digest

    def has_legacy_index(self) -> bool:
        """Whether the cache has the URL index files of caches before the catalog
        (``urls/``): when it has none, a URL the catalog lacks is not looked for there."""
        return os.path.lexists(self._root / "urls")

    def legacy_meta_path(self, digest: str) -> Path:
        """Where caches before the catalog kept a blob's metadata (read, never written)."""
        return self.checked("meta", digest[:2]) / f"{digest}.json"

    def blobs(self) -> Iterator[tuple[Path, str]]:
        """Every file under ``blobs/`` named as a blob, with its digest, in order."""
        top = self.checked("blobs", "sha256")
        if not top.is_dir():
            return
        for sub in sorted(top.iterdir()):
            try:
                st = sub.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                _check_dir(sub, st)
                for path in sorted(sub.iterdir()):
                    if SHA256.fullmatch(path.name) and path.name[:2] == sub.name:
                        yield path, path.name

    def lookup(self, digest: str, *, touch: bool) -> CacheEntry | None:
        """The blob with this digest; an untrusted one is re-hashed (and quarantined
        when it does not match). `touch`: mark it used now (the LRU order of `gc`)."""
        path = self.blob_path(digest)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        if not written_only_by_us(st):
            return self._rehash(path, digest)
        xxh3 = self._known_xxh3(digest, st.st_size)
        if xxh3 is None:
            size, xxh3, _ = hash_file(path, sha256=False)
            self.catalog.put_blob(digest, size, xxh3)
        if touch:
            with contextlib.suppress(OSError):  # another user's blob: LRU order is best effort
                os.utime(path)
        return CacheEntry(path, st.st_size, digest, xxh3, 0)

    def _known_xxh3(self, digest: str, size: int) -> str | None:
        """The blob's XXH3-128 as its catalog record (or a cache's older metadata file)
        has it, when that record is of a blob of this `size`."""
        record = self.catalog.blob(digest)
        if record is not None and record.size == size:
            return record.xxh3_128
        legacy = self.legacy_meta_path(digest)
        info = read_json(legacy) if trusted_path(legacy) else {}
        xxh3, url = info.get("xxh3_128"), info.get("url")
        if info.get("size") != size or not isinstance(xxh3, str) or not _XXH3_128.fullmatch(xxh3):
            return None
        self.catalog.put_blob(digest, size, xxh3, redact_url(url) if isinstance(url, str) else None)
        return xxh3

    def _rehash(self, path: Path, digest: str) -> CacheEntry | None:
        """An untrusted file under blobs/: keep it only if its bytes match its name."""
        try:
            regular = stat.S_ISREG(path.lstat().st_mode)
            size, xxh3, sha = hash_file(path) if regular else (0, "", "")
        except FileNotFoundError:
            return None
        if sha != digest:
            self.quarantine(path, digest)
            return None
        return CacheEntry(path, size, digest, xxh3, 0)

    def quarantine(self, path: Path, digest: str) -> Path:
        """Moves the blob `path`, which does not match `digest`, to ``quarantine/``."""
        try:
            target = self.directory("quarantine") / f"{digest}.{time.time_ns()}"
            os.rename(path, target)
        except OSError as exc:
            raise StorageError(
                exc.errno,
                f"{path} does not match its digest and cannot be moved to quarantine "
                f"({exc.strerror}); remove it as its owner or as root",
                str(path),
            ) from exc
        self.forget(digest)
        return target

    def forget(self, digest: str) -> None:
        """Drops the metadata of a blob that left the cache."""
        self.catalog.forget_blob(digest)
        with contextlib.suppress(OSError):
            self.legacy_meta_path(digest).unlink()

    def install(self, tmp: Path, digest: str, size: int, xxh3_128: str, url: str) -> Path:
        """Moves the verified download `tmp` (`size` bytes, with these digests, from `url`,
        redacted) to its blob path, over the blob if one is there (fresh verified bytes
        also mend one damaged behind the cache's back), fsyncs its directory, and records
        it in the catalog.

        Needs no lock: a blob's name is its content's digest, `tmp` is verified and
        durable, and the rename is atomic, so processes installing the same blob at once
        leave the same bytes whichever rename lands last (and a reader of the old file
        keeps reading it)."""
        directory = self.directory("blobs", "sha256", digest[:2])
        blob = directory / digest
        os.rename(tmp, blob)
        self._sync_blob_dir(blob, directory)
        self.catalog.put_blob(digest, size, xxh3_128, url)
        return blob

    def shards(self) -> Path:
        """``blobs/sha256``, every directory a blob may go in that exists checked
        (`_check_dir`), for a batch whose downloads the engine installs by digest (it
        creates the missing ones, 0755 minus the umask, as their first blobs arrive)."""
        top = self.directory("blobs", "sha256")
        checked = self._checked_dirs
        for entry in os.scandir(top):
            parts = ("blobs", "sha256", entry.name)
            if entry.name in _SHARDS and (checked is None or parts not in checked):
                path = top / entry.name
                _check_dir(path, os.lstat(path))
                if checked is not None:
                    checked[parts] = path
        return top

    def installed(self, digest: str, size: int, xxh3_128: str, url: str) -> Path:
        """Records the blob that the engine installed at its path (`shards`); see
        `install`."""
        self.catalog.put_blob(digest, size, xxh3_128, url)
        return self.blob_path(digest)

    def recheck(self, digest: str) -> CacheEntry | None:
        """The blob `digest`, hashed again whoever wrote it: None when it is absent, or
        did not match and was moved to ``quarantine/``."""
        path = self.blob_path(digest)
        return self._rehash(path, digest) if os.path.lexists(path) else None

    @staticmethod
    def _sync_blob_dir(blob: Path, directory: Path) -> None:
        try:
            fsync_dir(directory)
        except OSError as exc:
            raise StorageError(
                exc.errno,
                f"the blob {blob} is in the cache, whole and verified, but its durability is "
                f"unknown: syncing the directory {directory} failed: {exc.strerror} (os error "
                f"{exc.errno}); a crash or power loss could still lose it: check the disk",
            ) from exc

    def record(self, digest: str, size: int, xxh3_128: str) -> None:
        """Records a blob's size and XXH3-128 (computed by the caller) in the catalog."""
        self.catalog.put_blob(digest, size, xxh3_128)


# -- small helpers -------------------------------------------------------------


def check_sha256(sha256: str) -> str:
    """`sha256` as the cache names blobs (lowercase hex).

    Raises:
        ValueError: it is not 64 hex digits.
    """
    digest = sha256.strip().lower()
    if not SHA256.fullmatch(digest):
        raise ValueError(f"invalid sha256 {sha256!r}: expected 64 hex digits")
    return digest


def check_size(entry: CacheEntry, size: int | None) -> None:
    """Raises `SizeMismatch` when a cached blob is not of the `size` expected."""
    if size is not None and entry.size != size:
        raise SizeMismatch(
            f"size mismatch: the cached blob with sha256 {entry.sha256} is {entry.size} bytes, "
            f"not {size}; check the expected size",
            expected=size,
            actual=entry.size,
        )


def trusted_path(path: Path) -> bool:
    """Whether the file at `path` is one nobody but us (or root) can have written."""
    try:
        return written_only_by_us(path.lstat())
    except FileNotFoundError:
        return False


def _check_dir(path: Path, st: os.stat_result, *, root: bool = False) -> None:
    """Refuses a directory of the cache's own that is a symlink (`root`, which the
    user chose, may be one: `st` is then the target's), not a directory, or another
    user's that group or others can write without the sticky bit."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        code, problem = errno.ELOOP, "is a symbolic link, which the cache never follows"
    elif not stat.S_ISDIR(mode):
        code, problem = errno.ENOTDIR, "is not a directory"
    elif (
        st.st_uid not in (os.geteuid(), 0)
        and mode & (stat.S_IWGRP | stat.S_IWOTH)
        and not mode & stat.S_ISVTX
    ):
        code = errno.EPERM
        problem = (
            f"belongs to another user (uid {st.st_uid}) and others can write to it without "
            "the sticky bit, so nothing in it can be trusted"
        )
    else:
        return
    what = "the cache directory" if root else "a directory of the cache"
    fix = (
        "fix its owner or permissions (chmod +t, or go-w)"
        if code == errno.EPERM
        else "remove it (the cache recreates it)"
    )
    raise StorageError(
        code,
        f"{what} {path} {problem}: {fix}, or use another cache (--cache DIR, SUREFETCH_CACHE)",
        str(path),
    )


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in the file at `path` (never through a symlink), or ``{}``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            import json  # metadata files of caches before the catalog: rarely read

            value = json.loads(f.read(65536))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def printable(text: str, limit: int = 300) -> str:
    """Text from a file other processes write (a lock file, metadata): one short line."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."
