"""The `surefetch` command line: a thin face over the library.

Exit codes (DESIGN.md): 0 success · 1 other error · 2 usage · 3 integrity ·
4 HTTP or network error after retries · 5 timeout · 130 SIGINT · 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_NETWORK = 4
EXIT_TIMEOUT = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surefetch", description="Downloads that cannot corrupt anything."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_session_commands(sub)
    return parser


# --- sessions, users, serve -------------------------------------------------


def _add_session_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `sessions`, `users` and `serve` (each sets `handler` via set_defaults)."""


# --- entry point --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
