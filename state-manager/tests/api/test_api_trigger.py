"""E8 trigger: the root state, store and defaults, literal input overrides, start_delay, errors."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import sm_support
from sm_api import Api, error_locations, expect_error, node, template_node
from sm_support import read_states, serve

NS = "trig"


async def _graph(api: Api) -> None:
    await api.register(node("A", inputs=("x", "y", "z"), outputs=("o",)), node("B"))
    await api.create_graph(
        "g",
        {
            "nodes": [
                template_node(
                    "A",
                    "a",
                    NS,
                    {
                        "x": "${{ store.k }}",
                        "y": "pre-${{ store.d }}-${{store . k}}-post",
                        "z": "literal }} text",
                        "not_in_schema": "dropped",
                    },
                    ["b"],
                ),
                template_node("B", "b", NS),
            ],
            "store_config": {"required_keys": ["k"], "default_values": {"d": "dflt"}},
        },
    )


async def test_trigger_creates_the_root_state(client: httpx.AsyncClient, database_url: str) -> None:
    api = Api(client, NS)
    await _graph(api)

    r = await api.trigger_raw("g", {"store": {"k": "v", "unused": "u"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"status", "run_id"}
    assert body["status"] == "CREATED"
    run_id = body["run_id"]
    assert str(uuid.UUID(run_id)) == run_id and uuid.UUID(run_id).version == 4

    state = await api.claim_one("A", "B")
    assert (state["node_name"], state["identifier"]) == ("A", "a")
    assert state["inputs"] == {"x": "v", "y": "pre-dflt-v-post", "z": "literal }} text"}
    details = await api.node_details("g", run_id, state["state_id"])
    assert (details["run_id"], details["graph_name"], details["parents"]) == (run_id, "g", {})
    assert details["status"] == "QUEUED"

    # A store value overrides the default; trigger-time inputs are literal values that
    # replace the template's text (no placeholder is interpreted); unknown keys are ignored.
    second = await api.trigger(
        "g",
        store={"k": "v2", "d": "given"},
        inputs={"z": "${{ store.k }}", "nope": "ignored"},
        start_delay=0,
    )
    assert second != run_id
    state = await api.claim_one("A")
    assert state["inputs"] == {"x": "v2", "y": "pre-given-v2-post", "z": "${{ store.k }}"}

    # start_delay postpones the root state.
    delayed = await api.trigger("g", store={"k": "v3"}, start_delay=3_600_000)
    assert await api.claim("A", "B") == []
    [row] = await read_states(database_url, NS, delayed)
    assert row.enqueue_after - row.created_at == 3_600_000
    [row] = await read_states(database_url, NS, run_id)
    assert (row.enqueue_after, row.retry_count, row.parents) == (row.created_at, 0, {})
    graph = await api.run_graph(delayed)
    assert [(n["identifier"], n["status"]) for n in graph["nodes"]] == [("a", "CREATED")]

    # Each trigger is its own run.
    r = await client.get(f"{api.base}/runs/1/10")
    assert {run["run_id"] for run in r.json()["runs"]} == {run_id, second, delayed}


async def test_trigger_errors(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)

    missing = "Graph template nope not found in namespace trig"
    expect_error(await api.trigger_raw("nope", {}), 404, missing)
    expect_error(
        await Api(client, "other").trigger_raw("g", {}),
        404,
        "Graph template g not found in namespace other",
    )

    # Every required key must be in the trigger's store; a default does not satisfy it.
    expect_error(await api.trigger_raw("g", {}), 400, "Missing store keys: k")
    await api.create_graph(
        "req",
        {
            "nodes": [template_node("B", "b", NS)],
            "store_config": {"required_keys": ["k", "m"], "default_values": {"m": "1"}},
        },
    )
    expect_error(await api.trigger_raw("req", {"store": {}}), 400, "Missing store keys: k, m")
    expect_error(await api.trigger_raw("req", {"store": {"m": "x"}}), 400, "Missing store keys: k")

    # A template that failed validation cannot be triggered.
    r = await api.upsert("bad", {"nodes": [template_node("Unregistered", "u", NS)]})
    assert r.status_code == 201
    assert (await api.wait_validated("bad"))["validation_status"] == "INVALID"
    expect_error(await api.trigger_raw("bad", {}), 400, "Graph template is not valid")

    # Request-schema violations.
    cases = [
        ({"store": {"k": 1}}, ("body", "store", "k")),
        ({"store": ["k"]}, ("body", "store")),
        ({"inputs": {"x": None}}, ("body", "inputs", "x")),
        ({"start_delay": -1}, ("body", "start_delay")),
        ({"start_delay": "soon"}, ("body", "start_delay")),
    ]
    for body, location in cases:
        r = await api.trigger_raw("g", body)
        assert error_locations(r) == [location], body
    r = await client.post(f"{api.base}/graph/g/trigger", json=["not", "an", "object"])
    assert error_locations(r) == [("body",)]
    # None of the failed triggers created a run.
    r = await client.get(f"{api.base}/runs/1/10")
    assert r.json()["total"] == 0


async def test_a_pending_template_cannot_be_triggered(database_url: str, tmp_path: Path) -> None:
    # Without background work the template stays PENDING.
    settings = sm_support.test_settings(database_url, tmp_path / "data")
    with serve(settings, run_background=False) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as client:
            api = Api(client, NS)
            await api.register(node("B"))
            r = await api.upsert("g", {"nodes": [template_node("B", "b", NS)]})
            assert r.json()["validation_status"] == "PENDING"
            expect_error(await api.trigger_raw("g", {}), 400, "Graph template is not valid")
            assert (await api.get_graph("g"))["validation_status"] == "PENDING"


async def test_several_runs_start_in_one_request_all_or_none(
    client: httpx.AsyncClient, database_url: str
) -> None:
    api = Api(client, NS)
    await _graph(api)
    url = f"{api.base}/graph/g/runs"
    runs = [{"store": {"k": str(i)}} for i in range(3)] + [
        {"store": {"k": "late"}, "inputs": {"x": "given"}, "start_delay": 60_000}
    ]
    r = await client.post(url, json={"runs": runs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "CREATED" and len(body["run_ids"]) == 4
    assert len(set(body["run_ids"])) == 4
    claimed = {s["inputs"]["x"] for s in await api.claim("A", batch_size=10)}
    assert claimed == {"0", "1", "2"}  # the delayed run is not due yet
    for run_id, k in zip(body["run_ids"], ["0", "1", "2", "late"], strict=True):
        (root,) = await read_states(database_url, NS, run_id)
        assert root.inputs["x"] == ("given" if k == "late" else k)

    # One run that cannot start refuses the whole request, naming it; nothing is created.
    listed = (await client.get(f"{api.base}/runs/1/100")).json()["total"]
    bad = [{"store": {"k": "1"}}, {"store": {}}]
    expect_error(await client.post(url, json={"runs": bad}), 400, "Run 2: Missing store keys: k")
    assert (await client.get(f"{api.base}/runs/1/100")).json()["total"] == listed
    expect_error(
        await client.post(f"{api.base}/graph/nope/runs", json={"runs": [{}]}),
        404,
        f"Graph template nope not found in namespace {NS}",
    )
    assert error_locations(await client.post(url, json={"runs": []})) == [("body", "runs")]
    too_many = [{"store": {"k": "x"}}] * 1001
    expect_error(
        await client.post(url, json={"runs": too_many}), 400, "1001 runs exceed the limit of 1000"
    )
