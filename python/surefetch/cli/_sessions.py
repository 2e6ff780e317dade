"""`surefetch sessions|users|serve|enforce`: the session store, its HTTP API and the
cancellation enforcer."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from surefetch.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_USAGE,
    CommandError,
    add_history_limits,
    asked_limit,
    history_limit,
    log_to_stderr,
    note_more,
    print_line,
    redacted,
    seconds,
    shown_records,
    write_completed,
    write_or_undo,
)
from surefetch.errors import redact_urls


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Registers `sessions`, `users`, `serve` and `enforce` (each sets `handler` via
    set_defaults)."""
    db_help = "session store URL (default: $SUREFETCH_DB, else sqlite under the XDG data dir)"

    sessions = sub.add_parser("sessions", help="list, show and cancel your sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("list", "list your sessions, newest first"),
        ("show", "show one of your sessions"),
        ("cancel", "request the cancellation of one of your sessions"),
    ):
        p = ssub.add_parser(name, help=help_text)
        if name != "list":
            p.add_argument("id", metavar="ID", help="the session id")
        else:
            p.add_argument(
                "--status",
                "--state",
                dest="status",
                choices=("pending", "running", "succeeded", "failed", "cancelled"),
                help="only sessions in this state",
            )
            add_history_limits(p, "sessions")
        p.add_argument("--db", default=None, metavar="URL", help=db_help)
        p.add_argument(
            "--user",
            default=None,
            metavar="NAME",
            help="whose sessions (default: the current login user)",
        )
        p.add_argument("--json", action="store_true", help="print JSON on stdout")
        p.set_defaults(handler=_cmd_sessions, action=name)

    users = sub.add_parser("users", help="manage API users")
    usub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = usub.add_parser("add", help="create a bearer token for a user and print it")
    add.add_argument("name", metavar="NAME", help="the user name")
    add.add_argument("--db", default=None, metavar="URL", help=db_help)
    add.set_defaults(handler=_cmd_users_add)

    serve = sub.add_parser("serve", help="serve the sessions HTTP API")
    serve.add_argument("--db", default=None, metavar="URL", help=db_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any)")
    serve.add_argument(
        "--no-enforce",
        action="store_true",
        help="do not run this host's cancellation enforcer in the server "
        "(run `surefetch enforce` instead)",
    )
    serve.set_defaults(handler=_cmd_serve)

    enforce = sub.add_parser(
        "enforce",
        help="stop the processes of cancelled sessions on this host",
        description="Runs this host's cancellation enforcer in the foreground: the process "
        "of each session whose cancellation was requested gets SIGTERM, then SIGKILL after "
        "--grace, and the session is marked cancelled. Supervised jobs are left to their "
        "supervisor. SIGTERM (exit 0) or SIGINT (exit 130) stops it.",
    )
    enforce.add_argument("--db", default=None, metavar="URL", help=db_help)
    enforce.add_argument(
        "--host-id", default=None, metavar="ID", help="default $SUREFETCH_HOST_ID, else hostname"
    )
    enforce.add_argument(
        "--interval", type=seconds, default=0.2, metavar="S", help="time between polls (0.2)"
    )
    enforce.add_argument(
        "--grace", type=float, default=5.0, metavar="S", help="time from SIGTERM to SIGKILL (5)"
    )
    enforce.set_defaults(handler=_cmd_enforce)


def _open_store(url: str | None) -> Any:
    from surefetch.store import SessionStore

    return SessionStore(url)


def _cmd_sessions(args: argparse.Namespace) -> int:
    import getpass

    user: str = args.user if args.user is not None else getpass.getuser()
    missing = _missing_store(args)
    if missing is not None:  # nothing to read: say so rather than create it
        if args.action != "list":
            raise CommandError(
                f"no session {args.id!r}: there is no session store at {missing}; check --db",
                EXIT_ERROR,
            )
        if args.json:
            print_line(json.dumps({"sessions": []}))
        else:
            print(f"no sessions: there is no session store at {missing} yet", file=sys.stderr)
        return EXIT_OK
    store = _open_store(args.db)
    try:
        if args.action == "list":
            limit = history_limit(args)
            found = store.list(user, status=args.status, limit=asked_limit(limit))
            listed = shown_records(found, limit)
            if args.json:
                print_line(json.dumps({"sessions": [redacted(s.to_dict()) for s in listed]}))
            else:
                _print_session_table(listed)
            note_more(found, limit, "sessions")
            return EXIT_OK
        with _seen_by(user, args.id):
            if args.action == "show":
                session = store.get(args.id, user)
                if args.json:
                    print_line(json.dumps(redacted(session.to_dict())))
                else:
                    for key, value in redacted(session.to_dict()).items():
                        shown = json.dumps(value) if key == "metadata" else value
                        print_line(f"{key + ':':21}{'' if shown is None else shown}")
                return EXIT_OK
            changed = store.request_cancel(args.id, user)
            session = store.get(args.id, user)
        if args.json:
            shown = redacted(session.to_dict())
            text = json.dumps({"id": session.id, "changed": changed, "session": shown})
        else:
            text = _cancel_message(session, changed, store)
        done = "its cancellation was requested" if changed else "nothing was changed"
        write_completed(f"{text}\n", done=f"session {session.id}: {done}")
        return EXIT_OK
    finally:
        store.close()


