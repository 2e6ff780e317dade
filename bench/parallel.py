"""Benchmarks `surefetch get -c N` (parallel connections) and resume against aria2c, hf_transfer.

    python bench/parallel.py [--quick] [--size BYTES] [--runs N] [--warmups N]
                             [--throttled-size BYTES] [--rate BYTES_PER_S] [--throttled-runs N]
                             [--resume-runs N] [--only PART,...] [--no-write-results]
                             [--no-install]

Three parts (--only unthrottled,throttled,resume), each at N = 1, 4 and 8 connections:

1. unthrottled: one file from nginx on 127.0.0.1 (bench/run.py's server and method: each
   tool in its own process through bench/spawn.py, interleaved rounds, warm-ups, every output
   checked and deleted) with `surefetch get -c N --sha256`, `aria2c -x N -s N` and
   `hf_transfer` (max_files = N, 16 MiB chunks).
2. throttled: the same tools against a server whose every connection is paced to a fixed
   rate (50 MB/s; quick: 10 MB/s), where parallelism matters. nginx's `limit_rate` cannot do
   this: it limits each request, not each connection, and lets the first second's worth of
   every request through at once (at `limit_rate 1m` a 1 MiB range takes 0.03 s, a 4 MiB one
   3 s), so 4 or 16 MiB range requests at 50 MB/s are never slowed. The server here
   is a small HTTP/1.1 server in this process that serves the file with sendfile(2) on
   sockets paced by the kernel (SO_MAX_PACING_RATE): exact, per connection, no burst.
3. resume: `surefetch get -c N` (N = 1, 8) from the paced server is SIGKILLed once it has
   written half the file (its `wchar` in /proc), then the same command runs again with
   `--json`: its `bytes_transferred` and `resumed_from`, and the bytes the server sent it.

Full mode: 1 GiB; unthrottled 5 counted runs per tool (+1 warm-up each), throttled 3 runs,
resume 3 runs; writes its own section of bench/RESULTS.md. Quick mode (CI): 128 MiB, 2 runs,
1 throttled and 1 resume run, stdout only. Either way the exit status is 1 only when a gate is
missed by more than a factor of two, never because of absolute times. Gates: surefetch >=
1.0x hf_transfer and >= 1.0x aria2c at the same N (unthrottled); throttled N = 8 >= 0.9 x
8 x the rate; the second resume run transfers <= 55 % of the file; surefetch's peak RSS <=
64 MiB + N x 4 MiB (its unit).

aria2c (Debian package aria2) is installed when missing and running as root, like nginx.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

from run import (
    BENCH,
    EN_DASH,
    MIB,
    RESULTS,
    TIMES,
    WORK,
    Gate,
    Job,
    Nginx,
    Row,
    SetupError,
    Tool,
    _apt_install,
    _cell,
    _fmt,
    _killpg,
    _log,
    _on_sigterm,
    _python_peer,
    _ratio_gate,
    _reset,
    _sha256_file,
    _size_text,
    _surefetch,
    check_rows,
    ensure_data,
    find_nginx,
    machine_info,
    markdown_table,
    precompile_surefetch,
    ratio,
    results_withheld,
    run_process,
    run_rounds,
    write_section,
)

PWORK = WORK / "parallel"  # this script's server files and outputs, apart from run.py's
CONNECTIONS = (1, 4, 8)
RESUME_CONNECTIONS = (1, 8)
PARTS = ("unthrottled", "throttled", "resume")
HF_CHUNK = 16 * MIB
UNIT_MIB, RSS_BASE_MIB = 4, 64  # surefetch's range unit; its RSS target is 64 MiB + N units
THROTTLED_TARGET, RESUME_TARGET_PCT = 0.9, 55.0
SO_MAX_PACING_RATE: int = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux


@dataclass(frozen=True)
class Params:
    size: int
    runs: int
    warmups: int
    throttled_size: int
    rate: int  # bytes per second, per connection
    throttled_runs: int
    resume_runs: int


FULL = Params(1 << 30, 5, 1, 1 << 30, 50_000_000, 3, 3)
QUICK = Params(128 * MIB, 2, 1, 128 * MIB, 10_000_000, 1, 1)


# --- the rows -------------------------------------------------------------------------------------


def _aria2c(binary: str, n: int) -> Callable[[Job], list[str]]:
    def argv(job: Job) -> list[str]:
        return [binary, *_aria2c_flags(n), "-d", str(job.out.parent), "-o", job.out.name, job.url]

    return argv


def _aria2c_flags(n: int) -> list[str]:
    # -k 1M: the default 20 MiB minimum split would use fewer than N connections on small files.
    return [
        *("-x", str(n), "-s", str(n), "-k", "1M"),
        *("--file-allocation=none", "--allow-overwrite=true", "--auto-file-renaming=false", "-q"),
    ]


def tools_for(n: int, aria2c: str) -> list[Tool]:
    """surefetch first: the ratios are surefetch's MB/s over each peer's."""
    hf = ("hf_transfer", "--max-files", str(n), "--chunk-size", str(HF_CHUNK))
    return [
        Tool(
            f"surefetch-c{n}",
            f"`surefetch get -c {n} --sha256`",
            _surefetch("-c", str(n)),
            family="surefetch",
        ),
        Tool(
            f"aria2c-x{n}",
            f"`aria2c {' '.join(_aria2c_flags(n))} -d DIR -o NAME`",
            _aria2c(aria2c, n),
        ),
        Tool(
            f"hf_transfer-{n}x16MiB",
            f"`hf_transfer.download`, max_files={n}, chunk_size=16 MiB",
            _python_peer(*hf),
            modules=("hf_transfer",),
        ),
    ]


def find_aria2c(install: bool) -> tuple[str, str | None]:
    """aria2c's path (apt-installing the package aria2 if needed), or why it is unavailable."""
    found = shutil.which("aria2c")
    if found is None and install:
        try:
            _apt_install("aria2")
        except SetupError as exc:
            return "aria2c", f"not installed: {exc}"
        found = shutil.which("aria2c")
    if found is None:
        return "aria2c", "not installed (apt-get install aria2)"
    return found, None


