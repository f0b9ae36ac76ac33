"""Node timeouts against a real server on both backends.

A claimed state not reported within its node's ``timeout`` (or the graph's default) is
taken back by the lease-expiry loop as a failed attempt ("timed out after N s") under the
retry policy; heartbeats never extend it past the timeout. The test server checks leases
every 100 ms, so a 1 s timeout is seen within a fraction of a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sm_api import Api, error_locations, node, template_node
from sm_support import read_states, serve, test_settings, unique_namespace

LEASE_S = 60


@pytest.fixture
async def api(database_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    settings = test_settings(
        database_url, tmp_path / "data", lease_check_ms=100, lease_seconds=LEASE_S
    )
    with serve(settings) as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=30
        ) as client:
            api = Api(client, unique_namespace("timeouts"))
            await api.register(node("A", outputs=("x",)), node("B"))
            yield api


def _graph(ns: str, *, a_timeout: int | None, graph_timeout: int | None, retries: int) -> Any:
    a = template_node("A", "a", ns, {}, ["b"])
    if a_timeout is not None:
        a["timeout"] = a_timeout
    body: dict[str, Any] = {
        "nodes": [a, template_node("B", "b", ns)],
        "retry_policy": {"max_retries": retries, "strategy": "FIXED", "backoff_factor": 1},
    }
    if graph_timeout is not None:
        body["timeout"] = graph_timeout
    return body


async def _states(database_url: str, api: Api, run_id: str) -> list[Any]:
    return await read_states(database_url, api.ns, run_id)


async def _wait_status(api: Api, run_id: str, status: str, limit_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while (summary := await api.run_summary(run_id))["status"] != status:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"run still {summary['status']}, not {status}: {summary}")
        await asyncio.sleep(0.05)


async def test_a_timed_out_attempt_is_retried_then_succeeds(api: Api, database_url: str) -> None:
    await api.create_graph("g", _graph(api.ns, a_timeout=1, graph_timeout=30, retries=1))
    run_id = await api.trigger("g")
    first = await api.claim_one("A")
    (state,) = await _states(database_url, api, run_id)
    assert state.timeout_ms == 1_000
    assert state.lease_expires_at == state.claimed_at + 1_000  # not the 60 s lease
    # A heartbeat does not extend the state past its timeout.
    r = await api.post_state(first["state_id"], "heartbeat", {})
    assert r.status_code == 200, r.text
    assert r.json()["lease_expires_at"] == state.claimed_at + 1_000

    # Not reported in time: taken back as a failed attempt, and retried.
    retry = (await api.claim("A", wait_ms=5_000))[0]
    assert retry["state_id"] != first["state_id"]
    states = {s.id: s for s in await _states(database_url, api, run_id)}
    taken = states[first["state_id"]]
    assert (taken.status, taken.error) == ("RETRY_CREATED", "timed out after 1 s")
    assert states[retry["state_id"]].retry_count == 1
    # The late report of the timed-out attempt is refused; the retry's is accepted.
    late = await api.post_state(first["state_id"], "executed", {"outputs": [{"x": "1"}]})
    assert late.status_code == 400, late.text
    await api.executed(retry["state_id"], {"x": "1"})
    b = await api.claim_one("B")
    b_state = next(s for s in await _states(database_url, api, run_id) if s.id == b["state_id"])
    assert b_state.timeout_ms == 30_000  # the graph's default
    assert b_state.lease_expires_at == b_state.claimed_at + 30_000
    await api.executed(b["state_id"])
    await _wait_status(api, run_id, "SUCCESS")


async def test_timeouts_exhausting_the_retries_fail_the_run(api: Api, database_url: str) -> None:
    await api.create_graph("g", _graph(api.ns, a_timeout=None, graph_timeout=1, retries=1))
    run_id = await api.trigger("g")
    await api.claim_one("A")
    await asyncio.sleep(1.0)
    assert await api.claim("A", wait_ms=5_000)  # the retry, claimed and left to time out
    await _wait_status(api, run_id, "FAILED")
    states = await _states(database_url, api, run_id)
    assert sorted((s.retry_count, s.status, s.error) for s in states) == [
        (0, "RETRY_CREATED", "timed out after 1 s"),
        (1, "ERRORED", "timed out after 1 s"),
    ]


async def test_without_timeouts_the_server_lease_applies(api: Api, database_url: str) -> None:
    await api.create_graph("g", _graph(api.ns, a_timeout=None, graph_timeout=None, retries=0))
    run_id = await api.trigger("g")
    await api.claim_one("A")
    (state,) = await _states(database_url, api, run_id)
    assert state.timeout_ms is None
    assert state.lease_expires_at == state.claimed_at + LEASE_S * 1000


@pytest.mark.parametrize("value", [0, -5, 7 * 24 * 3600 + 1, "10", True, 2.5])
async def test_invalid_timeouts_are_refused_at_upsert(api: Api, value: Any) -> None:
    body = _graph(api.ns, a_timeout=None, graph_timeout=None, retries=0)
    body["nodes"][0]["timeout"] = value
    r = await api.upsert("bad", body)
    assert r.status_code == 422, r.text
    assert error_locations(r) == [("body", "nodes", 0, "timeout")]
    body = _graph(api.ns, a_timeout=None, graph_timeout=None, retries=0)
    body["timeout"] = value
    r = await api.upsert("bad", body)
    assert r.status_code == 422, r.text
    assert error_locations(r) == [("body", "timeout")]


async def test_timeouts_are_stored_and_shown(api: Api) -> None:
    await api.create_graph("g", _graph(api.ns, a_timeout=5, graph_timeout=7 * 24 * 3600, retries=0))
    got = await api.get_graph("g")
    assert got["timeout"] == 7 * 24 * 3600
    assert [n["timeout"] for n in got["nodes"]] == [5, None]


async def test_states_claimed_by_an_exchange_get_leases_that_end_at_their_timeout(
    api: Api, database_url: str
) -> None:
    """An exchange's claim takes the states that were waiting with the lock of its
    reports, and the states its reports create as they are written: both kinds end
    their lease at the node's timeout, as a claim of its own would."""
    await api.create_graph("g", _graph(api.ns, a_timeout=None, graph_timeout=30, retries=0))
    first_run, second_run = await api.trigger("g"), await api.trigger("g")
    first, second = await api.claim("A", batch_size=2)
    await api.executed(first["state_id"], {"x": "1"})  # its B waits
    r = await api.client.post(
        f"{api.base}/states/exchange",
        json={
            "reports": [
                {"state_id": second["state_id"], "kind": "executed", "outputs": [{"x": "2"}]}
            ],
            "claim": {"nodes": ["B"], "batch_size": 5},
        },
    )
    assert r.status_code == 200, r.text
    claimed = {s["state_id"] for s in r.json()["states"]}
    states = [
        s
        for run_id in (first_run, second_run)
        for s in await _states(database_url, api, run_id)
        if s.node_name == "B"
    ]
    assert {s.id for s in states} == claimed and len(claimed) == 2
    for state in states:
        assert state.status == "QUEUED"
        assert state.claimed_at is not None
        assert state.lease_expires_at == state.claimed_at + 30_000  # not the 60 s lease
