"""A round-robin TCP load balancer, as the fault suite's workers reach the servers.

Run as its own process::

    python faults_proxy.py LISTEN_PORT CONTROL_PORT BACKEND_PORT [BACKEND_PORT ...]

Each client connection goes to the next backend in turn; a backend that refuses the
connection (killed, restarting) is skipped, and the connection goes to the one after.
Bytes are copied both ways until either side closes, then both are closed: a backend
killed mid-request cuts its clients' connections, as a real load balancer does. With
no backend up, the client's connection is closed at once.

For the suite to aim and count its kills, the balancer reads the request line of what
it forwards (nothing else). A connection to ``CONTROL_PORT`` gets, as one JSON object,
the requests waiting for an answer on each backend: ``{"PORT": ["executed", ...]}`` (the
last segment of each request's path). Each connection a backend closed while a request
on it was unanswered is printed as a JSON line: ``{"cut": PORT, "request": ..., "t": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Callable

CONNECT_TIMEOUT_S = 2.0
CHUNK = 64 * 1024
METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"PATCH ", b"HEAD ", b"OPTIONS ")


class Exchange:
    """One client connection to one backend, and whether a request on it waits for its
    answer (the client sent bytes after the backend last did)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.request = ""  # last segment of the path of the latest request
        self.sent = 0.0  # when the client last sent bytes
        self.answered = 0.0  # when the backend last sent bytes

    @property
    def waiting(self) -> bool:
        return self.sent > self.answered

    def client_sent(self, chunk: bytes) -> None:
        self.sent = time.monotonic()
        if chunk.startswith(METHODS):
            path = chunk.split(b" ", 2)[1].split(b"?", 1)[0].rstrip(b"/")
            self.request = path.rsplit(b"/", 1)[-1].decode("latin-1")

    def backend_sent(self, _chunk: bytes) -> None:
        self.answered = time.monotonic()


async def pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Callable[[bytes], None]
) -> None:
    """Copy ``reader`` to ``writer`` until end of stream or an error."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await reader.read(CHUNK):
            seen(chunk)
            writer.write(chunk)
            await writer.drain()


class Balancer:
    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.turn = itertools.cycle(range(len(backends)))
        self.exchanges: set[Exchange] = set()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int] | None:
        """A connection to the next backend that accepts one (and its port), trying each once."""
        start = next(self.turn)
        for offset in range(len(self.backends)):
            port = self.backends[(start + offset) % len(self.backends)]
            with contextlib.suppress(OSError, TimeoutError):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S
                )
                return reader, writer, port
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = await self.connect()
        if backend is None:
            writer.close()
            return
        backend_reader, backend_writer, port = backend
        exchange = Exchange(port)
        self.exchanges.add(exchange)
        upstream = asyncio.create_task(pipe(reader, backend_writer, exchange.client_sent))
        downstream = asyncio.create_task(pipe(backend_reader, writer, exchange.backend_sent))
        try:
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
            if downstream.done() and exchange.waiting:
                cut = {"cut": port, "request": exchange.request, "t": time.time()}
                print(json.dumps(cut), flush=True)
        finally:
            self.exchanges.discard(exchange)
            for task in (upstream, downstream):
                task.cancel()
            for stream in (writer, backend_writer):
                stream.close()
            await asyncio.gather(upstream, downstream, return_exceptions=True)

    async def report(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer a control connection with the requests waiting on each backend."""
        waiting: dict[str, list[str]] = {str(port): [] for port in self.backends}
        for exchange in self.exchanges:
            if exchange.waiting:
                waiting[str(exchange.port)].append(exchange.request)
        writer.write(json.dumps(waiting).encode())
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


async def serve(listen_port: int, control_port: int, backends: list[int]) -> None:
    balancer = Balancer(backends)
    server = await asyncio.start_server(
        balancer.handle, "127.0.0.1", listen_port, reuse_address=True, backlog=1024
    )
    control = await asyncio.start_server(balancer.report, "127.0.0.1", control_port)
    async with server, control:
        await server.serve_forever()


def main() -> None:
    ports = [int(arg) for arg in sys.argv[1:]]
    if len(ports) < 3:
        raise SystemExit(
            "usage: faults_proxy.py LISTEN_PORT CONTROL_PORT BACKEND_PORT [BACKEND_PORT ...]"
        )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(serve(ports[0], ports[1], ports[2:]))
    else:
        uvloop.run(serve(ports[0], ports[1], ports[2:]))


if __name__ == "__main__":
    main()
