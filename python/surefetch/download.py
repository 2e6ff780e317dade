"""The Python face of the download engine: `download`, `adownload`, `DownloadResult`."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

from surefetch import _core
from surefetch._core import Batch as Batch  # for surefetch.streaming (one importer of _core)
from surefetch._core import CancelToken, fit_name, hash_file, part_dir, sync_filesystem
from surefetch._core import place_many as engine_place_many  # for surefetch.linking
from surefetch._core import warm_up as warm_up  # for surefetch.transaction
from surefetch.credentials import NetrcFile
from surefetch.errors import StorageError, SurefetchError, UnsafeDestination, redact_url
from surefetch.transfer import TransferOptions

if TYPE_CHECKING:
    import asyncio

# The engine's file primitives, for the layers above (only this module and the
# package's __init__ import the native core).
__all__ = [
    "BatchProgressCallback",
    "CancelToken",
    "DownloadItem",
    "DownloadResult",
    "ProgressCallback",
    "TransferOptions",
    "adownload",
    "download",
    "download_many",
    "engine_place_many",
    "fit_name",
    "hash_file",
    "name_from_url",
    "parse_items",
    "part_dir",
    "sync_filesystem",
]

ProgressCallback = Callable[[int, Optional[int]], Any]
"""Called with (bytes done, total bytes or None), at most about ten times a second."""

StrPath = Union[str, "os.PathLike[str]"]


class DownloadResult(NamedTuple):
    """A download that arrived whole and verified at `path`.

    With ``not_modified`` the server answered a revalidation ``304``: nothing was
    written, and the size and digests are empty (the caller's copy stands).
    ``etag`` and ``last_modified`` are the validators received, for the next
    revalidation.
    """

    path: Path
    size: int
    sha256: str | None
    xxh3_128: str
    resumed_from: int
    bytes_transferred: int
    elapsed: float
    not_modified: bool = False
    etag: str | None = None
    last_modified: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form (DESIGN.md): path, size, digests, ``resumed_from``,
        ``bytes_transferred`` and ``elapsed_s`` (seconds, rounded to the microsecond)."""
        return {
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "xxh3_128": self.xxh3_128,
            "resumed_from": self.resumed_from,
            "bytes_transferred": self.bytes_transferred,
            "elapsed_s": round(self.elapsed, 6),
        }


class _FromOptions:
    """The default of `download`'s transfer keywords: the value of the ``options`` given
    (or of `TransferOptions()`), so that a keyword given explicitly always wins."""

    def __repr__(self) -> str:
        return "FROM_OPTIONS"


FROM_OPTIONS: Any = _FromOptions()

PART_DIR = ".surefetch"
"""The directory beside a destination where surefetch keeps part files (a reserved name)."""

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
"""A SHA-256 digest as surefetch writes it: 64 lowercase hex digits."""


def _checked_out(out: str, url: str) -> str:
    """`out`, the name an item asks for, if it is a bare file name (`name_from_url`).

    Raises:
        ValueError: it is not, saying why.
    """
    if not out:
        raise ValueError(f"out= for {redact_url(url)} is empty: give a file name")
    size = len(os.fsencode(out))
    if size > 255:
        raise ValueError(
            f"out={out[:32]!r}... for {redact_url(url)} is {size} bytes long; a file name has "
            "at most 255"
        )
    if _core.bare_name(out) != out:
        raise ValueError(f"out={out!r} for {redact_url(url)} is not a bare file name")
    return out


def name_from_url(url: str) -> str:
    """The file name a URL suggests: its last path segment, percent-decoded, as a bare name.

    A bare name has no ``/`` or ``\\`` (only what follows the last one is kept),
    no control characters, no leading ``-``, is not ``.`` or ``..``, and fits in
    255 bytes; one that reduces to nothing becomes ``index``.
    """
    path = urllib.parse.urlsplit(url).path
    segment = urllib.parse.unquote(path.rsplit("/", 1)[-1])
    return _core.bare_name(segment) or "index"


def destination_for(url: str, dest: StrPath | None) -> tuple[Path, bool]:
    """The file to write, and whether it is in a directory the caller named (so that
    its name is ours to choose: from the URL, or the server with Content-Disposition).

    ``None`` is the current directory; a `dest` ending in ``/`` is a directory, which
    the engine creates when missing (0755 minus the umask) once it has checked the
    download's arguments: a refused call leaves nothing behind. An existing directory is
    one too.
    """
    if dest is None:
        directory = Path.cwd()
    else:
        text = os.fspath(dest)
        directory = Path(text)
        if text.endswith(("/", os.sep)):
            if os.path.lexists(directory) and not directory.is_dir():
                raise _not_a_directory(directory, _ENDS_IN_SLASH)
        elif not directory.is_dir():
            return _not_reserved(directory), False
    return _not_reserved(directory / name_from_url(url)), True


_ENDS_IN_SLASH = (
    "a destination ending in / names a directory: drop the / to write to that file, "
    "or choose another directory"
)


def _not_a_directory(directory: Path, hint: str) -> StorageError:
    """The error of a file where `directory` should be; `hint` says what to do."""
    return StorageError(
        errno.ENOTDIR, f"{directory} exists and is not a directory; {hint}", str(directory)
    )


def _make_directory(directory: Path, hint: str) -> None:
    """Creates `directory` (0755 minus the umask) if missing; `hint` says what to do when
    a file is there instead."""
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise _not_a_directory(directory, hint) from exc
    except OSError as exc:
        raise StorageError(
            exc.errno or errno.EIO,
            f"cannot create the directory {directory}: {exc.strerror}; check its permissions",
            str(directory),
        ) from exc


def _not_reserved(path: Path, rename: str = "-o NAME, or dest=") -> Path:
    """`path`, unless it is named like the part directory; `rename` says how to name it
    otherwise."""
    if path.name == PART_DIR:
        raise UnsafeDestination(
            f"{path}: {PART_DIR} is the directory where surefetch keeps part files beside "
            f"the destination; choose another file name ({rename})"
        )
    return path


def download(
    url: str,
    dest: StrPath | None = None,
    *,
    sha256: str | None = None,
    xxh3_128: str | None = None,
    size: int | None = None,
    connections: int | None = FROM_OPTIONS,
    resume: bool = FROM_OPTIONS,
    durable: bool = True,
    timeout: float | None = FROM_OPTIONS,
    read_timeout: float | None = FROM_OPTIONS,
    connect_timeout: float = FROM_OPTIONS,
    retries: int = FROM_OPTIONS,
    speed_limit: int = FROM_OPTIONS,
    speed_time: float = FROM_OPTIONS,
    headers: Mapping[str, str] | None = FROM_OPTIONS,
    cancel: CancelToken | None = None,
    progress: ProgressCallback | None = None,
    compute_sha256: bool = True,
    executable: bool = False,
    content_disposition: bool = False,
    netrc: bool = FROM_OPTIONS,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    options: TransferOptions | None = None,
) -> DownloadResult:
    """Download `url` to `dest`, verified, atomically.

    The body streams into ``<dest dir>/.surefetch/<name>.part`` while being hashed
    (XXH3-128 always, SHA-256 unless ``compute_sha256=False``); only once its size
    and digests check out is it fsynced and renamed to `dest`. Whatever was at
    `dest` before stays untouched when anything fails.

    Args:
        url: an http or https URL.
        dest: the file to create; a directory (one that exists, or any path ending
            in ``/``, created when missing) means "in it, named after the URL" (a
            bare name: `name_from_url`); None means the current directory.
        sha256: expected SHA-256 (hex); a mismatch raises `ChecksumMismatch`.
        xxh3_128: expected XXH3-128 (hex, canonical form as `xxhsum -H2` prints).
        size: expected size in bytes; a body that differs raises `SizeMismatch`.
        connections, resume, timeout, read_timeout, connect_timeout, retries,
            speed_limit, speed_time, headers, netrc: how the transfer behaves, as the
            fields of `TransferOptions` say (parallel ranged connections, resume
            with Range and If-Range, seconds, attempts, bytes per second, extra
            request headers, ``~/.netrc`` credentials). Each one given overrides
            `options`; those not given are `options`' (by default `TransferOptions()`:
            30 s read and connect timeouts, 3 retries, 1024 B/s over 30 s, netrc on).
        options: a `TransferOptions` holding those.
        durable: fsync the file and its directory (turn off for rebuildable caches).
        if_none_match, if_modified_since: revalidate a copy the caller holds (RFC 9110
            §13.1): a ``304`` returns a result with ``not_modified`` and writes nothing.
        cancel: a token whose cancellation stops the transfer within milliseconds.
        progress: called with (bytes done, total or None) at most ~10 times a second.
        compute_sha256: compute SHA-256 when no `sha256` is expected.
        executable: create the file with the executable bits (0755 minus umask).
        content_disposition: when `dest` is a directory (or None), name the file
            after the server's ``Content-Disposition`` filename (``filename*=UTF-8''``
            first, else ``filename=``) reduced to a bare name, instead of the URL's;
            without a usable one, the URL's name. Ignored when `dest` names a file.

    Returns:
        A `DownloadResult` with the path, size and digests.

    Raises:
        ChecksumMismatch, SizeMismatch: the bytes are not the ones promised.
        HTTPError: the server refused (after retries for 5xx, 408, 429).
        NetworkError: the connection failed or broke (after retries), or a
            redirect was unsafe.
        DownloadTimeout: a connect, read or overall timeout expired.
        Cancelled: `cancel` was cancelled; what was received is kept for resume (the
            message says where).
        StorageError: the disk is full, failed, or the rename crossed filesystems;
            `dest` ends in ``/`` but is a file; ``<dest dir>/.surefetch`` is a
            symlink, not a directory, or another user's.
        UnsafeDestination: the file would be named ``.surefetch``.
        LockTimeout: another process is downloading to the same destination.
        ValueError: an invalid argument (URL scheme, digest, number).
        KeyboardInterrupt: Ctrl+C, raised within 100 ms; the transfer is cancelled.
    """
    keywords = {
        "connections": connections,
        "resume": resume,
        "timeout": timeout,
        "read_timeout": read_timeout,
        "connect_timeout": connect_timeout,
        "retries": retries,
        "speed_limit": speed_limit,
        "speed_time": speed_time,
        "headers": headers,
        "netrc": netrc,
    }
    given = {name: value for name, value in keywords.items() if value is not FROM_OPTIONS}
    transfer = TransferOptions.of(options, **given)
    path, in_directory = destination_for(url, dest)
    raw = _core.download(
        url,
        path,
        {
            **transfer.engine_options(url),
            "sha256": sha256,
            "xxh3_128": xxh3_128,
            "size": size,
            "compute_sha256": compute_sha256,
            "durable": durable,
            "executable": executable,
            "content_disposition": content_disposition and in_directory,
            "if_none_match": if_none_match,
            "if_modified_since": if_modified_since,
        },
        cancel=cancel,
        progress=progress,
    )
    return result_from_engine(raw)


def _as_path(path: Path | str) -> Path:
    # The engine's paths arrive as Paths already: a batch of thousands need not copy each.
    return path if isinstance(path, Path) else Path(path)


def result_from_engine(raw: dict[str, Any]) -> DownloadResult:
    return DownloadResult(
        path=_as_path(raw["path"]),
        size=raw["size"],
        sha256=raw["sha256"],
        xxh3_128=raw["xxh3_128"],
        resumed_from=raw["resumed_from"],
        bytes_transferred=raw["bytes_transferred"],
        elapsed=raw["elapsed"],
        not_modified=raw.get("not_modified", False),
        etag=raw.get("etag"),
        last_modified=raw.get("last_modified"),
    )


async def adownload(
    url: str,
    dest: StrPath | None = None,
    *,
    cancel: CancelToken | None = None,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> DownloadResult:
    """`download` for asyncio: the transfer runs on its own thread, never blocking the loop.

    Takes the same arguments as `download`. `progress` is called on the event loop.
    Cancelling the task cancels the transfer (its part file is kept) and raises
    `asyncio.CancelledError` in the task once the transfer has stopped.
    """
    import asyncio  # lazily: it costs ~40 ms of start-up to every `surefetch` command

    loop = asyncio.get_running_loop()
    token = cancel.child() if cancel is not None else CancelToken()
    done: asyncio.Future[DownloadResult] = loop.create_future()

    def on_progress(now: int, total: int | None) -> None:
        assert progress is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(progress, now, total)

    def settle(outcome: DownloadResult | BaseException) -> None:
        if done.done():
            return
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)

    def run() -> None:
        outcome: DownloadResult | BaseException
        try:
            outcome = download(
                url,
                dest,
                cancel=token,
                progress=on_progress if progress is not None else None,
                **options,
            )
        except BaseException as exc:
            outcome = exc
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="surefetch-adownload", daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        token.cancel()
        with contextlib.suppress(BaseException):
            await done
        raise


# --- many ------------------------------------------------------------------------------

BatchProgressCallback = Callable[[int, int, int, int], Any]
"""Called with (items done, items, bytes done, bytes known so far), ~10 times a second."""


class DownloadItem(NamedTuple):
    """One item of `download_many`.

    Attributes:
        url: an http or https URL.
        out: the file name inside the destination directory (default: from the URL).
        sha256: expected SHA-256 (hex).
        size: expected size in bytes.
        if_none_match, if_modified_since: revalidate a copy the caller holds (RFC 9110
            §13.1), as for `download`: a ``304`` gives a result with ``not_modified``,
            and nothing is written.
    """

    url: str
    out: str | None = None
    sha256: str | None = None
    size: int | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None


def parse_items(lines: Iterable[str], source: str = "-i") -> list[DownloadItem]:
    """Items from an input file: one a line, ``URL [out=NAME] [sha256=HEX] [size=N]``;
    blank lines and ``#`` comments are skipped (aria2's input files, in short).

    Raises:
        ValueError: a line that does not parse, naming `source` and its line number.
    """
    items = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split() if not line.lstrip().startswith("#") else []
        if not fields:
            continue
        url, extra = fields[0], fields[1:]
        options: dict[str, str] = {}
        for field in extra:
            key, sep, value = field.partition("=")
            if not sep or key not in ("out", "sha256", "size") or key in options:
                raise ValueError(
                    f"{source}:{number}: expected URL [out=NAME] [sha256=HEX] [size=N], "
                    f"not {field!r}"
                )
            options[key] = value
        size, sha256 = options.get("size"), options.get("sha256")
        if size is not None and not size.isdigit():
            raise ValueError(f"{source}:{number}: size must be a number of bytes, not {size!r}")
        if sha256 is not None and not SHA256_HEX.fullmatch(sha256.lower()):
            raise ValueError(f"{source}:{number}: sha256 must be 64 hex digits, not {sha256!r}")
        if options.get("out") == "":
            raise ValueError(f"{source}:{number}: out= needs a file name")
        items.append(
            DownloadItem(
                url,
                out=options.get("out"),
                sha256=sha256,
                size=int(size) if size is not None else None,
            )
        )
    return items


def download_many(
    items: Iterable[str | DownloadItem],
    dest: StrPath | None = None,
    *,
    jobs: int = 8,
    durable: bool = True,
    cancel: CancelToken | None = None,
    progress: BatchProgressCallback | None = None,
    on_result: Callable[[int, DownloadResult | Exception], Any] | None = None,
    item_progress: Callable[[int, int, int | None], Any] | None = None,
    options: TransferOptions | None = None,
    compute_sha256: bool = True,
    executable: bool = False,
    content_disposition: bool = False,
    lock_parts: bool = True,
    install_by_digest: StrPath | None = None,
    **changes: Any,
) -> list[DownloadResult | Exception]:
    """Download many URLs into the directory `dest`, at most `jobs` at a time, in one
    call on one runtime (connections reused per host), each verified and atomic.

    Items are independent: one that fails does not stop the others. With `durable`,
    files are made durable together (group commit) before each is renamed into place.

    Args:
        items: URLs or `DownloadItem`s.
        dest: the directory (created if missing; default: the current directory).
        jobs: downloads in flight at once.
        durable: fsync the files and the directory, in groups.
        cancel: a token whose cancellation stops every item (their parts kept).
        progress: see `BatchProgressCallback`.
        on_result: called with (index, result or exception) as each item is final.
        item_progress: called with (index, bytes done, total or None) for each item whose
            bytes moved, about ten times a second.
        options: how each transfer behaves (`TransferOptions`; default: its defaults).
        compute_sha256, executable, content_disposition: as for `download`.
        lock_parts: take the engine's lock beside each part file. False only when the
            caller holds a lock of its own that covers each item's destination (as the
            cache's artifact locks do): one file creation fewer per item.
        install_by_digest: a content-addressed store: each verified file is installed at
            ``<it>/<first two hex digits of its SHA-256>/<its SHA-256>`` (directories the
            caller has created and checked) instead of in `dest`, which then only names
            its part file; its result's `path` says where.
        changes: fields of `TransferOptions` (``retries=5``, ``headers=...``) that
            override `options`.

    Returns:
        For each item, in order, its `DownloadResult` or the exception it raised (a
        `SurefetchError`, or `ValueError` for an item with a bad URL).

    Raises:
        ValueError: a bad argument, two items that would write the same file, or a netrc
            file that does not parse (with `netrc`).
        TypeError: a keyword that is neither an argument nor a `TransferOptions` field.
        StorageError: the destination directory cannot be created.
        KeyboardInterrupt: Ctrl+C; every transfer is cancelled first.
    """
    for name in ("sha256", "xxh3_128", "size", "progress"):
        if name in changes:
            raise ValueError(f"{name} is given per item (DownloadItem), not for all")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    transfer = TransferOptions.of(options, **changes)
    netrc_file = NetrcFile() if transfer.netrc else None  # read once for the batch
    directory = Path.cwd() if dest is None else Path(os.fspath(dest))
    batch = [DownloadItem(i) if isinstance(i, str) else i for i in items]
    raw_items: list[tuple[str, str | os.PathLike[str], dict[str, Any]]] = []
    positions: list[int] = []  # of each raw item in `batch`
    unusable: dict[int, Exception] = {}  # items whose URL cannot be parsed: their result
    seen: dict[Path, str] = {}
    for position, item in enumerate(batch):
        out = _checked_out(item.out, item.url) if item.out is not None else None
        try:
            name = out if out is not None else name_from_url(item.url)
            engine_options = transfer.engine_options(item.url, netrc_file)
        except ValueError as exc:  # this item fails, the others go on
            unusable[position] = ValueError(f"{redact_url(item.url)} is not a usable URL: {exc}")
            continue
        path = _not_reserved(directory / name, "out=NAME")
        if path in seen:
            raise ValueError(
                f"{redact_url(seen[path])} and {redact_url(item.url)} would both write {path}: "
                "give one of them out=NAME"
            )
        seen[path] = item.url
        per_item = {
            **engine_options,
            "sha256": item.sha256,
            "size": item.size,
            "compute_sha256": compute_sha256,
            "executable": executable,
            "content_disposition": content_disposition,
            "part_lock": lock_parts,
            "install_by_digest": os.fspath(install_by_digest) if install_by_digest else None,
            "if_none_match": item.if_none_match,
            "if_modified_since": item.if_modified_since,
        }
        raw_items.append((item.url, path, per_item))
        positions.append(position)
    # Only once the items are known to be usable: a refused batch leaves nothing behind.
    from surefetch._fs import missing_levels, remove_empty_levels  # (not on a get's start-up)

    made = missing_levels(directory)
    _make_directory(
        directory,
        "the files of a batch go into a directory: name one (or a path to create)",
    )
    results: list[DownloadResult | Exception | None] = [None] * len(batch)

    def collect(index: int, raw: dict[str, Any] | BaseException) -> None:
        if isinstance(raw, BaseException) and not isinstance(raw, Exception):
            raise raw
        result = raw if isinstance(raw, Exception) else result_from_engine(raw)
        position = positions[index]
        results[position] = result
        if on_result is not None:
            on_result(position, result)

    for position, error in unusable.items():
        results[position] = error
        if on_result is not None:
            on_result(position, error)

    try:
        _core.download_many(
            raw_items,
            jobs=jobs,
            durable=durable,
            cancel=cancel,
            on_result=collect,
            progress=progress,
            item_progress=item_progress,
        )
    finally:
        remove_empty_levels(made)  # a batch that installed nothing leaves no directory it made
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise SurefetchError(
            f"internal error: {len(missing)} item(s) ended without a result; please report this"
        )
    return [r for r in results if r is not None]
