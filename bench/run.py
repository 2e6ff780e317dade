"""Benchmarks `surefetch get` against its peers, downloading one file from nginx on 127.0.0.1.

    python bench/run.py [--quick] [--size BYTES] [--runs N] [--warmups N]
                        [--only NAME,...] [--no-write-results] [--no-install]

Full mode: a 1 GiB file, 5 counted runs per tool, each preceded by one uncounted warm-up
run of the same tool; the table goes to stdout and to bench/RESULTS.md. Quick mode (the
performance CI in .ci/run): 128 MiB, 3 runs, stdout only. Either way the exit status is 1
only when a gate is missed by more than a factor of two (a ratio below half its target, a
peak RSS or cancel latency above twice its limit), never because of absolute times.

Every tool runs as its own process and writes a new file into bench/.work/out/, on the
same file system as the served file; every output is checked (size and SHA-256) and then
deleted (and `sync` run) before the next run.
A run is timed by the wall clock around the process and its peak RSS comes from `os.wait4`,
both taken by bench/spawn.py, a small launcher (see there why: RSS below 8 MiB reads as 8).
Runs are interleaved (round r runs every tool once, starting at a different tool each
round) and each ratio is the median of per-round ratios, so that the machine's drift
between rounds cancels out. MB/s are 10^6 bytes per second.

nginx (and curl) are installed from Debian packages when missing and running as root;
missing Python peers are pip-installed into this interpreter (unless --no-install).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import grp
import hashlib
import http.client
import json
import math
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NoReturn

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work"
RESULTS = BENCH / "RESULTS.md"
PEERS = BENCH / "peers.py"
CANCEL = BENCH / "cancel.py"
SPAWN = BENCH / "spawn.py"
# The command next to this Python; SUREFETCH_BENCH_BIN points at another build.
SUREFETCH = Path(os.environ.get("SUREFETCH_BENCH_BIN") or Path(sys.executable).parent / "surefetch")

MIB = 1 << 20
LIMITED_RATE = 5 * MIB  # bytes/s per connection under nginx's /limited/ (bench/defaults.py)
FULL_SIZE, FULL_RUNS, FULL_CANCEL_RUNS = 1 << 30, 5, 30
QUICK_SIZE, QUICK_RUNS, QUICK_CANCEL_RUNS = 128 * MIB, 3, 10
CANCEL_AFTER_S = 0.2
TIMES, EN_DASH = "\u00d7", "\u2013"  # spelled out for ruff's RUF001


class SetupError(Exception):
    """The benchmark cannot run (nginx missing, port busy...); the message says what to do."""


# --- the rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One download: what every tool is given."""

    url: str
    out: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Tool:
    """One row of the table.

    family "surefetch" rows are the ones the gates judge; `single_connection_peer` rows are
    the candidates for "the fastest single-connection peer"; `modules` are Python modules
    (pip names alike) and `program` an executable the row needs.
    """

    name: str
    what: str
    argv: Callable[[Job], list[str]]
    family: str = "peer"
    single_connection_peer: bool = False
    modules: tuple[str, ...] = ()
    program: str | None = None


def _surefetch(*extra: str) -> Callable[[Job], list[str]]:
    def argv(job: Job) -> list[str]:
        cmd = [str(SUREFETCH), "get", job.url, "-o", str(job.out), "--sha256", job.sha256]
        return [*cmd, "--quiet", *extra]

    return argv


def _python_peer(mode: str, *extra: str, digest: bool = False) -> Callable[[Job], list[str]]:
    def argv(job: Job) -> list[str]:
        cmd = [sys.executable, str(PEERS), mode, job.url, str(job.out), *extra]
        return [*cmd, "--sha256", job.sha256] if digest else cmd

    return argv


def _curl(job: Job) -> list[str]:
    return ["curl", "-s", "-o", str(job.out), job.url]


