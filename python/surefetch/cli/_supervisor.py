"""`surefetch supervise` and `surefetch ctl`: the supervisor and its control socket."""

from __future__ import annotations

import argparse
import os
from typing import Any

from surefetch.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CommandError,
    add_history_limits,
    asked_limit,
    history_limit,
    json_line,
    log_to_stderr,
    note_more,
    positive_int,
    print_json,
    print_line,
    redacted,
    seconds,
    shown_records,
    write_completed,
)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Registers `supervise` and `ctl`."""
    sup = sub.add_parser(
        "supervise",
        help="run jobs in worker processes, restarting the ones that die",
        description="Owns worker processes and a Unix control socket (mode 0600); "
        "`surefetch ctl` talks to it. SIGTERM, SIGINT or `ctl shutdown` stop it cleanly.",
    )
    sup.add_argument("--socket", required=True, metavar="PATH", help="the control socket")
    sup.add_argument("--workers", type=positive_int, default=2, metavar="N")
    sup.add_argument(
        "--jobs-per-worker", type=positive_int, default=4, metavar="N", help="default 4"
    )
    sup.add_argument("--db", default=None, metavar="URL", help="session store URL")
    sup.add_argument(
        "--host-id", default=None, metavar="ID", help="default $SUREFETCH_HOST_ID, else hostname"
    )
    timing = sup.add_argument_group("timing (seconds)")
    for flag, default, text in (
        ("--backoff-initial", 0.5, "first restart delay"),
        ("--backoff-cap", 30.0, "longest restart delay"),
        ("--stable-after", 10.0, "uptime after which the backoff resets"),
        ("--degraded-window", 60.0, "window in which --degraded-after failures degrade"),
        ("--start-timeout", 10.0, "time a new worker has to answer the handshake"),
        ("--heartbeat-interval", 1.0, "time between heartbeats"),
        ("--heartbeat-timeout", 5.0, "silence after which a worker counts as hung"),
        ("--cancel-grace", 5.0, "time a worker has to stop a cancelled job"),
        ("--stop-grace", 5.0, "time between SIGTERM and SIGKILL"),
        ("--claim-ttl", 10.0, "silence after which other hosts take this one's jobs"),
        ("--poll-interval", 0.2, "time between polls of the store"),
    ):
        timing.add_argument(flag, type=seconds, default=default, metavar="S", help=text)
    sup.add_argument("--backoff-jitter", type=float, default=0.2, metavar="F", help="0 to 0.5")
    sup.add_argument("--degraded-after", type=positive_int, default=5, metavar="N")
    sup.add_argument("--max-job-crashes", type=positive_int, default=3, metavar="N")
    sup.add_argument(
        "--worker-command",
        default=None,
        metavar="CMD",
        help="how to start a worker (default: this Python with -m surefetch.worker), "
        "e.g. to wrap it in nice or taskset; the worker's options are appended",
    )
    sup.set_defaults(handler=_cmd_supervise)

    ctl = sub.add_parser("ctl", help="talk to a running supervisor")
    _add_ctl_options(ctl, None)
    csub = ctl.add_subparsers(dest="ctl_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("list-workers", "the workers: pid, state, restarts, next restart, jobs"),
        ("jobs", "your jobs, newest first: queued, running and finished"),
        ("shutdown", "stop the supervisor cleanly (jobs keep their parts)"),
    ):
        action = csub.add_parser(name, help=help_text)
        _add_ctl_options(action, argparse.SUPPRESS)
        if name == "jobs":
            action.add_argument(
                "--state",
                choices=("queued", "running", "succeeded", "failed", "cancelled"),
                help="only jobs in this state",
            )
            action.add_argument(
                "--summary",
                action="store_true",
                help="only how many jobs are in each state (cheap to poll)",
            )
            add_history_limits(action, "jobs")
    wait = csub.add_parser(
        "wait",
        help="wait until jobs are finished: exit 0 if all succeeded, 1 if one failed or "
        "was cancelled, 5 when --timeout ran out",
    )
    wait.add_argument("ids", nargs="+", metavar="ID", help="the jobs (ids `submit` printed)")
    wait.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up after S seconds"
    )
    _add_ctl_options(wait, argparse.SUPPRESS)
    cancel = csub.add_parser("cancel", help="cancel one of your jobs")
    cancel.add_argument("id", metavar="ID")
    _add_ctl_options(cancel, argparse.SUPPRESS)
    submit = csub.add_parser("submit", help="queue a job; prints its id")
    ssub = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    get = ssub.add_parser("get", help="download one URL")
    get.add_argument("url", metavar="URL")
    get.add_argument("-o", "--output", default=None, metavar="PATH")
    get.add_argument("--sha256", default=None, metavar="HEX")
    sync = ssub.add_parser("sync", help="sync a manifest into a directory")
    sync.add_argument("--manifest", default="surefetch.toml", metavar="F")
    sync.add_argument("--lock", default="surefetch.lock", metavar="F")
    sync.add_argument("--dest", default=".", metavar="DIR")
    for p in (submit, get, sync):
        _add_ctl_options(p, argparse.SUPPRESS)
    ctl.set_defaults(handler=_cmd_ctl)


def _add_ctl_options(parser: argparse.ArgumentParser, default: Any) -> None:
    # Accepted before and after the action; only the first parser sets the defaults.
    parser.add_argument("--socket", metavar="PATH", default=default, help="the control socket")
    parser.add_argument(
        "--json", action="store_true", default=default or False, help="print JSON on stdout"
    )


def _cmd_supervise(args: argparse.Namespace) -> int:
    import shlex

    from surefetch.supervisor import Backoff, Supervisor, SupervisorConfig

    config = SupervisorConfig(
        socket=args.socket,
        workers=args.workers,
        jobs_per_worker=args.jobs_per_worker,
        db=args.db,
        host=args.host_id,
        backoff=Backoff(
            initial=args.backoff_initial, cap=args.backoff_cap, jitter=args.backoff_jitter
        ),
        stable_after=args.stable_after,
        degraded_after=args.degraded_after,
        degraded_window=args.degraded_window,
        start_timeout=args.start_timeout,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        cancel_grace=args.cancel_grace,
        stop_grace=args.stop_grace,
        claim_ttl=args.claim_ttl,
        poll_interval=args.poll_interval,
        max_job_crashes=args.max_job_crashes,
        worker_command=tuple(shlex.split(args.worker_command)) if args.worker_command else None,
    )
    log_to_stderr("surefetch supervise")
    return Supervisor(config).run()


def _ctl_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.ctl_command == "submit":
        if args.kind == "get":
            output = args.output if args.output is not None else "."
            dest = os.path.abspath(output)
            if output.endswith(("/", os.sep)):
                dest = os.path.join(dest, "")  # still a directory, as `get -o DIR/` means
            spec: dict[str, Any] = {"url": args.url, "dest": dest}
            if args.sha256 is not None:
                spec["sha256"] = args.sha256
        else:
            spec = {
                "manifest": os.path.abspath(args.manifest),
                "lock": os.path.abspath(args.lock),
                "dest": os.path.abspath(args.dest),
            }
        return {"op": "submit", "kind": args.kind, "spec": spec}
    if args.ctl_command == "cancel":
        return {"op": "cancel", "id": args.id}
    if args.ctl_command == "wait":
        if args.timeout is not None and not args.timeout >= 0:
            raise CommandError(
                f"--timeout must be 0 or more seconds, not {args.timeout}", EXIT_USAGE
            )
        return {"op": "wait", "ids": args.ids, "timeout": args.timeout}
    if args.ctl_command == "jobs" and args.summary:
        if args.state is not None or args.limit is not None or args.all:
            raise CommandError(
                "--summary counts the jobs in every state: drop --state, --limit and --all",
                EXIT_USAGE,
            )
        return {"op": "jobs", "summary": True}
    if args.ctl_command == "jobs":
        return {"op": "jobs", "state": args.state, "limit": asked_limit(history_limit(args))}
    return {"op": args.ctl_command}


def _cmd_ctl(args: argparse.Namespace) -> int:
    from surefetch.supervisor import request

    path = getattr(args, "socket", None) or os.environ.get("SUREFETCH_SOCKET")
    if not path:
        raise CommandError("ctl needs --socket PATH (or $SUREFETCH_SOCKET)", EXIT_USAGE)
    as_json = bool(getattr(args, "json", False))
    message = _ctl_request(args)
    reply = request(path, message, timeout=_answer_within(message))
    if not reply.get("ok"):
        error = str(reply.get("error", "the supervisor refused"))
        raise CommandError(error, int(reply.get("exit", 1)))
    reply.pop("ok", None)
    listed: list[Any] = []  # every job the supervisor sent (one more than shown)
    limit = history_limit(args) if args.ctl_command == "jobs" else None
    if args.ctl_command == "jobs" and isinstance(reply.get("jobs"), list):
        if args.all:
            reply["jobs"].reverse()  # every job comes in submission order: newest first
        listed = reply["jobs"]
        reply["jobs"] = shown_records(listed, limit)
    if isinstance(reply.get("jobs"), list):
        reply["jobs"] = [redacted(job) for job in reply["jobs"]]
    if args.ctl_command in ("submit", "cancel", "shutdown"):  # done, whatever the output
        line, done = _change_reply(args, path, reply)
        write_completed(json_line(reply) if as_json else f"{line}\n", done=done)
    elif as_json:
        print_json(reply)
    else:
        _print_ctl_reply(args, path, reply)
    if listed:
        note_more(listed, limit, "jobs")
    if args.ctl_command == "wait":
        _check_waited(reply, len(set(args.ids)), args.timeout)
    return EXIT_OK


def _answer_within(message: dict[str, Any]) -> float | None:
    """Seconds `ctl` waits for the supervisor's answer to `message` (None: no limit)."""
    if message["op"] == "shutdown":
        return 600.0
    if message["op"] == "wait":
        timeout = message["timeout"]
        return None if timeout is None else timeout + 30.0
    return 30.0


