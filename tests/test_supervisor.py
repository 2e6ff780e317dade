"""`surefetch supervise` and `surefetch ctl`: real supervisor and worker processes, real
signals, a real Unix socket, SQLite and PostgreSQL stores, HTTP from the FaultServer."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from surefetch.sessions import SessionStore
from surefetch.supervisor import request
from surefetch.testing import FaultServer

import pgcluster
from session_support import alive, wait_until
from support import SUREFETCH, payload, run_cli

# Fast timings, so that every test runs in seconds; each test overrides what it exercises.
FAST = {
    "--backoff-initial": "0.05",
    "--backoff-cap": "0.4",
    "--stable-after": "3",
    "--heartbeat-interval": "0.1",
    "--heartbeat-timeout": "1",
    "--poll-interval": "0.05",
    "--stop-grace": "1",
    "--cancel-grace": "1",
    "--start-timeout": "5",
    "--claim-ttl": "2",
}


class Supervisor:
    """One `surefetch supervise` process (in its own session), and every worker pid it had."""

    def __init__(
        self,
        tmp: Path,
        db: str,
        *,
        name: str = "sup",
        socket_dir: Path | None = None,
        **options: Any,
    ) -> None:
        self.socket = (socket_dir or tmp) / f"{name}.sock"
        self.log = tmp / f"{name}.log"
        opts = dict(FAST)
        for key, value in options.items():
            opts["--" + key.replace("_", "-")] = str(value)
        argv = [SUREFETCH, "supervise", "--socket", str(self.socket), "--db", db]
        for key, value in opts.items():
            argv += [key, value]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            start_new_session=True,
        )
        self.pids: set[int] = set()

    def wait_ready(self, workers: int | None = None, timeout: float = 8.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}: {self.stderr()}")
            if not self.socket.exists():
                return False
            states = [w["state"] for w in self.workers()]
            count = len(states) if workers is None else workers
            return states.count("running") >= count

        assert wait_until(ready, timeout), self.stderr()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = request(self.socket, {"op": op, **fields})
        assert reply["ok"], reply
        return reply

    def workers(self) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = self.ask("list-workers")["workers"]
        self.pids.update(w["pid"] for w in workers if w["pid"])
        return workers

    def worker(self, slot: str = "w0") -> dict[str, Any]:
        return next(w for w in self.workers() if w["id"] == slot)

    def replaced(self, pid: int, slot: str = "w0") -> bool:
        """True once the slot runs a worker other than ``pid`` that answered its handshake."""
        w = self.worker(slot)
        return w["state"] == "running" and w["pid"] not in (None, pid)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {job["id"]: job for job in self.ask("jobs")["jobs"]}

    def submit_get(self, url: str, dest: Path, sha256: str | None = None) -> str:
        spec: dict[str, Any] = {"url": url, "dest": str(dest)}
        if sha256 is not None:
            spec["sha256"] = sha256
        return str(self.ask("submit", kind="get", spec=spec)["id"])

    def wait_jobs(self, ids: list[str], state: str, timeout: float = 8.0) -> dict[str, Any]:
        def done() -> bool:
            jobs = self.jobs()
            bad = [jobs[i] for i in ids if jobs[i]["state"] in ("failed", "cancelled")]
            if state not in ("failed", "cancelled") and bad:
                raise AssertionError(f"job ended {bad[0]['state']}: {bad[0]}\n{self.stderr()}")
            return all(jobs[i]["state"] == state for i in ids)

        assert wait_until(done, timeout), (self.jobs(), self.stderr())
        return self.jobs()

    def kill(self) -> None:
        with_signal(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            with_signal(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for pid in self.pids:
            with_signal(pid, signal.SIGKILL)


def with_signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for sup in started:
        sup.close()


@pytest.fixture
def start(tmp_path: Path, db: str, supervisors: list[Supervisor]) -> Any:
    def start(*, wait: int | None = None, store: str | None = None, **options: Any) -> Supervisor:
        sup = Supervisor(tmp_path, store or db, name=f"sup{len(supervisors)}", **options)
        supervisors.append(sup)
        if wait != 0:
            sup.wait_ready(wait)
        return sup

    return start


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crashing_worker(tmp_path: Path, body: str) -> str:
    """A --worker-command: a shell script that runs `body` (it gets the worker's options)."""
    script = tmp_path / "worker.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


# --- the control socket and ctl ----------------------------------------------------------


def test_a_request_longer_than_a_supervisor_takes_is_refused_clearly(
    start: Any, tmp_path: Path
) -> None:
    """A batch submit over the 1 MiB a supervisor reads in one request: `request` says so
    before sending anything (it was a bare BrokenPipeError, with the supervisor's
    answer unread); a line too long sent anyway gets the supervisor's own answer."""
    import socket

    from surefetch.supervisor.control import MAX_LINE

    sup = start(workers=1)
    url = "http://127.0.0.1:9/" + "x" * 200
    jobs = [
        {"kind": "get", "spec": {"url": url, "dest": str(tmp_path / f"o{i}")}} for i in range(6000)
    ]
    with pytest.raises(ValueError, match=r"at most 1,048,576 in one: send fewer jobs per submit"):
        request(sup.socket, {"op": "submit", "jobs": jobs})
    assert sup.jobs() == {}
    fits = request(sup.socket, {"op": "submit", "jobs": jobs[:10]})
    assert fits["ok"] and len(fits["ids"]) == 10
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(sup.socket))
        with contextlib.suppress(ConnectionError):
            raw.sendall(b"{" + b" " * (MAX_LINE + 10))
        answer = json.loads(raw.makefile("rb").readline())
    assert answer["ok"] is False and "request too long" in answer["error"]