TOOLS: tuple[Tool, ...] = (
    Tool(
        "surefetch",
        "`surefetch get --sha256`: SHA-256 and XXH3-128 verified, fsynced, renamed",
        _surefetch(),
        family="surefetch",
    ),
    Tool(
        "surefetch-1conn",
        "the same with `-c 1` (one connection)",
        _surefetch("-c", "1"),
        family="surefetch",
    ),
    Tool(
        "surefetch-no-fsync",
        "the same with `--no-fsync`",
        _surefetch("--no-fsync"),
        family="surefetch",
    ),
    Tool("curl", "`curl -s -o OUT URL`", _curl, single_connection_peer=True, program="curl"),
    Tool(
        "pycurl",
        "pycurl writing to the file, 1 MiB buffer",
        _python_peer("pycurl"),
        single_connection_peer=True,
        modules=("pycurl",),
    ),
    Tool(
        "requests",
        "requests, `iter_content(1 MiB)`",
        _python_peer("requests"),
        single_connection_peer=True,
        modules=("requests",),
    ),
    Tool(
        "requests-sha256",
        "requests 1 MiB chunks + `hashlib.sha256`, digest checked",
        _python_peer("requests-sha256", digest=True),
        modules=("requests",),
    ),
    Tool(
        "urllib3",
        "urllib3, `stream(1 MiB)`",
        _python_peer("urllib3"),
        single_connection_peer=True,
        modules=("urllib3",),
    ),
    Tool(
        "hf_transfer-8x16MiB",
        "`hf_transfer.download`, max_files=8, chunk_size=16 MiB (8 connections)",
        _python_peer("hf_transfer", "--max-files", "8", "--chunk-size", str(16 * MIB)),
        modules=("hf_transfer",),
    ),
    Tool(
        "hf_transfer-1x16MiB",
        "`hf_transfer.download`, max_files=1, chunk_size=16 MiB",
        _python_peer("hf_transfer", "--max-files", "1", "--chunk-size", str(16 * MIB)),
        modules=("hf_transfer",),
    ),
)
BASELINE = "curl"
CANCEL_SECTION = "cancel"


@dataclass
class Row:
    """What was measured for one tool; `status` is set when the row could not be measured."""

    tool: Tool
    status: str | None = None
    mbps: dict[int, float] = field(default_factory=dict)  # round -> MB/s of the counted run
    peak_rss_kib: int = 0

    @property
    def name(self) -> str:
        return self.tool.name

    def median(self) -> float | None:
        return statistics.median(self.mbps.values()) if self.mbps else None


def ratio(row: Row, ref: Row) -> float | None:
    """Median over rounds of row's MB/s divided by ref's MB/s in the same round."""
    rounds = sorted(set(row.mbps) & set(ref.mbps))
    if not rounds:
        return None
    return statistics.median(row.mbps[r] / ref.mbps[r] for r in rounds)


