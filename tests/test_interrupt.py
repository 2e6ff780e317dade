"""Ctrl+C inside `surefetch.download` raises KeyboardInterrupt at once, in a real child."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import surefetch as sf
from surefetch.testing import FaultServer

from support import part_dir, payload, restore_default_signals

CHILD = """
import json, sys, time
import surefetch as sf
print("ready", flush=True)
try:
    sf.download(sys.argv[1], sys.argv[2])
except KeyboardInterrupt:
    print(json.dumps({"caught": time.monotonic()}), flush=True)
"""


@pytest.mark.parametrize("query", ["throttle=500000", "hang=30", "hang_headers=30"])
def test_ctrl_c_raises_keyboard_interrupt_within_100ms(
    server: FaultServer, tmp_path: Path, query: str
) -> None:
    url = server.add("f", payload(4 << 20)) + "?" + query
    dest = tmp_path / "f"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(dest)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=restore_default_signals,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    sent = time.monotonic()  # CLOCK_MONOTONIC is shared with the child
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=10)
    caught = json.loads(out)["caught"]
    assert caught - sent < 0.1
    assert not dest.exists()
    if query.startswith("throttle"):
        assert (part_dir(dest) / "f.part").stat().st_size > 0


class _InterruptingHandler(logging.Handler):
    """Raises KeyboardInterrupt where a Ctrl+C handled inside the logging code would."""

    def emit(self, record: logging.LogRecord) -> None:
        raise KeyboardInterrupt


@pytest.mark.parametrize("call", ["download", "download_many"])
def test_an_interrupt_raised_while_the_engine_logs_reaches_the_caller(
    server: FaultServer, tmp_path: Path, call: str
) -> None:
    """The engine's notes are logged from its polling loop: a signal handled while that
    Python code runs raises there, and must not be lost with the note (it was: about
    half of the Ctrl+Cs during a stalled `get` went unnoticed)."""
    url = server.add(f"r-{call}", payload(10_000)) + "?redirect=1"  # a redirect is a note
    logger = logging.getLogger("surefetch.engine")
    handler, level = _InterruptingHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(KeyboardInterrupt):
            if call == "download":
                sf.download(url, tmp_path / "one")
            else:
                sf.download_many([url], tmp_path / "many")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
