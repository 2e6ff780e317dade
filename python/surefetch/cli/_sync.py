"""`surefetch sync` and `surefetch verify`: the manifest, the lockfile and the destination."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from surefetch.cli._common import (
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_OK,
    CommandError,
    add_network_options,
    json_line,
    positive_int,
    print_json,
    print_line,
    seconds,
    transfer_options,
    write_completed,
)
from surefetch.cli._progress import named_bar


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        "-j", "--jobs", metavar="N", type=positive_int, default=4, help="parallel downloads"
    )
    sync.add_argument(
        "--timeout-per-item", metavar="S", type=seconds, help="time limit for each artifact"
    )
    add_network_options(sync)
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
    sync.add_argument(
        "--offline",
        action="store_true",
        help="no network: every artifact from the cache, or fail (exit 4); also "
        "SUREFETCH_OFFLINE=1",
    )
    sync.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    sync.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sync.set_defaults(handler=_run_sync, keeps_parts=True)

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
    from surefetch.cache import Cache
    from surefetch.lockfile import sync

    show_bar = not (args.quiet or args.json) and sys.stderr.isatty()

    def on_wait(holder: str) -> None:
        if not args.quiet:
            print(f"surefetch: waiting for {holder}", file=sys.stderr, flush=True)

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
            cache=Cache(args.cache, offline=True) if args.offline else args.cache,
            link_mode=args.link_mode,
            progress=progress,
            artifact_progress=artifact_progress,
            options=transfer_options(args),
            on_wait=on_wait,
        )
    lock_note = "lockfile updated" if result.lockfile_changed else "lockfile unchanged"
    if args.json or not args.quiet:
        shown = (
            json_line(result.to_dict())
            if args.json
            else f"{len(result.installed)} installed, {len(result.unchanged)} unchanged, "
            f"{len(result.removed)} removed from the lockfile; {lock_note}; "
            f"{result.bytes_transferred} bytes transferred in {result.elapsed:.2f} s\n"
        )
        write_completed(shown, done=f"the sync completed ({lock_note})")
    return EXIT_OK


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

    bar = named_bar("")
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

    found = verify(lock=args.lock, dest=args.dest)
    code = EXIT_OK
    if found:
        code = EXIT_INTEGRITY if any(d.integrity for d in found) else EXIT_ERROR
    if args.json:
        print_json(
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
            print_line(difference)
    if found:
        raise CommandError(
            f"{len(found)} difference(s) with {args.lock}: {_what_differs(found)}; "
            "run `surefetch sync --frozen` to restore them",
            code,
        )
    if not (args.quiet or args.json):
        print_line(f"every file of {args.lock} matches in {args.dest}")
    return EXIT_OK


# What each kind of difference says of the files (`surefetch.transaction.Difference`).
_DIFFERENCE_SAYS = {
    "missing": "missing",
    "not a file": "not files",
    "size": "of another size",
    "sha256": "not matching their digests",
    "xxh3_128": "not matching their digests",
    "not executable": "not executable",
}


def _what_differs(found: list[Any]) -> str:
    """``files missing, not executable``: every kind of difference found, in one line."""
    said = dict.fromkeys(_DIFFERENCE_SAYS.get(d.kind, d.kind) for d in found)
    return "files " + ", ".join(said)
