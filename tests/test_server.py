"""The sessions HTTP API over a real uvicorn on loopback, on both store backends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode

from surefetch.server import create_app
from surefetch.sessions import SessionStore

from session_support import store, store_url

__all__ = ["store", "store_url"]  # fixtures, imported for pytest


@dataclass
class Api:
    base: str
    store: SessionStore
    alice: str  # alice's token
    bob: str

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10)


@pytest.fixture
def api(store: SessionStore) -> Iterator[Api]:
    """A real uvicorn serving ``store`` on 127.0.0.1 and a free port, in a thread."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(store), log_level="error", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield Api(f"http://127.0.0.1:{port}", store, store.add_user("alice"), store.add_user("bob"))
    server.should_exit = True
    thread.join(10)
    sock.close()


def test_requests_without_a_valid_token_get_401(api: Api) -> None:
    for token in (None, "not-a-token", "x" * 600):
        with api.client(token) as c:
            for method, path in (
                ("GET", "/sessions"),
                ("POST", "/sessions"),
                ("GET", "/sessions/abc"),
                ("POST", "/sessions/abc/cancel"),
            ):
                r = c.request(method, path, json={"title": "t"})
                assert r.status_code == 401, (method, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert "surefetch users add" in r.json()["detail"]
    with httpx.Client(base_url=api.base, headers={"Authorization": "Basic eDp5"}) as c:
        assert c.get("/sessions").status_code == 401


def test_create_get_list_cancel(api: Api) -> None:
    meta = {"manifest": "surefetch.toml", "n": [1, 2, {"x": None}]}
    with api.client(api.alice) as c:
        r = c.post("/sessions", json={"title": "sync models", "metadata": meta})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["owner"] == "alice" and created["metadata"] == meta
        assert created["status"] == "pending" and created["created_at"].endswith("Z")
        sid = created["id"]
        assert c.get(f"/sessions/{sid}").json() == created
        assert [s["id"] for s in c.get("/sessions").json()["sessions"]] == [sid]

        r = c.post(f"/sessions/{sid}/cancel")
        assert r.status_code == 202
        body = r.json()
        assert body["changed"] is True
        assert body["session"]["cancellation_status"] == "requested"
        assert body["session"]["cancelled_by"] == "alice"
        assert body["session"]["metadata"] == meta
        again = c.post(f"/sessions/{sid}/cancel")
        assert again.status_code == 202 and again.json()["changed"] is False
        assert again.json()["session"] == body["session"]

        listed = c.get("/sessions", params={"cancellation_status": "requested"}).json()
        assert [s["id"] for s in listed["sessions"]] == [sid]
        assert c.get("/sessions", params={"status": "running"}).json() == {"sessions": []}
        assert len(c.get("/sessions", params={"limit": 0}).json()["sessions"]) == 0


def test_users_are_isolated(api: Api) -> None:
    with api.client(api.alice) as alice, api.client(api.bob) as bob:
        sid = alice.post("/sessions", json={"title": "mine"}).json()["id"]
        bob.post("/sessions", json={"title": "his"})
        # Bob cannot see, list or cancel alice's session, nor learn that it exists.
        r = bob.get(f"/sessions/{sid}")
        unknown = bob.get("/sessions/" + "0" * 32)
        assert r.status_code == unknown.status_code == 404
        assert r.json()["detail"] == f"no session {sid} among yours; list them with GET /sessions"
        assert bob.post(f"/sessions/{sid}/cancel").status_code == 404
        assert [s["title"] for s in bob.get("/sessions").json()["sessions"]] == ["his"]
        assert [s["title"] for s in alice.get("/sessions").json()["sessions"]] == ["mine"]
    assert api.store.get(sid, "alice").cancellation_status == "none"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": ""},
        {"title": 5},
        {"title": "t", "metadata": []},
        {"title": "t", "extra": 1},
        {"title": "a\u0000b"},
        {"title": "t", "metadata": {"x": "y" * 70_000}},
        "not an object",
    ],
)
def test_invalid_input_is_422(api: Api, body: Any) -> None:
    with api.client(api.alice) as c:
        r = c.post("/sessions", json=body)
        assert r.status_code == 422, r.text
    with api.client(api.alice) as c:
        r = c.post("/sessions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert c.get("/sessions", params={"limit": -1}).status_code == 422
        assert c.get("/sessions", params={"status": "bogus"}).status_code == 422
        assert c.get("/sessions/..%2F..%2Fetc").status_code in (404, 422)


def test_openapi_document_is_served(api: Api) -> None:
    doc = httpx.get(api.base + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/sessions",
        "/sessions/{session_id}",
        "/sessions/{session_id}/cancel",
    }
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def _fuzz(
    strategy: st.SearchStrategy[schemathesis.Case[Any]],
    api: Api,
    positive: bool,
    statuses: list[int],
) -> None:
    headers = {"Authorization": f"Bearer {api.alice}"}

    @given(case=strategy)
    @settings(
        max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case: schemathesis.Case[Any]) -> None:
        response = case.call(base_url=api.base, headers=headers, timeout=10)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if positive and 200 <= response.status_code < 300:
            # Status codes and bodies as documented. Invalid requests are held to "no
            # 5xx" only: unknown query parameters are ignored, as usual.
            case.validate_response(response)

    check()


def test_fuzzed_from_the_openapi_document(api: Api) -> None:
    """Schemathesis-generated valid and invalid requests: never a 5xx, responses match."""
    schema = schemathesis.openapi.from_url(api.base + "/openapi.json")
    with api.client(api.alice) as c:
        existing = c.post("/sessions", json={"title": "seed"}).json()["id"]
    statuses: list[int] = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            pytest.fail(f"the OpenAPI document has an invalid operation: {result}")
        operation = result.ok()
        for positive in (True, False):
            mode = GenerationMode.POSITIVE if positive else GenerationMode.NEGATIVE
            strategy = operation.as_strategy(generation_mode=mode)  # type: ignore[arg-type]
            if "session_id" in operation.path:
                strategy = st.one_of(
                    strategy, operation.as_strategy(path_parameters={"session_id": existing})
                )
            _fuzz(strategy, api, positive, statuses)
    assert any(200 <= s < 300 for s in statuses) and 422 in statuses and 404 in statuses


def test_long_histories_are_limited_unless_all_is_asked(api: Api) -> None:
    ids = [api.store.create("alice", f"s{i}").id for i in range(103)]
    with api.client(api.alice) as c:
        default = c.get("/sessions").json()["sessions"]
        assert [s["id"] for s in default] == ids[::-1][:100]
        assert len(c.get("/sessions", params={"all": "true"}).json()["sessions"]) == 103
        two = c.get("/sessions", params={"limit": 2}).json()["sessions"]
        assert [s["id"] for s in two] == ids[::-1][:2]
