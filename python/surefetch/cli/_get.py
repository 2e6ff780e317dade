"""`surefetch get`: one URL to a file, or several into a directory."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import Any, Callable

from surefetch._signals import mark_completed
from surefetch.cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Terminated,
    add_network_options,
    cannot_write_stdout,
    error_line,
    exit_code_for,
    json_line,
    non_negative_int,
    positive_int,
    print_json,
    seconds,
    stopped_by_output,
    transfer_options,
    write_completed,
    write_flushed,
)
from surefetch.cli._progress import batch_progress_bar, progress_bar
from surefetch.errors import Cancelled, redact_url, redact_urls


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        "-j", "--jobs", metavar="N", type=positive_int, default=8, help="downloads at once"
    )
    get.add_argument("--sha256", metavar="HEX", help="expected SHA-256")
    get.add_argument("--xxh3", metavar="HEX", help="expected XXH3-128 (as xxhsum -H2 prints)")
    get.add_argument("--size", metavar="N", type=non_negative_int, help="expected size in bytes")
    get.add_argument(
        "-c", "--connections", metavar="N", type=positive_int, help="parallel connections"
    )
    get.add_argument("--no-resume", action="store_true", help="discard any part file")
    get.add_argument("--no-fsync", action="store_true", help="skip fsync (rebuildable caches)")
    get.add_argument("--no-sha256", action="store_true", help="compute only XXH3-128")
    get.add_argument("--timeout", metavar="S", type=seconds, help="overall time limit")
    add_network_options(get)
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
    get.set_defaults(handler=_run_get, keeps_parts=True)


def _run_get(args: argparse.Namespace) -> int:
    from surefetch.download import download

    if args.input_file is not None or len(args.url) != 1:
        return _run_get_many(args)

    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    with progress_bar(show_bar, _shown_name(args.url[0], args.output)) as progress:
        result = download(
            args.url[0],
            args.output,
            sha256=args.sha256,
            xxh3_128=args.xxh3,
            size=args.size,
            durable=not args.no_fsync,
            progress=progress,
            options=transfer_options(args),
            **_file_options(args),
        )
    done = f"{result.path} was downloaded and verified"
    mark_completed(done)  # a signal from now on cannot undo it: the command ends with 0
    if args.json or not args.quiet:
        shown = json_line(result.to_dict()) if args.json else f"{result.path}\n"
        write_completed(shown, done=done)
    return EXIT_OK


def _run_get_many(args: argparse.Namespace) -> int:
    from surefetch.download import (
        CancelToken,
        DownloadItem,
        DownloadResult,
        download_many,
        parse_items,
    )

    for flag, value in (("--sha256", args.sha256), ("--xxh3", args.xxh3), ("--size", args.size)):
        if value is not None:
            raise CommandError(
                f"{flag} names one file: with several URLs give it per item in -i FILE", EXIT_USAGE
            )
    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    items: list[str | DownloadItem] = list(args.url)
    if args.input_file is not None:
        items += _read_items(args.input_file, parse_items)
    if not items:
        raise CommandError("no URL given: name some, or -i FILE", EXIT_USAGE)
    if args.output is not None and os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise CommandError(
            f"-o {args.output} is a file: with several URLs -o names a directory", EXIT_USAGE
        )
    worst = EXIT_OK
    cancelled: dict[int, Exception] = {}  # items a signal (or a lost output) stopped
    output_lost: list[OSError] = []  # why an item's line could not be written
    reported: set[int] = set()  # the items whose line is written
    stop = CancelToken()  # cancelled when the output is lost: its files would be for nobody

    def shown_url(index: int) -> str:
        item = items[index]
        return redact_url(item if isinstance(item, str) else item.url)

    def report(index: int, result: DownloadResult | Exception) -> None:
        if isinstance(result, Cancelled):  # a signal, or a lost output, cancelled the batch
            cancelled[index] = result
        else:
            say(index, result)

    def say(index: int, result: DownloadResult | Exception) -> None:
        nonlocal worst
        reported.add(index)  # before writing: a signal during the write must not repeat it
        url = shown_url(index)
        text = None
        if isinstance(result, DownloadResult):
            if args.json:
                text = json_line({"url": url, **result.to_dict()})
            elif not args.quiet:
                text = f"{result.path}\n"
        else:
            code = exit_code_for(result)
            worst = max(worst, code)
            line = redact_urls(error_line(result))
            if args.json:
                text = json_line({"url": url, "error": line, "exit_code": code})
            else:
                print(f"surefetch: {url}: {line}", file=sys.stderr)
        if text is None or output_lost:  # (nobody reads what follows a lost line)
            return
        lost = write_flushed(text)  # as each item ends
        if lost is not None:
            output_lost.append(lost)
            stop.cancel()  # the engine still reports how each item ended

    try:
        with batch_progress_bar(show_bar) as progress:
            download_many(
                items,
                args.output or ".",
                jobs=args.jobs,
                durable=not args.no_fsync,
                progress=progress,
                on_result=report,
                cancel=stop,
                options=transfer_options(args),
                **_file_options(args),
            )
    except (KeyboardInterrupt, Terminated) as stopped:
        # The engine handed over how every item that had started ended (installed ones
        # are reported above): each stopped one says what its part keeps; with --json,
        # the ones that never started get their line too.
        what = error_line(stopped, keeps_parts=False)  # "interrupted" or "terminated"
        for index in sorted(set(range(len(items))) - reported):
            url = shown_url(index)
            stopped_item = cancelled.get(index)
            if stopped_item is not None:
                text = f"{what}: {redact_urls(error_line(stopped_item))}"
            elif args.json:
                text = f"{what} before it started: nothing of it was written"
            else:
                continue
            if args.json:
                print_json({"url": url, "error": text, "exit_code": exit_code_for(stopped)})
            else:
                print(f"surefetch: {url}: {text}", file=sys.stderr)
        raise
    if output_lost:
        return _after_lost_output(output_lost[0], bool(cancelled), worst)
    mark_completed("every item had ended")  # (as reported): a signal cannot undo that
    for index in sorted(cancelled):  # none without a signal; said as any other failure
        say(index, cancelled[index])
    return worst


def _after_lost_output(lost: OSError, left_undone: bool, worst: int) -> int:
    """The end of a batch whose output could not be written (it was cancelled then): a
    failure when items were left undone; else every item ended as reported, and their
    exit code stands, with a warning (none for a reader that went away).

    Raises:
        BrokenPipeError: stdout's reader went away, items left undone (`main` says so).
        CommandError: the output failed otherwise, items left undone.
    """
    if left_undone:
        raise lost if isinstance(lost, BrokenPipeError) else stopped_by_output(lost)
    mark_completed("every item had ended")
    if not isinstance(lost, BrokenPipeError):
        what = cannot_write_stdout(lost)
        print(f"surefetch: warning: {what}; every item ended", file=sys.stderr)
    return worst


def _file_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `get` does with each file besides transferring it, as `download`'s keywords."""
    return {
        "compute_sha256": not args.no_sha256,
        "executable": args.executable,
        "content_disposition": args.content_disposition,
    }


def _read_items(source: str, parse: Callable[[Iterable[str], str], list[Any]]) -> list[Any]:
    if source == "-":
        return parse(sys.stdin, "-i -")
    try:
        with open(source, encoding="utf-8") as lines:
            return parse(lines, source)
    except OSError as exc:
        raise ValueError(f"cannot read {source}: {exc.strerror}") from exc


def _shown_name(url: str, output: str | None) -> str:
    """The name of the file `get` writes: -o's, or the URL's (the server's, with
    --content-disposition, is known only once it answers)."""
    from surefetch.download import name_from_url

    if output and not output.endswith(("/", os.sep)) and not os.path.isdir(output):
        return os.path.basename(output)
    return name_from_url(url)