@contextmanager
def _seen_by(user: str, session_id: str) -> Iterator[None]:
    """A session that is missing or someone else's, said from `user`'s side: the store's
    message knows neither who asked nor which options would find the session."""
    from surefetch.errors import NotOwner, SessionNotFound

    try:
        yield
    except SessionNotFound as exc:
        raise SessionNotFound(
            f"no session {session_id} for user {user}; see your sessions with "
            "`surefetch sessions list` (or pass --user/--db)"
        ) from exc
    except NotOwner as exc:
        raise NotOwner(
            f"session {session_id} belongs to another user, not {user}; you can only see and "
            "cancel your own sessions"
        ) from exc


def _missing_store(args: argparse.Namespace) -> str | None:
    """The file of the SQLite store `args` name when it does not exist: a command that
    only reads or asks must not create it and its directories (a mistyped --db made a
    new database)."""
    from surefetch.store.db import default_db_url, missing_sqlite_file

    return missing_sqlite_file(args.db if args.db is not None else default_db_url())


def _print_session_table(found: Sequence[Any]) -> None:
    if not found:
        print("no sessions", file=sys.stderr)
        return
    print_line(f"{'ID':32}  {'STATUS':9}  {'UI':12}  {'CANCEL':9}  {'CREATED':20}  TITLE")
    for s in found:
        created = s.created_at.strftime("%Y-%m-%d %H:%M:%SZ")
        title = redact_urls(s.title).replace("\n", " ")
        print_line(
            f"{s.id:32}  {s.status:9}  {s.ui_status:12}  {s.cancellation_status:9}  "
            f"{created:20}  {title}"
        )


def _cancel_message(session: Any, changed: bool, store: Any) -> str:
    """What a cancellation request will do: who stops the session's process, if any."""
    from surefetch.store import JobQueue

    requested = f"cancellation of session {session.id} requested"
    job = JobQueue(store).get(session.id) if changed else None
    if job is not None and job.host is not None:
        return f"{requested}; it is a job: the supervisor on host {job.host} stops it"
    if job is not None:
        return (
            f"{requested}; it is a queued job: it will not start, a supervisor marks it cancelled"
        )
    if changed and session.pid is not None:
        return (
            f"{requested}; the enforcer on host {session.host} (`surefetch enforce` or "
            f"`surefetch serve`) stops pid {session.pid}"
        )
    if changed:
        return (
            f"{requested}; it has no process and will not start (a process that attaches to "
            "it is refused, and the session marked cancelled)"
        )
    if session.cancellation_status == "requested":
        return (
            f"cancellation of session {session.id} was already requested by {session.cancelled_by}"
        )
    if session.status == "cancelled":
        return f"session {session.id} is already cancelled"
    return f"session {session.id} already finished ({session.status}); nothing to cancel"


def _cmd_users_add(args: argparse.Namespace) -> int:
    store = _open_store(args.db)
    try:
        token = store.add_user(args.name)
        # The output is the token's only copy: a token nobody could read is revoked.
        write_or_undo(
            f"{token}\n",
            lambda: store.revoke_token(token),
            undone=f"the token was revoked, and user {args.name} has no new token",
        )
    finally:
        store.close()
    print(
        f"token for user {args.name} created; it is shown only this once: send it as "
        "`Authorization: Bearer TOKEN`",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import socket

    try:
        from surefetch.server import serve
    except ImportError as exc:
        raise CommandError(
            f"the HTTP API needs fastapi and uvicorn ({exc}): pip install 'surefetch[server]'"
        ) from exc
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be between 0 and 65535, not {args.port}", EXIT_USAGE)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
            "pick another --port or --host"
        ) from exc
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    enforcing = "" if args.no_enforce else "; this host's cancellation enforcer runs in it"
    print(
        f"serving the sessions API on http://{shown}:{port} (Ctrl+C stops){enforcing}",
        file=sys.stderr,
    )
    sys.stderr.flush()
    # uvicorn stops gracefully on SIGTERM and then raises it again, once its own handler
    # is gone: let that end the process by the signal, as a service manager expects of a
    # clean stop (not through Terminated and exit 143).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        serve(args.db, host, port, sock=sock, enforce=not args.no_enforce)
    finally:
        sock.close()
    return EXIT_OK


def _cmd_enforce(args: argparse.Namespace) -> int:
    from surefetch.store import CancellationEnforcer

    store = _open_store(args.db)
    try:
        enforcer = CancellationEnforcer(
            store, host=args.host_id, interval=args.interval, grace=args.grace
        )
        log_to_stderr("surefetch enforce")
        # The enforcer runs in a thread while this one waits for SIGTERM or SIGINT, blocked
        # in both so that sigwait receives them: stopping it takes locks, which a signal
        # handler must not do (it would deadlock if it interrupted their holder).
        stops = {signal.SIGTERM, signal.SIGINT}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            enforcer.start()  # its thread inherits the mask
            try:
                print(
                    f"surefetch enforce: stopping the cancelled sessions of host "
                    f"{enforcer.host} ({store.db.describe()}); SIGTERM or Ctrl+C stops",
                    file=sys.stderr,
                    flush=True,
                )
                signum = signal.sigwait(stops)
            finally:
                enforcer.stop(timeout=None)  # after the round under way
            while (again := signal.sigtimedwait(stops, 0)) is not None:  # sent while stopping
                signum = again.si_signo
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return EXIT_SIGINT if signum == signal.SIGINT else EXIT_OK
    finally:
        store.close()
