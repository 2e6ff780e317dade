"""The `surefetch` command line: a thin face over the library.

Exit codes (DESIGN.md): 0 success · 1 other error · 2 usage · 3 integrity ·
4 HTTP or network error after retries · 5 timeout · 130 SIGINT · 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, NoReturn, cast

from surefetch.errors import (
    DownloadTimeout,
    HTTPError,
    IntegrityError,
    LockfileError,
    ManifestError,
    NetworkError,
    StorageError,
    SurefetchError,
    redact_url,
    redact_urls,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_NETWORK = 4
EXIT_TIMEOUT = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that says where to look, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _VersionAction(argparse.Action):
    """``--version``: prints `version_line` and exits 0 (computed only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        print(version_line())
        parser.exit(EXIT_OK)


def version_line() -> str:
    """``surefetch X.Y.Z``; with the native core's version too when it differs from the
    installed package's (a stale build: both come from Cargo.toml)."""
    from importlib import metadata

    from surefetch import __version__ as core

    try:
        package = metadata.version("surefetch")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        package = core
    if package == core:
        return f"surefetch {package}"
    return f"surefetch {package} (its native core is {core}: reinstall surefetch)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="surefetch", description="Downloads that cannot corrupt anything.")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    parser.add_argument("-V", "--version", action=_VersionAction, help="print the version and exit")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )
    _add_get_command(sub)
    _add_cache_commands(sub)
    _add_demo_command(sub)
    _add_sync_commands(sub)
    _add_session_commands(sub)
    _add_supervisor_commands(sub)
    return parser


# --- errors, signals and output -----------------------------------------------

_VERBOSE_HELP = (
    "say what surefetch decides on stderr: retries and why, resume offsets, fall-backs, "
    "connections, lock waits"
)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", dest="verbose_here", action="store_true", help=_VERBOSE_HELP
    )


def _log_to_stderr() -> None:
    """The `surefetch` logger's INFO records on stderr, one line each (the library
    itself installs no handler)."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("surefetch: %(message)s"))
    logger = logging.getLogger("surefetch")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class Terminated(BaseException):
    """SIGTERM arrived; raised from the signal handler like KeyboardInterrupt for SIGINT."""


def _raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception (DESIGN.md)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(exc, Terminated):
        return EXIT_SIGTERM
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(exc, (HTTPError, NetworkError)):
        return EXIT_NETWORK
    if isinstance(exc, DownloadTimeout):
        return EXIT_TIMEOUT
    if isinstance(exc, (LockfileError, ManifestError)):
        return EXIT_USAGE
    if isinstance(exc, ValueError):
        return EXIT_USAGE
    return EXIT_ERROR


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; the part file is kept: run the same command again to continue"
    if isinstance(exc, Terminated):
        return "terminated; the part file is kept: run the same command again to continue"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    """Prints the one stderr line of a failed command (never a URL's password) and
    returns its exit code."""
    print(f"surefetch: error: {redact_urls(message)}", file=sys.stderr)
    return code


def run_reporting_errors(action: Callable[[], int]) -> int:
    """Runs `action`, turning the exceptions surefetch documents into one stderr line
    and an exit code."""
    try:
        with _sigterm_raises():
            return action()
    except (SurefetchError, ValueError, KeyboardInterrupt, Terminated) as exc:
        return _fail(_error_line(exc), exit_code_for(exc))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True))


# --- get ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', not {text!r}")
    return name.strip(), value.strip()


def _add_network_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that downloads shares: timeouts, retries, headers."""
    parser.add_argument(
        "--read-timeout", metavar="S", type=_seconds, default=30.0, help="idle read limit"
    )
    parser.add_argument(
        "--connect-timeout", metavar="S", type=_seconds, default=30.0, help="connect limit"
    )
    parser.add_argument("--retries", metavar="N", type=_non_negative_int, default=3)
    parser.add_argument(
        "-H",
        "--header",
        metavar="'NAME: VALUE'",
        type=_header,
        action="append",
        default=[],
        help="extra request header (repeatable)",
    )
    _add_verbose(parser)
    parser.add_argument(
        "--no-netrc",
        action="store_true",
        help="do not use the host's credentials from ~/.netrc ($NETRC)",
    )


def _add_get_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    get = sub.add_parser(
        "get",
        help="download URLs, verified, to files",
        description="Download URL to a file: nothing appears at the destination unless it "
        "arrived whole and verified; an interrupted download keeps its part file. With "
        "several URLs (or -i), each goes into the -o directory, --jobs at a time; the exit "
        "code is the worst of the items'.",
    )
    get.add_argument("url", metavar="URL", nargs="*")
    get.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="file to write, or directory to write into (a PATH ending in / is a directory, "
        "created if missing; with several URLs always a directory); default: the current "
        "directory",
    )
    get.add_argument(
        "-i",
        "--input-file",
        metavar="FILE",
        help="more URLs, one a line: URL [out=NAME] [sha256=HEX] [size=N] (- for stdin)",
    )
    get.add_argument(
        "-j", "--jobs", metavar="N", type=_positive_int, default=8, help="downloads at once"
    )
    get.add_argument("--sha256", metavar="HEX", help="expected SHA-256")
    get.add_argument("--xxh3", metavar="HEX", help="expected XXH3-128 (as xxhsum -H2 prints)")
    get.add_argument("--size", metavar="N", type=_non_negative_int, help="expected size in bytes")
    get.add_argument(
        "-c", "--connections", metavar="N", type=_positive_int, help="parallel connections"
    )
    get.add_argument("--no-resume", action="store_true", help="discard any part file")
    get.add_argument("--no-fsync", action="store_true", help="skip fsync (rebuildable caches)")
    get.add_argument("--no-sha256", action="store_true", help="compute only XXH3-128")
    get.add_argument("--timeout", metavar="S", type=_seconds, help="overall time limit")
    get.add_argument(
        "--speed-limit",
        metavar="BYTES_PER_S",
        type=_non_negative_int,
        default=1024,
        help="slower than this for --speed-time is a stall, retried (0: off; default 1024)",
    )
    get.add_argument(
        "--speed-time", metavar="S", type=_seconds, default=30.0, help="low-speed window"
    )
    _add_network_options(get)
    get.add_argument("--executable", action="store_true", help="make the file executable")
    get.add_argument(
        "--content-disposition",
        action="store_true",
        help="name the file after the server's Content-Disposition filename (reduced to a "
        "bare name) instead of the URL, unless -o names a file",
    )
    get.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    get.add_argument(
        "--json", action="store_true", help="print each result as one JSON object, one a line"
    )
    get.set_defaults(handler=_run_get)


