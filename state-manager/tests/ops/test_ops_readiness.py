"""``/ready`` follows the database (reachable and migrated); ``/health`` never looks at it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sm_api import REQUEST_ID_HEADER, node, template_node
from sm_support import API_KEY, RunningServer, make_database, serve, test_settings
from state_manager.services.context import Context
from state_manager.store.database import Database, migration_files
from state_manager.store.tables import schema_migrations


def context_of(server: RunningServer) -> Context:
    app = server.server.config.app
    assert isinstance(app, FastAPI)
    context: Context = app.state.context
    return context


async def expect_ready(client: httpx.AsyncClient) -> None:
    r = await client.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {"ready": True}


async def expect_not_ready(client: httpx.AsyncClient) -> str:
    """Check a 503 with a JSON body and a request id; return its detail."""
    r = await client.get("/ready")
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json", r.headers
    uuid.UUID(r.headers[REQUEST_ID_HEADER])
    body = r.json()
    assert body.keys() == {"ready", "detail"} and body["ready"] is False, body
    detail: str = body["detail"]
    return detail


async def expect_healthy(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "OK"}


# The schema rollback below is SQL (MongoDB's version record: test_store_contract).
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_ready_follows_the_schema_version(
    database_url: str, client: httpx.AsyncClient
) -> None:
    await expect_ready(client)
    db = Database(database_url)
    try:
        latest = db.latest_version()
        # Roll the recorded schema back one version behind the running server's back.
        async with db.write() as tx:
            row = (
                await tx._execute(
                    sa.select(schema_migrations).where(schema_migrations.c.version == latest)
                )
            ).one()
            await tx._execute(
                schema_migrations.delete().where(schema_migrations.c.version == latest)
            )
        detail = await expect_not_ready(client)
        # Versions need not be contiguous (one may land before a lower one).
        previous = sorted(version for version, _ in migration_files(db.dialect))[-2]
        assert f"at version {previous}, this server needs {latest}" in detail, detail
        assert "state-manager migrate" in detail, detail
        await expect_healthy(client)
        # Migrated again: ready again, without a restart.
        async with db.write() as tx:
            await tx._execute(schema_migrations.insert().values(**row._mapping))
        await expect_ready(client)
    finally:
        await db.close()


class Tripwire:
    """Stands in for the database engine: any use is recorded and fails."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def __getattr__(self, name: str) -> NoReturn:
        self.touched.append(name)
        raise ConnectionRefusedError("the database was touched")


@pytest.fixture
def quiet_server(database_url: str, tmp_path: Path) -> Iterator[RunningServer]:
    """A server without background loops, so nothing but requests uses the database."""
    with serve(test_settings(database_url, tmp_path / "data"), run_background=False) as server:
        database = context_of(server).db
        engine = database.engine
        try:
            yield server
        finally:
            database.engine = engine


# The tripwire replaces the SQL engine; /health is backend-independent.
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_health_never_touches_the_database(quiet_server: RunningServer) -> None:
    database = context_of(quiet_server).db
    async with httpx.AsyncClient(base_url=quiet_server.base_url, timeout=30) as client:
        await expect_ready(client)
        tripwire = Tripwire()
        database.engine = tripwire  # type: ignore[assignment]
        for _ in range(3):
            await expect_healthy(client)
        assert tripwire.touched == []
        # The wire is live: readiness does use the database, and reports it unreachable.
        detail = await expect_not_ready(client)
        assert detail == "database unreachable: ConnectionRefusedError", detail
        assert tripwire.touched


def sample(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def start_a_run(client: httpx.Client) -> None:
    """One graph of one node, triggered once (so the states gauge has a series)."""
    base = "/v0/namespace/ops-ready"
    key = {"x-api-key": API_KEY}
    nodes = {"runtime_name": "r", "nodes": [node("A")]}
    assert client.put(f"{base}/nodes/", json=nodes, headers=key).status_code == 200
    graph = {"secrets": {}, "nodes": [template_node("A", "a", "ops-ready")]}
    assert client.put(f"{base}/graph/g", json=graph, headers=key).status_code == 201
    for _ in range(300):  # validation runs in the background; bounded wait
        status = client.get(f"{base}/graph/g", headers=key).json()["validation_status"]
        if status != "PENDING":
            break
        time.sleep(0.05)
    assert status == "VALID", status
    assert client.post(f"{base}/graph/g/trigger", json={}, headers=key).status_code == 200


def test_ready_is_503_when_the_postgres_database_is_dropped(tmp_path: Path) -> None:
    # Synchronous: the database helpers run their own event loop.
    database = make_database("postgres", tmp_path)
    try:
        with (
            serve(test_settings(database.url, tmp_path / "data")) as server,
            httpx.Client(base_url=server.base_url, timeout=30) as client,
        ):
            r = client.get("/ready")
            assert (r.status_code, r.json()) == (200, {"ready": True})
            start_a_run(client)
            before = client.get("/metrics")
            assert sample(before.text, "exosphere_database_up") == {frozenset(): 1.0}
            assert sample(before.text, "exosphere_states") == {
                frozenset({"namespace": "ops-ready", "node": "A", "status": "CREATED"}.items()): 1
            }

            database.drop()  # DROP DATABASE ... WITH (FORCE): every connection is cut

            r = client.get("/ready")
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/json", r.headers
            body = r.json()
            assert body["ready"] is False, body
            assert body["detail"].startswith("database unreachable: "), body
            r = client.get("/health")
            assert (r.status_code, r.json()) == (200, {"message": "OK"})
            # Counters are still served while the database is away; the sampled gauges
            # are dropped rather than left stale, and the outage is visible.
            after = client.get("/metrics")
            assert after.status_code == 200, after.text
            assert sample(after.text, "exosphere_database_up") == {frozenset(): 0.0}
            assert sample(after.text, "exosphere_states") == {}
            route = {"method": "GET", "route": "/ready", "status": "503"}
            counts = sample(after.text, "exosphere_http_request_duration_seconds_count")
            assert counts[frozenset(route.items())] == 1
    finally:
        database.drop()
