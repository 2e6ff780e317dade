"""`surefetch demo`: the main job on an embedded default, with no internet.

Serves sample artifacts from a local fault-injecting server and downloads each
one with verification, showing what surefetch does about the usual failures: a
flaky server, a connection cut mid-body, and a corrupted file that must never
reach its final path.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from surefetch.download import download
from surefetch.errors import ChecksumMismatch
from surefetch.testing import FaultServer

__all__ = ["Sample", "run_demo"]


@dataclass(frozen=True)
class Sample:
    name: str
    size: int
    query: str
    story: str
    corrupt: bool = False


SAMPLES = (
    Sample("model.safetensors", 96 << 20, "", "a large model file"),
    Sample("tokenizer.json", 300 << 10, "?flaky=2", "server answers 503 twice"),
    Sample("plugin.bin", 8 << 20, "?cut=3000000&times=1", "connection cut at 3 MB"),
    Sample("weights.bin", 4 << 20, "?wrong=1", "server sends corrupted bytes", corrupt=True),
)


def _bytes_for(sample: Sample) -> bytes:
    return random.Random(sample.name).randbytes(sample.size)


def run_demo(directory: Path | None = None, quiet: bool = False) -> int:
    """Runs the demo; returns 0 when every sample behaved as surefetch promises."""
    say = (lambda text: None) if quiet else print
    with FaultServer() as server, tempfile.TemporaryDirectory(prefix="surefetch-demo-") as tmp:
        dest = Path(directory) if directory is not None else Path(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        say(f"serving {len(SAMPLES)} sample artifacts on {server.url}, downloading into {dest}\n")
        say(f"{'artifact':<20}{'size':>10}  {'MB/s':>7}  {'result':<34}scenario")
        ok = True
        for sample in SAMPLES:
            data = _bytes_for(sample)
            url = server.add(sample.name, data) + sample.query
            sha256 = hashlib.sha256(data).hexdigest()
            target = dest / sample.name
            try:
                result = download(url, target, sha256=sha256, size=sample.size)
            except ChecksumMismatch:
                outcome, rate = "refused: sha256 mismatch", "-"
                ok = ok and sample.corrupt and not target.exists()
            else:
                outcome = f"verified sha256 {result.sha256[:12] if result.sha256 else '?'}…"
                rate = f"{result.size / max(result.elapsed, 1e-9) / 1e6:.0f}"
                ok = ok and not sample.corrupt and target.read_bytes() == data
            size = f"{sample.size / (1 << 20):.1f} MiB"
            say(f"{sample.name:<20}{size:>10}  {rate:>7}  {outcome:<34}{sample.story}")
        files = sorted(p.name for p in dest.iterdir())
        say(f"\nfiles at their final paths: {', '.join(files)}")
        say("the corrupted artifact never appeared; nothing partial was left behind.")
        say("demo: ok" if ok else "demo: FAILED (something did not behave as promised)")
    return 0 if ok else 1
