"""The `surefetch` command line: a thin face over the library.

One module per command group, each registering its parsers and handlers: `_get`
(get), `_cache` (fetch, cache), `_demo`, `_sync` (sync, verify), `_sessions`
(sessions, users, serve, enforce), `_supervisor` (supervise, ctl); `_common` holds
the exit codes, the error line, signals and the shared options, `_progress` the bars.

Exit codes (DESIGN.md): 0 success · 1 other error · 2 usage · 3 integrity ·
4 HTTP or network error after retries · 5 timeout · 130 SIGINT · 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable, NoReturn, cast

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

from surefetch.cli._common import (
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_NETWORK,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    VERBOSE_HELP,
    Terminated,
    cannot_write_stdout,
    discard_stdout,
    exit_code_for,
    keep_signal_handlers_at_exit,
    log_to_stderr,
    run_reporting_errors,
    stdout,
    stop_on_closed_pipe,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_NETWORK",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "Terminated",
    "build_parser",
    "exit_code_for",
    "main",
    "run",
    "run_reporting_errors",
    "version_line",
]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that says where to look, exit code 2; help in
    `_Formatter`'s width."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        """As argparse's, but a failure to write is not swallowed: `main` reports it
        (stdout closed, too: argparse printed the help on stderr then)."""
        (file or stdout()).write(self.format_help())

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """argparse's help, as wide as `shutil.get_terminal_size` says (``$COLUMNS``, else
    the terminal's, else 80), found without importing `shutil`: argparse makes a
    formatter for every argument it adds, and `shutil` costs ~1.5 ms of every start."""

    def __init__(self, prog: str, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("width") is None and len(args) < 3:
            kwargs["width"] = _columns() - 2  # argparse's own margin
        super().__init__(prog, *args, **kwargs)


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


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
        stdout().write(f"{version_line()}\n")
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


# The command groups, and the commands each registers (`_command_group`).
# Modules by name: only the group of the command given is imported.
_GROUPS = {
    "surefetch.cli._get": ("get",),
    "surefetch.cli._cache": ("fetch", "cache"),
    "surefetch.cli._demo": ("demo",),
    "surefetch.cli._sync": ("sync", "verify"),
    "surefetch.cli._sessions": ("sessions", "users", "serve", "enforce"),
    "surefetch.cli._supervisor": ("supervise", "ctl"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given the `argv` to parse, only that of its command
    group when it names one (building all the others costs several milliseconds at
    every start)."""
    parser = _Parser(prog="surefetch", description="Downloads that cannot corrupt anything.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("-V", "--version", action=_VersionAction, help="print the version and exit")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )
    group = _command_group(argv) if argv is not None else None
    for module in _GROUPS if group is None else (group,):
        importlib.import_module(module).add_commands(sub)
    return parser


# Commands that run until stopped: they keep the garbage collector's defaults.
_LONG_RUNNING = frozenset({"serve", "enforce", "supervise"})


@contextlib.contextmanager
def _fewer_collections(one_shot: bool) -> Iterator[None]:
    """For a one-shot command, the cyclic garbage collector runs far less often: a batch
    creates many objects and few cycles (a sync of 10,000 files spent 0.14 s in 660
    collections, 0.06 s in 28 so), and the objects of the imports, never garbage, are
    left out of every collection (`gc.freeze`). Restored on the way out."""
    if not one_shot:
        yield
        return
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(_ONE_SHOT_GEN0, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


# Allocations (net) between two collections of the youngest generation (default 700).
_ONE_SHOT_GEN0 = 50_000


def _command_group(argv: Sequence[str]) -> str | None:
    """The name of the module of the command `argv` names, or None (no command, or an
    unknown one: the full parser then says what there is)."""
    word = _command_word(argv)
    return next((module for module, names in _GROUPS.items() if word in names), None)


def _command_word(argv: Sequence[str]) -> str | None:
    """The first word of `argv` that is not an option (None before a ``--``: what follows
    is no command)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def run() -> NoReturn:
    """The console script (and ``python -m surefetch``): `main`, then the exit.

    A one-shot command exits as soon as stdout and stderr are flushed, without Python's
    finalization: freeing every object of the process one by one took ~10 ms after a
    200-file sync, a tenth of it. Every file surefetch writes is closed (and fsynced)
    before `main` returns, so nothing is left for finalization to do. A long-running
    command (serve, enforce, supervise) exits as usual.
    """
    keep_signal_handlers_at_exit()  # the process ends right after the command
    try:
        code = main()
    except SystemExit as exc:  # argparse after --help, --version or a usage error
        code = (
            exc.code if isinstance(exc.code, int) else EXIT_OK if exc.code is None else EXIT_ERROR
        )
    if _command_word(sys.argv[1:]) in _LONG_RUNNING:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed: nothing was printed
            continue
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # the reader took what it wanted (`cache ls | head -1`): the code stands
        except (OSError, ValueError) as exc:  # a full disk behind `>`...
            if stream is sys.stdout and code == EXIT_OK:
                code = EXIT_ERROR  # what was printed did not all arrive
                if isinstance(exc, OSError):
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        what = cannot_write_stdout(exc)
                        sys.stderr.write(f"surefetch: error: {what}; the command had finished\n")
                        sys.stderr.flush()
    os._exit(code)


def _fill_closed_standard_descriptors() -> None:
    """For a process started with stdin, stdout or stderr closed (`>&-`): puts the null
    device at that descriptor, so that no file surefetch opens (a part file, the
    catalog) gets it and receives what is meant for it; stdin then reads nothing, and
    what was meant for stderr goes nowhere, as asked. `sys.stdout` stays None: a command
    with something to print says that it could not (`write_out`)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
    if sys.stdin is None:  # `-i -` then reads nothing, as from /dev/null
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 (for the process)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the process)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command `argv` (default: ``sys.argv[1:]``) and returns its exit code.

    Every handler runs in `run_reporting_errors`: the one error path (see `_common`).
    """
    words = sys.argv[1:] if argv is None else argv
    _fill_closed_standard_descriptors()
    try:
        args = build_parser(words).parse_args(words)
    except BrokenPipeError:  # `--help | head -1`: the reader took what it wanted
        discard_stdout()
        return EXIT_OK
    except OSError as exc:  # writing --help, --version or a usage error (unbuffered)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(f"surefetch: error: {cannot_write_stdout(exc)}\n")
        return EXIT_ERROR
    quiet = getattr(args, "quiet", False)
    log_to_stderr(verbose=(args.verbose or getattr(args, "verbose_here", False)) and not quiet)
    handler: Callable[[argparse.Namespace], int] = args.handler
    keeps_parts = getattr(args, "keeps_parts", False)
    stop_on_closed_pipe(keeps_parts)
    try:
        with _fewer_collections(args.command not in _LONG_RUNNING):
            return run_reporting_errors(lambda: handler(args), keeps_parts=keeps_parts)
    except BrokenPipeError:
        # The reader of a command that downloads went away (`surefetch get A B --json |
        # head -1`): stop, say so (what had not finished was not made), and keep Python
        # from complaining again when it flushes stdout at exit.
        discard_stdout()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            print(
                "surefetch: error: stdout's reader went away (a closed pipe): stopped; "
                "the downloads that had not finished were not made",
                file=sys.stderr,
            )
        return EXIT_ERROR
