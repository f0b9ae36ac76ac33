"""A database that cannot serve (down, restarting, connection cut) is a 503 with a JSON
message, never a 500; the server serves again by itself once the database is back.

PostgreSQL here is a cluster of the test's own, which it crashes and starts again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sm_api import Api, expect_error, node, template_node
from sm_support import admin_execute, make_database, postgres_cluster, server_process
from sqlalchemy.exc import DBAPIError
from state_manager.store.database import UNREACHABLE, Database, unavailable

NODES = {"runtime_name": "r", "nodes": [node("Work")]}


@pytest.mark.postgres
def test_postgres_down_is_a_503_until_it_is_back(tmp_path: Path) -> None:
    with (
        postgres_cluster() as cluster,
        server_process(cluster.create_database("exo_outage"), tmp_path / "server") as server,
        httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client,
    ):
        nodes_url = "/v0/namespace/outage/nodes/"
        assert client.put(nodes_url, json=NODES).status_code == 200
        cluster.stop("immediate")
        for response in (client.put(nodes_url, json=NODES), client.get(nodes_url)):
            expect_error(response, 503, UNREACHABLE)
        cluster.start()
        assert client.put(nodes_url, json=NODES).status_code == 200
        assert client.get(nodes_url).json()["count"] == 1
        assert '"unhandled error"' not in server.output(), server.output()


@pytest.mark.postgres
async def test_postgres_connection_cut_mid_query_counts_as_unavailable(tmp_path: Path) -> None:
    with make_database("postgres", tmp_path) as database:
        db = Database(database.url, pool_size=1)
        try:

            async def sleeper() -> None:
                async with db.read() as tx:
                    await tx.connection.execute(sa.text("SELECT pg_sleep(60)"))

            victim = asyncio.create_task(sleeper())
            async with asyncio.timeout(30):
                while not victim.done():
                    await asyncio.to_thread(
                        admin_execute,
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE datname = '{database.name}' AND query = 'SELECT pg_sleep(60)'",
                    )
                    await asyncio.sleep(0.1)
            with pytest.raises(DBAPIError) as caught:
                await victim
            error = unavailable(caught.value)
            assert error is not None and error.status_code == 503, caught.value
            assert error.detail == UNREACHABLE

            # Any other database error is a bug, answered 500 rather than hidden as a 503.
            with pytest.raises(DBAPIError) as caught:
                async with db.read() as tx:
                    await tx.connection.execute(sa.text("SELECT * FROM no_such_table"))
            assert unavailable(caught.value) is None
        finally:
            await db.close()


@pytest.mark.postgres
async def test_first_write_after_a_postgres_restart_succeeds(tmp_path: Path) -> None:
    """A server idle while PostgreSQL restarted serves its next write on a fresh
    connection instead of answering 503 on the one the restart cut."""
    with (
        postgres_cluster() as cluster,
        server_process(cluster.create_database("exo_restart"), tmp_path / "server") as server,
    ):
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=30
        ) as client:
            api = Api(client, "restart")
            await api.register(node("Work"))
            await api.create_graph(
                "g", {"nodes": [template_node("Work", "w", "restart")], "secrets": {}}
            )
            await api.trigger("g")  # the committer now keeps a connection
            cluster.stop("immediate")
            cluster.start()
            await asyncio.sleep(1.5)  # idle longer than the probe threshold
            run_id = await api.trigger("g")
            assert (await api.run_summary(run_id))["status"] is not None
        assert '"unhandled error"' not in server.output(), server.output()
