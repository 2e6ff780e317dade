"""The command line's parser, built for one command group at a time."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest

from surefetch.cli import _GROUPS, build_parser

from support import SUREFETCH


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_each_group_registers_exactly_the_commands_it_is_listed_with() -> None:
    """The table that picks a command's group cannot drift from what the groups register."""
    everything = _commands(build_parser())
    listed = [name for names in _GROUPS.values() for name in names]
    assert sorted(listed) == sorted(everything)
    for names in _GROUPS.values():
        for name in names:
            assert _commands(build_parser(["-v", name, "--help"])) == set(names)


@pytest.mark.parametrize("argv", [[], ["--version"], ["bogus"], ["-v"], ["--", "sync", "--help"]])
def test_without_a_known_command_every_command_is_there(argv: list[str]) -> None:
    assert _commands(build_parser(argv)) == _commands(build_parser())


def test_a_one_shot_command_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    """A one-shot command changes the collector's settings while it runs
    (`_fewer_collections`); an in-process caller of `main` gets them back afterwards,
    nothing left frozen."""
    import gc

    from surefetch.cli import main

    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []
    gc.callbacks.append(lambda phase, info: seen.append(gc.get_threshold()))
    try:
        assert main(["cache", "ls", "--cache", str(tmp_path / "cache")]) == 0
        gc.collect()
    finally:
        gc.callbacks.pop()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert seen and all(threshold == before for threshold in seen)


def test_the_command_exits_at_once_with_all_it_printed_and_its_code(tmp_path: Path) -> None:
    """The console script skips Python's finalization after a one-shot command
    (`surefetch.cli.run`): what it printed to a pipe, block-buffered, still arrives whole,
    and the exit code is the command's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SUREFETCH, *args], capture_output=True, text=True, env=env, timeout=30, check=False
        )

    listed = run("cache", "ls", "--json", "--cache", str(tmp_path / "cache"))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"blobs": [], "root": str(tmp_path / "cache")}
    missing = run("verify", "--lock", str(tmp_path / "none.lock"), "--dest", str(tmp_path))
    assert missing.returncode == 1
    assert missing.stdout == "" and missing.stderr.startswith("surefetch: error: there is no lock")
    # Started with stdout or stderr closed (`>&-`): Python has no stream for it. Without
    # stderr the exit code is still the command's; without stdout a listing fails, as
    # `ls >&-` does (test_cli_output has the table).
    for closed in (1, 2):
        for args, code in (
            (("cache", "ls", "--json", "--cache", str(tmp_path / "c")), 1 if closed == 1 else 0),
            (("verify", "--lock", str(tmp_path / "none.lock")), 1),
        ):
            done = subprocess.run(
                [SUREFETCH, *args],
                stdout=subprocess.PIPE if closed == 2 else None,
                stderr=subprocess.PIPE if closed == 1 else None,
                env=env,
                timeout=30,
                check=False,
                preexec_fn=lambda fd=closed: os.close(fd),
            )
            assert done.returncode == code, (closed, args, done.stderr)
            assert b"Traceback" not in (done.stderr or b"")


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("argv", [["--help"], ["sync", "--help"], ["--version"]])
def test_help_and_version_that_cannot_be_written_say_so(argv: list[str], unbuffered: bool) -> None:
    """`--help > /dev/full`: one line that blames stdout, exit 1 (argparse swallowed the
    error and exited 0; buffered, the interpreter's own flush ended it with 120, and an
    unbuffered --version with a traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [SUREFETCH, *argv], stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=30
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "surefetch: error: cannot write to stdout: No space left on device"
    ), done.stderr