def _run_get(args: argparse.Namespace) -> int:
    from surefetch.download import download

    if args.input_file is not None or len(args.url) != 1:
        return _run_get_many(args)

    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    def action() -> int:
        with _progress_bar(show_bar, _shown_name(args.url[0], args.output)) as progress:
            result = download(
                args.url[0],
                args.output,
                sha256=args.sha256,
                xxh3_128=args.xxh3,
                size=args.size,
                connections=args.connections,
                resume=not args.no_resume,
                durable=not args.no_fsync,
                timeout=args.timeout,
                read_timeout=args.read_timeout,
                connect_timeout=args.connect_timeout,
                retries=args.retries,
                speed_limit=args.speed_limit,
                speed_time=args.speed_time,
                headers=dict(args.header),
                progress=progress,
                compute_sha256=not args.no_sha256,
                executable=args.executable,
                content_disposition=args.content_disposition,
                netrc=not args.no_netrc,
            )
        if args.json:
            _print_json(result.to_dict())
        elif not args.quiet:
            print(result.path)
        return EXIT_OK

    return run_reporting_errors(action)


def _run_get_many(args: argparse.Namespace) -> int:
    from surefetch.download import DownloadItem, DownloadResult, download_many, parse_items

    for flag, value in (("--sha256", args.sha256), ("--xxh3", args.xxh3), ("--size", args.size)):
        if value is not None:
            return _fail(
                f"{flag} names one file: with several URLs give it per item in -i FILE", EXIT_USAGE
            )
    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    def action() -> int:
        items: list[str | DownloadItem] = list(args.url)
        if args.input_file is not None:
            items += _read_items(args.input_file, parse_items)
        if not items:
            return _fail("no URL given: name some, or -i FILE", EXIT_USAGE)
        worst = EXIT_OK

        def report(index: int, result: DownloadResult | Exception) -> None:
            nonlocal worst
            item = items[index]
            url = redact_url(item if isinstance(item, str) else item.url)
            if isinstance(result, DownloadResult):
                if args.json:
                    _print_json({"url": url, **result.to_dict()})
                elif not args.quiet:
                    print(result.path, flush=True)
                return
            code = exit_code_for(result)
            worst = max(worst, code)
            if args.json:
                _print_json(
                    {"url": url, "error": redact_urls(_error_line(result)), "exit_code": code}
                )
            else:
                print(f"surefetch: {url}: {redact_urls(_error_line(result))}", file=sys.stderr)

        with _batch_progress_bar(show_bar) as progress:
            download_many(
                items,
                args.output or ".",
                jobs=args.jobs,
                durable=not args.no_fsync,
                progress=progress,
                on_result=report,
                connections=args.connections,
                resume=not args.no_resume,
                timeout=args.timeout,
                read_timeout=args.read_timeout,
                connect_timeout=args.connect_timeout,
                retries=args.retries,
                speed_limit=args.speed_limit,
                speed_time=args.speed_time,
                headers=dict(args.header),
                compute_sha256=not args.no_sha256,
                executable=args.executable,
                content_disposition=args.content_disposition,
                netrc=not args.no_netrc,
            )
        return worst

    return run_reporting_errors(action)


def _read_items(source: str, parse: Callable[[Iterable[str], str], list[Any]]) -> list[Any]:
    if source == "-":
        return parse(sys.stdin, "-i -")
    try:
        with open(source, encoding="utf-8") as lines:
            return parse(lines, source)
    except OSError as exc:
        raise ValueError(f"cannot read {source}: {exc.strerror}") from exc


