"""`surefetch demo`: sample downloads from a local server."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="download sample artifacts from a local server, with verification (no internet)",
    )
    demo.add_argument("--dir", metavar="DIR", help="keep the downloads here (default: a temp dir)")
    demo.set_defaults(handler=_run_demo, keeps_parts=True)


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from surefetch.demo import run_demo

    return run_demo(Path(args.dir) if args.dir else None)
