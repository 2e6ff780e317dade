"""`surefetch sessions|users|serve` as a user runs them: real processes, real stores."""

from __future__ import annotations

import getpass
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from surefetch.jobs import JobQueue
from surefetch.sessions import SessionStore, host_id

from session_support import Children, alive, children, store, store_url, wait_until

__all__ = ["children", "store", "store_url"]  # fixtures, imported for pytest


def sf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "surefetch.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_list_show_cancel_json(store: SessionStore) -> None:
    meta = {"k": ["v", 1]}
    a1 = store.create("alice", "first", meta)
    a2 = store.create("alice", "second")
    store.create("bob", "bob's")
    db = ("--db", store.url)

    out = sf("sessions", "list", *db, "--user", "alice", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [s["id"] for s in listed["sessions"]] == [a2.id, a1.id]
    assert listed["sessions"][1] == a1.to_dict()

    out = sf("sessions", "show", a1.id, *db, "--user", "alice", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == a1.to_dict()

    out = sf("sessions", "cancel", a1.id, *db, "--user", "alice", "--json")
    assert out.returncode == 0
    result = json.loads(out.stdout)
    assert result["changed"] is True and result["id"] == a1.id
    assert result["session"]["cancellation_status"] == "requested"
    assert result["session"]["metadata"] == meta
    again = sf("sessions", "cancel", a1.id, *db, "--user", "alice", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False

    out = sf("sessions", "list", *db, "--user", "alice", "--status", "pending", "--json")
    assert len(json.loads(out.stdout)["sessions"]) == 2


def test_human_output(store: SessionStore) -> None:
    s = store.create("alice", "sync models")
    db = ("--db", store.url, "--user", "alice")
    out = sf("sessions", "list", *db)
    assert out.returncode == 0
    assert s.id in out.stdout and "sync models" in out.stdout and "pending" in out.stdout
    out = sf("sessions", "show", s.id, *db)
    assert re.search(r"^title:\s+sync models$", out.stdout, re.M)
    out = sf("sessions", "cancel", s.id, *db)
    assert out.returncode == 0 and "has no process and will not start" in out.stdout
    out = sf("sessions", "cancel", s.id, *db)
    assert "already requested by alice" in out.stdout
    done = store.create("alice", "done")
    store.finish(done.id, "succeeded")
    out = sf("sessions", "cancel", done.id, *db)
    assert out.returncode == 0 and "already finished (succeeded); nothing to cancel" in out.stdout
    assert store.get(done.id, "alice").status == "succeeded"


def test_users_are_isolated_in_the_cli(store: SessionStore) -> None:
    s = store.create("alice", "mine")
    db = ("--db", store.url)
    out = sf("sessions", "list", *db, "--user", "bob", "--json")
    assert json.loads(out.stdout) == {"sessions": []}
    for action in ("show", "cancel"):
        out = sf("sessions", action, s.id, *db, "--user", "bob")
        assert out.returncode == 1
        assert out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "belongs to another user" in lines[0]
    assert store.get(s.id, "alice").cancellation_status == "none"


def test_unknown_session_and_usage_errors(store: SessionStore) -> None:
    out = sf("sessions", "show", "0" * 32, "--db", store.url)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no session" in lines[0] and "sessions list" in lines[0]
    assert sf("sessions", "show").returncode == 2
    assert sf("sessions", "frobnicate").returncode == 2
    out = sf("sessions", "list", "--db", "mysql://x/y")
    assert out.returncode == 2 and "unsupported" in out.stderr
    out = sf("sessions", "list", "--db", store.url, "--limit", "-1")
    assert out.returncode == 2


def test_user_defaults_to_the_login_user_and_db_to_env(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/env.db"
    st = SessionStore(url)
    s = st.create(getpass.getuser(), "from env")
    st.close()
    out = sf("sessions", "list", "--json", env={"SUREFETCH_DB": url})
    assert [x["id"] for x in json.loads(out.stdout)["sessions"]] == [s.id]
    # Without --db nor SUREFETCH_DB: SQLite under the XDG data dir.
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "SUREFETCH_DB": ""}
    out = sf("sessions", "list", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout) == {"sessions": []}
    table = sf("sessions", "list", env=env)  # names the store it found missing (not made)
    assert str(tmp_path / "xdg" / "surefetch" / "sessions.db") in table.stderr, table.stderr
    assert not (tmp_path / "xdg").exists()


def test_users_add_prints_a_token(store: SessionStore) -> None:
    out = sf("users", "add", "carol", "--db", store.url)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", token)
    assert store.authenticate(token) == "carol"
    assert sf("users", "add", "", "--db", store.url).returncode == 2


def test_serve(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/serve.db"
    token = sf("users", "add", "alice", "--db", url).stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "surefetch.cli", "serve", "--db", url, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        base = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(base + "/sessions", headers={"Authorization": f"Bearer {token}"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 200 and r.json() == {"sessions": []}
        assert httpx.get(base + "/sessions").status_code == 401
        assert httpx.get(base + "/openapi.json").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def test_serve_on_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = sf("serve", "--db", f"sqlite:///{tmp_path}/x.db", "--port", str(port))
    assert out.returncode == 1 and "pick another --port" in out.stderr


@pytest.mark.parametrize("args", [["--port", "70000"]])
def test_serve_usage(args: list[str], tmp_path: Path) -> None:
    assert sf("serve", "--db", f"sqlite:///{tmp_path}/x.db", *args).returncode == 2


# --- one cancellation story: who stops what --------------------------------------------------


def background(*args: str) -> subprocess.Popen[str]:
    """`surefetch ARGS` in the background, in its own session; waits for its first stderr
    line (it is ready) and returns it with the process."""
    return subprocess.Popen(
        [sys.executable, "-m", "surefetch.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def ready_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line, f"{proc.args!r} exited {proc.wait()} before it was ready"
    return line


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_sessions_cancel_says_who_stops_what(store: SessionStore, children: Children) -> None:
    db = ("--db", store.url, "--user", "u")
    proc = children.sleep()
    plain = store.attach_process(store.create("u", "plain").id, proc.pid, host="h1")
    out = sf("sessions", "cancel", plain.id, *db)
    assert out.returncode == 0, out.stderr
    assert (
        "the enforcer on host h1 (`surefetch enforce` or `surefetch serve`) stops "
        f"pid {proc.pid}" in out.stdout
    )
    q = JobQueue(store)
    running, queued = (q.submit("u", "get", {"url": f"http://h/{i}", "dest": "/x"}) for i in (0, 1))
    q.claim("h2", {"w0": 1}, ttl=30)
    q.start(running.id, "h2", "w0", proc.pid)
    out = sf("sessions", "cancel", running.id, *db)
    assert "it is a job: the supervisor on host h2 stops it" in out.stdout
    out = sf("sessions", "cancel", queued.id, *db)
    assert "it is a queued job: it will not start" in out.stdout
    assert alive(proc.pid)  # saying is not doing


def test_enforce_stops_a_sessions_process_and_marks_it_cancelled(
    store: SessionStore, children: Children
) -> None:
    proc = children.sleep()
    s = store.attach_process(store.create("alice", "sleeper").id, proc.pid, host="enf-host")
    enforcer = background(
        "enforce", "--db", store.url, "--host-id", "enf-host", "--interval", "0.05"
    )
    try:
        assert "cancelled sessions of host enf-host" in ready_line(enforcer)
        assert store.request_cancel(s.id, "alice")
        assert proc.wait(10) == -signal.SIGTERM
        assert wait_until(lambda: store.get(s.id, "alice").status == "cancelled", 5)
        c = store.get(s.id, "alice")
        assert (c.cancellation_status, c.ui_status, c.pid) == ("cancelled", "needs_review", None)
        assert stop(enforcer, signal.SIGTERM) == 0
    finally:
        stop(enforcer, signal.SIGKILL)


def test_enforce_stops_on_sigint_with_130_and_checks_its_options(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/e.db"
    enforcer = background("enforce", "--db", url)
    try:
        assert f"host {host_id()}" in ready_line(enforcer)
        assert stop(enforcer, signal.SIGINT) == 130
    finally:
        stop(enforcer, signal.SIGKILL)
    for args in (["--grace", "-1"], ["--interval", "0"], ["--db", "mysql://x/y"]):
        out = sf("enforce", "--db", url, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("enforce", [True, False])
def test_serve_enforces_cancellations_unless_told_not_to(
    enforce: bool, tmp_path: Path, children: Children
) -> None:
    url = f"sqlite:///{tmp_path}/serve.db"
    token = sf("users", "add", "alice", "--db", url).stdout.strip()
    store = SessionStore(url)
    proc = children.sleep()
    s = store.attach_process(store.create("alice", "sleeper").id, proc.pid)
    flags = [] if enforce else ["--no-enforce"]
    server = background("serve", "--db", url, "--port", "0", *flags)
    try:
        match = re.search(r"http://127\.0\.0\.1:(\d+)", ready_line(server))
        assert match
        base = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.post(
                    f"{base}/sessions/{s.id}/cancel", headers={"Authorization": f"Bearer {token}"}
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 202 and r.json()["changed"] is True
        if enforce:
            assert proc.wait(10) == -signal.SIGTERM
            assert wait_until(lambda: store.get(s.id, "alice").status == "cancelled", 5)
        else:
            time.sleep(1.0)  # several rounds of an enforcer, had there been one
            assert proc.poll() is None
            assert store.get(s.id, "alice").cancellation_status == "requested"
    finally:
        stop(server, signal.SIGINT)
        store.close()


def test_long_histories_newest_first_with_a_default_limit(
    store: SessionStore, store_url: str
) -> None:
    ids = [store.create("hist", f"s{i}").id for i in range(105)]
    store.finish(ids[0], "failed")
    url = store_url
    listed = json.loads(sf("sessions", "list", "--db", url, "--user", "hist", "--json").stdout)
    assert [s["id"] for s in listed["sessions"]] == ids[::-1][:100]
    every = json.loads(
        sf("sessions", "list", "--db", url, "--user", "hist", "--json", "--all").stdout
    )
    assert len(every["sessions"]) == 105
    failed = json.loads(
        sf("sessions", "list", "--db", url, "--user", "hist", "--json", "--state", "failed").stdout
    )
    assert [s["id"] for s in failed["sessions"]] == [ids[0]]
    two = json.loads(
        sf("sessions", "list", "--db", url, "--user", "hist", "--json", "--limit", "2").stdout
    )
    assert [s["id"] for s in two["sessions"]] == ids[::-1][:2]
    bad = sf("sessions", "list", "--db", url, "--user", "hist", "--limit", "-1")
    assert bad.returncode == 2
    # The table says when there are more than it shows (100 rows looked like all of them).
    for args, rows, note in (
        ([], 100, True),
        (["--limit", "105"], 105, False),
        (["--all"], 105, False),
    ):
        table = sf("sessions", "list", "--db", url, "--user", "hist", *args)
        assert len(table.stdout.splitlines()) == 1 + rows, args
        assert ("only the newest 100 sessions are shown" in table.stderr) == note, table.stderr
    listed = sf("sessions", "list", "--db", url, "--user", "hist", "--json")  # said there too
    assert "only the newest 100 sessions are shown" in listed.stderr, listed.stderr
    for conflicting in (["--limit", "0"], ["--limit", "5", "--all"]):  # 0 showed "no sessions"
        refused = sf("sessions", "list", "--db", url, "--user", "hist", *conflicting)
        assert refused.returncode == 2, (conflicting, refused.stderr)


def test_job_history_filters(store: SessionStore, tmp_path: Path) -> None:
    queue = JobQueue(store)
    spec = {"url": "http://h/x", "dest": str(tmp_path / "x")}
    ids = queue.submit_many("hist", [("get", spec)] * 5)
    queue.complete(ids[0], "", "", "succeeded")  # not assigned: no change
    assert [j.id for j in queue.list("hist", limit=2)] == ids[::-1][:2]
    assert [j.id for j in queue.list("hist")] == ids
    assert len(queue.list("hist", state="queued")) == 5
    assert queue.list("hist", state="running") == []
    with pytest.raises(ValueError, match="state must be one of"):
        queue.list("hist", state="done")


@pytest.mark.parametrize(
    "args, code, out",
    [
        (["list"], 0, ""),
        (["list", "--json"], 0, '{"sessions": []}\n'),
        (["show", "0" * 32], 1, ""),
        (["cancel", "0" * 32], 1, ""),
    ],
)
def test_a_store_that_does_not_exist_is_not_created(
    tmp_path: Path, args: list[str], code: int, out: str
) -> None:
    """`sessions` only reads or asks: a --db naming nothing (a typo) made a new database
    and its directories."""
    db = tmp_path / "nodir" / "x.db"
    done = sf("sessions", *args, "--db", f"sqlite:///{db}")
    assert (done.returncode, done.stdout) == (code, out), done.stderr
    assert len(done.stderr.splitlines()) == (0 if "--json" in args else 1), done.stderr
    assert str(db) in done.stderr or "--json" in args
    assert not (tmp_path / "nodir").exists()
