"""The sessions HTTP API: an ASGI app (FastAPI) over a :class:`SessionStore`.

Endpoints (bearer token per user; ``surefetch users add NAME`` makes one)::

    POST /sessions               create one of your sessions           -> 201
    GET  /sessions               list yours, newest first (?status=, ?limit=, default 100,
                                 ?all=true)                            -> 200 {"sessions": [...]}
    GET  /sessions/{id}          one of yours (404 for anyone else's)  -> 200
    POST /sessions/{id}/cancel   request its cancellation (idempotent) -> 202
    GET  /openapi.json           this API's OpenAPI document
    GET  /docs, /redoc           the API's pages (Swagger UI, ReDoc), no CDN needed

A missing or unknown token gets 401; another user's session is answered 404, so
that users cannot even learn it exists. Invalid input gets 422, never 500.

:func:`serve` also runs this host's cancellation enforcer, unless told not to, so
that a cancel asked over HTTP stops the session's process here.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field

from surefetch.errors import NotOwner, SessionNotFound
from surefetch.store import CancellationEnforcer, SessionStore
from surefetch.store.sessions import HISTORY_LIMIT

if TYPE_CHECKING:
    from surefetch.store import Session

__all__ = ["create_app", "serve"]

Status = Literal["pending", "running", "succeeded", "failed", "cancelled"]
UIStatus = Literal["in_progress", "needs_review", "done"]
CancellationStatus = Literal["none", "requested", "cancelled"]

# Pydantic evaluates these annotations at runtime: keep typing.Optional for Python 3.9.


class SessionIn(BaseModel):
    """A session to create."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=1000, description="What the session does.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Any JSON object; stored as given, never changed."
    )


class SessionOut(BaseModel):
    """A session as stored."""

    id: str
    owner: str
    title: str
    metadata: dict[str, Any]
    status: Status
    ui_status: UIStatus
    cancellation_status: CancellationStatus
    cancelled_at: Optional[str] = Field(description="ISO 8601, UTC")  # noqa: UP045
    cancelled_by: Optional[str]  # noqa: UP045
    host: Optional[str]  # noqa: UP045
    pid: Optional[int]  # noqa: UP045
    last_error: Optional[str]  # noqa: UP045
    created_at: str = Field(description="ISO 8601, UTC")
    updated_at: str = Field(description="ISO 8601, UTC")


class SessionList(BaseModel):
    sessions: list[SessionOut]


class CancelOut(BaseModel):
    changed: bool = Field(
        description="False when cancellation was already asked for or done, "
        "or the session had already finished."
    )
    session: SessionOut


class ErrorOut(BaseModel):
    detail: str


_SESSION_ID = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or unknown bearer token."}
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such session among yours."}
}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {"description": "Invalid input."},
}


_bearer = HTTPBearer(auto_error=False, description="A token from `surefetch users add NAME`.")


def _current_user(
    request: Request,
    credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(_bearer)],  # noqa: UP045
) -> str:
    store: SessionStore = request.app.state.store
    user = store.authenticate(credentials.credentials) if credentials is not None else None
    if user is None:
        raise HTTPException(
            status_code=401,
            detail="missing or unknown bearer token; create one with `surefetch users add "
            "NAME` and send it as `Authorization: Bearer TOKEN`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


User = Annotated[str, Depends(_current_user)]


def _out(session: Session) -> dict[str, Any]:
    return session.to_dict()


def create_app(store: SessionStore) -> FastAPI:
    """The ASGI app serving ``store``.

    Args:
        store: the session store; the app never closes it.
    """
    # /docs and /redoc with Swagger UI's and ReDoc's files served from the fastapi-offline
    # package (FastAPI's self-hosting recipe, packaged), not from a CDN: the pages work
    # on a machine without internet. validatorUrl None: no badge from swagger.io either.
    app = FastAPIOffline(
        title="surefetch sessions",
        version="1",
        description="Sessions of the surefetch download tool, per user.",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.store = store

    def not_found(session_id: str) -> HTTPException:
        return HTTPException(
            status_code=404,
            detail=f"no session {session_id} among yours; list them with GET /sessions",
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.post(
        "/sessions",
        status_code=201,
        response_model=SessionOut,
        responses={**_UNAUTHORIZED, **_INVALID},
        summary="Create a session",
    )
    def create_session(body: SessionIn, user: User) -> dict[str, Any]:
        return _out(store.create(user, body.title, body.metadata))

    @app.get(
        "/sessions",
        response_model=SessionList,
        responses={**_UNAUTHORIZED, **_INVALID},
        summary="List your sessions, newest first",
    )
    def list_sessions(
        user: User,
        status: Optional[Status] = None,  # noqa: UP045
        ui_status: Optional[UIStatus] = None,  # noqa: UP045
        cancellation_status: Optional[CancellationStatus] = None,  # noqa: UP045
        limit: Annotated[int, Query(ge=0, le=10000)] = HISTORY_LIMIT,
        all: Annotated[bool, Query(description="every session: no limit")] = False,
    ) -> dict[str, Any]:
        sessions = store.list(
            user,
            status=status,
            ui_status=ui_status,
            cancellation_status=cancellation_status,
            limit=None if all else limit,
        )
        return {"sessions": [_out(s) for s in sessions]}

    @app.get(
        "/sessions/{session_id}",
        response_model=SessionOut,
        responses={**_UNAUTHORIZED, **_NOT_FOUND, **_INVALID},
        summary="One of your sessions",
    )
    def get_session(session_id: _SESSION_ID, user: User) -> dict[str, Any]:
        try:
            return _out(store.get(session_id, user))
        except (SessionNotFound, NotOwner):
            raise not_found(session_id) from None

    @app.post(
        "/sessions/{session_id}/cancel",
        status_code=202,
        response_model=CancelOut,
        responses={**_UNAUTHORIZED, **_NOT_FOUND, **_INVALID},
        summary="Request the cancellation of one of your sessions (idempotent)",
    )
    def cancel_session(session_id: _SESSION_ID, user: User) -> dict[str, Any]:
        try:
            changed = store.request_cancel(session_id, user)
            session = store.get(session_id, user)
        except (SessionNotFound, NotOwner):
            raise not_found(session_id) from None
        return {"changed": changed, "session": _out(session)}

    return app


def serve(
    url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    sock: socket.socket | None = None,
    enforce: bool = True,
) -> None:
    """Serves the sessions API with uvicorn until interrupted.

    Args:
        url: the session store URL; None means the default (``$SUREFETCH_DB`` or SQLite).
        host: the address to bind (loopback by default).
        port: the TCP port (0 picks a free one).
        sock: an already bound socket to serve on instead of ``host``/``port``.
        enforce: also run this host's :class:`CancellationEnforcer` (for the host id
            ``$SUREFETCH_HOST_ID``, else the hostname) in a thread while serving.

    Raises:
        ValueError: an invalid store URL.
        SurefetchError: the store cannot be opened.
    """
    import uvicorn

    store = SessionStore(url)
    enforcer = CancellationEnforcer(store).start() if enforce else None
    try:
        config = uvicorn.Config(
            create_app(store),
            host=host,
            port=port,
            log_level=os.environ.get("SUREFETCH_LOG_LEVEL", "warning").lower(),
            access_log=False,
        )
        server = uvicorn.Server(config)
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        if enforcer is not None:
            enforcer.stop()
        store.close()
