"""ASGI middleware: request ids, access logs, latency metrics, body limits, last-resort 500s.

One pure-ASGI layer does all of it, so every response — 401, 413, 422 and 500
included — carries ``x-exosphere-request-id`` and is timed and logged once.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from state_manager.logs import request_id_var
from state_manager.metrics import Metrics

logger = logging.getLogger("state_manager.access")

REQUEST_ID_HEADER = "x-exosphere-request-id"
INTERNAL_ERROR = (
    "An internal error occurred. It has been logged with the request id in the "
    "x-exosphere-request-id header; quote it when you report the problem."
)


def parse_request_id(raw: str | None) -> str:
    """Keep a client's request id if it parses as a UUID (any common form), else make one."""
    if raw:
        try:
            uuid.UUID(raw.strip())
        except ValueError:
            pass
        else:
            return raw
    return str(uuid.uuid4())


def route_template(scope: Scope) -> str:
    """The matched route's full path template (``/v0/namespace/{namespace_name}/...``).

    A label per template, never per raw path, keeps the metric's cardinality bounded.
    Recent FastAPI versions leave routes of included routers unprefixed in
    ``scope["route"]`` and record the matched route with its full template under
    ``scope["fastapi"]``; older ones copy routes with the prefix applied.
    """
    fastapi_scope = scope.get("fastapi")
    effective = (
        fastapi_scope.get("effective_route_context") if isinstance(fastapi_scope, dict) else None
    )
    for candidate in (effective, scope.get("route")):
        template = getattr(candidate, "path_format", None)
        if isinstance(template, str) and template:
            return template
    return "unmatched"


def replayed(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an app after the whole ``body`` was read: the body as one message,
    then whatever ``receive`` says (the client's disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class RejectedRequest(HTTPException):
    """Raised while reading a request that is refused as a whole; answered as a JSON error.

    Being an ``HTTPException``, it also passes through FastAPI's body parsing unchanged.
    """


class BodyTooLarge(RejectedRequest):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"Request body exceeds {limit} bytes")


class NulCharacter(RejectedRequest):
    """Text with U+0000 cannot be stored (PostgreSQL refuses it), so it is refused up front."""

    def __init__(self, where: str) -> None:
        super().__init__(status_code=400, detail=f"The request {where} contains a NUL character")


NUL_ESCAPE = b"\\u0000"
BACKSLASH = ord("\\")


def contains_nul(body: bytes) -> bool:
    """Whether a JSON body holds U+0000: a raw NUL, or a ``\\u0000`` escape that is not
    itself an escaped backslash followed by ``u0000``."""
    if b"\x00" in body:
        return True
    start = body.find(NUL_ESCAPE)
    while start != -1:
        backslashes = 0
        while start - backslashes - 1 >= 0 and body[start - backslashes - 1] == BACKSLASH:
            backslashes += 1
        if backslashes % 2 == 0:
            return True
        start = body.find(NUL_ESCAPE, start + 1)
    return False


def _json_response(status: int, body: dict[str, Any], request_id: str) -> list[Message]:
    payload = json.dumps(body).encode("utf-8")
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode("ascii")),
                (REQUEST_ID_HEADER.encode("ascii"), request_id.encode("latin-1")),
            ],
        },
        {"type": "http.response.body", "body": payload},
    ]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = parse_request_id(headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status_holder = {"status": 500, "sent": False}
        limit = self.max_body_bytes

        declared = headers.get("content-length")

        async def read_body() -> bytes | None:
            """The whole body (bounded by the limit), or None if the client went away."""
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
                more = bool(message.get("more_body", False))
            return b"".join(chunks)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["sent"] = True
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (REQUEST_ID_HEADER.encode("ascii"), request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(limit)
            if "\x00" in scope.get("path", ""):
                raise NulCharacter("path")
            body = await read_body()
            if body is None:
                return  # disconnected before sending its body: nobody to answer
            if contains_nul(body):
                raise NulCharacter("body")
            await self.app(scope, replayed(body, receive), send_with_id)
        except RejectedRequest as exc:
            if not status_holder["sent"]:
                await self._finish(
                    scope,
                    send,
                    exc.status_code,
                    {"detail": exc.detail},
                    request_id,
                    started,
                    status_holder,
                )
                return
        except Exception:
            logger.exception("unhandled error", extra={"path": scope.get("path", "")})
            if not status_holder["sent"]:
                await self._finish(
                    scope,
                    send,
                    500,
                    {"success": False, "detail": INTERNAL_ERROR},
                    request_id,
                    started,
                    status_holder,
                )
                return
        else:
            self._record(scope, int(status_holder["status"]), started)
        finally:
            request_id_var.reset(token)

    async def _finish(
        self,
        scope: Scope,
        send: Send,
        status: int,
        body: dict[str, Any],
        request_id: str,
        started: float,
        status_holder: dict[str, Any],
    ) -> None:
        for message in _json_response(status, body, request_id):
            await send(message)
        status_holder["status"] = status
        self._record(scope, status, started)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        template = route_template(scope)
        histogram = self.metrics.child(
            self.metrics.http_seconds, scope["method"], template, str(status)
        )
        histogram.observe(elapsed)
        logger.info(
            "%s %s %s",
            scope["method"],
            scope.get("path", ""),
            status,
            extra={
                "method": scope["method"],
                "path": scope.get("path", ""),
                "status": status,
                "latency_ms": round(elapsed * 1000, 2),
            },
        )
