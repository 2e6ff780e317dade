"""`surefetch fetch` and `surefetch cache ls|verify|gc|clean`: the shared cache."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from surefetch._signals import mark_completed
from surefetch.cli._common import (
    EXIT_INTEGRITY,
    EXIT_OK,
    CommandError,
    add_network_options,
    json_line,
    non_negative_int,
    print_json,
    print_line,
    seconds,
    transfer_options,
    write_completed,
)
from surefetch.cli._progress import progress_bar
from surefetch.errors import StorageError, SurefetchError

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _byte_size(text: str) -> int:
    """``1024``, ``500M``, ``10G``, ``1.5GiB`` (powers of 1024) → bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 1024, 500M or 10G, not {text!r}")
    return int(float(match[1]) * _SIZE_UNITS[match[2].upper()])


def _age(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``7d`` (or plain seconds) → seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected an age like 30s, 10m, 2h or 7d, not {text!r}")
    return float(match[1]) * _AGE_UNITS[match[2]]


def _add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="the cache directory (default: $SUREFETCH_CACHE, else the XDG cache dir)",
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `fetch` and `cache ls|verify|gc|clean`."""
    fetch = sub.add_parser(
        "fetch",
        help="download a URL into the shared cache (or find it there) and print its path",
        description="Print the path of URL's verified blob in the cache, downloading it only "
        "when it is not cached; with --sha256 a cached blob needs no network at all. Processes "
        "fetching the same artifact wait for each other: only one downloads.",
    )
    fetch.add_argument("url", metavar="URL")
    fetch.add_argument("--sha256", metavar="HEX", help="expected SHA-256 (the cache key)")
    fetch.add_argument("--size", metavar="N", type=non_negative_int, help="expected size")
    _add_cache_option(fetch)
    fetch.add_argument("--timeout", metavar="S", type=seconds, help="overall limit, waits too")
    fetch.add_argument(
        "--lock-timeout",
        metavar="S",
        type=seconds,
        default=300.0,
        help="how long to wait for another process fetching the same artifact (default 300)",
    )
    add_network_options(fetch)
    fetch.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="also install the verified file at PATH (a PATH ending in / is a directory: "
        "named after the URL), atomically",
    )
    fetch.add_argument(
        "--link-mode",
        choices=("auto", "reflink", "hardlink", "copy"),
        default="auto",
        help="how -o's file is made from the cached one (see `surefetch sync --help`)",
    )
    fetch.add_argument(
        "--offline",
        action="store_true",
        help="no network: answer from the cache, or fail (exit 4) for a URL never fetched "
        "(also SUREFETCH_OFFLINE=1)",
    )
    fetch.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    fetch.add_argument("--json", action="store_true", help="print the result as one JSON object")
    fetch.set_defaults(handler=_run_fetch, keeps_parts=True)

    cache = sub.add_parser("cache", help="list, verify, shrink and clean the cache")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = csub.add_parser("ls", help="list the cached blobs, least recently used first")
    verify = csub.add_parser(
        "verify", help="re-hash every blob; quarantine mismatches (exit 3 if any)"
    )
    gc = csub.add_parser("gc", help="evict least-recently-used blobs down to a size")
    gc.add_argument(
        "--max-size", metavar="SIZE", type=_byte_size, required=True, help="e.g. 10G, 500M, 1024"
    )
    clean = csub.add_parser("clean", help="remove part files of dead downloads")
    clean.add_argument(
        "--older-than",
        metavar="AGE",
        type=_age,
        default=7 * 86400.0,
        help="only parts at least this old, e.g. 30s, 10m, 2h, 7d (default 7d)",
    )
    clean.add_argument("--quarantine", action="store_true", help="also empty the quarantine")
    for parser, handler in ((ls, _cache_ls), (verify, _cache_verify), (gc, _cache_gc)):
        _add_cache_option(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.set_defaults(handler=_run_cache(handler))
    _add_cache_option(clean)
    clean.add_argument("--json", action="store_true", help="print one JSON object")
    clean.set_defaults(handler=_run_cache(_cache_clean))


def _open_cache(args: argparse.Namespace, lock_timeout: float = 300.0) -> Any:
    from surefetch.cache import Cache

    offline = True if getattr(args, "offline", False) else None  # None: $SUREFETCH_OFFLINE
    return Cache(args.cache, lock_timeout=lock_timeout, offline=offline)


@contextmanager
def _cache_errors(cache: Any) -> Iterator[None]:
    """Turns an OSError on the cache's files that surefetch did not explain already into a
    StorageError that names the cache and what to do."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, (SurefetchError, BrokenPipeError)):
            raise  # (a reader of stdout that went away is `main`'s to handle)
        raise StorageError(
            exc.errno or 0,
            f"cannot use the cache at {cache.root}: {exc.strerror or exc}; "
            "pass --cache DIR or set SUREFETCH_CACHE to a directory you can write",
            str(cache.root),
        ) from exc


def _name_from_url(url: str) -> str:
    from surefetch.download import name_from_url

    return name_from_url(url)


def _run_fetch(args: argparse.Namespace) -> int:
    cache = _open_cache(args, args.lock_timeout)
    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    def on_wait(holder: str) -> None:
        if not args.quiet:
            print(f"surefetch: waiting for {holder}", file=sys.stderr, flush=True)

    with _cache_errors(cache), progress_bar(show_bar, _name_from_url(args.url)) as progress:
        entry = cache.fetch_entry(
            args.url,
            sha256=args.sha256,
            size=args.size,
            options=transfer_options(args),
            progress=progress,
            on_wait=on_wait,
        )
    if args.output is not None:
        entry = _install_fetched(entry, args.url, args.output, args.link_mode)
    mark_completed(f"{entry.path} was fetched and verified")  # a signal cannot undo it now
    if args.json or not args.quiet:
        shown = (
            json_line(
                {
                    "path": str(entry.path),
                    "size": entry.size,
                    "sha256": entry.sha256,
                    "xxh3_128": entry.xxh3_128,
                    "bytes_transferred": entry.bytes_transferred,
                }
            )
            if args.json
            else f"{entry.path}\n"
        )
        write_completed(shown, done=f"{entry.path} was fetched and verified")
    return EXIT_OK


def _install_fetched(entry: Any, url: str, output: str, link_mode: Any) -> Any:
    """Installs a fetched blob at -o's path; returns the entry with that path."""
    from pathlib import Path

    from surefetch.download import name_from_url
    from surefetch.linking import install

    target = Path(output)
    if output.endswith(("/", os.sep)) or target.is_dir():
        target = target / name_from_url(url)
    try:  # missing directories are created, as `get -o` does
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        why = _why_not_a_directory(target.parent, exc)
        raise StorageError(
            exc.errno or 0,
            f"cannot create the directory {target.parent}: {why}; the cached copy is fine: "
            "check -o",
            str(target.parent),
        ) from exc
    try:
        install(entry.path, target, 0o644, link_mode)
    except OSError as exc:
        raise StorageError(
            exc.errno or 0,
            f"cannot install {target} from the cache ({link_mode}): {exc.strerror or exc}; "
            "the cached copy is fine: check the destination, or use --link-mode copy",
            str(target),
        ) from exc
    return entry._replace(path=target)


def _why_not_a_directory(path: Any, exc: OSError) -> str:
    """Why `path` cannot be made a directory: the first level of it that is in the way
    (a file, a symlink that leads nowhere), else what the system said."""
    for level in [*reversed(path.parents), path]:
        if level.is_dir():
            continue
        if level.is_symlink():
            return f"{level} is a symbolic link that leads nowhere"
        if os.path.lexists(level):
            return f"{level} is not a directory"
        break
    return str(exc.strerror or exc)


def _run_cache(
    handler: Callable[[Any, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        cache = _open_cache(args)
        with _cache_errors(cache):
            return handler(cache, args)

    return run


def _cache_ls(cache: Any, args: argparse.Namespace) -> int:
    import datetime

    blobs = cache.ls()

    def when(timestamp: float) -> str:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    if args.json:
        print_json(
            {
                "root": str(cache.root),
                "blobs": [
                    {
                        "sha256": b.sha256,
                        "size": b.size,
                        "last_used": when(b.last_used),
                        "url": b.url,
                        "path": str(b.path),
                    }
                    for b in blobs
                ],
            }
        )
        return EXIT_OK
    if not blobs:
        print(f"no blobs in {cache.root}", file=sys.stderr)
    for b in blobs:
        print_line(f"{b.sha256}  {b.size:>14}  {when(b.last_used)}  {b.url or '-'}")
    return EXIT_OK


def _cache_verify(cache: Any, args: argparse.Namespace) -> int:
    report = cache.verify()
    bad = [str(p) for p in report.quarantined]
    stuck = [str(p) for p in report.not_quarantined]
    if args.json:
        text = json_line(
            {
                "checked": report.checked,
                "quarantined": bad,
                "not_quarantined": stuck,
                "catalog_quarantined": [str(p) for p in report.catalog],
            }
        )
    else:
        text = f"checked {_count(report.checked, 'blob')}, {len(bad) + len(stuck)} did not match\n"
        if report.catalog:
            text += (
                f"the catalog could not be used: moved to {report.catalog[0]}; the blobs' "
                "records were made again (URLs fetched without a digest download again once)\n"
            )
    # It may have quarantined blobs and the catalog: done, whatever happens to the report.
    write_completed(text, done=f"{_count(report.checked, 'blob')} checked")
    if report.catalog_problem is not None:
        print(f"surefetch: the catalog is not used: {report.catalog_problem}", file=sys.stderr)
    if stuck:
        moved = f"; {len(bad)} more were moved to quarantine" if bad else ""
        raise CommandError(
            f"{_count(len(stuck), 'blob')} did not match their digest and could not be moved "
            f"to quarantine (you may not change this cache): {', '.join(stuck)}{moved}; have "
            "the cache's owner run `surefetch cache verify`",
            EXIT_INTEGRITY,
        )
    if bad:
        raise CommandError(
            f"{len(bad)} blob(s) did not match their digest and were moved to "
            f"{cache.root / 'quarantine'}; fetch them again",
            EXIT_INTEGRITY,
        )
    return EXIT_OK


def _cache_gc(cache: Any, args: argparse.Namespace) -> int:
    report = cache.gc(args.max_size)
    evicted = f"evicted {_count(len(report.evicted), 'blob')} ({report.freed} bytes)"
    if args.json:
        text = json_line(
            {
                "evicted": [str(p) for p in report.evicted],
                "freed": report.freed,
                "remaining": report.remaining,
                "in_use": report.in_use,
            }
        )
    else:
        text = (
            f"{evicted}; {report.remaining} bytes left"
            + (f"; {report.in_use} kept because in use" if report.in_use else "")
            + "\n"
        )
    write_completed(text, done=evicted)
    return EXIT_OK


def _cache_clean(cache: Any, args: argparse.Namespace) -> int:
    report = cache.clean(args.older_than, quarantine=args.quarantine)
    removed = f"removed {_count(len(report.removed), 'file')} ({report.freed} bytes)"
    if args.json:
        text = json_line(
            {
                "removed": [str(p) for p in report.removed],
                "freed": report.freed,
                "live": report.live,
            }
        )
    else:
        text = (
            removed
            + (f"; kept {_count(report.live, 'part')} of live downloads" if report.live else "")
            + "\n"
        )
    write_completed(text, done=removed)
    return EXIT_OK


def _count(n: int, noun: str) -> str:
    """``1 blob``, ``2 blobs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
