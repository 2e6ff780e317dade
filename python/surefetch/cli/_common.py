"""What every command shares: exit codes, the one error path, SIGTERM, option types,
the shared options and JSON output.

Exit codes (DESIGN.md): 0 success · 1 other error · 2 usage · 3 integrity ·
4 HTTP or network error after retries · 5 timeout · 130 SIGINT · 143 SIGTERM.

The one error path: a handler returns its exit code on success and raises on failure,
and `run_reporting_errors` (which `main` runs every handler in) turns what it raised
into one stderr line (`error_line`, URL passwords redacted) and the exit code of
`exit_code_for`. A failure that is the command's own rather than the library's (a
usage mistake found after parsing, `verify` finding differences, a supervisor's
refusal) is a `CommandError` carrying its message and exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, TextIO

from surefetch import _log, _signals
from surefetch.errors import (
    DownloadTimeout,
    HTTPError,
    IntegrityError,
    LockfileError,
    ManifestError,
    NetworkError,
    SurefetchError,
    redact_url,
    redact_urls,
)

if TYPE_CHECKING:
    from surefetch.transfer import TransferOptions

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_NETWORK = 4
EXIT_TIMEOUT = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


VERBOSE_HELP = (
    "say what surefetch decides on stderr: retries and why, resume offsets, fall-backs, "
    "connections, lock waits"
)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", dest="verbose_here", action="store_true", help=VERBOSE_HELP
    )


# The handler `log_to_stderr` installed, and its logger (replaced when called again).
_installed_handlers: list[tuple[Any, Any]] = []


def log_to_stderr(prefix: str = "surefetch", *, verbose: bool = True) -> None:
    """Log records on stderr, one line each after `prefix` (the library itself installs
    no handler): with `verbose`, the `surefetch` logger's from INFO up (its decisions);
    else only the warnings of `surefetch.cache`, which concern the cache's own files
    (an unusable catalog). Set up when the first such record comes (`_log`)."""
    _log.when_listened(
        lambda: _install_stderr_handler(prefix, verbose), _log.INFO if verbose else _log.WARNING
    )


def _install_stderr_handler(prefix: str, verbose: bool) -> None:
    import logging

    while _installed_handlers:  # one line per record, with the latest prefix
        logger, handler = _installed_handlers.pop()
        logger.removeHandler(handler)
    logger = logging.getLogger("surefetch" if verbose else "surefetch.cache")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.addHandler(handler)
    _installed_handlers.append((logger, handler))
    if verbose:
        logger.setLevel(logging.INFO)


class CommandError(Exception):
    """A command failed in a way of its own: `message` is its stderr line, `exit_code`
    its exit code (DESIGN.md's codes)."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM arrived; raised from the signal handler like KeyboardInterrupt for SIGINT."""


_keep_handlers_at_exit = False


def keep_signal_handlers_at_exit() -> None:
    """For the console script, whose process ends right after the command: the handlers
    of `_signals_until_complete` stay, so that a signal during the exit that follows a
    completed command is noted, not raised (a traceback, or exit 130 with the work done)."""
    global _keep_handlers_at_exit
    _keep_handlers_at_exit = True


@contextmanager
def _signals_until_complete(defer: bool) -> Iterator[list[int]]:
    """SIGINT raises KeyboardInterrupt and SIGTERM `Terminated`; with `defer` (a command
    that downloads), only until its work is complete (`surefetch._signals.completed`: a
    sync's install done, a download returned): a signal after that is only noted in the
    list yielded, since the work is done and an exit code other than 0 would say that
    nothing changed (DESIGN.md)."""
    late: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if defer and _signals.completed() is not None:
            late.append(signum)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated()

    _signals.mark_completed(None)
    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield late
    finally:
        if not _keep_handlers_at_exit:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception (DESIGN.md)."""
    if isinstance(exc, CommandError):
        return exc.exit_code
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


PARTS_KEPT = "run the same command again: downloads that can resume continue from their part files"
"""What to do after an interrupted command that downloads, said after "interrupted" or
"terminated" when the engine did not say what it kept (a batch, a sync)."""

_NOTHING_KEPT = "nothing of the download was kept: the same command starts over"
"""Said when the engine removed the part (a small body, no validator, nothing received)."""

_KEPT = "surefetch_kept"
"""The attribute the engine sets on the exception that stopped one download: its note of
what the part file keeps, or None when it keeps nothing (``KEPT_ATTRIBUTE`` in
``rust/bindings.rs``)."""


def error_line(exc: BaseException, *, keeps_parts: bool = True) -> str:
    """What happened, in one line (without the ``surefetch: error:`` prefix); a signal's
    line tells a command that downloads (`keeps_parts`) how to continue."""
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated"
        if not keeps_parts:
            return what
        if hasattr(exc, _KEPT):  # one download, and the engine said what it kept
            kept = getattr(exc, _KEPT) or _NOTHING_KEPT
            return f"{what}; {kept}"
        return f"{what}; {PARTS_KEPT}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _fail(message: str, code: int) -> int:
    """Prints the one stderr line of a failed command (never a URL's password) and
    returns its exit code."""
    print(f"surefetch: error: {redact_urls(message)}", file=sys.stderr)
    return code


def run_reporting_errors(action: Callable[[], int], *, keeps_parts: bool = True) -> int:
    """Runs `action` with SIGTERM raising `Terminated`, and returns its exit code; turns
    the exceptions surefetch documents (and `CommandError`, SIGINT, SIGTERM) into one
    stderr line and the exit code of `exit_code_for` (a signal after the command's work
    was complete: a warning, and its exit code). Anything else is a bug: it propagates,
    with its traceback.

    Args:
        action: the command; returns its exit code.
        keeps_parts: whether the command downloads, so that an interrupted one says that
            its part file is kept.
    """
    try:
        with _signals_until_complete(defer=keeps_parts) as late:
            code = action()
        if late:
            what = "interrupted" if late[0] == signal.SIGINT else "terminated"
            print(f"surefetch: warning: {what}, but {_signals.completed()}", file=sys.stderr)
        return code
    except (CommandError, SurefetchError, ValueError, KeyboardInterrupt, Terminated) as exc:
        return _fail(error_line(exc, keeps_parts=keeps_parts), exit_code_for(exc))


def json_line(obj: Any) -> str:
    """`obj` as one line of JSON (keys sorted), with its newline."""
    import json  # only for --json (~1 ms of every start otherwise)

    return json.dumps(obj, sort_keys=True) + "\n"


def print_json(obj: Any, *, flush: bool = False) -> None:
    """`obj` as one line of JSON on stdout (`write_out`; flushed with `flush`)."""
    write_out(json_line(obj), flush=flush)


def write_completed(text: str, *, done: str) -> None:
    """`text` on stdout, flushed, by a command that has already changed what it was asked
    to (a file installed, a lockfile written). Its exit code stays 0 whatever happens to
    the output: a non-zero exit promises that nothing changed at the final path or in
    the lockfile (DESIGN.md). An output that cannot be written is said on stderr, as a
    warning that names what was `done`; a reader that went away (a closed pipe) is not
    told, as with any command whose reader stops reading."""
    exc = write_flushed(text)
    if exc is not None and not isinstance(exc, BrokenPipeError):
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(f"surefetch: warning: {cannot_write_stdout(exc)}; {done}\n")


def write_or_undo(text: str, undo: Callable[[], None], *, undone: str) -> None:
    """`text` on stdout, flushed, when it is the only copy of what the command made (a new
    token): when it cannot be written, or nobody reads it, `undo` is called and the
    command fails, saying `undone`.

    Raises:
        CommandError: the output could not be written (after `undo`).
    """
    exc = write_flushed(text)
    if exc is None:
        return
    undo()
    why = "its reader went away" if isinstance(exc, BrokenPipeError) else None
    raise CommandError(
        f"{f'cannot write to stdout: {why}' if why else cannot_write_stdout(exc)}; {undone}"
    )


def stdout() -> TextIO:
    """`sys.stdout`, for a command with something to print.

    Raises:
        OSError: EBADF, the process was started with stdout closed (`>&-`): a command
            whose output is lost fails, as `ls >&-` does (Python's `print` skips it).
    """
    if sys.stdout is None:
        raise OSError(errno.EBADF, "it is closed")
    return sys.stdout


def write_flushed(text: str) -> OSError | None:
    """Writes and flushes `text` on stdout; the error when it could not (stdout then
    discarded, so that later lines and the exit's flush do not fail again)."""
    try:
        out = stdout()
        out.write(text)
        out.flush()
    except OSError as exc:
        if sys.stdout is not None:
            discard_stdout()
        return exc
    return None


def discard_stdout() -> None:
    """Points stdout's descriptor at the null device, so that what it still buffers, and
    the interpreter's flush at exit, go nowhere instead of failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


_closed_pipe_stops = True


def stop_on_closed_pipe(stops: bool) -> None:
    """What `write_out` does when stdout's reader went away (``... | head -1``): raise
    `BrokenPipeError` so that the command stops (one that downloads: it would otherwise
    go on making files for nobody), or not (the default for commands that only report:
    the rest of the output goes nowhere and the command ends with its own exit code,
    so that ``surefetch verify | head -1`` still exits 3 on a difference)."""
    global _closed_pipe_stops
    _closed_pipe_stops = stops


def write_out(text: str, *, flush: bool = False) -> None:
    """`text` on stdout in one write (then flushed, with `flush`): a signal handled
    meanwhile never leaves half a line that the next one would continue. A closed pipe
    is `stop_on_closed_pipe`'s to decide; any other failure to write (a full disk
    behind ``>``) is the command's error, in one line.

    Raises:
        BrokenPipeError: the reader of stdout went away (`stop_on_closed_pipe`).
        CommandError: stdout cannot be written.
    """
    try:
        out = stdout()
        out.write(text)
        if flush:
            out.flush()
    except BrokenPipeError:
        if _closed_pipe_stops:
            raise
        discard_stdout()
    except OSError as exc:
        # Only the output stopped: what the command did before this line stands (a file
        # installed, a lockfile written, a job queued), and a batch does no more.
        raise stopped_by_output(exc) from None


def stopped_by_output(exc: OSError) -> CommandError:
    """The error of a command that stopped because its output could not be written."""
    # Only the output stopped: what the command did before this line stands (a file
    # installed, a lockfile written, a job queued), and a batch does no more.
    return CommandError(
        f"{cannot_write_stdout(exc)}; the command stopped there, and what it had done before stands"
    )


def print_line(*values: object) -> None:
    """`print` of `values` (one line on stdout), through `write_out`: every line a
    command prints goes through here or `print_json`.

    Raises:
        BrokenPipeError: the reader of stdout went away.
        CommandError: stdout cannot be written.
    """
    write_out(" ".join(map(str, values)) + "\n")


def cannot_write_stdout(exc: OSError) -> str:
    """What the error line of an output that could not be written starts with."""
    return f"cannot write to stdout: {exc.strerror or exc}"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f"must be a positive, finite number of seconds, not {text}"
        )
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', not {text!r}")
    return name.strip(), value.strip()


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that downloads shares: timeouts, retries, the low-speed
    limit (DESIGN.md: curl's names), headers."""
    parser.add_argument(
        "--read-timeout", metavar="S", type=seconds, default=30.0, help="idle read limit"
    )
    parser.add_argument(
        "--connect-timeout", metavar="S", type=seconds, default=30.0, help="connect limit"
    )
    parser.add_argument("--retries", metavar="N", type=non_negative_int, default=3)
    parser.add_argument(
        "--speed-limit",
        metavar="BYTES_PER_S",
        type=non_negative_int,
        default=1024,
        help="slower than this for --speed-time is a stall, retried (0: off; default 1024)",
    )
    parser.add_argument(
        "--speed-time", metavar="S", type=seconds, default=30.0, help="low-speed window"
    )
    parser.add_argument(
        "-H",
        "--header",
        metavar="'NAME: VALUE'",
        type=_header,
        action="append",
        default=[],
        help="extra request header (repeatable)",
    )
    add_verbose(parser)
    parser.add_argument(
        "--no-netrc",
        action="store_true",
        help="do not use the host's credentials from ~/.netrc ($NETRC)",
    )


def transfer_options(args: argparse.Namespace) -> TransferOptions:
    """The `TransferOptions` a command's flags set (`add_network_options`, and those of
    ``--connections``, ``--no-resume``, ``--timeout``, ``--speed-limit``/``--speed-time``
    where the command has them); the rest keep their defaults."""
    from surefetch.transfer import TransferOptions

    fields: dict[str, Any] = {
        "read_timeout": args.read_timeout,
        "connect_timeout": args.connect_timeout,
        "retries": args.retries,
        "headers": dict(args.header),
        "netrc": not args.no_netrc,
    }
    for name in ("connections", "timeout", "speed_limit", "speed_time"):
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    if hasattr(args, "no_resume"):
        fields["resume"] = not args.no_resume
    return TransferOptions(**fields)


def add_history_limits(parser: argparse.ArgumentParser, what: str) -> None:
    # The store's default is read when the command runs (`history_limit`): importing the
    # store here would cost every command its start-up.
    limits = parser.add_mutually_exclusive_group()
    limits.add_argument(
        "--limit",
        metavar="N",
        type=positive_int,
        help=f"the newest N {what} (default: as many as the HTTP API shows, 100)",
    )
    limits.add_argument("--all", action="store_true", help=f"every one of your {what}")


def history_limit(args: argparse.Namespace) -> int | None:
    """How many of the newest records to show: None for ``--all``."""
    if args.all:
        return None
    if args.limit is not None:
        return int(args.limit)
    from surefetch.store.sessions import HISTORY_LIMIT

    return HISTORY_LIMIT


def asked_limit(limit: int | None) -> int | None:
    """The limit to ask the store for: one more than shown, so that `note_more` knows
    whether more records exist."""
    return None if limit is None else limit + 1


def shown_records(records: list[Any], limit: int | None) -> list[Any]:
    """The first `limit` of `records` (asked with `asked_limit`)."""
    return records if limit is None else records[:limit]


def note_more(records: list[Any], limit: int | None, what: str) -> None:
    """Says on stderr, once the table is printed, when there were more `records` (asked
    with `asked_limit`) than the `limit` shown: a table of exactly 100 looked like all
    there was."""
    if limit is not None and len(records) > limit:
        print(
            f"surefetch: only the newest {limit} {what} are shown; --limit N shows more, "
            "--all every one",
            file=sys.stderr,
        )


def redacted(record: dict[str, Any]) -> dict[str, Any]:
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
