"""The SDK's plain-HTTP transport against a scripted server on loopback: keep-alive,
answer framings, connections the server closes, and failures raised as httpx raises them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from exospherehost._http import ApiClient
from exospherehost._transport import PlainHttpTransport

Script = Callable[[bytes], bytes | None]
"""Given a request's head and body, the bytes to answer (None: close without answering)."""


@dataclass
class Server:
    """A TCP server that answers each request by its script, counting connections."""

    script: Script
    close_after: bool = False  # close each connection after its next answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.script(request)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                lowered = answer.lower()
                if (
                    self.close_after
                    or b"connection: close" in lowered
                    or not (b"content-length" in lowered or b"chunked" in lowered)
                ):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[[Script], Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[asyncio.Server] = []

    async def run(script: Script) -> Server:
        state = Server(script)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        started.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield run
    for server in started:
        server.close()
        await server.wait_closed()


def ok(body: bytes = b'{"ok": true}', *extra: bytes) -> Script:
    def answer(_request: bytes) -> bytes:
        headers = [b"HTTP/1.1 200 OK", b"content-type: application/json", *extra]
        headers.append(b"content-length: " + str(len(body)).encode())
        return b"\r\n".join(headers) + b"\r\n\r\n" + body

    return answer


def client(port: int, **kwargs: float) -> httpx.AsyncClient:
    transport = PlainHttpTransport(httpx.AsyncHTTPTransport(), max_connections=4)
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=kwargs.get("timeout", 5)
    )


async def test_requests_share_one_kept_alive_connection(serve: Serve) -> None:
    server = await serve(ok())
    async with client(server.port) as http:
        for _ in range(3):
            r = await http.post("/v0/x", json={"a": 1}, headers={"x-api-key": "k"})
            assert (r.status_code, r.json(), r.http_version) == (200, {"ok": True}, "HTTP/1.1")
    assert server.connections == 1 and len(server.requests) == 3
    first = server.requests[0]
    assert first.startswith(b"POST /v0/x HTTP/1.1\r\n")
    assert b"\r\nx-api-key: k\r\n" in first and b"\r\nhost: 127.0.0.1:" in first.lower()
    assert first.endswith(b'{"a":1}') or first.endswith(b'{"a": 1}')


async def test_chunked_answers_are_joined(serve: Serve) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\ntrailer: x\r\n\r\n"
    )
    server = await serve(lambda _request: chunked)
    async with client(server.port) as http:
        assert (await http.get("/")).text == "hello, world"
        assert (await http.get("/")).text == "hello, world"
    assert server.connections == 1


async def test_a_closing_or_unframed_answer_is_not_reused(serve: Serve) -> None:
    closing = await serve(ok(b"bye", b"Connection: close"))
    unframed = await serve(lambda _request: b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    for server, text in ((closing, "bye"), (unframed, "until the end")):
        async with client(server.port) as http:
            assert (await http.get("/")).text == text
            assert (await http.get("/")).text == text
        assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_replaced(serve: Serve) -> None:
    server = await serve(ok())
    async with client(server.port) as http:
        assert (await http.get("/")).status_code == 200
        server.close_after = True  # as a server ending idle keep-alive connections does
        assert (await http.get("/")).status_code == 200
        await asyncio.sleep(0.05)  # the connection's end reaches the client
        server.close_after = False
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/")).status_code == 200
    assert server.connections == 2 and len(server.requests) == 4


async def test_failures_are_httpx_errors(serve: Serve) -> None:
    silent = await serve(lambda _request: None)
    async with client(silent.port) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")
    cut = await serve(lambda _request: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
    cut.close_after = True
    async with client(cut.port) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; ends when the client gives up
        writer.close()

    slow = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = slow.sockets[0].getsockname()[1]
    try:
        async with client(port, timeout=0.2) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get("/")
    finally:
        slow.close()
        await slow.wait_closed()
    async with client(port) as http:  # nobody listens there any more
        with pytest.raises(httpx.ConnectError):
            await http.get("/")
    async with client(cut.port) as http:
        with pytest.raises(httpx.LocalProtocolError):
            await http.get("/", headers={"x-bad": "a\r\nInjected: 1"})


async def test_other_schemes_go_to_the_fallback_transport() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(204)

    transport = PlainHttpTransport(httpx.MockTransport(handler), max_connections=1)
    async with httpx.AsyncClient(transport=transport) as http:
        assert (await http.get("https://example.invalid/x")).status_code == 204
    assert seen == ["https://example.invalid/x"]


async def test_the_sdk_uses_it_unless_a_proxy_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    plain = ApiClient("http://127.0.0.1:1", "k", "ns")
    assert isinstance(plain.client._transport, PlainHttpTransport)
    await plain.aclose()
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    proxied = ApiClient("http://127.0.0.1:1", "k", "ns")
    assert not isinstance(proxied.client._transport, PlainHttpTransport)
    await proxied.aclose()