def test_ctl_submit_get_runs_the_job_and_reports_workers_and_jobs(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    data = payload(300_000)
    url = server.add("model.bin", data)
    sup = start(workers=2)
    mode = stat.S_IMODE(sup.socket.stat().st_mode)
    assert stat.S_ISSOCK(sup.socket.stat().st_mode) and mode == 0o600

    out = tmp_path / "out"
    out.mkdir()
    submitted = run_cli(
        ["ctl", "--socket", str(sup.socket), "submit", "get", url, "--sha256", sha256(data)],
        cwd=out,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    jobs = sup.wait_jobs([job_id], "succeeded")
    assert (out / "model.bin").read_bytes() == data  # -o defaults to ctl's working directory
    into = run_cli(["ctl", "--socket", str(sup.socket), "submit", "get", url, "-o", "new/"], out)
    assert into.returncode == 0, into.stderr
    sup.wait_jobs([into.stdout.strip()], "succeeded")
    assert (out / "new" / "model.bin").read_bytes() == data  # "DIR/": a directory, as for get

    listed = run_cli(["ctl", "jobs", "--socket", str(sup.socket), "--json"])
    assert listed.returncode == 0, listed.stderr
    (job,) = [j for j in json.loads(listed.stdout)["jobs"] if j["id"] == job_id]
    assert {k: job[k] for k in ("id", "kind", "state")} == {
        "id": job_id,
        "kind": "get",
        "state": "succeeded",
    }
    assert job["worker"] in ("w0", "w1") and jobs[job_id]["result"]["size"] == len(data)
    for limit, note in (("1", True), ("2", False)):  # two jobs: the table says when it cuts
        table = run_cli(["ctl", "jobs", "--socket", str(sup.socket), "--limit", limit])
        assert len(table.stdout.splitlines()) == 1 + int(limit), table.stdout
        assert ("only the newest 1 jobs are shown" in table.stderr) == note, table.stderr
        cut = run_cli(["ctl", "jobs", "--socket", str(sup.socket), "--limit", limit, "--json"])
        assert len(json.loads(cut.stdout)["jobs"]) == int(limit)
    summary = run_cli(["ctl", "jobs", "--socket", str(sup.socket), "--summary", "--json"])
    assert summary.returncode == 0, summary.stderr
    counts = {"queued": 0, "running": 0, "succeeded": 2, "failed": 0, "cancelled": 0}
    assert json.loads(summary.stdout) == {"counts": counts}
    text = run_cli(["ctl", "jobs", "--socket", str(sup.socket), "--summary"]).stdout
    assert text == "queued 0  running 0  succeeded 2  failed 0  cancelled 0\n"
    both = run_cli(["ctl", "jobs", "--socket", str(sup.socket), "--summary", "--state", "queued"])
    assert both.returncode == 2 and "drop --state" in both.stderr, both.stderr
    with open("/dev/full", "w") as full:  # submitted: exit 0, and the id said on stderr
        lost = subprocess.run(
            [SUREFETCH, "ctl", "--socket", str(sup.socket), "submit", "get", url, "-o", "lost"],
            cwd=out, stdout=full, stderr=subprocess.PIPE, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert lost.returncode == 0, lost.stderr
    (warning,) = lost.stderr.splitlines()
    lost_id = warning.rsplit("job ", 1)[1].split()[0]
    assert warning.endswith(f"job {lost_id} was submitted"), warning
    sup.wait_jobs([lost_id], "succeeded")

    workers = json.loads(
        run_cli(["ctl", "--socket", str(sup.socket), "list-workers", "--json"]).stdout
    )["workers"]
    assert [w["id"] for w in workers] == ["w0", "w1"]
    for w in workers:
        assert set(w) >= {"id", "kind", "pid", "state", "restarts", "jobs", "next_restart"}
        assert w["state"] == "running" and alive(w["pid"]) and w["restarts"] == 0

    as_json = run_cli(
        ["ctl", "--socket", str(sup.socket), "submit", "get", url, "-o", "x.bin", "--json"],
        cwd=out,
    )
    second = json.loads(as_json.stdout)["id"]
    sup.wait_jobs([second], "succeeded")
    assert (out / "x.bin").read_bytes() == data

    # The session belongs to the user who submitted it.
    store = SessionStore(sup_db(sup))
    session = store.lookup(job_id)
    store.close()
    assert session is not None and session.status == "succeeded"
    assert session.metadata["url"] == url


def sup_db(sup: Supervisor) -> str:
    argv = sup.proc.args
    assert isinstance(argv, list)
    return str(argv[argv.index("--db") + 1])


def test_ctl_errors_are_one_line_with_documented_exit_codes(
    start: Any, tmp_path: Path, db: str
) -> None:
    missing = run_cli(["ctl", "--socket", str(tmp_path / "none.sock"), "jobs"])
    assert missing.returncode == 1
    assert "no supervisor is listening" in missing.stderr and missing.stderr.count("\n") == 1

    sup = start(workers=1)
    bad_scheme = run_cli(
        ["ctl", "--socket", str(sup.socket), "submit", "get", "file:///etc/passwd"]
    )
    assert bad_scheme.returncode == 2 and "only http:// and https://" in bad_scheme.stderr
    bad_hash = run_cli(
        ["ctl", "--socket", str(sup.socket), "submit", "get", "http://x/a", "--sha256", "zz"]
    )
    assert bad_hash.returncode == 2 and "64 hex digits" in bad_hash.stderr
    unknown = run_cli(["ctl", "--socket", str(sup.socket), "cancel", "nosuchjob"])
    assert unknown.returncode == 1 and "no session" in unknown.stderr
    assert sup.jobs() == {}

    # A second supervisor on the same socket is refused, and the first keeps running.
    second = run_cli(["supervise", "--socket", str(sup.socket), "--db", db], timeout=10)
    assert second.returncode == 1 and "another supervisor is running" in second.stderr
    assert sup.proc.poll() is None and sup.worker()["state"] == "running"


def test_ctl_wait_answers_once_the_jobs_end_with_the_worst_outcome(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    sup = start(workers=2)
    data = payload(200_000)
    url = server.add("w.bin", data)
    sock = ["--socket", str(sup.socket)]

    def wait(*ids: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return run_cli(["ctl", *sock, "wait", *ids, *options], timeout=20)

    # Two that succeed, slowly: the answer comes once both are in place.
    slow = [
        sup.submit_get(url + f"?throttle=400000&_={i}", tmp_path / f"ok{i}.bin", sha256(data))
        for i in range(2)
    ]
    ok = wait(*slow, options=("--json",))
    assert ok.returncode == 0, ok.stderr
    counts = {"queued": 0, "running": 0, "succeeded": 2, "failed": 0, "cancelled": 0}
    assert json.loads(ok.stdout) == {"done": True, "counts": counts}
    assert all((tmp_path / f"ok{i}.bin").read_bytes() == data for i in range(2))
    assert wait(slow[0]).stdout == "queued 0  running 0  succeeded 1  failed 0  cancelled 0\n"

    # The exit code is the worst outcome: a failed job among good ones is exit 1, one line.
    missing = sup.submit_get(server.url_for("nothing-here"), tmp_path / "missing.bin")
    failed = wait(slow[0], missing)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
    assert "1 of 2 job(s) failed" in failed.stderr and not (tmp_path / "missing.bin").exists()

    # Out of time: exit 5 and what is still unfinished; the job itself goes on.
    stalled = sup.submit_get(url + "?stall_after=1000&stall=30", tmp_path / "stalled.bin")
    late = wait(stalled, "--timeout", "0.3", options=("--json",))
    assert late.returncode == 5, late.stderr
    assert json.loads(late.stdout)["done"] is False
    assert "1 of 1 job(s) still queued or running after 0.3s" in late.stderr
    assert sup.jobs()[stalled]["state"] in ("queued", "running")

    # A cancelled job ends the wait too (exit 1).
    assert sup.ask("cancel", id=stalled)["changed"]
    cancelled = wait(stalled)
    assert cancelled.returncode == 1 and "1 were cancelled" in cancelled.stderr

    # Unknown ids and bad arguments are refused at once.
    unknown = wait(slow[0], "nosuchjob")
    assert unknown.returncode == 1 and "no job nosuchjob of yours" in unknown.stderr
    store = SessionStore(sup_db(sup))  # a session of the user's that is no supervised job
    plain = store.create(pwd.getpwuid(os.getuid()).pw_name, "not a job").id
    store.close()
    not_a_job = wait(plain)
    assert not_a_job.returncode == 1 and f"no job {plain} of yours" in not_a_job.stderr
    negative = wait(slow[0], "--timeout", "-1")
    assert negative.returncode == 2 and "--timeout" in negative.stderr
    assert request(sup.socket, {"op": "wait", "ids": []})["exit"] == 2


def test_ctl_wait_is_told_when_the_supervisor_stops(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    sup = start(workers=1)
    url = server.add("long.bin", payload(4 << 20)) + "?throttle=500000"
    job = sup.submit_get(url, tmp_path / "long.bin")
    sup.wait_jobs([job], "running")
    waiting = subprocess.Popen(
        [SUREFETCH, "ctl", "--socket", str(sup.socket), "wait", job],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # the wait is under way
    assert waiting.poll() is None
    os.kill(sup.proc.pid, signal.SIGTERM)
    _, err = waiting.communicate(timeout=10)
    assert waiting.returncode == 1, err
    assert "the supervisor is stopping before the jobs finished" in err
    assert sup.proc.wait(5) == 0


def test_socket_refuses_other_users(start: Any, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")  # CI runs as root
    shared = Path(tempfile.mkdtemp(prefix="sf-sock-", dir="/tmp"))
    shared.chmod(0o755)
    try:
        sup = start(workers=1, socket_dir=shared)
        client = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except PermissionError:\n"
            "    print('denied'); sys.exit(0)\n"
            "print(s.makefile().readline())\n"  # answered before it can even ask
        )

        def as_nobody() -> str:
            done = subprocess.run(
                ["/usr/bin/python3", "-c", client, str(sup.socket)],
                capture_output=True,
                text=True,
                user=65534,
                timeout=20,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert as_nobody().strip() == "denied"  # mode 0600
        sup.socket.chmod(0o666)  # even with the mode opened up, the peer's uid is checked
        reply = json.loads(as_nobody())
        assert reply["ok"] is False and "own user" in reply["error"]
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_same_host_id_twice_on_one_store_is_refused(start: Any, db: str, tmp_path: Path) -> None:
    start(workers=1, host_id="alpha")
    clash = run_cli(
        ["supervise", "--socket", str(tmp_path / "b.sock"), "--db", db, "--host-id", "alpha"],
        timeout=10,
    )
    assert clash.returncode == 1
    assert "holds host id 'alpha'" in clash.stderr and "another --host-id" in clash.stderr


# --- restarts -------------------------------------------------------------------------------


def test_killed_worker_comes_back_and_its_jobs_finish_with_bounded_retransfer(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    size = 3 << 20
    files = {f"f{i}.bin": payload(size, seed=i) for i in range(2)}
    urls = {name: server.add(name, data) + "?throttle=2000000" for name, data in files.items()}
    sup = start(workers=1)
    old = sup.worker()["pid"]
    ids = {
        name: sup.submit_get(url, tmp_path / name, sha256(files[name]))
        for name, url in urls.items()
    }
    assert wait_until(lambda: server.bytes_sent >= size, 5)  # about a third of each
    os.kill(old, signal.SIGKILL)

    assert wait_until(lambda: sup.replaced(old), 5), sup.stderr()
    w = sup.worker()
    assert w["restarts"] == 1 and w["state"] == "running" and not alive(old)
    assert "killed by SIGKILL" in sup.stderr()
    jobs = sup.wait_jobs(list(ids.values()), "succeeded", timeout=8)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
        assert server.bytes_sent_for(name) <= size * 1.25, "the restarted job started over"
        assert jobs[ids[name]]["result"]["resumed_from"] > 0


def test_repeated_kills_grow_the_delay_then_stability_resets_it(start: Any) -> None:
    sup = start(workers=1, backoff_initial=0.1, backoff_cap=5, backoff_jitter=0.2, stable_after=1)
    delays = []
    for _ in range(3):
        pid = sup.worker()["pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_until(functools.partial(sup.replaced, pid), 5)
        delays.append(sup.worker()["last_delay_s"])
    assert 0.08 <= delays[0] <= 0.1
    assert delays[0] < delays[1] < delays[2]
    assert 0.16 <= delays[1] <= 0.2 and 0.32 <= delays[2] <= 0.4
    assert sup.worker()["failures"] == 3

    assert wait_until(lambda: sup.worker()["failures"] == 0, 3)  # stable for 1 s
    pid = sup.worker()["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: sup.replaced(pid), 5)
    assert 0.08 <= sup.worker()["last_delay_s"] <= 0.1
    assert sup.worker()["restarts"] == 4


def test_worker_crashing_at_start_goes_degraded_and_keeps_retrying_at_the_cap(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    # Slot w0's worker dies at start; w1's is the real one.
    command = crashing_worker(
        tmp_path,
        'case "$*" in *"--slot w0"*) echo "cannot start: disk on fire" >&2; exit 1;; esac\n'
        f'exec {sys.executable} -m surefetch.worker "$@"',
    )
    sup = start(
        wait=0,
        workers=2,
        worker_command=command,
        backoff_initial=0.02,
        backoff_cap=0.1,
        degraded_after=4,
        degraded_window=30,
    )
    assert wait_until(lambda: sup.socket.exists() and sup.worker("w0")["degraded"], 5)
    w0 = sup.worker("w0")
    assert w0["state"] == "degraded"
    assert "exited 1: cannot start: disk on fire" in w0["reason"]
    first = w0["restarts"]
    time.sleep(0.6)
    w0 = sup.worker("w0")
    assert w0["degraded"], "degraded is reported, not cleared, while it keeps failing"
    # Still retrying: at most one delay of the cap between attempts (0.08 to 0.1 s, plus the start).
    assert 3 <= w0["restarts"] - first <= 8
    assert 0.08 <= w0["last_delay_s"] <= 0.1
    assert "degraded" in sup.stderr()

    # Its jobs go to the healthy worker.
    data = payload(10_000)
    job = sup.submit_get(server.add("a.bin", data), tmp_path / "a.bin")
    jobs = sup.wait_jobs([job], "succeeded")
    assert jobs[job]["worker"] == "w1" and (tmp_path / "a.bin").read_bytes() == data


def test_permanent_exit_stops_restarts_and_says_why(start: Any, tmp_path: Path) -> None:
    command = crashing_worker(tmp_path, 'echo "store URL is not valid" >&2\nexit 78')
    sup = start(wait=0, workers=1, worker_command=command)
    assert wait_until(lambda: sup.socket.exists() and sup.worker()["state"] == "stopped", 5)
    w = sup.worker()
    assert w["reason"] == "exited 78 (bad configuration); not restarted: store URL is not valid"
    time.sleep(0.3)
    assert sup.worker()["restarts"] == w["restarts"] == 0
    assert sup.proc.poll() is None  # the supervisor itself keeps serving


def test_hung_worker_is_detected_killed_and_replaced(start: Any) -> None:
    sup = start(workers=1, heartbeat_interval=0.1, heartbeat_timeout=0.5)
    pid = sup.worker()["pid"]
    os.kill(pid, signal.SIGSTOP)
    assert wait_until(lambda: sup.replaced(pid), 3), sup.stderr()
    assert wait_until(lambda: not alive(pid), 1)
    assert "hung: no answer to heartbeats" in sup.stderr()
    assert sup.worker()["failures"] == 1


def test_worker_that_never_answers_the_handshake_is_killed(start: Any, tmp_path: Path) -> None:
    command = crashing_worker(tmp_path, "exec sleep 60")
    sup = start(wait=0, workers=1, worker_command=command, start_timeout=0.3)
    assert wait_until(lambda: sup.socket.exists() and sup.worker()["failures"] >= 2, 5)
    assert "did not answer the handshake within 0.3s" in sup.worker()["reason"]
    assert sup.worker()["state"] != "running"


# --- cancellation ----------------------------------------------------------------------------


def test_cancel_one_job_leaves_the_workers_other_jobs_running(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    size = 2 << 20
    sup = start(workers=1)
    pid = sup.worker()["pid"]
    ids = [
        sup.submit_get(
            server.add(f"c{i}.bin", payload(size, i)) + "?throttle=1500000", tmp_path / f"c{i}.bin"
        )
        for i in range(3)
    ]
    sup.wait_jobs(ids, "running")
    started = time.monotonic()
    cancelled = run_cli(["ctl", "--socket", str(sup.socket), "cancel", ids[0]])
    assert cancelled.returncode == 0 and "requested" in cancelled.stdout
    sup.wait_jobs([ids[0]], "cancelled", timeout=3)
    assert time.monotonic() - started < 1.0  # through the worker, not its grace period

    jobs = sup.jobs()
    assert [jobs[i]["state"] for i in ids[1:]] == ["running", "running"]
    assert sup.worker()["pid"] == pid and sup.worker()["restarts"] == 0
    sup.wait_jobs(ids[1:], "succeeded")
    assert not (tmp_path / "c0.bin").exists()
    again = run_cli(["ctl", "--socket", str(sup.socket), "cancel", ids[0]])
    assert again.returncode == 0 and "nothing to do" in again.stdout

    store = SessionStore(sup_db(sup))
    session = store.lookup(ids[0])
    store.close()
    assert session is not None and session.cancellation_status == "cancelled"


def test_cancel_falls_back_to_signals_when_the_worker_does_not_answer(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    size = 2 << 20
    sup = start(workers=1, cancel_grace=0.3, stop_grace=0.3, heartbeat_timeout=30)
    pid = sup.worker()["pid"]
    victim, other = (
        sup.submit_get(
            server.add(f"h{i}.bin", payload(size, i)) + "?throttle=1000000", tmp_path / f"h{i}.bin"
        )
        for i in range(2)
    )
    sup.wait_jobs([victim, other], "running")
    os.kill(pid, signal.SIGSTOP)  # it can no longer hear the cancel
    assert sup.ask("cancel", id=victim)["changed"]
    sup.wait_jobs([victim], "cancelled", timeout=4)
    assert not alive(pid)
    assert "did not stop job" in sup.stderr()
    sup.wait_jobs([other], "succeeded", timeout=8)  # resumed by the replacement worker
    assert (tmp_path / "h1.bin").read_bytes() == payload(size, 1)


def test_a_worker_keeps_its_next_jobs_started_and_runs_only_its_share(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    sup = start(workers=1, jobs_per_worker=1)
    data = payload(50_000)
    names = ["first.bin", "s1.bin", "s2.bin", "last.bin"]
    urls = {name: server.add(name, data) for name in names}
    for stalled in ("s1.bin", "s2.bin"):
        urls[stalled] += "?stall=30"  # stalls at byte 0 until cancelled
    batch = [
        {"kind": "get", "spec": {"url": urls[name], "dest": str(tmp_path / name)}} for name in names
    ]
    first, s1, s2, last = sup.ask("submit", jobs=batch)["ids"]
    # The end of `first` takes s1 and s2 (the worker holds two jobs: one to run, one
    # ready); one of them runs (and stalls), the other waits, started, for its turn.
    sup.wait_jobs([first], "succeeded")
    sup.wait_jobs([s1, s2], "running")
    assert wait_until(
        lambda: server.request_count("s1.bin") + server.request_count("s2.bin") > 0, 5
    )
    asked = {job: server.request_count(name) for job, name in ((s1, "s1.bin"), (s2, "s2.bin"))}
    ((waiting, _),) = [(job, n) for job, n in asked.items() if n == 0]
    (running,) = [job for job in asked if job != waiting]
    assert sup.jobs()[last]["state"] == "queued"
    # A job waiting for its turn is cancelled at once, without a request.
    assert sup.ask("cancel", id=waiting)["changed"]
    sup.wait_jobs([waiting], "cancelled", timeout=3)
    assert sum(asked.values()) == server.request_count("s1.bin") + server.request_count("s2.bin")
    # The running one is cancelled alone; then the last job runs.
    assert sup.ask("cancel", id=running)["changed"]
    sup.wait_jobs([running], "cancelled", timeout=3)
    sup.wait_jobs([last], "succeeded")
    assert (tmp_path / "last.bin").read_bytes() == data
    assert not (tmp_path / "s1.bin").exists() and not (tmp_path / "s2.bin").exists()


def test_queued_job_cancelled_before_it_starts(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    sup = start(workers=1, jobs_per_worker=1)
    url = server.add("q.bin", payload(1 << 20))
    busy = sup.submit_get(url + "?throttle=1000000", tmp_path / "busy.bin")
    queued = sup.submit_get(url, tmp_path / "q.bin")
    sup.wait_jobs([busy], "running")
    assert sup.jobs()[queued]["state"] == "queued"
    assert sup.ask("cancel", id=queued)["changed"]
    sup.wait_jobs([queued], "cancelled", timeout=2)
    sup.wait_jobs([busy], "succeeded", timeout=5)
    # Only the busy one's (counted once it is over: "running" is committed before its
    # request leaves).
    assert server.request_count("q.bin") == 1


# --- shutdown and crashes of the supervisor --------------------------------------------------


def test_shutdown_stops_everything_and_the_next_supervisor_resumes(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    size = 3 << 20
    data = payload(size)
    url = server.add("s.bin", data) + "?throttle=2000000"
    sup = start(workers=2)
    pids = [w["pid"] for w in sup.workers()]
    job = sup.submit_get(url, tmp_path / "s.bin", sha256(data))
    assert wait_until(lambda: server.bytes_sent >= size // 3, 5)

    stopped = run_cli(["ctl", "--socket", str(sup.socket), "shutdown"], timeout=20)
    assert stopped.returncode == 0, stopped.stderr
    assert sup.proc.wait(5) == 0
    assert not sup.socket.exists() and not Path(str(sup.socket) + ".lock").exists()
    assert not any(alive(pid) for pid in pids)
    assert (tmp_path / ".surefetch" / "s.bin.part").exists()
    assert not (tmp_path / "s.bin").exists()

    sup2 = start(workers=1)
    jobs = sup2.wait_jobs([job], "succeeded", timeout=8)
    assert jobs[job]["result"]["resumed_from"] > 0
    assert (tmp_path / "s.bin").read_bytes() == data
    assert server.bytes_sent_for("s.bin") <= size * 1.25


def test_sigterm_stops_cleanly_with_exit_0(start: Any) -> None:
    sup = start(workers=2)
    pids = [w["pid"] for w in sup.workers()]
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(5) == 0
    assert not sup.socket.exists() and not any(alive(pid) for pid in pids)
    assert "stopped" in sup.stderr()


def test_supervisor_sigkill_leaves_no_orphan_and_the_next_one_finishes_the_jobs(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    size = 3 << 20
    files = {f"k{i}.bin": payload(size, i) for i in range(2)}
    sup = start(workers=2)
    pids = [w["pid"] for w in sup.workers()]
    ids = [
        sup.submit_get(server.add(name, data) + "?throttle=2000000", tmp_path / name)
        for name, data in files.items()
    ]
    assert wait_until(lambda: server.bytes_sent >= size, 5)
    sup.kill()
    killed = time.monotonic()
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 1.0), "orphaned workers"
    assert time.monotonic() - killed <= 1.0

    sup2 = start(workers=2)
    sup2.wait_jobs(ids, "succeeded", timeout=8)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
        assert server.bytes_sent_for(name) <= size * 1.25


# --- many hosts on PostgreSQL ---------------------------------------------------------------


def test_two_supervisors_on_postgresql_run_each_job_once(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    pg = pgcluster.fresh_url()
    a = start(store=pg, host_id="host-a", workers=2, jobs_per_worker=2)
    b = start(store=pg, host_id="host-b", workers=2, jobs_per_worker=2)
    files = {f"p{i}.bin": payload(200_000, i) for i in range(24)}
    ids = {
        name: (a if i % 2 else b).submit_get(
            server.add(name, data) + "?throttle=1000000", tmp_path / name
        )
        for i, (name, data) in enumerate(files.items())
    }
    jobs = a.wait_jobs(list(ids.values()), "succeeded", timeout=9)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
        assert server.request_count(name, "GET") == 1, f"{name} was fetched twice"
    hosts = {jobs[i]["host"] for i in ids.values()}
    assert hosts == {"host-a", "host-b"}
    assert b.jobs().keys() == jobs.keys()  # one queue, seen from either host


def test_cancel_reaches_the_host_running_the_job(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    pg = pgcluster.fresh_url()
    a = start(store=pg, host_id="host-a", workers=1, jobs_per_worker=2)
    b = start(store=pg, host_id="host-b", workers=1, jobs_per_worker=2)
    url = server.add("x.bin", payload(2 << 20)) + "?throttle=1000000"
    ids = [a.submit_get(url + f"&_={i}", tmp_path / f"x{i}.bin") for i in range(4)]
    jobs = a.wait_jobs(ids, "running")
    on_b = next(i for i in ids if jobs[i]["host"] == "host-b")
    b_pid = b.worker()["pid"]
    started = time.monotonic()
    assert a.ask("cancel", id=on_b)["changed"]  # asked on host a
    a.wait_jobs([on_b], "cancelled", timeout=3)
    assert time.monotonic() - started < 1.5
    assert b.worker()["pid"] == b_pid  # delivered to b's worker, not by killing it


def test_jobs_of_a_silent_host_are_requeued_and_finished_elsewhere(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    pg = pgcluster.fresh_url()
    size = 2 << 20
    data = payload(size)
    a = start(store=pg, host_id="host-a", workers=1, claim_ttl=1)
    a_pid = a.worker()["pid"]
    job = a.submit_get(server.add("r.bin", data) + "?throttle=1500000", tmp_path / "r.bin")
    a.wait_jobs([job], "running")
    b = start(store=pg, host_id="host-b", workers=1, claim_ttl=1)
    assert wait_until(lambda: server.bytes_sent >= size // 3, 5)
    a.kill()  # host a goes silent; its claims expire after 1 s
    assert wait_until(lambda: not alive(a_pid), 1)
    jobs = b.wait_jobs([job], "succeeded", timeout=9)
    assert jobs[job]["host"] == "host-b" and jobs[job]["result"]["resumed_from"] > 0
    assert (tmp_path / "r.bin").read_bytes() == data
    assert "re-queued 1 job(s) of a silent host" in b.stderr()


# --- sync jobs and jobs that keep killing their worker ----------------------------------------


def test_ctl_submit_sync_installs_the_manifest(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    files = {f"s{i}.bin": payload(50_000, i) for i in range(3)}
    project = tmp_path / "project"
    project.mkdir()
    lines = []
    for name, data in files.items():
        url = server.add(name, data)
        lines.append(f'[[artifact]]\nname = "{name}"\nurl = "{url}"\nsha256 = "{sha256(data)}"\n')
    (project / "surefetch.toml").write_text("\n".join(lines))
    sup = start(workers=1)
    submitted = run_cli(
        ["ctl", "--socket", str(sup.socket), "submit", "sync", "--dest", "vendor", "--json"],
        cwd=project,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["id"]
    jobs = sup.wait_jobs([job], "succeeded")
    assert jobs[job]["kind"] == "sync"
    assert sorted(jobs[job]["result"]["installed"]) == sorted(files)
    for name, data in files.items():
        assert (project / "vendor" / name).read_bytes() == data
    assert "[[artifact]]" in (project / "surefetch.lock").read_text()

    # A sync that cannot succeed fails its job and leaves no lockfile change.
    before = (project / "surefetch.lock").read_bytes()
    (project / "surefetch.toml").write_text('[[artifact]]\nname = "../escape"\nurl = "http://x/"\n')
    bad = sup.ask(
        "submit",
        kind="sync",
        spec={
            "manifest": str(project / "surefetch.toml"),
            "lock": str(project / "surefetch.lock"),
            "dest": str(project / "vendor"),
        },
    )["id"]
    failed = sup.wait_jobs([bad], "failed")
    assert "ManifestError" in failed[bad]["error"]
    assert (project / "surefetch.lock").read_bytes() == before


def test_a_job_whose_worker_keeps_dying_fails_after_max_crashes(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    sup = start(workers=1, max_job_crashes=2, backoff_initial=0.05)
    url = server.add("p.bin", payload(2 << 20)) + "?throttle=1000000"
    job = sup.submit_get(url, tmp_path / "p.bin")
    for _ in range(2):
        sup.wait_jobs([job], "running")
        pid = sup.worker()["pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_until(functools.partial(sup.replaced, pid), 5)
    failed = sup.wait_jobs([job], "failed", timeout=3)
    assert "its worker died 2 times while running it" in failed[job]["error"]
    # The worker slot itself is healthy again and takes new work.
    other = sup.submit_get(server.add("ok.bin", b"fine"), tmp_path / "ok.bin")
    sup.wait_jobs([other], "succeeded")


def test_a_crash_counts_against_the_job_that_ran_not_the_jobs_waiting_in_the_worker(
    start: Any, server: FaultServer, tmp_path: Path
) -> None:
    """A worker takes jobs ahead of time and holds them, started in the store, until a
    place frees. A poison job that kills its worker fails (here at its first crash); the
    job that only waited behind it is spared the crash and succeeds."""
    sup = start(workers=1, jobs_per_worker=1, max_job_crashes=1, backoff_initial=0.05)
    first = sup.submit_get(server.add("first.bin", b"1" * 1000), tmp_path / "first.bin")
    poison = sup.submit_get(
        server.add("p.bin", payload(2 << 20)) + "?throttle=1000000", tmp_path / "p.bin"
    )
    waiting = sup.submit_get(server.add("w.bin", b"w" * 1000), tmp_path / "w.bin")
    sup.wait_jobs([first], "succeeded")
    # The poison job downloading (its request reached the server), the other held.
    assert wait_until(lambda: server.request_count("p.bin") > 0, 5)
    assert server.request_count("w.bin") == 0
    pid = sup.worker()["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(functools.partial(sup.replaced, pid), 5)
    failed = sup.wait_jobs([poison], "failed", timeout=5)
    assert "its worker died once while running it" in failed[poison]["error"]
    sup.wait_jobs([waiting], "succeeded", timeout=5)
    assert (tmp_path / "w.bin").read_bytes() == b"w" * 1000


# --- one cancellation story: the supervisor enforces its jobs, an enforcer never does -----------


def test_an_enforcer_next_to_the_supervisor_leaves_its_worker_alone(
    start: Any, server: FaultServer, tmp_path: Path, db: str
) -> None:
    size = 4 << 20
    # Cancels asked in the store reach this supervisor at its next poll, up to 1 s later:
    # plenty of rounds for an enforcer of the same host to act, if it would.
    sup = start(workers=1, poll_interval=1.0, claim_ttl=10)
    pid = sup.worker()["pid"]
    victim, other = (
        sup.submit_get(
            server.add(f"e{i}.bin", payload(size, i)) + "?throttle=1000000", tmp_path / f"e{i}.bin"
        )
        for i in range(2)
    )
    sup.wait_jobs([victim, other], "running")
    log = tmp_path / "enforce.log"
    enforcer = subprocess.Popen(
        [SUREFETCH, "enforce", "--db", db, "--interval", "0.02", "--grace", "0.5"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    try:
        assert wait_until(lambda: "stopping the cancelled sessions" in log.read_text(), 5)
        store = SessionStore(db)
        session = store.lookup(victim)
        assert session is not None and session.pid == pid  # the worker's pid, on this host
        assert store.request_cancel(victim, session.owner)
        assert store.pending_cancellations(session.host) == []  # not the enforcer's to stop
        store.close()
        sup.wait_jobs([victim], "cancelled", timeout=4)  # by the supervisor, through the token
        worker = sup.worker()
        assert alive(pid) and worker["pid"] == pid and worker["restarts"] == 0
        sup.wait_jobs([other], "succeeded", timeout=10)  # the worker's other job went on
        assert victim not in log.read_text()
        enforcer.send_signal(signal.SIGTERM)
        assert enforcer.wait(10) == 0
    finally:
        if enforcer.poll() is None:
            with_signal(enforcer.pid, signal.SIGKILL)
            enforcer.wait(5)


def test_the_control_socket_appears_only_once_it_listens(tmp_path: Path) -> None:
    """A client that finds the socket can connect: it is bound under another name and
    renamed into place after listen(). Here listen() is held back half a second (strace
    fault injection); before, the path existed meanwhile and connections were refused."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("this test needs strace (scripts/system-deps installs it)")
    sock = tmp_path / "late.sock"
    argv = [SUREFETCH, "supervise", "--socket", str(sock), "--workers", "1"]
    argv += ["--db", f"sqlite:///{tmp_path / 'jobs.db'}"]
    proc = subprocess.Popen(
        [strace, "-f", "-o", "/dev/null", "-e", "inject=listen:delay_enter=500000", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert wait_until(sock.exists, 15), proc.stderr
        assert "workers" in request(sock, {"op": "list-workers"})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
