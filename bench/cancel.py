"""Cancel latency of `surefetch.download`: from `CancelToken.cancel()` to the call returning.

    python bench/cancel.py URL --runs N [--after SECONDS] [--dir DIR]

Each run starts `surefetch.download(URL, DIR/cancel.bin, cancel=tok)` in a thread against a
slow server (throttled or trickling), waits `--after` seconds so that the transfer is under
way, calls `tok.cancel()` and measures the time until `download` returns; it must raise
`surefetch.Cancelled`. Prints one JSON object on stdout:

    {"available": bool, "reason": str, "latencies_ms": [...], "errors": [...]}

`available` is false (with the reason) while `surefetch.download` does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HANG_LIMIT_S = 10.0


def _report(
    available: bool,
    reason: str = "",
    latencies: list[float] | None = None,
    errors: list[str] | None = None,
) -> None:
    print(
        json.dumps(
            {
                "available": available,
                "reason": reason,
                "latencies_ms": latencies or [],
                "errors": errors or [],
            }
        ),
        flush=True,
    )


def _clean(dest: Path) -> None:
    dest.unlink(missing_ok=True)
    shutil.rmtree(dest.parent / ".surefetch", ignore_errors=True)


def _one_run(
    download: Callable[..., object],
    token_type: Callable[[], Any],
    cancelled: type[BaseException],
    url: str,
    dest: Path,
    after: float,
) -> tuple[float | None, str | None, bool]:
    """Returns (latency in ms or None, error or None, hung)."""
    tok = token_type()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            download(url, dest, cancel=tok)
        except BaseException as exc:  # reported below, not swallowed
            outcome["end"] = time.perf_counter()
            outcome["exc"] = exc
        else:
            outcome["end"] = time.perf_counter()

    thread = threading.Thread(target=target, name="download", daemon=True)
    thread.start()
    time.sleep(after)
    if not thread.is_alive():
        thread.join()
        exc = outcome.get("exc")
        what = "completed" if exc is None else f"raised {exc!r}"
        return None, f"download {what} before cancel() was called", False
    start = time.perf_counter()
    tok.cancel()
    thread.join(HANG_LIMIT_S)
    if thread.is_alive():
        return None, f"download still running {HANG_LIMIT_S:.0f} s after cancel()", True
    latency_ms = (float(outcome["end"]) - start) * 1000.0
    exc = outcome.get("exc")
    if not isinstance(exc, cancelled):
        what = "returned normally" if exc is None else f"raised {exc!r}"
        return latency_ms, f"download {what} after cancel(), expected surefetch.Cancelled", False
    return latency_ms, None, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--after", type=float, default=0.2, help="seconds before cancel()")
    parser.add_argument("--dir", type=Path, help="where to download (default: a temp dir)")
    args = parser.parse_args(argv)

    try:
        import surefetch
    except ImportError as exc:
        _report(False, f"import surefetch failed: {exc}")
        return 0
    download = getattr(surefetch, "download", None)
    if not callable(download):
        _report(False, "surefetch.download does not exist yet")
        return 0

    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="surefetch-cancel-")
        workdir = Path(tmp)
    else:
        workdir = Path(args.dir)
        workdir.mkdir(parents=True, exist_ok=True)
    dest = workdir / "cancel.bin"
    latencies: list[float] = []
    errors: list[str] = []
    hung = False
    try:
        for _ in range(int(args.runs)):
            _clean(dest)
            latency, error, hung = _one_run(
                download,
                surefetch.CancelToken,
                surefetch.Cancelled,
                str(args.url),
                dest,
                float(args.after),
            )
            if latency is not None:
                latencies.append(latency)
            if error is not None:
                errors.append(error)
            if hung:
                break
        _clean(dest)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _report(True, "", latencies, errors)
    if hung:
        # A download thread that ignores its token would keep this process alive.
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
