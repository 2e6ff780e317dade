"""`sync`: manifest → pinned lockfile, as a transaction; `verify` checks a destination.

A destination's targets: at sync time, the real path of every target's parent must stay
inside the real path of the destination (a symlink leading out is refused), and a target
must not be a directory (`ManifestError`, or `LockfileError` for the lockfile).

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
destination nor the lockfile has changed. A Ctrl+C or SIGTERM that arrives once the
renames have begun is held back until they are all done and the lockfile written
(`surefetch._signals.held_back`): it then raises as usual, with the sync complete. After a
SIGKILL the next sync removes the staging directory and the temporary lockfile
(``.<lock name>.<hex>.tmp``, flocked while in use) it left; a SIGKILL during the renames
leaves only whole, verified files (each rename is atomic), and the lockfile is then still
the old one; the next sync finds those files by their digests. When only an fsync of a
directory fails after its renames, the files (or the lockfile) are in place: the lockfile is
still written to match them, and the `StorageError` says that they were installed but that
their durability is unknown.

``locked=True`` fails with `LockfileOutdated` (exit 1) before any network access when the
lockfile would change (a new, changed or removed artifact, or a lockfile that is missing or
not in canonical form). ``frozen=True`` reads only the lockfile (missing → `LockfileOutdated`),
installs exactly its entries, verified by their digests, and never writes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from surefetch._fs import (
    fsync_dir,
    missing_levels,
    not_durable,
    remove_empty_levels,
    storage_error,
    try_flock,
)
from surefetch._signals import held_back
from surefetch.download import CancelToken, TransferOptions, hash_file, part_dir, warm_up
from surefetch.errors import (
    Cancelled,
    LockfileError,
    LockfileOutdated,
    LockTimeout,
    ManifestError,
    StorageError,
    SurefetchError,
)
from surefetch.linking import LINK_MODES, LinkMode
from surefetch.lockfile import (
    LockedArtifact,
    Lockfile,
    parse_lockfile,
    read_lock_bytes,
    read_lockfile,
    remove_stale_temporaries,
    write_lockfile,
)
from surefetch.manifest import STATE_DIR, StrPath, read_manifest
from surefetch.resolve import (
    LazyCache,
    Outcome,
    Resolver,
    SyncProgress,
    check_locked,
    frozen_plan,
    plan,
)

if TYPE_CHECKING:
    from surefetch.cache import Cache

__all__ = ["Difference", "SyncProgress", "SyncResult", "sync", "verify"]


_DEST_LOCK_WAIT_S = 300.0
_POLL_S = 0.05


class SyncResult(NamedTuple):
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


class Difference(NamedTuple):
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


# --- the destination --------------------------------------------------------------------------


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _checked_target(
    root: str,
    target: str,
    file: Path,
    name: str,
    error: type[SurefetchError],
    parents_inside: set[str] | None = None,
) -> str:
    """The absolute target path, refusing symlinks that lead out of `root` and directories
    (a string: a batch's thousands of paths cost less so).

    `parents_inside`: directories already found inside `root` in this pass (each is
    resolved once, not once per file in it); the checked parent is added."""
    full = os.path.join(root, target)
    unresolved = os.path.dirname(full)
    if parents_inside is None or unresolved not in parents_inside:
        parent = os.path.realpath(unresolved)
        if not _inside(root, parent):
            raise error(
                f"{file}: artifact {name!r}: {target!r} leads outside the destination {root} "
                f"(through a symlink, to {parent}); remove the symlink or change 'path'"
            )
        if parents_inside is not None:
            parents_inside.add(unresolved)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(full).st_mode):
            raise error(
                f"{file}: artifact {name!r}: {full} is a directory; move it away or change 'path'"
            )
    return full


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


def _remove_tree(path: str | Path, *, within: float | None = None) -> None:
    """Removes the directory `path` and what is in it, if it can (best effort); with
    `within`, a staging directory (files only), for at most that many seconds."""
    try:
        os.rmdir(path)  # the common case: a staging dir emptied by the install
        return
    except OSError:
        pass
    if within is None:
        import shutil  # lazily: ~1 ms of start-up that a successful sync does not need

        shutil.rmtree(path, ignore_errors=True)
        return
    deadline = time.monotonic() + within
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            if time.monotonic() > deadline:
                return
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


# How long an interrupted sync spends removing its staging directory before it exits.
_INTERRUPTED_TIDY_S = 0.03


def _remove_stale_staging(state: Path) -> None:
    """Staging dirs left by a killed sync (we hold the destination's lock: none is live)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(state):
            if entry.name.startswith("sync-") and entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.path)


# --- installing -------------------------------------------------------------------------------


def _install(
    root: str, outcomes: Sequence[Outcome], file: Path, error: type[SurefetchError]
) -> StorageError | None:
    """Renames every staged file into place, then fsyncs the directories that changed.

    Returns the error of a directory fsync that failed (the files are in place then, but
    their durability is unknown), for the caller to raise once the lockfile matches them.
    """
    touched: set[str] = set()
    parents_inside: set[str] = set()
    staged = [o for o in outcomes if o.staged is not None]
    for installed, outcome in enumerate(staged):
        item = outcome.item
        assert outcome.staged is not None
        target = os.path.join(root, item.target)
        directory = os.path.dirname(target)
        try:
            if directory not in touched:  # each directory once, not once per file
                os.makedirs(directory, mode=0o755, exist_ok=True)
            # Again, now that it exists (each directory once).
            _checked_target(root, item.target, file, item.name, error, parents_inside)
            os.replace(outcome.staged, target)
        except OSError as exc:
            what = f"{item.name}: cannot install {target}"
            if installed:
                what += (
                    f" ({installed} of {len(staged)} artifacts were already installed, whole and "
                    "verified; the lockfile is unchanged)"
                )
            raise storage_error(exc, what) from exc
        while _inside(root, directory) and directory not in touched:
            touched.add(directory)
            directory = os.path.dirname(directory)
    for changed in sorted(touched, key=lambda d: -d.count("/")):
        try:
            fsync_dir(Path(changed))
        except OSError as exc:
            many = len(staged) != 1
            done = f"{len(staged)} artifact{'s' if many else ''} installed in {root}"
            return not_durable(exc, done, Path(changed), many=many)
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
    options: TransferOptions | None = None,
    on_wait: Callable[[str], None] | None = None,
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
        options: how each download behaves (`TransferOptions`: retries, timeouts,
            headers, netrc...); `timeout_per_item`, when given, sets its ``timeout``.
        on_wait: called with a description of the holder (pid, host, URL) when an
            artifact waits for another process fetching it into the cache.

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
    warm_up()  # the engine starts on another core while the manifest and lockfile are read
    if link_mode not in LINK_MODES:
        raise ValueError(f"link_mode must be one of {', '.join(LINK_MODES)}, not {link_mode!r}")
    lock_path = Path(os.fspath(lock))
    old_bytes = read_lock_bytes(lock_path)
    old = parse_lockfile(old_bytes, lock_path) if old_bytes is not None else None
    removed: tuple[str, ...] = ()
    error: type[SurefetchError]
    if frozen:
        if old is None:
            raise LockfileOutdated(
                f"there is no lockfile at {lock_path}, and --frozen installs only what it "
                "pins: run `surefetch sync` without --frozen to create it"
            )
        items, source, error = frozen_plan(old), lock_path, LockfileError
    else:
        man = read_manifest(manifest)
        items, removed = plan(man, old, upgrade)
        source, error = man.path, ManifestError
        if locked:
            check_locked(items, removed, old_bytes, lock_path)
    root, made = _prepare_dest(Path(os.fspath(dest)))
    try:
        parents_inside: set[str] = set()
        for item in items:
            _checked_target(root, item.target, source, item.name, error, parents_inside)
        token = cancel.child() if cancel is not None else CancelToken()
        state = Path(root, STATE_DIR)
        install_done = contextlib.ExitStack()  # holds signals back once the install begins
        with install_done:
            try:
                _make_state_dir(root, state)
                with _dest_lock(state, token):
                    _remove_stale_staging(state)
                    remove_stale_temporaries(lock_path)
                    staging = state / f"sync-{os.urandom(8).hex()}"
                    lazy_cache = LazyCache(cache)
                    try:
                        _make_staging_dir(staging)  # (in here: a Ctrl+C now removes it too)
                        resolver = Resolver(
                            root,
                            staging,
                            lazy_cache,
                            token,
                            TransferOptions.of(options, timeout=timeout_per_item)
                            if timeout_per_item is not None
                            else TransferOptions.of(options),
                            lock_path,
                            link_mode,
                            artifact_progress,
                            on_wait,
                        )
                        outcomes = resolver.run(items, jobs, progress)
                        # From the first rename on, all of it: a Ctrl+C or SIGTERM takes effect
                        # once every file is in place, the lockfile matches them and the staging
                        # area is tidied (`install_done` is left when this function ends).
                        install_done.enter_context(
                            held_back(
                                f"the install had begun, and was completed first: every artifact "
                                f"is in {root} and {lock_path} matches them"
                            )
                        )
                        not_durable = _install(root, outcomes, source, error)
                        changed = False
                        if not frozen:
                            entries = sorted((o.entry for o in outcomes), key=lambda a: a.name)
                            changed = write_lockfile(lock_path, Lockfile(tuple(entries)))
                        if not_durable is not None:
                            raise not_durable
                    finally:
                        lazy_cache.release()
                        # Interrupted: as much as a moment allows, not thousands of unlinks
                        # between a Ctrl+C and the exit; the next sync removes the rest.
                        interrupted = isinstance(
                            sys.exc_info()[1], BaseException
                        ) and not isinstance(sys.exc_info()[1], Exception)
                        _remove_tree(staging, within=_INTERRUPTED_TIDY_S if interrupted else None)
            finally:
                with contextlib.suppress(OSError):
                    state.rmdir()  # only when empty: part files of other downloads stay
    except BaseException:
        remove_empty_levels(made)  # a destination this sync created goes when it failed
        raise
    return SyncResult(
        installed=tuple(sorted(o.item.name for o in outcomes if o.staged is not None)),
        unchanged=tuple(sorted(o.item.name for o in outcomes if o.staged is None)),
        removed=removed,
        lockfile_changed=changed,
        bytes_transferred=sum(o.bytes_transferred for o in outcomes),
        elapsed=time.monotonic() - started,
    )


def _prepare_dest(dest: Path) -> tuple[str, list[Path]]:
    """Makes `dest` (and its missing parents); its real path, and the directories made."""
    made = missing_levels(dest.absolute())
    try:
        dest.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, f"cannot create the destination {dest}") from exc
    return os.path.realpath(dest), made


def _make_staging_dir(staging: Path) -> None:
    try:
        staging.mkdir(mode=0o700)
    except OSError as exc:
        raise storage_error(exc, f"cannot create the staging directory {staging}") from exc


def _make_state_dir(root: str, state: Path) -> None:
    try:
        part_dir(root)  # a real directory of ours, as the engine's part files need
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(exc, f"cannot create {state}") from exc


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
    parents_inside: set[str] = set()
    for entry in locked.artifacts:
        target = _checked_target(
            root, entry.target, lock_path, entry.name, LockfileError, parents_inside
        )
        found.extend(_differences(entry, Path(target)))
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
