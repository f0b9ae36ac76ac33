"""Trigger idempotency: the Idempotency-Key header on trigger and per-run keys on the bulk
route, against real servers on both backends (concurrent duplicates included)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sm_api import Api, expect_error, node, template_node
from sm_support import RunningServer, serve, server_process, test_settings, unique_namespace
from state_manager.store.database import Database
from state_manager.store.tables import runs, states, trigger_keys

GRAPH = "g"


async def _graph(api: Api, graph: str = GRAPH) -> None:
    await api.register(node("A", inputs=("x",), outputs=("o",)))
    await api.create_graph(
        graph,
        {
            "nodes": [template_node("A", "a", api.ns, {"x": "${{ store.k }}"})],
            "store_config": {"required_keys": ["k"]},
        },
    )


def _trigger(
    http: httpx.AsyncClient, ns: str, key: str | None, body: dict[str, Any], graph: str = GRAPH
) -> Any:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return http.post(f"/v0/namespace/{ns}/graph/{graph}/trigger", json=body, headers=headers)


async def _db_count(database_url: str, query: Callable[[], Any]) -> int:
    database = Database(database_url)
    try:
        return int(await database.run_sync(lambda connection: connection.scalar(query())))
    finally:
        await database.close()


async def _runs_in(database_url: str, namespace: str) -> int:
    return await _db_count(
        database_url,
        lambda: sa.select(sa.func.count()).select_from(runs).where(runs.c.namespace == namespace),
    )


async def test_same_key_returns_the_first_run_and_creates_nothing(
    client: httpx.AsyncClient, database_url: str
) -> None:
    ns = unique_namespace("idem")
    api = Api(client, ns)
    await _graph(api)
    body = {"store": {"k": "v"}, "inputs": {}, "start_delay": 0}

    first = await _trigger(client, ns, "order-1", body)
    assert first.status_code == 200, first.text
    again = await _trigger(client, ns, "order-1", {"inputs": {}, "store": {"k": "v"}})
    assert again.status_code == 200, again.text
    assert again.json() == first.json()  # same shape and status, same run
    assert await _runs_in(database_url, ns) == 1
    assert len(await api.claim("A")) == 1  # one root state

    # Without a key, or with another key, a trigger starts a run as before.
    assert (await _trigger(client, ns, None, body)).json()["run_id"] != first.json()["run_id"]
    other = await _trigger(client, ns, "order-2", body)
    assert other.json()["run_id"] != first.json()["run_id"]
    # Keys are per namespace: the same key elsewhere is another run.
    ns2 = unique_namespace("idem")
    await _graph(Api(client, ns2))
    elsewhere = await _trigger(client, ns2, "order-1", body)
    assert elsewhere.status_code == 200 and elsewhere.json()["run_id"] != first.json()["run_id"]
    assert await _runs_in(database_url, ns) == 3


async def test_same_key_with_another_body_or_graph_is_a_conflict(
    client: httpx.AsyncClient, database_url: str
) -> None:
    ns = unique_namespace("idem")
    api = Api(client, ns)
    await _graph(api)
    await _graph(api, "g2")
    first = await _trigger(client, ns, "k1", {"store": {"k": "v"}})
    assert first.status_code == 200

    detail = expect_error(await _trigger(client, ns, "k1", {"store": {"k": "other"}}), 409)
    assert "k1" in detail and "different request" in detail
    expect_error(await _trigger(client, ns, "k1", {"store": {"k": "v"}, "start_delay": 5}), 409)
    expect_error(await _trigger(client, ns, "k1", {"store": {"k": "v"}}, graph="g2"), 409)
    assert await _runs_in(database_url, ns) == 1

    # A refused trigger does not hold its key: fixed, it starts a run with the same key.
    expect_error(await _trigger(client, ns, "k2", {"store": {}}), 400)  # missing store key
    fixed = await _trigger(client, ns, "k2", {"store": {"k": "v"}})
    assert fixed.status_code == 200, fixed.text
    assert await _runs_in(database_url, ns) == 2

    # Keys are bounded printable text.
    for bad in ("x" * 256, "caf\u00e9"):
        response = await client.post(
            f"/v0/namespace/{ns}/graph/{GRAPH}/trigger",
            json={"store": {"k": "v"}},
            headers={"Idempotency-Key": bad.encode("utf-8")},  # type: ignore[dict-item]
        )
        assert response.status_code in (400, 422), response.text
        expect_error(response, response.status_code)
    assert await _runs_in(database_url, ns) == 2


async def test_concurrent_duplicates_create_one_run(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """20 requests with one key at once (most of them in one group-commit batch)."""
    ns = unique_namespace("idem")
    await _graph(Api(client, ns))
    body = {"store": {"k": "v"}}
    answers = await asyncio.gather(*(_trigger(client, ns, "once", body) for _ in range(20)))
    assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers]
    assert len({a.json()["run_id"] for a in answers}) == 1
    # Other callers in the same batches are unaffected, keyed or not.
    mixed = await asyncio.gather(
        *(_trigger(client, ns, f"k{i % 5}", body) for i in range(20)),
        *(_trigger(client, ns, None, body) for _ in range(5)),
        *(_trigger(client, ns, "once", {"store": {"k": "other"}}) for _ in range(3)),
    )
    assert [a.status_code for a in mixed] == [200] * 25 + [409] * 3
    assert len({a.json()["run_id"] for a in mixed[:20]}) == 5
    assert await _runs_in(database_url, ns) == 1 + 5 + 5


async def test_concurrent_duplicates_across_two_server_processes(
    database_url: str, tmp_path: Path
) -> None:
    with (
        server_process(database_url, tmp_path / "one") as one,
        server_process(database_url, tmp_path / "two") as two,
    ):
        ns = unique_namespace("idem")
        async with (
            httpx.AsyncClient(base_url=one.base_url, headers=one.headers, timeout=30) as a,
            httpx.AsyncClient(base_url=two.base_url, headers=two.headers, timeout=30) as b,
        ):
            await _graph(Api(a, ns))
            await Api(b, ns).wait_validated(GRAPH)
            for round_ in range(3):
                key = f"twin-{round_}"
                answers = await asyncio.gather(
                    *(_trigger(c, ns, key, {"store": {"k": "v"}}) for c in [a, b] * 10)
                )
                assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers]
                assert len({r.json()["run_id"] for r in answers}) == 1
        assert await _runs_in(database_url, ns) == 3


async def test_bulk_route_per_run_keys(client: httpx.AsyncClient, database_url: str) -> None:
    ns = unique_namespace("idem")
    api = Api(client, ns)
    await _graph(api)
    url = f"/v0/namespace/{ns}/graph/{GRAPH}/runs"
    first = await client.post(
        url,
        json={
            "runs": [
                {"store": {"k": "1"}, "idempotency_key": "b1"},
                {"store": {"k": "2"}, "idempotency_key": "b2"},
                {"store": {"k": "3"}},
            ]
        },
    )
    assert first.status_code == 200, first.text
    ids = first.json()["run_ids"]
    assert len(set(ids)) == 3

    # Again: keyed runs answer their first run, the unkeyed one is new; a single trigger
    # with the same key and body is the same request.
    again = await client.post(
        url,
        json={
            "runs": [
                {"store": {"k": "2"}, "idempotency_key": "b2"},
                {"store": {"k": "3"}},
                {"store": {"k": "1"}, "idempotency_key": "b1"},
                {"store": {"k": "4"}, "idempotency_key": "b4"},
            ]
        },
    )
    assert again.status_code == 200, again.text
    second = again.json()["run_ids"]
    assert second[0] == ids[1] and second[2] == ids[0]
    assert len(set(second) | set(ids)) == 5
    single = await _trigger(client, ns, "b4", {"store": {"k": "4"}})
    assert single.json()["run_id"] == second[3]
    assert await _runs_in(database_url, ns) == 5

    # All or none: one run's key used for another body refuses the request, and its new
    # keys are not held afterwards.
    refused = await client.post(
        url,
        json={
            "runs": [
                {"store": {"k": "5"}, "idempotency_key": "b5"},
                {"store": {"k": "changed"}, "idempotency_key": "b1"},
            ]
        },
    )
    assert "b1" in expect_error(refused, 409)
    assert await _runs_in(database_url, ns) == 5
    later = await _trigger(client, ns, "b5", {"store": {"k": "other"}})
    assert later.status_code == 200, later.text

    # One key twice in one request is a client error.
    twice = await client.post(
        url,
        json={
            "runs": [
                {"store": {"k": "6"}, "idempotency_key": "b6"},
                {"store": {"k": "6"}, "idempotency_key": "b6"},
            ]
        },
    )
    expect_error(twice, 400)
    assert await _runs_in(database_url, ns) == 6


async def test_keys_expire_and_are_purged(database_url: str, tmp_path: Path) -> None:
    settings = replace(
        _settings(database_url, tmp_path), idempotency_ttl_seconds=1, retention_interval_seconds=1
    )
    with serve(settings) as server:
        async with _client(server) as http:
            ns = unique_namespace("idem")
            await _graph(Api(http, ns))
            body = {"store": {"k": "v"}}
            first = (await _trigger(http, ns, "short", body)).json()["run_id"]
            assert (await _trigger(http, ns, "short", body)).json()["run_id"] == first
            await asyncio.sleep(1.2)
            # Expired: the key starts a new run (even with another body), and holds it.
            renewed = await _trigger(http, ns, "short", {"store": {"k": "new"}})
            assert renewed.status_code == 200, renewed.text
            assert renewed.json()["run_id"] != first
            same = await _trigger(http, ns, "short", {"store": {"k": "new"}})
            assert same.json()["run_id"] == renewed.json()["run_id"]
            # The background loop deletes expired keys.
            deadline = time.monotonic() + 15
            while await _db_count(
                database_url, lambda: sa.select(sa.func.count()).select_from(trigger_keys)
            ):
                assert time.monotonic() < deadline, "expired keys were not purged"
                await asyncio.sleep(0.2)
            assert await _runs_in(database_url, ns) == 2
            assert (
                await _db_count(
                    database_url,
                    lambda: (
                        sa.select(sa.func.count())
                        .select_from(states)
                        .where(states.c.namespace == ns)
                    ),
                )
                == 2
            )


def _settings(database_url: str, tmp_path: Path) -> Any:
    return test_settings(database_url, tmp_path / "data")


def _client(server: RunningServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=30)
