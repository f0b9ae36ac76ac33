"""HTTP/1.1 over plain TCP with keep-alive, as an ``httpx`` transport.

A worker spends most of its own CPU on HTTP: per request, httpcore's connection pool,
h11 and anyio cost about as much as everything the SDK does for a batch of states. The
state manager speaks HTTP/1.1 with bodies of known length, so this transport does just
that, on asyncio streams: requests to ``http://`` URLs go here, anything else (``https``)
to httpx's own transport. It stays behind ``httpx.AsyncClient``, so URLs, headers,
timeouts, proxies from the environment (httpx mounts its own transports for them) and
errors (``httpx.ConnectError``, ``httpx.ReadTimeout``, ...) are as with httpx alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx

__all__ = ["PlainHttpTransport"]

_MAX_HEAD = 64 * 1024  # bytes of status line and headers accepted in an answer
_NO_BODY = frozenset({204, 304})
_LINE_BREAK = re.compile(rb"[\r\n]")


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def usable(self) -> bool:
        """Whether an idle connection can take a request (the server has not closed it)."""
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class PlainHttpTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 for ``http://`` URLs; others go to ``fallback``."""

    def __init__(self, fallback: httpx.AsyncBaseTransport, *, max_connections: int) -> None:
        self._fallback = fallback
        self._max_connections = max_connections
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._slots: asyncio.Semaphore | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            return await self._fallback.handle_async_request(request)
        timeout = request.extensions.get("timeout", {})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_connections)
        try:
            async with asyncio.timeout(timeout.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection in time", request=request) from None
        try:
            return await self._send(request, (url.host, url.port or 80), timeout)
        finally:
            self._slots.release()

    async def _send(
        self, request: httpx.Request, address: tuple[str, int], limits: Mapping[str, float | None]
    ) -> httpx.Response:
        """``limits``: seconds per phase (httpx's ``timeout`` extension)."""
        connection = await self._connection(request, address, limits.get("connect"))
        kept = False
        try:
            with _mapped(httpx.WriteError, httpx.WriteTimeout, request):
                async with asyncio.timeout(limits.get("write")):
                    connection.writer.write(_head(request) + await request.aread())
                    await connection.writer.drain()
            with _mapped(httpx.ReadError, httpx.ReadTimeout, request):
                async with asyncio.timeout(limits.get("read")):
                    status, reason, headers, body, reusable = await _answer(
                        connection.reader, request
                    )
            if reusable:
                self._idle.setdefault(address, []).append(connection)
                kept = True
            return httpx.Response(
                status,
                headers=headers,
                stream=httpx.ByteStream(body),
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
            )
        finally:
            if not kept:
                connection.close()

    async def _connection(
        self, request: httpx.Request, address: tuple[str, int], connect_timeout: float | None
    ) -> _Connection:
        idle = self._idle.get(address, [])
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            connection.close()
        with _mapped(httpx.ConnectError, httpx.ConnectTimeout, request):
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(*address, limit=_MAX_HEAD)
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        await self._fallback.aclose()


def _head(request: httpx.Request) -> bytes:
    lines = [request.method.encode("ascii") + b" " + request.url.raw_path + b" HTTP/1.1"]
    for name, value in request.headers.raw:
        if _LINE_BREAK.search(name) or _LINE_BREAK.search(value):
            raise httpx.LocalProtocolError("Line break in a request header", request=request)
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _answer(
    reader: asyncio.StreamReader, request: httpx.Request
) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes, bool]:
    """Status, reason, headers, body, and whether the connection can be used again."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            ) from None
        except asyncio.LimitOverrunError:
            raise httpx.RemoteProtocolError("Answer headers too large", request=request) from None
        status_line, *header_lines = head[:-4].split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise httpx.RemoteProtocolError(
                f"Malformed status line {status_line!r}", request=request
            )
        status = int(code)
        if not 100 <= status < 200:
            break  # an informational answer (100 Continue, ...) precedes the real one
    headers = []
    for line in header_lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise httpx.RemoteProtocolError(f"Malformed header line {line!r}", request=request)
        headers.append((name.strip(), value.strip()))
    fields = {name.lower(): value for name, value in headers}
    reusable = version == b"HTTP/1.1" and fields.get(b"connection", b"").lower() != b"close"
    if request.method == "HEAD" or status in _NO_BODY:
        return status, reason, headers, b"", reusable
    try:
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = await _chunked(reader)
        elif b"content-length" in fields:
            body = await reader.readexactly(int(fields[b"content-length"]))
        else:  # delimited by the end of the connection
            body, reusable = await reader.read(), False
    except asyncio.IncompleteReadError:
        raise httpx.RemoteProtocolError(
            "Server disconnected before the end of the answer", request=request
        ) from None
    except ValueError:
        raise httpx.RemoteProtocolError("Malformed answer framing", request=request) from None
    return status, reason, headers, body, reusable


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


@contextlib.contextmanager
def _mapped(
    error: type[httpx.TransportError],
    timed_out: type[httpx.TimeoutException],
    request: httpx.Request,
) -> Iterator[None]:
    """Network failures and timeouts as httpx raises them."""
    try:
        yield
    except TimeoutError:
        raise timed_out("timed out", request=request) from None
    except httpx.TransportError:
        raise
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise error(str(exc) or type(exc).__name__, request=request) from exc
