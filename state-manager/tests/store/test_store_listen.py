"""Wake-ups across replicas survive a PostgreSQL restart: the LISTEN connection comes back.

Runs on a PostgreSQL cluster of its own, which it crashes and starts again.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest
from sm_support import postgres_cluster
from state_manager.store.database import NOTIFY_CHANNEL, Database


async def notify(url: str, payload: str) -> None:
    """Send one NOTIFY as another replica would; quietly nothing while PostgreSQL is down."""
    with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
        connection = await asyncpg.connect(url, timeout=2)
        try:
            await connection.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
        finally:
            await connection.close()


async def first_notification(url: str, received: asyncio.Queue[str], payload: str) -> str:
    """Send ``payload`` until a notification arrives; return what arrived."""
    async with asyncio.timeout(30):
        while True:
            await notify(url, payload)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(received.get(), 0.5)


@pytest.mark.postgres
async def test_postgres_listener_comes_back_after_a_crash_restart() -> None:
    with postgres_cluster() as cluster:
        url = await asyncio.to_thread(cluster.create_database, "exo_listen")
        db = Database(url, pool_size=1)
        received: asyncio.Queue[str] = asyncio.Queue()
        db.on_work = received.put_nowait
        await db.start_listening()
        try:
            assert await first_notification(url, received, "before") == "before"
            await asyncio.to_thread(cluster.stop, "immediate")
            await asyncio.to_thread(cluster.start)
            assert await first_notification(url, received, "after") == "after"
        finally:
            await db.close()