# --- system packages, Python peers, surefetch -----------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _last_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _apt_install(package: str) -> None:
    if os.geteuid() != 0:
        raise SetupError(
            f"{package} is not installed and this is not root; install it with: "
            f"sudo apt-get install -y {package}"
        )
    if shutil.which("apt-get") is None:
        raise SetupError(f"{package} is not installed and there is no apt-get to install it")
    _log(f"installing the Debian package {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    done = subprocess.run(cmd, env=env, capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(cmd, env=env, capture_output=True, check=False)
    if done.returncode != 0:
        raise SetupError(f"apt-get install {package} failed: {_last_line(done.stderr)}")
    # Debian starts the packaged service; the benchmark runs its own on a free port.
    subprocess.run(["service", package, "stop"], capture_output=True, check=False)


def find_nginx(install: bool) -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if not install:
        raise SetupError("nginx is not installed (run without --no-install, or apt-get it)")
    _apt_install("nginx")
    if os.access("/usr/sbin/nginx", os.X_OK):
        return "/usr/sbin/nginx"
    raise SetupError("nginx was installed but /usr/sbin/nginx is not there")


def _importable(module: str) -> bool:
    cmd = [sys.executable, "-c", f"import {module}"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def python_module_status(module: str, install: bool, cache: dict[str, str | None]) -> str | None:
    """None when `module` imports in this interpreter (pip-installing it if needed)."""
    if module in cache:
        return cache[module]
    status: str | None = None
    if not _importable(module):
        status = f"not installed (pip install {module})"
        if install:
            _log(f"pip-installing {module} into {sys.prefix}")
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            done = subprocess.run(
                [*cmd, "--retries", "1", "--timeout", "20", module],
                capture_output=True,
                check=False,
            )
            if done.returncode == 0 and _importable(module):
                status = None
            else:
                reason = _last_line(done.stderr) or "does not import"
                status = f"not installed: pip install {module} failed ({reason})"
    cache[module] = status
    return status


def precompile_surefetch() -> None:
    """Writes the bytecode of the surefetch package the harness imports, as ``pip install``
    does: a checkout run with PYTHONDONTWRITEBYTECODE set would otherwise compile its
    modules again in every command timed (~25 ms each), which no installed copy does."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("surefetch")
    if spec is not None and spec.origin is not None:
        compileall.compile_dir(Path(spec.origin).parent, quiet=1)


def surefetch_status() -> str | None:
    """None when `surefetch get` is there (the command next to this Python)."""
    if not SUREFETCH.exists():
        return f"unavailable: no {SUREFETCH}"
    try:
        done = subprocess.run(
            [str(SUREFETCH), "get", "--help"], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    if done.returncode != 0:
        return f"unavailable: `surefetch get --help` exited {done.returncode}"
    return None


def check_rows(rows: list[Row], install: bool) -> None:
    modules: dict[str, str | None] = {}
    sf_status: str | None = None
    sf_checked = False
    for row in rows:
        tool = row.tool
        if tool.family == "surefetch":
            if not sf_checked:
                sf_status, sf_checked = surefetch_status(), True
            row.status = sf_status
        if row.status is None and tool.program and shutil.which(tool.program) is None:
            if install:
                try:
                    _apt_install(tool.program)
                except SetupError as exc:
                    row.status = f"not installed: {exc}"
            if row.status is None and shutil.which(tool.program) is None:
                row.status = f"not installed ({tool.program} is not on PATH)"
        for module in tool.modules:
            if row.status is None:
                row.status = python_module_status(module, install, modules)
        if row.status is not None:
            _log(f"{tool.name}: {row.status}")


# --- the data file and the server -----------------------------------------------------------------


def ensure_data(docroot: Path, size: int) -> tuple[Path, str]:
    """A file of `size` random bytes in `docroot` and its SHA-256, made once and then reused."""
    path = docroot / f"blob-{size}.bin"
    sidecar = docroot / f"blob-{size}.sha256"
    if path.exists() and sidecar.exists():
        st = path.stat()
        fields = sidecar.read_text().split()
        if len(fields) == 3 and fields[1:] == [str(st.st_size), str(st.st_mtime_ns)]:
            return path, fields[0]
    _log(f"generating {size} random bytes into {path}")
    digest = hashlib.sha256()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MIB))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    tmp.chmod(0o644)
    tmp.replace(path)
    st = path.stat()
    sidecar.write_text(f"{digest.hexdigest()} {st.st_size} {st.st_mtime_ns}\n")
    return path, digest.hexdigest()


def make_small_files(docroot: Path, count: int, size: int) -> list[tuple[str, str]]:
    """`count` deterministic incompressible files of `size` bytes in `docroot` (rewritten
    only when missing or different), as (name, sha256) pairs."""
    import random

    docroot.mkdir(parents=True, exist_ok=True)
    docroot.chmod(0o755)
    rng = random.Random(size)
    width = len(str(max(count - 1, 0)))
    files = []
    for i in range(count):
        data = rng.randbytes(size)
        name = f"f{i:0{width}d}.bin"
        path = docroot / name
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            path.chmod(0o644)
        files.append((name, hashlib.sha256(data).hexdigest()))
    return files


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _worker_user(docroot: Path) -> str:
    """The `user` line for nginx's workers when the master runs as root ("" otherwise).

    The workers drop to an unprivileged user, which must be able to reach the data file;
    when some parent directory is closed to others, they stay root (loopback only).
    """
    if os.geteuid() != 0:
        return ""
    reachable = all(p.stat().st_mode & 0o001 for p in [docroot, *docroot.parents])
    if reachable:
        for name in ("www-data", "nginx", "nobody"):
            try:
                pw = pwd.getpwnam(name)
                return f"user {name} {grp.getgrgid(pw.pw_gid).gr_name};"
            except KeyError:
                continue
    return "user root root;"


class Nginx:
    """nginx in the foreground as a child process, configured from scratch in `workdir`."""

    def __init__(self, binary: str, workdir: Path, docroot: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.docroot = docroot
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.error_log = workdir / "nginx-error.log"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def _config(self) -> str:
        work, root = self.workdir, self.docroot
        temp = "\n".join(
            f"    {kind}_temp_path {work}/nginx-tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""# written by bench/run.py
{_worker_user(root)}
daemon off;
worker_processes auto;
pid {work}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
{temp}
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        # cancel latency: a transfer under way at 1 MB/s, and one that has stalled
        location /throttled/ {{ alias {root}/; limit_rate 1m; }}
        location /stalled/ {{ alias {root}/; limit_rate_after 64k; limit_rate 1; }}
        # bench/defaults.py: every connection limited from its first byte
        location /limited/ {{ alias {root}/; limit_rate {LIMITED_RATE}; sendfile_max_chunk 64k; }}
    }}
}}
"""

    def start(self, probe_path: str, probe_size: int) -> None:
        self.port = _free_port()
        (self.workdir / "nginx-tmp").mkdir(exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config())
        self.error_log.unlink(missing_ok=True)
        with open(self.workdir / "nginx-stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                [self.binary, "-p", f"{self.workdir}/", "-c", str(conf), "-e", str(self.error_log)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"nginx exited {self.proc.returncode}: {self._errors()}")
            try:
                status, length = self._head(probe_path)
            except OSError:
                if time.monotonic() > deadline:
                    msg = f"nginx did not answer on port {self.port}: {self._errors()}"
                    raise SetupError(msg) from None
                time.sleep(0.05)
                continue
            if status != 200 or length != probe_size:
                raise SetupError(
                    f"nginx answered {status} with Content-Length {length} for /{probe_path} "
                    f"(expected 200, {probe_size}): {self._errors()}"
                )
            return

    def _head(self, path: str) -> tuple[int, int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("HEAD", f"/{path}")
            resp = conn.getresponse()
            return resp.status, int(resp.getheader("Content-Length") or -1)
        finally:
            conn.close()

    def _errors(self) -> str:
        text = ""
        for log in (self.error_log, self.workdir / "nginx-stderr.log"):
            if log.exists():
                text += log.read_text(errors="replace")
        return _last_line(text) or "(no error logged)"

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise SetupError(f"nginx exited {self.proc.returncode} mid-run: {self._errors()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def version(self) -> str:
        done = subprocess.run([self.binary, "-v"], capture_output=True, check=False)
        return _last_line(done.stderr).replace("nginx version: ", "")


# --- measuring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    seconds: float
    rss_kib: int
    error: str | None


def run_process(argv: Sequence[str], timeout: float, stderr_path: Path) -> tuple[float, int, str]:
    """Runs argv through bench/spawn.py; returns (wall seconds, peak RSS KiB, error or "")."""
    helper = [sys.executable, "-I", "-S", str(SPAWN), *argv]
    with open(stderr_path, "wb") as err:
        # Its own session, so that a timeout or Ctrl+C can kill the helper and the tool at once.
        proc = subprocess.Popen(
            helper,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            return timeout, 0, f"timed out after {timeout:.0f} s"
        except BaseException:
            _killpg(proc)
            raise
    fields = out.decode().split()
    if proc.returncode != 0 or len(fields) != 3:
        detail = _last_line(stderr_path.read_bytes())
        return 0.0, 0, f"bench/spawn.py exited {proc.returncode}: {detail}"
    seconds, rss_kib, code = float(fields[0]), int(fields[1]), int(fields[2])
    if code == 0:
        return seconds, rss_kib, ""
    detail = _last_line(stderr_path.read_bytes())
    return seconds, rss_kib, f"exit {code}" + (f": {detail}" if detail else "")


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(MIB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _reset(outdir: Path) -> None:
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    os.sync()


FRESH_FS_SIZE = 1 << 30


@contextlib.contextmanager
def fresh_filesystem(mountpoint: Path) -> Iterator[bool]:
    """A new, empty ext4 filesystem mounted at `mountpoint` for one run (a loop device on
    a sparse image in WORK), so that no run inherits the state other runs' deletes left:
    after mass deletes ext4 searches its inode bitmaps for longer (`find_inode_bit`),
    and the same run of 1,000 small files took 0.3 s or 2 s depending on what ran before
    it. Yields True; where it cannot be done (not root, no ``mkfs.ext4`` or ``mount``) it
    yields False with `mountpoint` an emptied directory (`_reset`)."""
    image = WORK / "fresh-fs.img"
    mounted = False
    if os.geteuid() == 0 and shutil.which("mkfs.ext4") and shutil.which("mount"):
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        shutil.rmtree(mountpoint, ignore_errors=True)
        mountpoint.mkdir(parents=True)
        image.unlink(missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(FRESH_FS_SIZE)
        made = subprocess.run(
            ["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, check=False
        )
        if made.returncode == 0:
            mounted = (
                subprocess.run(
                    ["mount", "-o", "loop", str(image), str(mountpoint)],
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            )
    if not mounted:
        _reset(mountpoint)
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
            image.unlink(missing_ok=True)


def measure(tool: Tool, job: Job, timeout: float) -> Sample:
    """One run of `tool` into a fresh directory; its output is checked (size, SHA-256) and
    removed, the same way after every run, so that each run starts from the same state."""
    outdir = job.out.parent
    _reset(outdir)
    seconds, rss, error = run_process(tool.argv(job), timeout, WORK / "tool-stderr.log")
    if not error:
        if not job.out.exists():
            error = f"no file at {job.out}"
        elif job.out.stat().st_size != job.size:
            error = f"wrong size {job.out.stat().st_size}, expected {job.size}"
        elif _sha256_file(job.out) != job.sha256:
            error = "wrong content (SHA-256 of the output differs)"
    _reset(outdir)
    return Sample(seconds, rss, error or None)


def run_rounds(rows: list[Row], job: Job, runs: int, warmups: int, server: Nginx) -> None:
    timeout = 60 + job.size / 10e6
    for rnd in range(runs):
        live = [row for row in rows if row.status is None]
        shift = rnd % len(live) if live else 0
        for row in live[shift:] + live[:shift]:
            for i in range(warmups + 1):
                counted = i == warmups
                if row.status is not None:
                    break
                sample = measure(row.tool, job, timeout)
                row.peak_rss_kib = max(row.peak_rss_kib, sample.rss_kib)
                label = f"[{rnd + 1}/{runs}]" + ("" if counted else " warm-up")
                if sample.error:
                    server.check_alive()
                    row.status = f"failed: {sample.error}"
                    _log(f"{label} {row.name}: FAILED {sample.error}")
                    continue
                mbps = job.size / sample.seconds / 1e6
                if counted:
                    row.mbps[rnd] = mbps
                _log(
                    f"{label:18} {row.name:22} {mbps:7.0f} MB/s {sample.seconds:7.2f} s "
                    f"{sample.rss_kib / 1024:6.0f} MiB"
                )


# --- cancel latency -------------------------------------------------------------------------------


@dataclass
class CancelResult:
    scenario: str
    status: str | None = None  # "unavailable: ..." when not measured
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (p99 of 30 samples is the largest)."""
        if not self.latencies_ms:
            return None
        data = sorted(self.latencies_ms)
        return data[max(0, math.ceil(q / 100 * len(data)) - 1)]


CANCEL_SCENARIOS = (
    ("throttled (1 MB/s)", "throttled"),
    ("stalled (64 KiB, then 1 B/s)", "stalled"),
)


def run_cancel(server: Nginx, data: Path, runs: int) -> list[CancelResult]:
    results = []
    for scenario, location in CANCEL_SCENARIOS:
        result = CancelResult(scenario)
        results.append(result)
        cmd = [sys.executable, str(CANCEL), server.url(f"{location}/{data.name}")]
        cmd += ["--runs", str(runs), "--after", str(CANCEL_AFTER_S), "--dir", str(WORK / "cancel")]
        try:
            done = subprocess.run(
                cmd, capture_output=True, timeout=runs * 11 + 60, check=False, text=True
            )
        except subprocess.TimeoutExpired:
            result.status = "failed: bench/cancel.py timed out"
            continue
        finally:
            shutil.rmtree(WORK / "cancel", ignore_errors=True)
        try:
            report = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            result.status = f"failed: bench/cancel.py exited {done.returncode}: "
            result.status += _last_line(done.stderr)
            continue
        if not report["available"]:
            result.status = f"unavailable: {report['reason']}"
        result.latencies_ms = [float(x) for x in report["latencies_ms"]]
        result.errors = [str(x) for x in report["errors"]]
        p50, p99 = result.percentile(50), result.percentile(99)
        _log(f"cancel, {scenario}: p50 {_fmt(p50, 1)} ms, p99 {_fmt(p99, 1)} ms")
        if result.status is not None:
            _log(f"cancel, {scenario}: {result.status}")
        for error in result.errors:
            _log(f"cancel, {scenario}: {error}")
    return results


# --- gates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """A target; missing it by more than a factor of two (or `broken`) fails the run."""

    name: str
    value: float | None
    target: float
    higher_is_better: bool
    unit: str
    skipped: str | None = None  # why it could not be judged (a row unavailable, not selected)
    broken: str | None = None  # what went wrong when surefetch itself failed: always FAIL
    # Overrides "half the target" for a target this machine is known not to reach: the
    # gate then guards against a regression from the measured level (RESULTS.md says why).
    fail_below: float | None = None

    @property
    def fail_at(self) -> float:
        if self.fail_below is not None:
            return self.fail_below
        return self.target / 2 if self.higher_is_better else self.target * 2

    @property
    def status(self) -> str:
        if self.broken is not None:
            return "FAIL"
        if self.skipped is not None or self.value is None:
            return "skipped"
        if self.higher_is_better:
            if self.value < self.fail_at:
                return "FAIL"
            return "ok" if self.value >= self.target else "below target"
        if self.value > self.fail_at:
            return "FAIL"
        return "ok" if self.value <= self.target else "above target"

    def line(self) -> str:
        if self.broken is not None:
            return f"gate {self.name}: FAIL ({_cell(self.broken, 200)})"
        if self.skipped is not None or self.value is None:
            return f"gate {self.name}: skipped ({_cell(self.skipped, 200) or 'not measured'})"
        digits = 2 if self.unit == TIMES else 0 if self.unit == " MiB" else 1
        op, worse = (">=", "below") if self.higher_is_better else ("<=", "above")
        bound = (
            f"target {op} {self.target:.{digits}f}{self.unit}, "
            f"fails {worse} {self.fail_at:.{digits}f}{self.unit}"
        )
        return f"gate {self.name}: {self.value:.{digits}f}{self.unit} ({bound}): {self.status}"


def _ratio_gate(name: str, row: Row | None, ref: Row | None) -> Gate:
    """`row` (a surefetch row) against `ref`, target 1.0."""
    if row is None or ref is None:
        return Gate(name, None, 1.0, True, TIMES, "not selected")
    if row.status is not None and row.status.startswith("failed"):
        return Gate(name, None, 1.0, True, TIMES, broken=f"{row.name} {row.status}")
    for r in (row, ref):
        if r.status is not None:
            return Gate(name, None, 1.0, True, TIMES, f"{r.name} {r.status}")
    return Gate(name, ratio(row, ref), 1.0, True, TIMES)


def compute_gates(rows: list[Row], cancels: list[CancelResult] | None) -> list[Gate]:
    by_name = {row.name: row for row in rows}
    sf, nofsync = by_name.get("surefetch"), by_name.get("surefetch-no-fsync")
    peers = [r for r in rows if r.tool.single_connection_peer and r.median() is not None]
    fastest = max(peers, key=lambda r: r.median() or 0.0) if peers else None
    label = f"fastest single-connection peer ({fastest.name if fastest else 'none'})"
    gates = [
        _ratio_gate("surefetch / curl", sf, by_name.get("curl")),
        _ratio_gate("surefetch / requests-sha256", sf, by_name.get("requests-sha256")),
        _ratio_gate(f"surefetch-no-fsync / {label}", nofsync, fastest),
    ]
    sf_rows = [r for r in (sf, nofsync) if r is not None]
    measured = [r for r in sf_rows if r.peak_rss_kib]
    if measured:
        peak = max(r.peak_rss_kib for r in measured) / 1024
        gates.append(Gate("surefetch peak RSS", peak, 64.0, False, " MiB"))
    else:
        why = (sf_rows[0].status or "not measured") if sf_rows else "not selected"
        gates.append(Gate("surefetch peak RSS", None, 64.0, False, " MiB", why))
    for c in cancels or []:
        name = f"cancel latency p99, {c.scenario}"
        if c.status is not None and c.status.startswith("unavailable"):
            gates.append(Gate(name, None, 50.0, False, " ms", c.status))
        elif c.status is not None or c.errors:
            # A cancel that hangs, or ends otherwise than with Cancelled, is a gross regression.
            broken = c.status or "; ".join(sorted(set(c.errors)))
            gates.append(Gate(name, None, 50.0, False, " ms", broken=broken))
        else:
            gates.append(Gate(name, c.percentile(99), 50.0, False, " ms"))
    return gates


# --- the report -----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


COLUMNS: tuple[tuple[str, Callable[[Row, Row | None], str]], ...] = (
    ("tool", lambda row, base: row.name),
    ("median MB/s", lambda row, base: _cell(row.status) or _fmt(row.median(), 0)),
    (f"{TIMES} curl", lambda row, base: _fmt(ratio(row, base), 2) if base and row.mbps else "—"),
    ("peak RSS MiB", lambda row, base: _fmt(row.peak_rss_kib / 1024 or None, 0)),
    ("runs", lambda row, base: str(len(row.mbps))),
    (
        f"MB/s min{EN_DASH}max",
        lambda row, base: (
            f"{min(row.mbps.values()):.0f}{EN_DASH}{max(row.mbps.values()):.0f}"
            if row.mbps
            else "—"
        ),
    ),
    ("what", lambda row, base: row.tool.what),
)


def _cell(text: str | None, limit: int = 90) -> str:
    """Text fit for a table cell: one line, no `|`, at most `limit` characters."""
    if not text:
        return ""
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def throughput_table(rows: list[Row]) -> str:
    base = next((r for r in rows if r.name == BASELINE and r.mbps), None)
    return markdown_table(
        [title for title, _ in COLUMNS], [[cell(row, base) for _, cell in COLUMNS] for row in rows]
    )


def cancel_table(results: list[CancelResult]) -> str:
    body = []
    for c in results:
        note = _cell(c.status or "; ".join(sorted(set(c.errors))))
        body.append(
            [
                c.scenario,
                str(len(c.latencies_ms)),
                _fmt(c.percentile(50), 1),
                _fmt(c.percentile(99), 1),
                note,
            ]
        )
    return markdown_table(["server", "runs", "p50 ms", "p99 ms", "notes"], body)


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def machine_info(nginx_version: str) -> list[tuple[str, str]]:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    def fs_type(path: Path) -> str:
        best, kind = "", "?"
        try:
            for line in Path("/proc/self/mounts").read_text().splitlines():
                parts = line.split()
                mnt = parts[1]
                inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, f"{parts[2]} on {parts[0]}"
        except OSError:
            pass
        return kind

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "—"

    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False)
    mem_kib = first("/proc/meminfo", "MemTotal").split()[0]
    peers = ", ".join(
        f"{d} {version(d)}" for d in ("surefetch", "requests", "urllib3", "pycurl", "hf_transfer")
    )
    return [
        ("CPU", f"{first('/proc/cpuinfo', 'model name')}, nproc {os.cpu_count()}"),
        ("memory", f"{int(mem_kib) // 1024} MiB" if mem_kib.isdigit() else "?"),
        ("kernel", platform.release()),
        ("file system", fs_type(WORK)),
        ("nginx", nginx_version),
        ("curl", " ".join(curl.stdout.split()[:2]) if curl.returncode == 0 else "—"),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("packages", peers),
    ]


# --- main -----------------------------------------------------------------------------------------


def _select(only: str | None) -> tuple[list[Tool], bool]:
    """The tools --only asks for (NAME selects NAME and NAME-*), and whether to time cancel."""
    if only is None:
        return list(TOOLS), True
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [t.name for t in TOOLS] + [CANCEL_SECTION]
    for n in names:
        if not any(k == n or k.startswith(n + "-") for k in known):
            _usage(f"--only: unknown name {n!r}; the names are: {', '.join(known)}")
    tools = [t for t in TOOLS if any(t.name == n or t.name.startswith(n + "-") for n in names)]
    if tools and all(t.name != BASELINE for t in tools):
        _log(f"adding {BASELINE}: every ratio is taken against it")
        tools = [t for t in TOOLS if t in tools or t.name == BASELINE]
    return tools, CANCEL_SECTION in names


def _usage(msg: str) -> NoReturn:
    print(f"bench/run.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="128 MiB, 3 runs, no RESULTS.md")
    parser.add_argument("--size", type=int, help="file size in bytes (1 GiB; quick: 128 MiB)")
    parser.add_argument("--runs", type=int, help="counted runs per tool (5; quick: 3)")
    parser.add_argument("--warmups", type=int, default=1, help="uncounted runs before each run")
    parser.add_argument(
        "--only", metavar="NAME,...", help="rows to run (NAME also selects NAME-*) and/or cancel"
    )
    parser.add_argument("--no-write-results", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get or pip install")
    args = parser.parse_args(argv)
    precompile_surefetch()
    quick: bool = args.quick
    size: int = args.size or (QUICK_SIZE if quick else FULL_SIZE)
    runs: int = args.runs or (QUICK_RUNS if quick else FULL_RUNS)
    warmups: int = args.warmups
    if size <= 0 or runs <= 0 or warmups < 0:
        _usage("--size and --runs must be positive, --warmups not negative")
    tools, with_cancel = _select(args.only)
    install = not args.no_install
    signal.signal(signal.SIGTERM, _on_sigterm)

    started = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    docroot = WORK / "www"
    try:
        nginx_bin = find_nginx(install)
        docroot.mkdir(parents=True, exist_ok=True)
        for d in (WORK, docroot):
            d.chmod(0o755)
        rows = [Row(t) for t in tools]
        check_rows(rows, install)
        data, sha256 = ensure_data(docroot, size)
        server = Nginx(nginx_bin, WORK, docroot)
        nginx_version = server.version()
        cancels: list[CancelResult] | None = None
        try:
            server.start(data.name, size)
            job = Job(server.url(data.name), WORK / "out" / "download.bin", size, sha256)
            run_rounds(rows, job, runs, warmups, server)
            if with_cancel:
                cancel_runs = QUICK_CANCEL_RUNS if quick else FULL_CANCEL_RUNS
                cancels = run_cancel(server, data, cancel_runs)
        finally:
            server.stop()
            shutil.rmtree(WORK / "out", ignore_errors=True)
    except SetupError as exc:
        print(f"bench/run.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/run.py: interrupted", file=sys.stderr)
        return 130

    gates = compute_gates(rows, cancels)
    title = (
        f"{_size_text(size)} from {nginx_version} on 127.0.0.1, written beside it "
        f"(bench/.work/); median of {runs} runs per tool, each after {warmups} uncounted "
        f"warm-up run(s); {TIMES} curl is the median of per-round ratios; MB = 10^6 bytes."
    )
    sections = [title, "", throughput_table(rows)]
    if cancels is not None:
        sections += [
            "",
            f"Cancel latency, `cancel()` to `surefetch.download` returning, "
            f"{CANCEL_AFTER_S * 1000:.0f} ms into the transfer:",
            "",
            cancel_table(cancels),
        ]
    sections += ["", *(g.line() for g in gates)]
    report = "\n".join(sections)
    print(report)
    failed = [g for g in gates if g.status == "FAIL"]
    for g in failed:
        print(f"FAILED: {g.line()}")
    print(f"bench: {'FAILED' if failed else 'ok'} in {time.monotonic() - started:.0f} s")

    write_results(args, rows, report, when, nginx_version)
    return 1 if failed else 0


def other_sections() -> str:
    """The `## ` sections that other scripts (bench/sync.py, bench/parallel.py) keep at the
    end of RESULTS.md, which this script's rewrite keeps ("" when there are none)."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    start = old.find("\n## ")
    return "" if start < 0 else "\n" + old[start + 1 :]


def write_section(section: str) -> None:
    """Replaces the `## ` section of RESULTS.md that starts with `section`'s heading (it runs
    to the next `## ` heading), or appends it: how bench/sync.py and bench/parallel.py keep
    their own sections beside this script's."""
    heading = section.split("\n", 1)[0]
    text = RESULTS.read_text() if RESULTS.exists() else "# surefetch benchmark results\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(text)


def results_withheld(args: argparse.Namespace, rows: Iterable[Row]) -> str | None:
    """Why a run must not write RESULTS.md (None when it may): a partial or quick run,
    or a surefetch row that could not be measured."""
    if args.quick:
        return "quick mode"
    if args.no_write_results:
        return "--no-write-results"
    if args.only is not None:
        return "--only"
    if any(r.tool.family == "surefetch" and r.status is not None for r in rows):
        return "a surefetch row was not measured"
    return None


def write_results(
    args: argparse.Namespace, rows: list[Row], report: str, when: str, nginx: str
) -> None:
    why_not = results_withheld(args, rows)
    if why_not is not None:
        _log(f"not writing {RESULTS.relative_to(BENCH.parent)} ({why_not})")
        return
    info = "\n".join(f"- {key}: {value}" for key, value in machine_info(nginx))
    cmd = " ".join(["python bench/run.py", *sys.argv[1:]])
    RESULTS.write_text(
        f"# surefetch benchmark results\n\n{when}, `{cmd}`\n\n{info}\n\n{report}\n"
        f"\nFile rates vary ±20{EN_DASH}50 % between runs on this kind of machine: trust the "
        "ratios, taken in one run, not the absolute figures (see PERFORMANCE.md).\n"
        + other_sections()
    )
    _log(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
