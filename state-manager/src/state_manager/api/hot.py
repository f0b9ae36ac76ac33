"""A short path for the hottest route, ``POST /v0/namespace/{namespace}/states/exchange``.

Every worker sends it after each batch of nodes, and FastAPI's routing, dependency
resolution and body parsing cost a fifth of the server's CPU per such request. This
ASGI layer answers the exchanges that pass the key check and the body's validation with
the route's own handler (:func:`routes.exchange_answer`). Every other request, and every
exchange it does not take as it is (wrong or missing key, a body that is not valid JSON
of the right shape, another content type, a namespace too long), goes on to FastAPI
unchanged, so refusals are worded as on every route. It sits inside the request
middleware: ids, access logs, metrics and the body limit apply as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pydantic
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from state_manager.api import routes, schemas
from state_manager.api.middleware import replayed
from state_manager.domain.models import NAME_MAX_LENGTH
from state_manager.services.context import Context


@dataclass(frozen=True)
class RouteTemplate:
    """What the request middleware labels a request with (FastAPI's routes have it too)."""

    path_format: str


EXCHANGE = RouteTemplate("/v0/namespace/{namespace_name}/states/exchange")


def exchange_namespace(method: str, path: str) -> str | None:
    """The namespace of an exchange request, or None for any other request."""
    parts = path.split("/")
    if (
        method == "POST"
        and len(parts) == 6
        and parts[:3] == ["", "v0", "namespace"]
        and parts[4:] == ["states", "exchange"]
        and 0 < len(parts[3]) <= NAME_MAX_LENGTH
    ):
        return parts[3]
    return None


class HotPath:
    """ASGI middleware: answers acceptable exchange requests without routing them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        namespace = (
            exchange_namespace(scope["method"], scope["path"]) if scope["type"] == "http" else None
        )
        if namespace is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        context: Context = scope["app"].state.context
        body = raw = None
        if routes.api_key_accepted(
            context, request.headers.get("x-api-key")
        ) and request.headers.get("content-type", "").startswith("application/json"):
            raw = await request.body()
            with contextlib.suppress(pydantic.ValidationError):  # FastAPI answers it
                body = schemas.ExchangeRequest.model_validate_json(raw)
        if body is None:
            await self.app(scope, receive if raw is None else replayed(raw, receive), send)
            return
        scope["route"] = EXCHANGE
        try:
            response = await routes.exchange_answer(
                context, namespace, body, request.is_disconnected
            )
        except Exception as exc:
            refused = routes.refusal(exc, scope["path"])
            if refused is None:
                raise  # a bug: the request middleware logs it and answers 500
            response = refused
        await response(scope, receive, send)
