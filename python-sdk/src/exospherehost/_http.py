"""The one HTTP layer of the SDK: a pooled ``httpx.AsyncClient`` plus retry rules.

Plain ``http://`` requests travel on :class:`PlainHttpTransport` (keep-alive HTTP/1.1 on
asyncio streams, a fraction of httpcore's CPU per request), unless the environment sets
a proxy; everything else on httpx's own transport.

Both :class:`~exospherehost.Runtime` and :class:`~exospherehost.StateManager` talk to the
state manager through :class:`ApiClient`. It knows the URL layout
(``{uri}/{version}/namespace/{namespace}/...``), sends the ``x-api-key`` header, parses
JSON bodies and decides which failures are worth retrying.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote
from urllib.request import getproxies

import httpx
from pydantic_core import from_json, to_json

from ._transport import PlainHttpTransport
from ._version import VERSION
from .errors import ApiError

__all__ = ["ApiClient", "Backoff", "is_retryable_status", "response_body"]

# Statuses after which the same request may succeed later: the server is overloaded,
# restarting or behind a proxy that timed out. Every other 4xx is a definitive answer.
_RETRYABLE_4XX = frozenset({408, 425, 429})


def is_retryable_status(status_code: int) -> bool:
    """True when a request that got ``status_code`` may succeed if sent again."""
    return status_code >= 500 or status_code in _RETRYABLE_4XX


def response_body(response: httpx.Response) -> Any:
    """The JSON body of ``response``, or its text when it is not JSON.

    Parsed with pydantic-core, which costs about half of ``response.json()``.
    """
    try:
        return from_json(response.content)
    except ValueError:
        return response.text


_JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: about ``base * 2**attempt``, at most ``cap`` seconds."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry)."""
        ceiling: float = min(self.cap, self.base * 2.0 ** min(attempt, 32))
        # "Equal jitter": never less than half the ceiling, so retries still back off,
        # but spread so that many workers do not hammer a recovering server in step.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def _proxied() -> bool:
    """Whether the environment configures an HTTP proxy: then httpx's own transports
    (which follow it) carry every request, not :class:`PlainHttpTransport`."""
    proxies = getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def segment(value: str) -> str:
    """Quote one URL path segment (names may contain spaces or slashes)."""
    return quote(value, safe="")


class ApiClient:
    """Namespace-scoped client of the state manager's ``v0`` API over one connection pool."""

    def __init__(
        self,
        uri: str,
        key: str,
        namespace: str,
        version: str = "v0",
        *,
        timeout: float = 30.0,
        max_connections: int = 20,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.namespace = namespace
        self.base_path = f"/{segment(version)}/namespace/{segment(namespace)}"
        self.timeout = timeout
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        if transport is None and not _proxied():
            transport = PlainHttpTransport(
                httpx.AsyncHTTPTransport(limits=limits), max_connections=max_connections
            )
        self.client = httpx.AsyncClient(
            base_url=uri.rstrip("/"),
            headers={"x-api-key": key, "user-agent": f"exospherehost-python/{VERSION}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=limits,
            transport=transport,
        )

    def url(self, *parts: str, trailing_slash: bool = False) -> str:
        """Path under the namespace: ``url("state", id, "executed")``."""
        path = "/".join([self.base_path, *(segment(part) for part in parts)])
        return path + "/" if trailing_slash else path

    async def send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        request_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request; network failures raise ``httpx.RequestError``.

        ``json`` is encoded with pydantic-core (a third cheaper than httpx's own
        encoding; NaN and infinities are sent as JSON constants, not refused).
        """
        content = None if json is None else to_json(json)
        if json is not None:
            headers = {**_JSON_HEADERS, **headers} if headers else _JSON_HEADERS
        if request_timeout is None:
            return await self.client.request(method, path, content=content, headers=headers)
        timeout = httpx.Timeout(request_timeout, connect=min(request_timeout, 10.0))
        return await self.client.request(
            method, path, content=content, headers=headers, timeout=timeout
        )

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        ok: tuple[int, ...] = (200,),
        request_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one request and return its JSON body; raise :class:`ApiError` unless ``ok``."""
        response = await self.send(
            method, path, json=json, request_timeout=request_timeout, headers=headers
        )
        body = response_body(response)
        if response.status_code not in ok:
            raise ApiError(method, path, response.status_code, body)
        return body

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
