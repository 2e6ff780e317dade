"""What a command costs before it does anything: the modules it imports, and the
library's logging, which imports `logging` only once a record can reach someone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomli_w

from surefetch.testing import FaultServer

from support import SUREFETCH, payload, run_cli

# Modules the common commands do without (each costs 1-5 ms of every start): they are
# imported only on the paths that need them (a netrc file, a logged record, --help...).
NOT_ON_THE_COMMON_PATH = {
    "logging",  # surefetch._log: only when a record can reach someone
    "dataclasses",  # records are named tuples and plain classes
    "inspect",  # imported by dataclasses
    "hashlib",  # short keys: surefetch._digests
    "_hashlib",  # OpenSSL
    "shutil",  # argparse's help width: cli._Formatter
    "netrc",  # only when there is a netrc file
    "base64",  # only for a netrc entry
}


def _imported(stderr: str) -> set[str]:
    """The modules named by ``-X importtime``'s lines in `stderr`."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _run_importtime(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command with ``-X importtime`` on, and no netrc file (none in HOME or NETRC)."""
    variables = {"PYTHONPROFILEIMPORTTIME": "1", "HOME": str(cwd), "NETRC": str(cwd / "none")}
    return run_cli(args, cwd, env=variables)


def test_a_sync_a_get_and_a_fetch_import_only_what_they_use(
    server: FaultServer, tmp_path: Path
) -> None:
    urls = [server.add(f"f{i}.bin", payload(4096, i)) for i in range(3)]
    manifest = tmp_path / "surefetch.toml"
    manifest.write_text(
        tomli_w.dumps({"artifact": [{"name": f"f{i}.bin", "url": u} for i, u in enumerate(urls)]})
    )
    commands = {
        "sync": ["sync", "--cache", "cache", "--dest", "dest"],
        "get": ["get", urls[0], "-o", "got.bin"],
        "fetch": ["fetch", urls[1], "--cache", "cache2"],
    }
    for name, args in commands.items():
        done = _run_importtime(args, tmp_path)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        imported = _imported(done.stderr)
        assert "surefetch.cli" in imported, name  # the lines were there to read
        assert imported & NOT_ON_THE_COMMON_PATH == set(), name
    assert (tmp_path / "dest" / "f2.bin").read_bytes() == payload(4096, 2)
    assert (tmp_path / "got.bin").read_bytes() == payload(4096, 0)


def test_a_record_waits_for_a_listener_and_reaches_it(tmp_path: Path) -> None:
    """Before `logging` is imported nobody can listen: the record is dropped and
    `logging` stays unimported. Imported but not configured, a warning still does not
    reach Python's last-resort handler. Configured, records arrive as ever."""
    code = """if True:
        import sys
        import surefetch
        from surefetch._log import get_logger

        log = get_logger("surefetch.cache")
        log.warning("nobody listens yet")
        print("logging imported:", "logging" in sys.modules)
        import logging

        log.warning("not configured")
        logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
        log.info("configured: %s", 1)
        logging.getLogger().handlers[0].setFormatter(logging.Formatter("at %(funcName)s"))
        def caller():
            log.info("where")
        caller()
        logging.getLogger().handlers[0].setFormatter(
            logging.Formatter("%(name)s %(levelname)s %(message)s")
        )
        log.debug("below the level")
        try:
            raise OSError("the cause")
        except OSError:
            log.exception("with its traceback")
    """
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "logging imported: False\n"
    lines = done.stderr.splitlines()
    assert "at caller" in lines  # the record names its caller, not surefetch._log
    lines.remove("at caller")
    assert lines[:2] == [
        "surefetch.cache INFO configured: 1",
        "surefetch.cache ERROR with its traceback",
    ]
    assert "OSError: the cause" in done.stderr
    assert "nobody listens" not in done.stderr and "not configured" not in done.stderr


def test_the_commands_own_logging_is_set_up_when_a_record_comes(
    server: FaultServer, tmp_path: Path
) -> None:
    """`-v` prints the engine's decisions (here a redirect); without it nothing of the
    kind is printed, and `logging` is not imported."""
    url = server.add("r.bin", b"r" * 1000)
    told = _run_importtime(["-v", "get", f"{url}?redirect=1", "-o", "a.bin"], tmp_path)
    assert told.returncode == 0, told.stderr[-2000:]
    said = [line for line in told.stderr.splitlines() if not line.startswith("import time:")]
    assert any(line.startswith("surefetch: ") and "redirect" in line for line in said), said
    quiet = _run_importtime(["get", f"{url}?redirect=1", "-o", "b.bin"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    said = [line for line in quiet.stderr.splitlines() if not line.startswith("import time:")]
    assert said == [] and "logging" not in _imported(quiet.stderr)


def test_help_is_as_wide_as_columns_says(tmp_path: Path) -> None:
    """As argparse's own formatter would: ``$COLUMNS`` (the usage lines keep their
    groups whole, so only the text after them is measured)."""
    for columns in (50, 120):
        done = subprocess.run(
            [SUREFETCH, "sync", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": str(columns)},
        )
        assert done.returncode == 0, done.stderr
        after_usage = done.stdout.split("\n\n", 1)[1]
        widths = [len(line) for line in after_usage.splitlines()]
        assert columns - 20 < max(widths) <= columns, (columns, widths)
