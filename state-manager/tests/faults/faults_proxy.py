"""A round-robin TCP load balancer, as the fault suite's workers reach the servers.

Run as its own process::

    python faults_proxy.py LISTEN_PORT BACKEND_PORT [BACKEND_PORT ...]

Each client connection goes to the next backend in turn; a backend that refuses the
connection (killed, restarting) is skipped, and the connection goes to the one after.
Bytes are copied both ways until either side closes, then both are closed: a backend
killed mid-request cuts its clients' connections, as a real load balancer does. With
no backend up, the client's connection is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys

CONNECT_TIMEOUT_S = 2.0
CHUNK = 64 * 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until end of stream or an error."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()


class Balancer:
    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.turn = itertools.cycle(range(len(backends)))

    async def connect(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A connection to the next backend that accepts one, trying each once."""
        start = next(self.turn)
        for offset in range(len(self.backends)):
            port = self.backends[(start + offset) % len(self.backends)]
            with contextlib.suppress(OSError, TimeoutError):
                return await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S
                )
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = await self.connect()
        if backend is None:
            writer.close()
            return
        backend_reader, backend_writer = backend
        upstream = asyncio.create_task(pipe(reader, backend_writer))
        downstream = asyncio.create_task(pipe(backend_reader, writer))
        try:
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (upstream, downstream):
                task.cancel()
            for stream in (writer, backend_writer):
                stream.close()
            await asyncio.gather(upstream, downstream, return_exceptions=True)


async def serve(listen_port: int, backends: list[int]) -> None:
    balancer = Balancer(backends)
    server = await asyncio.start_server(
        balancer.handle, "127.0.0.1", listen_port, reuse_address=True, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, *backends = (int(arg) for arg in sys.argv[1:])
    if not backends:
        raise SystemExit("usage: faults_proxy.py LISTEN_PORT BACKEND_PORT [BACKEND_PORT ...]")
    try:
        import uvloop

        uvloop.run(serve(listen_port, backends))
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(serve(listen_port, backends))


if __name__ == "__main__":
    main()
