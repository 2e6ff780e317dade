"""What a command's exit code says when its stdout cannot take what it prints: a full
disk behind ``>`` (``/dev/full``) or a reader that went away (a closed pipe), for the
commands that change files and for those that only report.

The rule (DESIGN.md): a non-zero exit means nothing changed at the final path or in the
lockfile. So a command that has installed what it was asked to exits 0 whatever happens
to its output, and says on stderr (a full disk) what it did; a command that only reports
ends with its own exit code when the reader left (``verify | head -1`` still exits 3), and
exit 1 with one line when the output hit a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tomli_w

from surefetch.testing import FaultServer

from support import SUREFETCH, payload, restore_default_signals, run_cli

BODY = payload(5000, 7)


@contextmanager
def _full_disk() -> Iterator[int]:
    with open("/dev/full", "wb") as full:
        yield full.fileno()


@contextmanager
def _closed_pipe() -> Iterator[int]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)


CLOSED = -1
"""Started with no stdout at all (`>&-`)."""


@contextmanager
def _closed() -> Iterator[int]:
    yield CLOSED


OUTPUTS: dict[str, Callable[[], contextlib.AbstractContextManager[int]]] = {
    "full disk": _full_disk,
    "closed pipe": _closed_pipe,
    "closed": _closed,
}


def _close_stdout() -> None:
    restore_default_signals()
    os.close(1)


def _run(args: list[str], stdout: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SUREFETCH, *args],
        cwd=cwd,
        stdout=None if stdout == CLOSED else stdout,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=30,
        preexec_fn=_close_stdout if stdout == CLOSED else restore_default_signals,
    )


def _sync_args(root: Path) -> list[str]:
    return ["sync", "--manifest", str(root / "surefetch.toml"), "--lock", str(root / "l"),
            "--dest", str(root / "d"), "--cache", str(root / "c")]  # fmt: skip


def _installing(command: str, url: str, tmp_path: Path, target: Path) -> list[str]:
    """The arguments of `get`, `fetch -o` or `sync` that install `url` at `target`."""
    if command == "sync":
        (tmp_path / "surefetch.toml").write_text(
            tomli_w.dumps({"artifact": [{"name": target.name, "url": url}]})
        )
        return _sync_args(tmp_path)
    if command == "get":
        return ["get", url, "-o", str(target)]
    return ["fetch", url, "--cache", str(tmp_path / "c"), "-o", str(target)]


@pytest.fixture
def url(server: FaultServer) -> str:
    return server.add("a.bin", BODY)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
@pytest.mark.parametrize("command", ["get", "fetch -o", "sync"])
def test_a_command_that_installed_exits_0_when_its_output_is_lost(
    url: str, tmp_path: Path, command: str, json_flag: list[str], output: str
) -> None:
    target = tmp_path / "d" / "a.bin"
    args = _installing(command, url, tmp_path, target)
    with OUTPUTS[output]() as stdout:
        done = _run([*args, *json_flag], stdout, tmp_path)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == BODY
    if command == "sync":
        assert (tmp_path / "l").exists()
    if output == "closed pipe":  # the reader left: nobody to tell
        assert done.stderr == "", done.stderr
    else:
        (line,) = done.stderr.splitlines()
        why = "it is closed" if output == "closed" else "No space left on device"
        assert line.startswith(f"surefetch: warning: cannot write to stdout: {why}"), line
        assert ("the sync completed" if command == "sync" else str(target)) in line, line


@pytest.mark.parametrize("output", OUTPUTS)
def test_a_report_read_by_nobody_keeps_its_verdict(url: str, tmp_path: Path, output: str) -> None:
    """`verify | head -1` on a damaged file still exits 3 (the verdict is the exit code);
    `verify > /dev/full` and `verify >&-` exit 1 with one line, as `ls` fails then."""
    (tmp_path / "surefetch.toml").write_text(
        tomli_w.dumps({"artifact": [{"name": "a.bin", "url": url}]})
    )
    assert run_cli(_sync_args(tmp_path)).returncode == 0
    (tmp_path / "d" / "a.bin").write_bytes(b"x" * len(BODY))
    verify = ["verify", "--lock", str(tmp_path / "l"), "--dest", str(tmp_path / "d")]
    with OUTPUTS[output]() as stdout:
        done = _run(verify, stdout, tmp_path)
    if output == "closed pipe":
        assert done.returncode == 3, done.stderr
    else:
        assert done.returncode == 1, done.stderr
        (line,) = done.stderr.splitlines()
        why = "it is closed" if output == "closed" else "No space left on device"
        assert f"cannot write to stdout: {why}" in line, line


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["cache", "ls"], ["cache", "ls", "--json"]]
)
def test_a_reader_that_took_what_it_wanted_is_a_success(
    url: str, tmp_path: Path, args: list[str]
) -> None:
    """`surefetch --help | head -1`, `cache ls | head -1`: exit 0, nothing on stderr."""
    if args[0] == "cache":
        args = [*args, "--cache", str(tmp_path / "c")]
        assert run_cli(["fetch", url, "--cache", str(tmp_path / "c"), "-q"]).returncode == 0
    with _closed_pipe() as stdout:
        done = _run(args, stdout, tmp_path)
    assert (done.returncode, done.stderr) == (0, "")


def _close_stderr() -> None:
    restore_default_signals()
    os.close(2)


@pytest.mark.parametrize("command", ["get", "fetch -o", "sync", "get (fails)"])
def test_a_command_started_without_stderr_works_and_keeps_stdout_clean(
    url: str, tmp_path: Path, command: str
) -> None:
    """`2>&-` (a cron job's habit): the command runs as usual (a progress-bar check on the
    missing stderr made it fail with exit 1, having done nothing), its messages go
    nowhere rather than onto stdout, and no file it opens takes descriptor 2."""
    target = tmp_path / "d" / "a.bin"
    failing = command == "get (fails)"
    args = _installing("get" if failing else command, url, tmp_path, target)
    if failing:
        args[1] = "http://127.0.0.1:1/a.bin"
    done = subprocess.run(
        [SUREFETCH, *args, "--json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=30,
        preexec_fn=_close_stderr,
    )
    if command == "get (fails)":
        assert (done.returncode, done.stdout) == (4, "")
        assert not target.exists()
        return
    assert done.returncode == 0
    assert target.read_bytes() == BODY
    assert json.loads(done.stdout)  # one object, and nothing else on stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sync", "--help"]])
def test_help_into_a_closed_stdout_fails_as_ls_does(tmp_path: Path, args: list[str]) -> None:
    """`surefetch --help >&-` exited 0, argparse having written the help on stderr."""
    with _closed() as stdout:
        done = _run(args, stdout, tmp_path)
    assert done.returncode == 1
    assert done.stderr == "surefetch: error: cannot write to stdout: it is closed\n"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("command", ["gc", "clean", "verify"])
def test_cache_maintenance_that_changed_the_cache_keeps_its_exit_code(
    url: str, tmp_path: Path, command: str, output: str
) -> None:
    """`cache gc`, `clean` and `verify` change the cache (evict, remove, quarantine): their
    exit code says what they found, whatever happens to the report (they exited 1, and
    verify's line saying where a damaged blob went was replaced by the write error)."""
    cache = tmp_path / "c"
    fetched = run_cli(["fetch", url, "--cache", str(cache)])
    assert fetched.returncode == 0, fetched.stderr
    blob = Path(fetched.stdout.strip())
    args = {
        "gc": ["gc", "--max-size", "0"],
        "clean": ["clean", "--older-than", "0"],
        "verify": ["verify"],
    }[command]
    if command == "verify":
        blob.chmod(0o644)
        blob.write_bytes(b"damaged")
    with OUTPUTS[output]() as stdout:
        done = _run(["cache", *args, "--cache", str(cache), "--json"], stdout, tmp_path)
    lines = done.stderr.splitlines()
    if command == "verify":
        assert done.returncode == 3, done.stderr
        assert "moved to" in lines[-1] and str(cache / "quarantine") in lines[-1], lines
        lines = lines[:-1]
    else:
        assert done.returncode == 0, done.stderr
    if command != "clean":
        assert not blob.exists()
    if output == "closed pipe":
        assert lines == []
    else:
        (line,) = lines
        assert line.startswith("surefetch: warning: cannot write to stdout"), line


@pytest.mark.parametrize("output", OUTPUTS)
def test_a_token_nobody_could_read_is_revoked(tmp_path: Path, output: str) -> None:
    """`users add NAME > /dev/full` left a live token nobody had seen: the output is its
    only copy, so it is revoked, and the command fails saying so."""
    from surefetch.sessions import SessionStore

    db = f"sqlite:///{tmp_path / 's.db'}"
    with OUTPUTS[output]() as stdout:
        done = _run(["users", "add", "alice", "--db", db], stdout, tmp_path)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("surefetch: error: cannot write to stdout"), line
    assert "the token was revoked" in line, line
    with SessionStore(db) as store, store.db.connection() as conn:
        (count,) = store.db.execute(conn, "SELECT count(*) FROM tokens").fetchone()
    assert count == 0
    shown = run_cli(["users", "add", "alice", "--db", db])
    assert shown.returncode == 0 and shown.stdout.strip()


@pytest.mark.parametrize("output", ["full disk", "closed"])
def test_a_cancel_request_made_keeps_exit_0(tmp_path: Path, output: str) -> None:
    from surefetch.sessions import SessionStore

    db = f"sqlite:///{tmp_path / 's.db'}"
    with SessionStore(db) as store:
        session = store.create("alice", "t")
    with OUTPUTS[output]() as stdout:
        done = _run(["sessions", "cancel", session.id, "--db", db, "--user", "alice"], stdout,
                    tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.endswith(f"session {session.id}: its cancellation was requested"), line
    with SessionStore(db) as store:
        assert store.get(session.id, "alice").cancellation_status == "requested"


def _close_stdin() -> None:
    restore_default_signals()
    os.close(0)


def test_a_list_from_a_closed_stdin_is_empty(tmp_path: Path) -> None:
    """`get -i - <&-` ended with a traceback (no `sys.stdin`); it reads nothing, as from
    /dev/null."""
    done = subprocess.run(
        [SUREFETCH, "get", "-i", "-", "-o", str(tmp_path / "out") + "/"],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_close_stdin,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == "surefetch: error: no URL given: name some, or -i FILE\n"