@contextmanager
def _batch_progress_bar(
    enabled: bool,
) -> Iterator[Callable[[int, int, int, int], None] | None]:
    """One tqdm bar for a batch: files done/total, bytes, rate, ETA."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def update(items_done: int, items: int, done: int, known: int) -> None:
        bar.set_description_str(f"{items_done}/{items} files", refresh=False)
        if bar.total != known:
            bar.total = known
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _fit_name(name: str, width: int) -> str:
    """`name` cut in the middle to at most `width` terminal columns, keeping its end
    (the extension): ``a_very_long_model_na…-00001.safetensors``."""
    from tqdm.utils import disp_len

    if disp_len(name) <= width:
        return name
    if width < 1:
        return ""
    dots = "…" if (sys.stderr.encoding or "").lower().replace("-", "") == "utf8" else "..."
    head, tail = list(name[: len(name) // 2]), list(name[len(name) // 2 :])
    while head or tail:
        text = "".join(head) + dots + "".join(tail)
        if disp_len(text) <= width:
            return text
        # Take from the head twice as often as from the tail: the tail holds the extension.
        if tail and (not head or len(tail) * 2 > len(head)):
            tail.pop(0)
        else:
            head.pop()
    return dots[:width]


_MIN_NAME_WIDTH = 12
"""Columns a file name keeps in a narrow terminal, even if the numbers then lose theirs."""


def _named_bar(name: str, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (bytes, rate, ETA) that starts with `name`, the file it is
    about, shortened in the middle to leave the numbers whole at the terminal's width
    (followed as it changes). `set_description_str` changes the name."""
    from tqdm import tqdm
    from tqdm.utils import disp_len

    class NamedBar(tqdm):  # type: ignore[type-arg]
        lead = ""  # shown whole before the name, e.g. "3/5 "

        @property
        def format_dict(self) -> dict[str, Any]:
            values = dict(super().format_dict)
            name, ncols = values.get("prefix") or "", values.get("ncols")
            if name and ncols:
                numbers = self.format_meter(**{**values, "prefix": "", "ncols": None})
                # tqdm writes "PREFIX: " before the numbers.
                room = ncols - disp_len(numbers) - 2 - disp_len(self.lead)
                name = _fit_name(name, max(room, _MIN_NAME_WIDTH))
            values["prefix"] = (self.lead + name).rstrip()
            return values

    return NamedBar(
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        **kwargs,
    )


def _shown_name(url: str, output: str | None) -> str:
    """The name of the file `get` writes: -o's, or the URL's (the server's, with
    --content-disposition, is known only once it answers)."""
    from surefetch.download import name_from_url

    if output and not output.endswith(("/", os.sep)) and not os.path.isdir(output):
        return os.path.basename(output)
    return name_from_url(url)


@contextmanager
def _progress_bar(enabled: bool, name: str) -> Iterator[Callable[[int, int | None], None] | None]:
    """A bar on stderr naming the file (bytes, rate, ETA), or None when not wanted."""
    if not enabled:
        yield None
        return
    bar = _named_bar(name)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


# --- fetch and cache ---------------------------------------------------------------

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


def _add_cache_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    fetch.add_argument("--size", metavar="N", type=_non_negative_int, help="expected size")
    _add_cache_option(fetch)
    fetch.add_argument("--timeout", metavar="S", type=_seconds, help="overall limit, waits too")
    fetch.add_argument(
        "--lock-timeout",
        metavar="S",
        type=_seconds,
        default=300.0,
        help="how long to wait for another process fetching the same artifact (default 300)",
    )
    _add_network_options(fetch)
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
    fetch.set_defaults(handler=_run_fetch)

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


def _cache_os_error(cache: Any, exc: OSError) -> int:
    return _fail(
        f"cannot use the cache at {cache.root}: {exc.strerror or exc}; "
        "pass --cache DIR or set SUREFETCH_CACHE to a directory you can write"
    )


def _name_from_url(url: str) -> str:
    from surefetch.download import name_from_url

    return name_from_url(url)


def _run_fetch(args: argparse.Namespace) -> int:
    cache = _open_cache(args, args.lock_timeout)
    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    def on_wait(holder: str) -> None:
        if not args.quiet:
            print(f"surefetch: waiting for {holder}", file=sys.stderr, flush=True)

    def action() -> int:
        try:
            with _progress_bar(show_bar, _name_from_url(args.url)) as progress:
                entry = cache.fetch_entry(
                    args.url,
                    sha256=args.sha256,
                    size=args.size,
                    headers=dict(args.header),
                    timeout=args.timeout,
                    read_timeout=args.read_timeout,
                    connect_timeout=args.connect_timeout,
                    retries=args.retries,
                    netrc=not args.no_netrc,
                    progress=progress,
                    on_wait=on_wait,
                )
        except OSError as exc:
            if isinstance(exc, SurefetchError):
                raise
            return _cache_os_error(cache, exc)
        if args.output is not None:
            entry = _install_fetched(entry, args.url, args.output, args.link_mode)
        if args.json:
            _print_json(
                {
                    "path": str(entry.path),
                    "size": entry.size,
                    "sha256": entry.sha256,
                    "xxh3_128": entry.xxh3_128,
                    "bytes_transferred": entry.bytes_transferred,
                }
            )
        elif not args.quiet:
            print(entry.path)
        return EXIT_OK

    return run_reporting_errors(action)


def _install_fetched(entry: Any, url: str, output: str, link_mode: Any) -> Any:
    """Installs a fetched blob at -o's path; returns the entry with that path."""
    import dataclasses
    from pathlib import Path

    from surefetch._fs import install
    from surefetch.download import name_from_url

    target = Path(output)
    if output.endswith(("/", os.sep)) or target.is_dir():
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        target = target / name_from_url(url)
    try:
        install(entry.path, target, 0o644, link_mode)
    except OSError as exc:
        raise StorageError(
            exc.errno or 0,
            f"cannot install {target} from the cache ({link_mode}): {exc.strerror or exc}; "
            "the cached copy is fine: check the destination, or use --link-mode copy",
            str(target),
        ) from exc
    return dataclasses.replace(entry, path=target)


