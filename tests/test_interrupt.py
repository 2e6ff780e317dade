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


def test_an_interrupted_batch_still_hands_over_how_each_started_item_ended(
    server: FaultServer, tmp_path: Path
) -> None:
    """A Ctrl+C raised in the batch's result callback stops the batch; the items that
    had started and ended meanwhile (installed, or cancelled with what their part keeps)
    are still handed to the callback before the interrupt is raised, so that a caller
    never reports an installed file as interrupted."""
    urls = [server.add(f"h{i}.bin", payload(3000, seed=i)) for i in range(6)]
    urls.append(server.add("slow.bin", payload(8 << 20, seed=9)) + "?throttle=2000000")
    seen: dict[int, object] = {}

    def on_result(index: int, result: object) -> None:
        first = not seen
        seen[index] = result
        if first:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sf.download_many(urls, tmp_path, jobs=7, on_result=on_result)
    for i in range(6):
        if (tmp_path / f"h{i}.bin").exists():
            assert isinstance(seen.get(i), sf.DownloadResult), (i, seen.get(i))
    slow = seen.get(6)
    assert isinstance(slow, sf.Cancelled), slow
    kept = part_dir(tmp_path / "x") / "slow.bin.part"
    assert ("bytes received are kept in" in str(slow)) == kept.exists()


@pytest.mark.parametrize(("size", "kept"), [(300_000, False), (8 << 20, True)])
def test_the_interrupt_says_what_the_part_file_keeps(
    server: FaultServer, tmp_path: Path, size: int, kept: bool
) -> None:
    """`get` stopped by Ctrl+C says what is on disk: the bytes its part keeps, or that
    nothing was kept (a small body is fetched whole or not at all)."""
    url = server.add("f.bin", payload(size)) + "?throttle=200000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "surefetch", "get", url, "-o", str(tmp_path / "f.bin")],
        stderr=subprocess.PIPE,
        preexec_fn=restore_default_signals,
    )
    time.sleep(0.8)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130
    part = part_dir(tmp_path / "f.bin") / "f.bin.part"
    assert part.exists() == kept
    if kept:
        assert f"bytes received are kept in {part}" in stderr.decode()
    else:
        assert "nothing of the download was kept" in stderr.decode()


def test_a_held_back_signal_acts_after_a_completed_step_only() -> None:
    """`held_back`: a Ctrl+C during a step that completes is raised after it, marked as
    arriving after the completion; during a step that fails, the step's error is raised
    (it was replaced by a KeyboardInterrupt saying the step had completed)."""
    from surefetch import _signals

    _signals.mark_completed(None)
    with pytest.raises(KeyboardInterrupt) as caught, _signals.held_back("the step ended"):
        signal.raise_signal(signal.SIGINT)
        done = True
    assert done and getattr(caught.value, _signals.COMPLETED_FIRST) == "the step ended"
    assert _signals.completed() == "the step ended"
    _signals.mark_completed(None)
    with pytest.raises(OSError, match="disk"), _signals.held_back("never"):
        signal.raise_signal(signal.SIGINT)
        raise OSError("disk")
    assert _signals.completed() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