@dataclass
class Scenario:
    """The rows of one server: by N, surefetch first, each group timed in its own rounds."""

    name: str
    data: Path  # the served file
    sha256: str
    runs: int
    warmups: int
    rate: int | None = None  # per connection, bytes per second (throttled only)
    groups: dict[int, list[Row]] = field(default_factory=dict)

    def rows(self) -> list[Row]:
        return [row for rows in self.groups.values() for row in rows]

    def job(self, url: str) -> Job:
        return Job(url, PWORK / "out" / "download.bin", self.data.stat().st_size, self.sha256)


# --- the paced server -----------------------------------------------------------------------------


class _PacedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, docroot: Path, rate: int) -> None:
        super().__init__(("127.0.0.1", 0), _PacedHandler)
        self.docroot = docroot
        self.rate = rate
        self.lock = threading.Lock()
        self.sent: dict[str, int] = {}  # X-Bench-Run header -> body bytes of completed responses

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a killed client: expected
            super().handle_error(request, client_address)

    def count(self, tag: str, sent: int) -> None:
        with self.lock:
            self.sent[tag] = self.sent.get(tag, 0) + sent


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) of a single `bytes=` range, None when it cannot be satisfied."""
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if m is None or not (m[1] or m[2]):
        return None
    if not m[1]:
        first, last = max(0, size - int(m[2])), size - 1
    else:
        first, last = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    return (first, last) if first <= last else None


class _PacedHandler(BaseHTTPRequestHandler):
    """GET and HEAD of a file in the docroot, with single ranges, ETag and If-Range."""

    protocol_version = "HTTP/1.1"
    server: _PacedHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, self.server.rate)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        path = self.server.docroot / name
        if not name or "/" in name or not path.is_file():
            self.send_error(404)
            return
        st = path.stat()
        etag, modified = f'"{st.st_size:x}-{st.st_mtime_ns:x}"', self.date_time_string(st.st_mtime)
        first, last, status = 0, st.st_size - 1, 200
        asked = self.headers.get("Range")
        if asked is not None and self.headers.get("If-Range", etag) in (etag, modified):
            span = parse_range(asked, st.st_size)
            if span is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{st.st_size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            (first, last), status = span, 206
        self.send_response(status)
        for key, value in (
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(last - first + 1)),
            ("Accept-Ranges", "bytes"),
            ("ETag", etag),
            ("Last-Modified", modified),
        ):
            self.send_header(key, value)
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{st.st_size}")
        self.end_headers()
        if body:
            self._send_file(path, first, last - first + 1)

    def _send_file(self, path: Path, offset: int, count: int) -> None:
        try:
            with open(path, "rb") as f:
                sent = self.connection.sendfile(f, offset, count)
        except OSError:  # the client went away (a killed run)
            self.close_connection = True
            return
        self.server.count(self.headers.get("X-Bench-Run", ""), sent)


class PacedServer:
    """The throttled server: every connection paced by the kernel to `rate` bytes/s."""

    def __init__(self, docroot: Path, rate: int) -> None:
        self.httpd = _PacedHTTPServer(docroot, rate)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        port: int = self.httpd.server_address[1]
        return port

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def sent(self, tag: str) -> int:
        with self.httpd.lock:
            return self.httpd.sent.get(tag, 0)

    def __enter__(self) -> PacedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- throughput -----------------------------------------------------------------------------------


def run_scenario(scenario: Scenario, url: str, server: Nginx) -> None:
    for n, rows in scenario.groups.items():
        _log(f"== {scenario.name}, N = {n}")
        run_rounds(rows, scenario.job(url), scenario.runs, scenario.warmups, server)


class _Unwatched(Nginx):
    """What run_rounds is given for the paced server: it asks its server, after a failure,
    whether it is still alive (the paced server is a thread of this process)."""

    def __init__(self) -> None:
        super().__init__("nginx", PWORK, PWORK)

    def check_alive(self) -> None:
        pass


def _limit_mbps(scenario: Scenario, n: int) -> float | None:
    return None if scenario.rate is None else n * scenario.rate / 1e6


def scenario_table(scenario: Scenario) -> str:
    header = ["N", "tool", "median MB/s", "surefetch ÷ tool"]
    if scenario.rate is not None:
        header.append(f"÷ (N {TIMES} limit)")
    header += ["peak RSS MiB", "runs", f"MB/s min{EN_DASH}max", "what"]
    body = []
    for n, rows in scenario.groups.items():
        sf, limit = rows[0], _limit_mbps(scenario, n)
        for row in rows:
            median = row.median()
            cells = [str(n), row.name, _cell(row.status) or _fmt(median, 0)]
            cells.append(_fmt(ratio(sf, row), 2) if row.mbps and sf.mbps else "—")
            if limit is not None:
                cells.append(_fmt(None if median is None else median / limit, 2))
            spread = f"{min(row.mbps.values()):.0f}{EN_DASH}{max(row.mbps.values()):.0f}"
            cells += [_fmt(row.peak_rss_kib / 1024 or None, 0), str(len(row.mbps))]
            cells += [spread if row.mbps else "—", row.tool.what]
            body.append(cells)
    return markdown_table(header, body)


# --- resume ---------------------------------------------------------------------------------------


class ResumeError(Exception):
    """One resume run went wrong; the message says how."""


@dataclass(frozen=True)
class ResumeRun:
    n: int
    killed_at: int  # bytes the first process had written when it was killed
    checkpointed: int  # bytes its part.json claimed by then
    resumed_from: int  # the second run's --json
    transferred: int  # the second run's --json bytes_transferred
    server_sent: int  # body bytes the server sent the second run
    seconds: float
    rss_kib: int

    @property
    def retransferred(self) -> int:
        return max(self.transferred, self.server_sent)


@dataclass
class Resume:
    n: int
    runs: list[ResumeRun] = field(default_factory=list)
    status: str | None = None

    def worst_pct(self, size: int) -> float | None:
        return max(r.retransferred for r in self.runs) * 100 / size if self.runs else None


def _wchar(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return 0
    m = re.search(r"^wchar: (\d+)$", text, re.M)
    return int(m[1]) if m else 0


def _checkpointed(out: Path) -> int:
    sidecar = out.parent / ".surefetch" / f"{out.name}.part.json"
    try:
        done = json.loads(sidecar.read_text()).get("ranges_done", [])
        return sum(int(end) - int(start) for start, end in done)
    except (OSError, ValueError, TypeError):
        return 0


def kill_halfway(argv: list[str], size: int, timeout: float) -> tuple[int, int]:
    """Runs argv and SIGKILLs it once it has written half of `size`: (written, checkpointed)."""
    with open(PWORK / "killed-stderr.log", "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    deadline, written = time.monotonic() + timeout, 0
    try:
        while written < size // 2:
            if proc.poll() is not None:
                raise ResumeError(f"the first run ended (exit {proc.returncode}) before 50 %")
            if time.monotonic() > deadline:
                raise ResumeError(f"the first run wrote {written} bytes in {timeout:.0f} s")
            time.sleep(0.002)
            written = _wchar(proc.pid)
    finally:
        _killpg(proc)
    return written, _checkpointed(Path(argv[argv.index("-o") + 1]))


def check_output(job: Job) -> str | None:
    if not job.out.exists():
        return f"no file at {job.out}"
    if job.out.stat().st_size != job.size:
        return f"wrong size {job.out.stat().st_size}, expected {job.size}"
    if _sha256_file(job.out) != job.sha256:
        return "wrong content (SHA-256 of the output differs)"
    return None


def _read_report(path: Path) -> tuple[int, int]:
    """(resumed_from, bytes_transferred) from the second run's --json output."""
    try:
        result = json.loads(path.read_text())
        return int(result["resumed_from"]), int(result["bytes_transferred"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"the second run's --json: {exc!r}") from exc


def resume_once(server: PacedServer, job: Job, n: int, tag: str) -> ResumeRun:
    """Kill at 50 %, then the same command with --json; outputs removed before and after."""
    argv = _surefetch("-c", str(n))(job)
    timeout = 60 + 2 * job.size / (n * server.httpd.rate)
    report = PWORK / "resume.json"
    _reset(job.out.parent)
    report.unlink(missing_ok=True)
    try:
        killed = [*argv, "-H", f"X-Bench-Run: {tag}-killed"]
        killed_at, checkpointed = kill_halfway(killed, job.size, timeout)
        again = [*argv, "--json", "-H", f"X-Bench-Run: {tag}"]
        shell = ["sh", "-c", 'out=$1; shift; exec "$@" >"$out"', "sh", str(report), *again]
        seconds, rss, error = run_process(shell, timeout, PWORK / "tool-stderr.log")
        problem = error or check_output(job)
        if problem:
            raise ResumeError(f"the second run: {problem}")
        resumed_from, transferred = _read_report(report)
    finally:
        _reset(job.out.parent)
    return ResumeRun(
        n, killed_at, checkpointed, resumed_from, transferred, server.sent(tag), seconds, rss
    )


def run_resume(server: PacedServer, job: Job, runs: int) -> list[Resume]:
    results = []
    for n in RESUME_CONNECTIONS:
        result = Resume(n)
        results.append(result)
        for r in range(runs):
            try:
                run = resume_once(server, job, n, f"resume-c{n}-{r}")
            except ResumeError as exc:
                result.status = f"failed: {exc}"
                _log(f"resume -c {n} [{r + 1}/{runs}]: FAILED {exc}")
                break
            result.runs.append(run)
            pct = [f"{100 * x / job.size:5.1f} %" for x in (run.killed_at, run.retransferred)]
            _log(
                f"resume -c {n} [{r + 1}/{runs}]: killed at {pct[0]} written, second run "
                f"transferred {pct[1]} in {run.seconds:.2f} s, {run.rss_kib / 1024:.0f} MiB"
            )
    return results


def resume_table(results: list[Resume], size: int) -> str:
    def pct(x: int) -> str:
        return f"{100 * x / size:.1f}"

    body = []
    for res in results:
        for i, run in enumerate(res.runs):
            body.append(
                [
                    *(str(res.n), str(i + 1), pct(run.killed_at), pct(run.checkpointed)),
                    *(pct(run.resumed_from), pct(run.transferred), pct(run.server_sent)),
                    *(f"{run.seconds:.2f}", _fmt(run.rss_kib / 1024 or None, 0), ""),
                ]
            )
        if res.status is not None:
            body.append([str(res.n), "—", *["—"] * 7, _cell(res.status)])
    header = ["N", "run", "killed at %", "checkpointed %", "resumed_from %"]
    header += ["2nd run: bytes_transferred %", "2nd run: server sent %", "2nd run s"]
    return markdown_table([*header, "peak RSS MiB", "notes"], body)


# --- gates ----------------------------------------------------------------------------------------


def throughput_gates(unthrottled: Scenario | None) -> list[Gate]:
    gates = []
    for rows in unthrottled.groups.values() if unthrottled else []:
        for peer in rows[1:]:
            gates.append(_ratio_gate(f"unthrottled {rows[0].name} / {peer.name}", rows[0], peer))
    return gates


def throttled_gate(throttled: Scenario | None) -> list[Gate]:
    n = max(CONNECTIONS)
    name = f"throttled surefetch-c{n} / ({n} {TIMES} the per-connection rate)"
    if throttled is None or throttled.rate is None:
        return [Gate(name, None, THROTTLED_TARGET, True, TIMES, "not selected")]
    sf, limit = throttled.groups[n][0], _limit_mbps(throttled, n)
    if sf.status is not None and sf.status.startswith("failed"):
        return [Gate(name, None, THROTTLED_TARGET, True, TIMES, broken=sf.status)]
    median = sf.median()
    if sf.status is not None or median is None or limit is None:
        return [Gate(name, None, THROTTLED_TARGET, True, TIMES, sf.status or "not measured")]
    return [Gate(name, median / limit, THROTTLED_TARGET, True, TIMES)]


def resume_gates(resumes: list[Resume] | None, size: int) -> list[Gate]:
    gates = []
    for res in resumes or []:
        name = f"resume -c {res.n}: second run transferred (worst run, % of the file)"
        if res.status is not None:
            gates.append(Gate(name, None, RESUME_TARGET_PCT, False, " %", broken=res.status))
        else:
            gates.append(Gate(name, res.worst_pct(size), RESUME_TARGET_PCT, False, " %"))
    return gates


def rss_gates(scenarios: list[Scenario], resumes: list[Resume] | None) -> list[Gate]:
    gates = []
    for n in CONNECTIONS:
        peaks = [s.groups[n][0].peak_rss_kib for s in scenarios if n in s.groups]
        peaks += [run.rss_kib for res in resumes or [] if res.n == n for run in res.runs]
        target = float(RSS_BASE_MIB + n * UNIT_MIB)
        name = f"surefetch-c{n} peak RSS"
        if any(peaks):
            gates.append(Gate(name, max(peaks) / 1024, target, False, " MiB"))
        else:
            gates.append(Gate(name, None, target, False, " MiB", "not measured"))
    return gates


# --- main -----------------------------------------------------------------------------------------


def _usage(msg: str) -> NoReturn:
    print(f"bench/parallel.py: {msg}", file=sys.stderr)
    sys.exit(2)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="128 MiB, fewer runs, no RESULTS.md")
    parser.add_argument("--size", type=int, help="unthrottled file size (1 GiB; quick: 128 MiB)")
    parser.add_argument("--runs", type=int, help="unthrottled counted runs per tool (5; quick: 2)")
    parser.add_argument("--warmups", type=int, help="uncounted runs before each unthrottled run")
    parser.add_argument("--throttled-size", type=int, help="throttled and resume file size")
    parser.add_argument("--rate", type=int, help="bytes/s per connection (50e6; quick: 10e6)")
    parser.add_argument("--throttled-runs", type=int, help="throttled runs per tool (3; quick: 1)")
    parser.add_argument("--resume-runs", type=int, help="kill-and-resume runs per N (3; quick: 1)")
    parser.add_argument("--only", metavar="PART,...", help=f"parts to run: {', '.join(PARTS)}")
    parser.add_argument("--no-write-results", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get or pip install")
    return parser.parse_args(argv)


def _params(args: argparse.Namespace) -> Params:
    base = QUICK if args.quick else FULL
    values = {
        key: getattr(args, key) if getattr(args, key) is not None else getattr(base, key)
        for key in (f.name for f in dataclasses.fields(Params))
    }
    params = Params(**values)
    positive = (params.size, params.runs, params.throttled_size, params.rate)
    if min(*positive, params.throttled_runs, params.resume_runs) <= 0 or params.warmups < 0:
        _usage("sizes, runs and the rate must be positive, --warmups not negative")
    return params


def _parts(only: str | None) -> list[str]:
    if only is None:
        return list(PARTS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    for n in names:
        if n not in PARTS:
            _usage(f"--only: unknown part {n!r}; the parts are: {', '.join(PARTS)}")
    return [p for p in PARTS if p in names]


@dataclass
class Results:
    scenarios: list[Scenario] = field(default_factory=list)
    resumes: list[Resume] | None = None
    nginx_version: str = "—"
    paced: tuple[Path, str] | None = None  # the throttled server's file and its SHA-256


def _scenario(name: str, data: tuple[Path, str], runs: int, warmups: int, aria2c: str) -> Scenario:
    scenario = Scenario(name, data[0], data[1], runs, warmups)
    for n in CONNECTIONS:
        scenario.groups[n] = [Row(t) for t in tools_for(n, aria2c)]
    return scenario


def _prepare(params: Params, parts: list[str], install: bool) -> Results:
    """The data files and the rows (their status set when a tool is unavailable)."""
    docroot, results = WORK / "www", Results()
    docroot.mkdir(parents=True, exist_ok=True)
    for d in (WORK, docroot):
        d.chmod(0o755)
    PWORK.mkdir(parents=True, exist_ok=True)
    aria2c, aria2c_status = find_aria2c(install)
    if "unthrottled" in parts:
        data = ensure_data(docroot, params.size)
        results.scenarios.append(
            _scenario("unthrottled", data, params.runs, params.warmups, aria2c)
        )
    if "throttled" in parts or "resume" in parts:
        results.paced = paced = ensure_data(docroot, params.throttled_size)
        if "throttled" in parts:
            throttled = _scenario("throttled", paced, params.throttled_runs, 0, aria2c)
            throttled.rate = params.rate
            results.scenarios.append(throttled)
    rows = [row for s in results.scenarios for row in s.rows()]
    check_rows(rows, install)
    for row in rows:
        if row.name.startswith("aria2c") and row.status is None:
            row.status = aria2c_status
    return results


def _measure_unthrottled(scenario: Scenario, results: Results, install: bool) -> None:
    nginx = Nginx(find_nginx(install), PWORK, scenario.data.parent)
    results.nginx_version = nginx.version()
    nginx.start(scenario.data.name, scenario.data.stat().st_size)
    try:
        run_scenario(scenario, nginx.url(scenario.data.name), nginx)
    finally:
        nginx.stop()


def _measure_paced(params: Params, results: Results, resume: bool) -> None:
    if results.paced is None:
        return
    data, sha256 = results.paced
    with PacedServer(data.parent, params.rate) as server:
        url = server.url(data.name)
        for scenario in results.scenarios:
            if scenario.name == "throttled":
                run_scenario(scenario, url, _Unwatched())
        if resume:
            job = Job(url, PWORK / "out" / "download.bin", params.throttled_size, sha256)
            results.resumes = run_resume(server, job, params.resume_runs)


def measure_all(params: Params, parts: list[str], install: bool) -> Results:
    results = _prepare(params, parts, install)
    try:
        for scenario in results.scenarios:
            if scenario.name == "unthrottled":
                _measure_unthrottled(scenario, results, install)
        _measure_paced(params, results, "resume" in parts)
    finally:
        shutil.rmtree(PWORK / "out", ignore_errors=True)
    return results


def report_text(params: Params, results: Results) -> tuple[str, list[Gate]]:
    sections: list[str] = []
    by_name = {s.name: s for s in results.scenarios}
    if "unthrottled" in by_name:
        sections += [
            f"Unthrottled: {_size_text(params.size)} from {results.nginx_version} on 127.0.0.1, "
            f"written beside it (bench/.work/); median of {params.runs} runs per tool, each "
            f"after {params.warmups} uncounted warm-up run(s); surefetch ÷ tool is the median of "
            "per-round ratios at the same N; MB = 10^6 bytes.",
            "",
            scenario_table(by_name["unthrottled"]),
            "",
        ]
    rate = f"{params.rate / 1e6:g} MB/s"
    if "throttled" in by_name:
        sections += [
            f"Throttled: {_size_text(params.throttled_size)} from a server pacing every "
            f"connection to {rate} (SO_MAX_PACING_RATE, sendfile; not nginx's per-request "
            f"`limit_rate`); median of {params.throttled_runs} runs per tool, no warm-up; "
            f"÷ (N {TIMES} limit) is the median MB/s over N {TIMES} {rate}.",
            "",
            scenario_table(by_name["throttled"]),
            "",
        ]
    if results.resumes is not None:
        sections += [
            f"Resume: `surefetch get -c N --sha256` of {_size_text(params.throttled_size)} at "
            f"{rate} per connection, SIGKILLed once it had written half the file (its `wchar`), "
            "then run again with `--json`; % of the file. checkpointed: what its part.json "
            "claimed at the kill; server sent: body bytes the server sent the second run.",
            "",
            resume_table(results.resumes, params.throttled_size),
            "",
        ]
    gates = throughput_gates(by_name.get("unthrottled")) + throttled_gate(by_name.get("throttled"))
    gates += resume_gates(results.resumes, params.throttled_size)
    gates += rss_gates(results.scenarios, results.resumes)
    sections += [g.line() for g in gates if g.skipped != "not selected"]
    return "\n".join(sections), gates


# --- RESULTS.md -----------------------------------------------------------------------------------

SECTION = "## Parallel connections and resume (bench/parallel.py)"


def write_results(args: argparse.Namespace, results: Results, report: str, when: str) -> None:
    why_not = results_withheld(args, (r for s in results.scenarios for r in s.rows()))
    if why_not is None and (
        results.resumes is None or any(r.status is not None for r in results.resumes)
    ):
        why_not = "a resume run failed"
    if why_not is not None:
        _log(f"not writing {RESULTS.relative_to(BENCH.parent)} ({why_not})")
        return
    aria2 = subprocess.run(["aria2c", "--version"], capture_output=True, text=True, check=False)
    info = machine_info(results.nginx_version)
    info.append(("aria2c", aria2.stdout.splitlines()[0] if aria2.returncode == 0 else "—"))
    lines = "\n".join(f"- {key}: {value}" for key, value in info)
    cmd = " ".join(["python bench/parallel.py", *sys.argv[1:]])
    section = f"{SECTION}\n\n{when}, `{cmd}`\n\n{lines}\n\n{report}\n"
    write_section(section)
    _log(f"wrote its section of {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    precompile_surefetch()
    params, parts = _params(args), _parts(args.only)
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        results = measure_all(params, parts, not args.no_install)
    except SetupError as exc:
        print(f"bench/parallel.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/parallel.py: interrupted", file=sys.stderr)
        return 130
    report, gates = report_text(params, results)
    print(report)
    failed = [g for g in gates if g.status == "FAIL"]
    for g in failed:
        print(f"FAILED: {g.line()}")
    print(
        f"bench/parallel.py: {'FAILED' if failed else 'ok'} in {time.monotonic() - started:.0f} s"
    )
    write_results(args, results, report, when)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