def _run_cache(
    handler: Callable[[Any, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        cache = _open_cache(args)

        def action() -> int:
            try:
                return handler(cache, args)
            except OSError as exc:
                if isinstance(exc, SurefetchError):
                    raise
                return _cache_os_error(cache, exc)

        return run_reporting_errors(action)

    return run


def _cache_ls(cache: Any, args: argparse.Namespace) -> int:
    import datetime

    blobs = cache.ls()

    def when(timestamp: float) -> str:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    if args.json:
        _print_json(
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
        print(f"{b.sha256}  {b.size:>14}  {when(b.last_used)}  {b.url or '-'}")
    return EXIT_OK


def _cache_verify(cache: Any, args: argparse.Namespace) -> int:
    report = cache.verify()
    bad = [str(p) for p in report.quarantined]
    if args.json:
        _print_json({"checked": report.checked, "quarantined": bad})
    else:
        print(f"checked {report.checked} blobs, {len(bad)} did not match")
    if bad:
        return _fail(
            f"{len(bad)} blob(s) did not match their digest and were moved to "
            f"{cache.root / 'quarantine'}; fetch them again",
            EXIT_INTEGRITY,
        )
    return EXIT_OK


def _cache_gc(cache: Any, args: argparse.Namespace) -> int:
    report = cache.gc(args.max_size)
    if args.json:
        _print_json(
            {
                "evicted": [str(p) for p in report.evicted],
                "freed": report.freed,
                "remaining": report.remaining,
                "in_use": report.in_use,
            }
        )
    else:
        print(
            f"evicted {len(report.evicted)} blobs ({report.freed} bytes); "
            f"{report.remaining} bytes left"
            + (f"; {report.in_use} kept because in use" if report.in_use else "")
        )
    return EXIT_OK


def _cache_clean(cache: Any, args: argparse.Namespace) -> int:
    report = cache.clean(args.older_than, quarantine=args.quarantine)
    if args.json:
        _print_json(
            {
                "removed": [str(p) for p in report.removed],
                "freed": report.freed,
                "live": report.live,
            }
        )
    else:
        print(
            f"removed {len(report.removed)} files ({report.freed} bytes)"
            + (f"; kept {report.live} parts of live downloads" if report.live else "")
        )
    return EXIT_OK


# --- demo ------------------------------------------------------------------------


def _add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="download sample artifacts from a local server, with verification (no internet)",
    )
    demo.add_argument("--dir", metavar="DIR", help="keep the downloads here (default: a temp dir)")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from surefetch.demo import run_demo

    return run_reporting_errors(lambda: run_demo(Path(args.dir) if args.dir else None))


# --- sync, verify ------------------------------------------------------------------


def _add_sync_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `sync` and `verify` (see lockfile.py for the transaction they rely on)."""
    sync = sub.add_parser(
        "sync",
        help="install the manifest's artifacts into a directory and pin them in the lockfile",
        description="Resolve every artifact of the manifest (from the cache or the network), "
        "verify it against the lockfile's pins, and install it into --dest. All or nothing: "
        "on any failure the destination and the lockfile are left as they were.",
    )
    sync.add_argument("--manifest", metavar="F", default="surefetch.toml", help="the manifest")
    sync.add_argument("--lock", metavar="F", default="surefetch.lock", help="the lockfile")
    sync.add_argument("--dest", metavar="DIR", default=".", help="where to install (default .)")
    sync.add_argument(
        "-j", "--jobs", metavar="N", type=_positive_int, default=4, help="parallel downloads"
    )
    sync.add_argument(
        "--timeout-per-item", metavar="S", type=_seconds, help="time limit for each artifact"
    )
    _add_verbose(sync)
    sync.add_argument(
        "--link-mode",
        choices=("auto", "reflink", "hardlink", "copy"),
        default="auto",
        help="how a cached file enters the destination: auto (reflink where the filesystem "
        "can, else a kernel copy), reflink, copy, or hardlink (the installed file IS the "
        "cache's copy: never edit it in place)",
    )
    mode = sync.add_mutually_exclusive_group()
    mode.add_argument(
        "--locked", action="store_true", help="fail (exit 1) if the lockfile would change"
    )
    mode.add_argument(
        "--frozen",
        action="store_true",
        help="install exactly what the lockfile pins; do not read the manifest",
    )
    mode.add_argument(
        "--upgrade", action="store_true", help="re-resolve every artifact, ignoring the pins"
    )
    sync.add_argument("--cache", metavar="DIR", help="cache directory (default: $SUREFETCH_CACHE)")
    sync.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    sync.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sync.set_defaults(handler=_run_sync)

    verify = sub.add_parser(
        "verify",
        help="check the installed files against the lockfile",
        description="Report every file of the lockfile that is missing or differs in --dest. "
        "Exit 3 if a file's bytes differ, 1 if files are only missing or not executable.",
    )
    verify.add_argument("--lock", metavar="F", default="surefetch.lock", help="the lockfile")
    verify.add_argument("--dest", metavar="DIR", default=".", help="the installed directory")
    verify.add_argument("-q", "--quiet", action="store_true", help="print only the differences")
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object")
    verify.set_defaults(handler=_run_verify)


def _run_sync(args: argparse.Namespace) -> int:
    from surefetch.lockfile import sync

    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    def action() -> int:
        with _sync_bar(show_bar) as (progress, artifact_progress):
            result = sync(
                manifest=args.manifest,
                lock=args.lock,
                dest=args.dest,
                jobs=args.jobs,
                timeout_per_item=args.timeout_per_item,
                locked=args.locked,
                frozen=args.frozen,
                upgrade=args.upgrade,
                cache=args.cache,
                link_mode=args.link_mode,
                progress=progress,
                artifact_progress=artifact_progress,
            )
        if args.json:
            _print_json(result.to_dict())
        elif not args.quiet:
            lock_note = "lockfile updated" if result.lockfile_changed else "lockfile unchanged"
            print(
                f"{len(result.installed)} installed, {len(result.unchanged)} unchanged, "
                f"{len(result.removed)} removed from the lockfile; {lock_note}; "
                f"{result.bytes_transferred} bytes transferred in {result.elapsed:.2f} s"
            )
        return EXIT_OK

    return run_reporting_errors(action)


@contextmanager
def _sync_bar(
    enabled: bool,
) -> Iterator[
    tuple[Callable[[int, int], None] | None, Callable[[str, int, int | None], None] | None]
]:
    """The bar of `sync` on stderr: artifacts done of all, the name of the one that last
    made progress, then the bytes of all downloads (known total, rate, ETA) like
    `get`'s. Yields sync's `progress` and `artifact_progress` callbacks (None, None when
    not wanted); the second is called from several threads."""
    if not enabled:
        yield None, None
        return
    import threading

    bar = _named_bar("")
    lock = threading.Lock()
    done: dict[str, int] = {}
    totals: dict[str, int] = {}

    def show(name: str | None = None) -> None:
        if name is not None:
            bar.set_description_str(name, refresh=False)
        known = sum(totals.values())
        if known and bar.total != known:
            bar.total = known
        bar.update(sum(done.values()) - bar.n)

    def artifacts(finished: int, total: int) -> None:
        with lock:
            bar.lead = f"{finished}/{total} "
            show()
            bar.refresh()

    def artifact_bytes(name: str, now: int, total: int | None) -> None:
        with lock:
            done[name] = now
            if total is not None:
                totals[name] = total
            show(name)

    try:
        yield artifacts, artifact_bytes
    finally:
        bar.close()


def _run_verify(args: argparse.Namespace) -> int:
    from surefetch.lockfile import verify

    def action() -> int:
        found = verify(lock=args.lock, dest=args.dest)
        code = EXIT_OK
        if found:
            code = EXIT_INTEGRITY if any(d.integrity for d in found) else EXIT_ERROR
        if args.json:
            _print_json(
                {
                    "ok": not found,
                    "differences": [
                        {
                            "name": d.name,
                            "path": str(d.path),
                            "kind": d.kind,
                            "expected": d.expected,
                            "actual": d.actual,
                        }
                        for d in found
                    ],
                }
            )
        else:
            for difference in found:
                print(difference)
        if found:
            what = "do not match their digests" if code == EXIT_INTEGRITY else "are missing"
            _fail(
                f"{len(found)} difference(s) with {args.lock}: files {what}; "
                "run `surefetch sync --frozen` to restore them",
                code,
            )
        elif not (args.quiet or args.json):
            print(f"every file of {args.lock} matches in {args.dest}")
        return code

    return run_reporting_errors(action)


# --- sessions, users, serve -------------------------------------------------


def _add_session_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Registers `sessions`, `users`, `serve` and `enforce` (each sets `handler` via
    set_defaults)."""
    db_help = "session store URL (default: $SUREFETCH_DB, else sqlite under the XDG data dir)"

    sessions = sub.add_parser("sessions", help="list, show and cancel your sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("list", "list your sessions, newest first"),
        ("show", "show one of your sessions"),
        ("cancel", "request the cancellation of one of your sessions"),
    ):
        p = ssub.add_parser(name, help=help_text)
        if name != "list":
            p.add_argument("id", metavar="ID", help="the session id")
        else:
            p.add_argument(
                "--status",
                "--state",
                dest="status",
                choices=("pending", "running", "succeeded", "failed", "cancelled"),
                help="only sessions in this state",
            )
            _add_history_limits(p, "sessions")
        p.add_argument("--db", default=None, metavar="URL", help=db_help)
        p.add_argument(
            "--user",
            default=None,
            metavar="NAME",
            help="whose sessions (default: the current login user)",
        )
        p.add_argument("--json", action="store_true", help="print JSON on stdout")
        p.set_defaults(handler=_cmd_sessions, action=name)

    users = sub.add_parser("users", help="manage API users")
    usub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = usub.add_parser("add", help="create a bearer token for a user and print it")
    add.add_argument("name", metavar="NAME", help="the user name")
    add.add_argument("--db", default=None, metavar="URL", help=db_help)
    add.set_defaults(handler=_cmd_users_add)

    serve = sub.add_parser("serve", help="serve the sessions HTTP API")
    serve.add_argument("--db", default=None, metavar="URL", help=db_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any)")
    serve.add_argument(
        "--no-enforce",
        action="store_true",
        help="do not run this host's cancellation enforcer in the server "
        "(run `surefetch enforce` instead)",
    )
    serve.set_defaults(handler=_cmd_serve)

    enforce = sub.add_parser(
        "enforce",
        help="stop the processes of cancelled sessions on this host",
        description="Runs this host's cancellation enforcer in the foreground: the process "
        "of each session whose cancellation was requested gets SIGTERM, then SIGKILL after "
        "--grace, and the session is marked cancelled. Supervised jobs are left to their "
        "supervisor. SIGTERM (exit 0) or SIGINT (exit 130) stops it.",
    )
    enforce.add_argument("--db", default=None, metavar="URL", help=db_help)
    enforce.add_argument(
        "--host-id", default=None, metavar="ID", help="default $SUREFETCH_HOST_ID, else hostname"
    )
    enforce.add_argument(
        "--interval", type=_seconds, default=0.2, metavar="S", help="time between polls (0.2)"
    )
    enforce.add_argument(
        "--grace", type=float, default=5.0, metavar="S", help="time from SIGTERM to SIGKILL (5)"
    )
    enforce.set_defaults(handler=_cmd_enforce)


def _open_store(url: str | None) -> Any:
    from surefetch.store import SessionStore

    return SessionStore(url)


def _cmd_sessions(args: argparse.Namespace) -> int:
    import getpass

    from surefetch.errors import NotOwner, SessionNotFound

    user: str = args.user if args.user is not None else getpass.getuser()
    try:
        store = _open_store(args.db)
    except ValueError as exc:
        return _fail(f"{exc}", EXIT_USAGE)
    except SurefetchError as exc:
        return _fail(str(exc))
    try:
        if args.action == "list":
            found = store.list(user, status=args.status, limit=_history_limit(args))
            if args.json:
                print(json.dumps({"sessions": [_shown(s.to_dict()) for s in found]}))
            else:
                _print_session_table(found)
            return EXIT_OK
        if args.action == "show":
            session = store.get(args.id, user)
            if args.json:
                print(json.dumps(_shown(session.to_dict())))
            else:
                for key, value in _shown(session.to_dict()).items():
                    shown = json.dumps(value) if key == "metadata" else value
                    print(f"{key + ':':21}{'' if shown is None else shown}")
            return EXIT_OK
        changed = store.request_cancel(args.id, user)
        session = store.get(args.id, user)
        if args.json:
            shown = _shown(session.to_dict())
            print(json.dumps({"id": session.id, "changed": changed, "session": shown}))
        else:
            print(_cancel_message(session, changed, store))
        return EXIT_OK
    except SessionNotFound:
        return _fail(
            f"no session {args.id} for user {user}; see your sessions with "
            "`surefetch sessions list` (or pass --user/--db)"
        )
    except NotOwner:
        return _fail(
            f"session {args.id} belongs to another user, not {user}; you can only see and "
            "cancel your own sessions"
        )
    except (TypeError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SurefetchError as exc:
        return _fail(str(exc))
    finally:
        store.close()


def _shown(record: dict[str, Any]) -> dict[str, Any]:
    """A session or job as printed: the URLs in its title, metadata, spec and error
    without their passwords (the store keeps them: a job needs them to run)."""
    shown = dict(record)
    for key in ("title", "error"):
        if isinstance(shown.get(key), str):
            shown[key] = redact_urls(shown[key])
    for key in ("metadata", "spec"):
        inner = shown.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("url"), str):
            shown[key] = {**inner, "url": redact_url(inner["url"])}
    return shown


def _print_session_table(found: Sequence[Any]) -> None:
    if not found:
        print("no sessions", file=sys.stderr)
        return
    print(f"{'ID':32}  {'STATUS':9}  {'UI':12}  {'CANCEL':9}  {'CREATED':20}  TITLE")
    for s in found:
        created = s.created_at.strftime("%Y-%m-%d %H:%M:%SZ")
        title = redact_urls(s.title).replace("\n", " ")
        print(
            f"{s.id:32}  {s.status:9}  {s.ui_status:12}  {s.cancellation_status:9}  "
            f"{created:20}  {title}"
        )


def _cancel_message(session: Any, changed: bool, store: Any) -> str:
    """What a cancellation request will do: who stops the session's process, if any."""
    from surefetch.store import JobQueue

    requested = f"cancellation of session {session.id} requested"
    job = JobQueue(store).get(session.id) if changed else None
    if job is not None and job.host is not None:
        return f"{requested}; it is a job: the supervisor on host {job.host} stops it"
    if job is not None:
        return (
            f"{requested}; it is a queued job: it will not start, a supervisor marks it cancelled"
        )
    if changed and session.pid is not None:
        return (
            f"{requested}; the enforcer on host {session.host} (`surefetch enforce` or "
            f"`surefetch serve`) stops pid {session.pid}"
        )
    if changed:
        return (
            f"{requested}; it has no process and will not start (a process that attaches to "
            "it is refused, and the session marked cancelled)"
        )
    if session.cancellation_status == "requested":
        return (
            f"cancellation of session {session.id} was already requested by {session.cancelled_by}"
        )
    if session.status == "cancelled":
        return f"session {session.id} is already cancelled"
    return f"session {session.id} already finished ({session.status}); nothing to cancel"


def _cmd_users_add(args: argparse.Namespace) -> int:
    try:
        store = _open_store(args.db)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SurefetchError as exc:
        return _fail(str(exc))
    try:
        token = store.add_user(args.name)
    except (TypeError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SurefetchError as exc:
        return _fail(str(exc))
    finally:
        store.close()
    print(token)
    print(
        f"token for user {args.name} created; it is shown only this once: send it as "
        "`Authorization: Bearer TOKEN`",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import socket

    try:
        from surefetch.server import serve
    except ImportError as exc:
        return _fail(
            f"the HTTP API needs fastapi and uvicorn ({exc}): pip install 'surefetch[server]'"
        )
    if not 0 <= args.port <= 65535:
        return _fail(f"--port must be between 0 and 65535, not {args.port}", EXIT_USAGE)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        return _fail(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
            "pick another --port or --host"
        )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    enforcing = "" if args.no_enforce else "; this host's cancellation enforcer runs in it"
    print(
        f"serving the sessions API on http://{shown}:{port} (Ctrl+C stops){enforcing}",
        file=sys.stderr,
    )
    sys.stderr.flush()
    try:
        serve(args.db, host, port, sock=sock, enforce=not args.no_enforce)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SurefetchError as exc:
        return _fail(str(exc))
    finally:
        sock.close()
    return EXIT_OK


def _cmd_enforce(args: argparse.Namespace) -> int:
    import logging

    from surefetch.store import CancellationEnforcer

    try:
        store = _open_store(args.db)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SurefetchError as exc:
        return _fail(str(exc))
    try:
        enforcer = CancellationEnforcer(
            store, host=args.host_id, interval=args.interval, grace=args.grace
        )
    except ValueError as exc:
        store.close()
        return _fail(str(exc), EXIT_USAGE)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("surefetch enforce: %(message)s"))
    logger = logging.getLogger("surefetch")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    code = EXIT_OK

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal code
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_OK
        enforcer.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(
        f"surefetch enforce: stopping the cancelled sessions of host {enforcer.host} "
        f"({store.db.describe()}); SIGTERM or Ctrl+C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        enforcer.run()
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
        store.close()
    return code


# --- supervise, ctl ------------------------------------------------------------


def _add_supervisor_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Registers `supervise` and `ctl`."""
    sup = sub.add_parser(
        "supervise",
        help="run jobs in worker processes, restarting the ones that die",
        description="Owns worker processes and a Unix control socket (mode 0600); "
        "`surefetch ctl` talks to it. SIGTERM, SIGINT or `ctl shutdown` stop it cleanly.",
    )
    sup.add_argument("--socket", required=True, metavar="PATH", help="the control socket")
    sup.add_argument("--workers", type=_positive_int, default=2, metavar="N")
    sup.add_argument(
        "--jobs-per-worker", type=_positive_int, default=4, metavar="N", help="default 4"
    )
    sup.add_argument("--db", default=None, metavar="URL", help="session store URL")
    sup.add_argument(
        "--host-id", default=None, metavar="ID", help="default $SUREFETCH_HOST_ID, else hostname"
    )
    timing = sup.add_argument_group("timing (seconds)")
    for flag, default, text in (
        ("--backoff-initial", 0.5, "first restart delay"),
        ("--backoff-cap", 30.0, "longest restart delay"),
        ("--stable-after", 10.0, "uptime after which the backoff resets"),
        ("--degraded-window", 60.0, "window in which --degraded-after failures degrade"),
        ("--start-timeout", 10.0, "time a new worker has to answer the handshake"),
        ("--heartbeat-interval", 1.0, "time between heartbeats"),
        ("--heartbeat-timeout", 5.0, "silence after which a worker counts as hung"),
        ("--cancel-grace", 5.0, "time a worker has to stop a cancelled job"),
        ("--stop-grace", 5.0, "time between SIGTERM and SIGKILL"),
        ("--claim-ttl", 10.0, "silence after which other hosts take this one's jobs"),
        ("--poll-interval", 0.2, "time between polls of the store"),
    ):
        timing.add_argument(flag, type=_seconds, default=default, metavar="S", help=text)
    sup.add_argument("--backoff-jitter", type=float, default=0.2, metavar="F", help="0 to 0.5")
    sup.add_argument("--degraded-after", type=_positive_int, default=5, metavar="N")
    sup.add_argument("--max-job-crashes", type=_positive_int, default=3, metavar="N")
    sup.add_argument(
        "--worker-command",
        default=None,
        metavar="CMD",
        help="how to start a worker (default: this Python with -m surefetch.worker), "
        "e.g. to wrap it in nice or taskset; the worker's options are appended",
    )
    sup.set_defaults(handler=_cmd_supervise)

    ctl = sub.add_parser("ctl", help="talk to a running supervisor")
    _add_ctl_options(ctl, None)
    csub = ctl.add_subparsers(dest="ctl_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("list-workers", "the workers: pid, state, restarts, next restart, jobs"),
        ("jobs", "your jobs, newest first: queued, running and finished"),
        ("shutdown", "stop the supervisor cleanly (jobs keep their parts)"),
    ):
        action = csub.add_parser(name, help=help_text)
        _add_ctl_options(action, argparse.SUPPRESS)
        if name == "jobs":
            action.add_argument(
                "--state",
                choices=("queued", "running", "succeeded", "failed", "cancelled"),
                help="only jobs in this state",
            )
            _add_history_limits(action, "jobs")
    cancel = csub.add_parser("cancel", help="cancel one of your jobs")
    cancel.add_argument("id", metavar="ID")
    _add_ctl_options(cancel, argparse.SUPPRESS)
    submit = csub.add_parser("submit", help="queue a job; prints its id")
    ssub = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    get = ssub.add_parser("get", help="download one URL")
    get.add_argument("url", metavar="URL")
    get.add_argument("-o", "--output", default=None, metavar="PATH")
    get.add_argument("--sha256", default=None, metavar="HEX")
    sync = ssub.add_parser("sync", help="sync a manifest into a directory")
    sync.add_argument("--manifest", default="surefetch.toml", metavar="F")
    sync.add_argument("--lock", default="surefetch.lock", metavar="F")
    sync.add_argument("--dest", default=".", metavar="DIR")
    for p in (submit, get, sync):
        _add_ctl_options(p, argparse.SUPPRESS)
    ctl.set_defaults(handler=_cmd_ctl)


def _add_history_limits(parser: argparse.ArgumentParser, what: str) -> None:
    from surefetch.store.sessions import HISTORY_LIMIT

    parser.add_argument(
        "--limit",
        metavar="N",
        type=_non_negative_int,
        default=HISTORY_LIMIT,
        help=f"the newest N {what} (default {HISTORY_LIMIT})",
    )
    parser.add_argument("--all", action="store_true", help=f"every one of your {what}")


def _history_limit(args: argparse.Namespace) -> int | None:
    return None if args.all else int(args.limit)


def _add_ctl_options(parser: argparse.ArgumentParser, default: Any) -> None:
    # Accepted before and after the action; only the first parser sets the defaults.
    parser.add_argument("--socket", metavar="PATH", default=default, help="the control socket")
    parser.add_argument(
        "--json", action="store_true", default=default or False, help="print JSON on stdout"
    )


def _cmd_supervise(args: argparse.Namespace) -> int:
    import logging
    import shlex

    from surefetch.supervisor import Backoff, Supervisor, SupervisorConfig

    try:
        config = SupervisorConfig(
            socket=args.socket,
            workers=args.workers,
            jobs_per_worker=args.jobs_per_worker,
            db=args.db,
            host=args.host_id,
            backoff=Backoff(
                initial=args.backoff_initial, cap=args.backoff_cap, jitter=args.backoff_jitter
            ),
            stable_after=args.stable_after,
            degraded_after=args.degraded_after,
            degraded_window=args.degraded_window,
            start_timeout=args.start_timeout,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            cancel_grace=args.cancel_grace,
            stop_grace=args.stop_grace,
            claim_ttl=args.claim_ttl,
            poll_interval=args.poll_interval,
            max_job_crashes=args.max_job_crashes,
            worker_command=tuple(shlex.split(args.worker_command)) if args.worker_command else None,
        )
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("surefetch supervise: %(message)s"))
    logger = logging.getLogger("surefetch")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return Supervisor(config).run()
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except SurefetchError as exc:
        return _fail(str(exc))


def _ctl_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.ctl_command == "submit":
        if args.kind == "get":
            dest = os.path.abspath(args.output if args.output is not None else ".")
            spec: dict[str, Any] = {"url": args.url, "dest": dest}
            if args.sha256 is not None:
                spec["sha256"] = args.sha256
        else:
            spec = {
                "manifest": os.path.abspath(args.manifest),
                "lock": os.path.abspath(args.lock),
                "dest": os.path.abspath(args.dest),
            }
        return {"op": "submit", "kind": args.kind, "spec": spec}
    if args.ctl_command == "cancel":
        return {"op": "cancel", "id": args.id}
    if args.ctl_command == "jobs":
        return {"op": "jobs", "state": args.state, "limit": _history_limit(args)}
    return {"op": args.ctl_command}


def _cmd_ctl(args: argparse.Namespace) -> int:
    from surefetch.supervisor import request

    path = getattr(args, "socket", None) or os.environ.get("SUREFETCH_SOCKET")
    if not path:
        return _fail("ctl needs --socket PATH (or $SUREFETCH_SOCKET)", EXIT_USAGE)
    as_json = bool(getattr(args, "json", False))
    timeout = 600.0 if args.ctl_command == "shutdown" else 30.0
    try:
        reply = request(path, _ctl_request(args), timeout=timeout)
    except SurefetchError as exc:
        return _fail(str(exc))
    if not reply.get("ok"):
        return _fail(str(reply.get("error", "the supervisor refused")), int(reply.get("exit", 1)))
    reply.pop("ok", None)
    if args.ctl_command == "jobs" and args.all and isinstance(reply.get("jobs"), list):
        reply["jobs"].reverse()  # every job comes in submission order: newest first
    if isinstance(reply.get("jobs"), list):
        reply["jobs"] = [_shown(job) for job in reply["jobs"]]
    if as_json:
        _print_json(reply)
    else:
        _print_ctl_reply(args, path, reply)
    return EXIT_OK


def _print_ctl_reply(args: argparse.Namespace, path: str, reply: dict[str, Any]) -> None:
    command = args.ctl_command
    if command == "list-workers":
        print(f"{'ID':<5} {'KIND':<9} {'PID':>8} {'STATE':<9} {'RESTARTS':>8}  NEXT-RESTART  JOBS")
        for w in reply["workers"]:
            pid = w["pid"] if w["pid"] is not None else "-"
            restart = w["next_restart"] or "-"
            print(
                f"{w['id']:<5} {w['kind']:<9} {pid:>8} {w['state']:<9} {w['restarts']:>8}  "
                f"{restart:<12}  {len(w['jobs'])}"
            )
            if w["reason"]:
                print(f"      {w['reason']}")
    elif command == "jobs":
        print(f"{'ID':<32}  {'KIND':<4}  {'STATE':<9}  {'WORKER':<8}  WHAT")
        for job in reply["jobs"]:
            spec = job["spec"]
            what = spec.get("url") or spec.get("dest", "")
            if job.get("error"):
                what += f"  ({job['error']})"
            print(
                f"{job['id']:<32}  {job['kind']:<4}  {job['state']:<9}  "
                f"{job['worker'] or '-':<8}  {what}"
            )
    elif command == "submit":
        print(reply["id"])
    elif command == "cancel":
        if reply["changed"]:
            print(f"cancellation of job {args.id} requested")
        else:
            print(f"job {args.id}: already cancelled or finished; nothing to do")
    elif command == "shutdown":
        print(f"the supervisor on {path} stopped")


# --- entry point --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    if (args.verbose or getattr(args, "verbose_here", False)) and not quiet:
        _log_to_stderr()
    handler = args.handler
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
