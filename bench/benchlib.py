"""Shared plumbing for the benchmarks: a real server process per backend, timing, tables.

The server is started with the same support code the test suite uses
(``state-manager/tests/sm_support.py``), as a separate process, so the load
generator in this process does not share an interpreter with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx

TESTS = Path(__file__).resolve().parents[1] / "state-manager" / "tests"
sys.path.insert(0, str(TESTS))

from sm_api import Api, node, template_node  # noqa: E402
from sm_support import ServerProcess, TempDatabase, make_database  # noqa: E402

__all__ = [
    "Api",
    "bench_server",
    "fresh_server",
    "node",
    "parse_args",
    "percentiles",
    "template_node",
    "timer",
]

BACKENDS = ("sqlite", "postgres")


def parse_args(
    description: str, extra: Sequence[tuple[str, dict[str, object]]] = ()
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--backend",
        choices=[*BACKENDS, "both"],
        default="both",
        help="database to run against (default: both, one after the other)",
    )
    for flag, options in extra:
        parser.add_argument(flag, **options)  # type: ignore[arg-type]
    args = parser.parse_args()
    args.backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    return args


@contextlib.asynccontextmanager
async def fresh_server(
    backend: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[ServerProcess, TempDatabase]]:
    """A fresh database and a server process on it; both removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="exo-bench-") as tmp:
        database = await asyncio.to_thread(make_database, backend, Path(tmp), "exo_bench_")
        server = ServerProcess(database.url, Path(tmp) / "server", dict(env or {}))
        try:
            await asyncio.to_thread(server.start)
            yield server, database
        finally:
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(database.drop)


@contextlib.asynccontextmanager
async def bench_server(
    backend: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[ServerProcess, httpx.AsyncClient]]:
    """A fresh database, a server process on it, and a client; all cleaned up afterwards."""
    async with fresh_server(backend, env) as (server, _database):
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=120, limits=limits
        ) as client:
            yield server, client


def percentiles(samples_s: Sequence[float]) -> str:
    """p50 / p90 / p99 / mean of durations in seconds, shown in milliseconds."""
    ordered = sorted(samples_s)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    mean = statistics.fmean(ordered) * 1000
    return (
        f"p50 {at(0.5):7.2f} ms  p90 {at(0.9):7.2f} ms  p99 {at(0.99):7.2f} ms  mean {mean:7.2f} ms"
    )


class timer:
    """``with timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> timer:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
