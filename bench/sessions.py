"""Benchmarks sessions: cancellation latency and listing, on SQLite and PostgreSQL.

    python bench/sessions.py [--quick] [--runs N] [--sessions N] [--only sqlite|postgresql]

1. Cancel: a real ``sleep`` in its own process group runs a session; a
   CancellationEnforcer runs in a background thread (default 0.2 s polling on
   SQLite; LISTEN/NOTIFY on PostgreSQL). Timed from ``request_cancel`` to the session
   marked cancelled (after the process is gone, which the enforcer waits for) and its
   workspace removed. Median of 50 (10 with --quick). Targets: <= 300 ms on SQLite,
   <= 100 ms on PostgreSQL.
2. List: 100,000 sessions spread over 1,000 users (100 each; see --per-user);
   ``store.list(user)`` for random users, median of 50. Target: <= 20 ms on either backend.

PostgreSQL: ``$SUREFETCH_BENCH_PG_URL`` if set, else a throwaway cluster started like the
tests do (tests/pgcluster.py). Prints a markdown table; exits 1 when a median misses its
target by more than a factor of two.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from surefetch.sessions import CancellationEnforcer, SessionStore  # noqa: E402
from surefetch.workspaces import WorkspaceManager  # noqa: E402

CANCEL_TARGET_MS = {"sqlite": 300.0, "postgresql": 100.0}
LIST_TARGET_MS = 20.0


def bench_cancel(store: SessionStore, runs: int, work: Path) -> list[float]:
    """Milliseconds from request_cancel to the session marked and its workspace removed."""
    done: dict[str, float] = {}
    event = threading.Condition()

    def on_cleaned(session_id: str, path: Path) -> None:
        with event:
            done[session_id] = time.perf_counter()
            event.notify_all()

    workspaces = WorkspaceManager(work / "ws", on_cleaned=on_cleaned)
    enforcer = CancellationEnforcer(store, grace=5.0, workspaces=workspaces)
    times: list[float] = []
    with enforcer:
        time.sleep(0.3)  # let the enforcer's LISTEN connection settle
        for _ in range(runs + 1):  # the first one warms up
            proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
            session = store.create("bench", "cancel latency", {"run": len(times)})
            store.attach_process(session.id, proc.pid)
            workspaces.create(session.id)
            time.sleep(random.uniform(0.0, 0.2))  # land anywhere in the polling cycle
            start = time.perf_counter()
            store.request_cancel(session.id, "bench")
            sid = session.id
            with event:
                if not event.wait_for(lambda: sid in done, timeout=30):  # noqa: B023
                    raise RuntimeError(f"session {session.id} was not cancelled within 30 s")
            code = proc.wait(5)
            if code != -signal.SIGTERM:
                raise RuntimeError(f"the sleep ended with {code}, not SIGTERM")
            times.append((done[session.id] - start) * 1000)
    return times[1:]


def seed(store: SessionStore, total: int, users: int) -> list[str]:
    """Inserts ``total`` sessions over ``users`` users directly (a bulk load, not the API)."""
    names = [f"user{i:05d}" for i in range(users)]
    now = time.time()
    rows = [
        (uuid.uuid4().hex, names[i % users], f"session {i}", f'{{"i": {i}}}', now - total + i)
        for i in range(total)
    ]
    sql = (
        "INSERT INTO sessions (id, owner, title, metadata, status, ui_status, "
        "cancellation_status, created_at, updated_at) VALUES (?, ?, ?, ?, 'succeeded', 'done', "
        "'none', ?, ?)"
    )
    with store.db.connection() as conn:
        if store.backend == "sqlite":
            conn.execute("BEGIN")
            conn.executemany(sql, [(*r, r[-1]) for r in rows])
            conn.execute("COMMIT")
            conn.execute("ANALYZE")
        else:
            with conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), [(*r, r[-1]) for r in rows])
            conn.execute("ANALYZE sessions")
    return names


def bench_list(
    store: SessionStore, total: int, runs: int, per_user: int
) -> tuple[list[float], int]:
    users = max(1, total // per_user)
    names = seed(store, total, users)
    rng = random.Random(1)
    store.list(names[0])  # warm up
    times: list[float] = []
    count = 0
    for _ in range(runs):
        start = time.perf_counter()
        count = len(store.list(rng.choice(names)))
        times.append((time.perf_counter() - start) * 1000)
    return times, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10 cancel runs instead of 50")
    parser.add_argument("--runs", type=int, default=None, help="cancel and list runs")
    parser.add_argument("--sessions", type=int, default=100_000, help="sessions in the store")
    parser.add_argument("--per-user", type=int, default=100, help="sessions of each user")
    parser.add_argument("--only", choices=("sqlite", "postgresql"), default=None)
    args = parser.parse_args(argv)
    runs = args.runs or (10 if args.quick else 50)
    backends = [args.only] if args.only else ["sqlite", "postgresql"]

    rows: list[tuple[str, str, float, float, int]] = []
    missed = False
    with tempfile.TemporaryDirectory(prefix="surefetch-bench-") as tmp:
        work = Path(tmp)
        for backend in backends:
            if backend == "sqlite":
                url = f"sqlite:///{work}/bench.db"
            else:
                url = os.environ.get("SUREFETCH_BENCH_PG_URL") or _pg_url()
            store = SessionStore(url)
            try:
                cancel = bench_cancel(store, runs, work / backend)
                listing, count = bench_list(store, args.sessions, runs, args.per_user)
            finally:
                store.close()
            med = statistics.median(cancel)
            rows.append(
                (
                    f"cancel → process gone, marked (n={runs})",
                    backend,
                    med,
                    CANCEL_TARGET_MS[backend],
                    0,
                )
            )
            rows.append(
                (
                    f"list one user's {count} of {args.sessions:,} (n={runs})",
                    backend,
                    statistics.median(listing),
                    LIST_TARGET_MS,
                    0,
                )
            )
            print(
                f"{backend}: cancel p90 {sorted(cancel)[int(len(cancel) * 0.9) - 1]:.1f} ms, "
                f"max {max(cancel):.1f} ms; list max {max(listing):.2f} ms",
                file=sys.stderr,
            )

    print("| benchmark | backend | median (ms) | target (ms) | |")
    print("| --- | --- | ---: | ---: | --- |")
    for name, backend, median, target, _ in rows:
        ok = "ok" if median <= target else "MISSED"
        missed = missed or median > 2 * target
        print(f"| {name} | {backend} | {median:.1f} | ≤ {target:.0f} | {ok} |")
    return 1 if missed else 0


def _pg_url() -> str:
    import pgcluster

    url: str = pgcluster.fresh_url()
    return url


if __name__ == "__main__":
    sys.exit(main())
