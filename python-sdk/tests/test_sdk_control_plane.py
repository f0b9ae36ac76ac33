"""The StateManager calls the CLI is built on, against the real server on loopback:
list_nodes, list_graphs, get_run_details, retry_state and the run graph's retry_count."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from exospherehost import (
    GraphNodeModel,
    RetryPolicyModel,
    RetryStrategyEnum,
    StateManager,
    StoreConfigModel,
)
from exospherehost.errors import ApiError
from exospherehost.models import RunStatus
from sm_support import ServerProcess, unique_namespace


@pytest.fixture
async def api(sm_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """Raw HTTP, playing the worker's part."""
    async with httpx.AsyncClient(base_url=sm_server.base_url, headers=sm_server.headers) as http:
        yield http


async def test_control_plane_calls(sm_server: ServerProcess, api: httpx.AsyncClient) -> None:
    namespace = unique_namespace("control")
    base = f"/v0/namespace/{namespace}"
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    registered = await api.put(
        f"{base}/nodes/",
        json={
            "runtime_name": "rt",
            "nodes": [
                {"name": "Greet", "inputs_schema": schema, "outputs_schema": {}, "secrets": []}
            ],
        },
    )
    assert registered.status_code == 200, registered.text
    async with StateManager(namespace, sm_server.base_url, sm_server.key) as sm:
        [node] = await sm.list_nodes()
        assert (node.name, node.runtime_name, node.namespace) == ("Greet", "rt", namespace)
        assert (node.input_fields, node.output_fields, node.secrets) == (["name"], [], [])

        await sm.upsert_graph(
            "g",
            [GraphNodeModel(node_name="Greet", namespace=namespace, identifier="greet",
                            inputs={"name": "x"})],
            {"token": "t"},
            retry_policy=RetryPolicyModel(
                max_retries=1, strategy=RetryStrategyEnum.FIXED, backoff_factor=1
            ),
            validation_timeout=30,
            polling_interval=0.1,
        )  # fmt: skip
        [graph] = await sm.list_graphs()
        assert (graph["name"], graph["validation_status"], graph["secrets"]) == (
            "g",
            "VALID",
            {"token": True},
        )

        run_id = (await sm.trigger("g"))["run_id"]
        details = await sm.get_run_details(run_id)
        assert (details.run_id, details.namespace, details.status) == (
            run_id,
            namespace,
            RunStatus.PENDING,
        )
        assert (details.counts["CREATED"], details.total_count, details.finished) == (1, 1, 0)

        # Two failed attempts: the run fails, the run graph numbers the attempts.
        for _ in range(2):
            claim = {"nodes": ["Greet"], "batch_size": 1, "wait_ms": 5000}
            claimed = await api.post(f"{base}/states/enqueue", json=claim)
            [state] = claimed.json()["states"]
            await api.post(f"{base}/state/{state['state_id']}/errored", json={"error": "boom"})
        details = await sm.get_run_details(run_id)
        assert (details.status, details.errored_count, details.retried_count) == (
            RunStatus.FAILED,
            1,
            1,
        )
        view = await sm.get_run_graph(run_id)
        assert sorted((n.status, n.retry_count) for n in view.nodes) == [
            ("ERRORED", 1),
            ("RETRY_CREATED", 0),
        ]

        new_id = await sm.retry_state(state["state_id"])
        assert new_id != state["state_id"]
        assert (await sm.get_run_details(run_id)).status is RunStatus.PENDING
        with pytest.raises(ApiError) as again:
            await sm.retry_state(state["state_id"])
        assert again.value.status_code == 400
        with pytest.raises(ApiError) as unknown:
            await sm.get_run_details("no-such-run")
        assert unknown.value.status_code == 404