def _check_waited(reply: dict[str, Any], jobs: int, timeout: float | None) -> None:
    """`ctl wait`'s exit code: 0 when every job succeeded (raises otherwise)."""
    counts: dict[str, int] = reply["counts"]
    if not reply["done"]:
        unfinished = counts["queued"] + counts["running"]
        raise CommandError(
            f"{unfinished} of {jobs} job(s) still queued or running after {timeout:g}s; "
            "wait again, or see `surefetch ctl jobs`",
            EXIT_TIMEOUT,
        )
    bad = counts["failed"] + counts["cancelled"]
    if bad:
        raise CommandError(
            f"{counts['failed']} of {jobs} job(s) failed and {counts['cancelled']} were "
            "cancelled; `surefetch ctl jobs --state failed` says why",
            EXIT_ERROR,
        )


def _print_ctl_reply(args: argparse.Namespace, path: str, reply: dict[str, Any]) -> None:
    command = args.ctl_command
    if command == "list-workers":
        print_line(
            f"{'ID':<5} {'KIND':<9} {'PID':>8} {'STATE':<9} {'RESTARTS':>8}  NEXT-RESTART  JOBS"
        )
        for w in reply["workers"]:
            pid = w["pid"] if w["pid"] is not None else "-"
            restart = w["next_restart"] or "-"
            print_line(
                f"{w['id']:<5} {w['kind']:<9} {pid:>8} {w['state']:<9} {w['restarts']:>8}  "
                f"{restart:<12}  {len(w['jobs'])}"
            )
            if w["reason"]:
                print_line(f"      {w['reason']}")
    elif command == "jobs" and "counts" in reply:
        print_line("  ".join(f"{state} {count}" for state, count in reply["counts"].items()))
    elif command == "jobs":
        print_line(f"{'ID':<32}  {'KIND':<4}  {'STATE':<9}  {'WORKER':<8}  WHAT")
        for job in reply["jobs"]:
            spec = job["spec"]
            what = spec.get("url") or spec.get("dest", "")
            if job.get("error"):
                what += f"  ({job['error']})"
            print_line(
                f"{job['id']:<32}  {job['kind']:<4}  {job['state']:<9}  "
                f"{job['worker'] or '-':<8}  {what}"
            )
    elif command == "wait":
        print_line("  ".join(f"{state} {count}" for state, count in reply["counts"].items()))


def _change_reply(args: argparse.Namespace, path: str, reply: dict[str, Any]) -> tuple[str, str]:
    """The line a command that changed something prints, and what it did (for the warning
    when that line cannot be written)."""
    command = args.ctl_command
    if command == "submit":
        return reply["id"], f"job {reply['id']} was submitted"
    if command == "cancel":
        if reply["changed"]:
            line = f"cancellation of job {args.id} requested"
            return line, line
        return f"job {args.id}: already cancelled or finished; nothing to do", "nothing changed"
    return f"the supervisor on {path} stopped", f"the supervisor on {path} stopped"
