"""The exchange short path: which requests it answers itself, and that it hands every
other request on to the application with its body intact."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from state_manager.api import hot, routes, schemas

KEY = "s3cret"
PATH = "/v0/namespace/ns/states/exchange"
VALID = {
    "reports": [{"state_id": "a" * 24, "kind": "heartbeat"}],
    "claim": {"nodes": ["A"], "batch_size": 2},
}


def test_only_exchange_paths_have_a_namespace() -> None:
    assert hot.exchange_namespace("POST", PATH) == "ns"
    assert hot.exchange_namespace("GET", PATH) is None
    assert hot.exchange_namespace("POST", PATH + "/") is None
    assert hot.exchange_namespace("POST", "/v0/namespace/ns/states/enqueue") is None
    assert hot.exchange_namespace("POST", "/v0/namespace//states/exchange") is None
    assert hot.exchange_namespace("POST", "/v0/namespace/a/b/states/exchange") is None
    assert hot.exchange_namespace("POST", "/v1/namespace/ns/states/exchange") is None
    too_long = "n" * 1000
    assert hot.exchange_namespace("POST", f"/v0/namespace/{too_long}/states/exchange") is None


class Inner:
    """The application behind the short path: records what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await Response("inner", status_code=299)(scope, receive, send)


async def call(
    app: hot.HotPath, body: bytes, *, method: str = "POST", path: str = PATH, **headers: str
) -> tuple[int, bytes]:
    settings = SimpleNamespace(state_manager_secret=KEY)
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        "app": SimpleNamespace(state=SimpleNamespace(context=SimpleNamespace(settings=settings))),
    }
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, schemas.ExchangeRequest]]:
    """The exchanges the short path answered itself (with the route's handler)."""
    calls: list[tuple[str, schemas.ExchangeRequest]] = []

    async def exchange_answer(
        ctx: Any, namespace: str, body: schemas.ExchangeRequest, caller_gone: Any
    ) -> Response:
        calls.append((namespace, body))
        return Response("short", status_code=200)

    monkeypatch.setattr(routes, "exchange_answer", exchange_answer)
    return calls


async def test_a_valid_exchange_is_answered_without_the_application(
    answered: list[tuple[str, schemas.ExchangeRequest]],
) -> None:
    inner = Inner()
    status, body = await call(
        hot.HotPath(inner),
        json.dumps(VALID).encode(),
        x_api_key=KEY,
        content_type="application/json",
    )
    assert (status, body) == (200, b"short")
    assert inner.bodies == []
    ((namespace, request),) = answered
    assert namespace == "ns"
    assert request.reports[0].state_id == "a" * 24 and request.claim is not None


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (json.dumps(VALID).encode(), {"content_type": "application/json"}),  # no key
        (json.dumps(VALID).encode(), {"x_api_key": "wrong", "content_type": "application/json"}),
        (json.dumps(VALID).encode(), {"x_api_key": KEY, "content_type": "text/plain"}),
        (
            b'{"reports": [{"kind": "heartbeat"}]}',
            {"x_api_key": KEY, "content_type": "application/json"},
        ),
        (b"not json", {"x_api_key": KEY, "content_type": "application/json"}),
        (b"", {"x_api_key": KEY, "content_type": "application/json"}),
    ],
)
async def test_anything_else_reaches_the_application_with_its_body(
    answered: list[tuple[str, schemas.ExchangeRequest]], body: bytes, headers: dict[str, str]
) -> None:
    inner = Inner()
    status, _ = await call(hot.HotPath(inner), body, **headers)
    assert status == 299
    assert inner.bodies == [body]
    assert answered == []


async def test_other_routes_are_not_touched(
    answered: list[tuple[str, schemas.ExchangeRequest]],
) -> None:
    inner = Inner()
    payload = json.dumps(VALID).encode()
    path = "/v0/namespace/ns/states/enqueue"
    status, _ = await call(hot.HotPath(inner), payload, path=path, x_api_key=KEY)
    assert status == 299 and inner.bodies == [payload] and answered == []