async def test_trigger_many_starts_runs_in_chunks(
    sm_server: ServerProcess, api: httpx.AsyncClient
) -> None:
    namespace = unique_namespace("many")
    base = f"/v0/namespace/{namespace}"
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    registered = await api.put(
        f"{base}/nodes/",
        json={
            "runtime_name": "rt",
            "nodes": [
                {"name": "Greet", "inputs_schema": schema, "outputs_schema": {}, "secrets": []}
            ],
        },
    )
    assert registered.status_code == 200, registered.text
    async with StateManager(namespace, sm_server.base_url, sm_server.key) as sm:
        await sm.upsert_graph(
            "g",
            [GraphNodeModel(node_name="Greet", namespace=namespace, identifier="greet",
                            inputs={"name": "${{ store.who }}"})],
            {},
            store_config=StoreConfigModel(required_keys=["who"]),
            validation_timeout=30,
            polling_interval=0.1,
        )  # fmt: skip
        runs = [{"store": {"who": f"w{i}"}} for i in range(7)] + [{"inputs": {"name": "lit"}}]
        with pytest.raises(ApiError) as refused:  # the store key is missing in the last run
            await sm.trigger_many("g", runs)
        assert refused.value.status_code == 400
        assert "Run 8" in refused.value.detail
        run_ids = await sm.trigger_many("g", runs[:7], chunk_size=3)

    assert len(set(run_ids)) == 7
    claimed = await api.post(f"{base}/states/enqueue", json={"nodes": ["Greet"], "batch_size": 100})
    assert sorted(s["inputs"]["name"] for s in claimed.json()["states"]) == [
        f"w{i}" for i in range(7)
    ]
    for run_id in run_ids:
        summary = await api.get(f"{base}/run/{run_id}")
        assert summary.json()["total_count"] == 1


async def test_cancel_run_and_timeouts(sm_server: ServerProcess, api: httpx.AsyncClient) -> None:
    namespace = unique_namespace("cancel")
    base = f"/v0/namespace/{namespace}"
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    registered = await api.put(
        f"{base}/nodes/",
        json={
            "runtime_name": "rt",
            "nodes": [
                {"name": "Greet", "inputs_schema": schema, "outputs_schema": {}, "secrets": []}
            ],
        },
    )
    assert registered.status_code == 200, registered.text
    async with StateManager(namespace, sm_server.base_url, sm_server.key) as sm:
        stored = await sm.upsert_graph(
            "g",
            [GraphNodeModel(node_name="Greet", namespace=namespace, identifier="greet",
                            inputs={"name": "x"}, timeout=30)],
            {},
            timeout=600,
            validation_timeout=30,
            polling_interval=0.1,
        )  # fmt: skip
        assert (stored["timeout"], stored["nodes"][0]["timeout"]) == (600, 30)
        with pytest.raises(ValueError, match="timeout"):
            await sm.upsert_graph("g", [], {}, timeout=0)

        delayed = (await sm.trigger("g", start_delay=3_600_000))["run_id"]
        answer = await sm.cancel_run(delayed)
        assert (answer["run_id"], answer["status"], answer["cancelled_states"]) == (
            delayed,
            "CANCELLED",
            1,
        )
        assert await sm.cancel_run(delayed) == answer  # twice: the same answer
        graph = await sm.wait_for_run(delayed, timeout=10)
        assert graph.status is RunStatus.CANCELLED
        assert (await sm.get_run_details(delayed)).status is RunStatus.CANCELLED
        assert (await sm.get_run(delayed)).status is RunStatus.CANCELLED

        finished = (await sm.trigger("g"))["run_id"]
        claimed = await api.post(
            f"{base}/states/enqueue", json={"nodes": ["Greet"], "batch_size": 1}
        )
        [state] = claimed.json()["states"]
        done = await api.post(f"{base}/state/{state['state_id']}/executed", json={"outputs": []})
        assert done.status_code == 200, done.text
        with pytest.raises(ApiError) as refused:
            await sm.cancel_run(finished)
        assert refused.value.status_code == 409
        assert "already finished" in refused.value.detail
        with pytest.raises(ApiError) as unknown:
            await sm.cancel_run("00000000-0000-0000-0000-000000000000")
        assert unknown.value.status_code == 404
    async with StateManager(namespace, sm_server.base_url, sm_server.key) as sm:
        # Idempotency keys: the same key answers the first run; another body is a 409.
        first = await sm.trigger("g", store={"who": "k"}, idempotency_key="sdk-1")
        again = await sm.trigger("g", store={"who": "k"}, idempotency_key="sdk-1")
        assert again == first
        with pytest.raises(ApiError) as conflict:
            await sm.trigger("g", store={"who": "else"}, idempotency_key="sdk-1")
        assert conflict.value.status_code == 409
        keyed = [{"store": {"who": "k"}, "idempotency_key": "sdk-1"}, {"store": {"who": "m"}}]
        many = await sm.trigger_many("g", [*keyed, {"store": {"who": "n"}, "idempotency_key": "x"}])
        assert many[0] == first["run_id"] and len(set(many)) == 3
        assert (await sm.trigger_many("g", [keyed[0]]))[0] == first["run_id"]
