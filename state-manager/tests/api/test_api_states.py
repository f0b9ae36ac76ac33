"""E9 enqueue (with the wait_ms long-poll), E10 executed, E11 errored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import sm_support
from sm_api import Api, error_locations, expect_error, node, template_node
from sm_support import read_states, serve

NS = "states"


async def _two_step(api: Api, retry_policy: dict[str, Any] | None = None) -> None:
    """Graph g: a (A: x -> y) then b (B: z = "got <a.y>")."""
    await api.register(node("A", inputs=("x",), outputs=("y",)), node("B", inputs=("z",)))
    body: dict[str, Any] = {
        "nodes": [
            template_node("A", "a", NS, {"x": "${{ store.k }}"}, ["b"]),
            template_node("B", "b", NS, {"z": "got ${{ a.outputs.y }}"}),
        ],
        "store_config": {"default_values": {"k": "kv"}},
    }
    if retry_policy is not None:
        body["retry_policy"] = retry_policy
    await api.create_graph("g", body)


def _statuses(graph: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((n["identifier"], n["status"]) for n in graph["nodes"])


async def test_enqueue_claims_listed_nodes_once_up_to_batch_size(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await _two_step(api)
    runs = [await api.trigger("g", store={"k": str(i)}) for i in range(5)]
    assert len(set(runs)) == 5

    # Nothing claimable for other nodes, other namespaces, empty lists or batch_size <= 0.
    for body in (
        {"nodes": ["B"], "batch_size": 10},
        {"nodes": [], "batch_size": 10},
        {"nodes": ["A"], "batch_size": 0},
        {"nodes": ["A"], "batch_size": -3},
    ):
        r = await api.enqueue_raw(body)
        assert r.status_code == 200, r.text
        assert r.json() == {"count": 0, "namespace": NS, "status": "QUEUED", "states": []}
    r = await Api(client, "elsewhere").enqueue_raw({"nodes": ["A"], "batch_size": 10})
    assert r.json() == {"count": 0, "namespace": "elsewhere", "status": "QUEUED", "states": []}

    r = await api.enqueue_raw({"nodes": ["A", "Unknown"], "batch_size": 2, "extra": 1})
    assert r.status_code == 200
    body = r.json()
    assert (body["count"], body["namespace"], body["status"]) == (2, NS, "QUEUED")
    first = body["states"]
    assert len(first) == 2
    for state in first:
        assert set(state) == {"state_id", "node_name", "identifier", "inputs", "created_at"}
        assert (state["node_name"], state["identifier"]) == ("A", "a")
        assert state["created_at"].endswith("Z")
    rest = await api.claim("A", batch_size=10)
    assert len(rest) == 3
    assert await api.claim("A") == []
    claimed = first + rest
    assert len({s["state_id"] for s in claimed}) == 5
    assert sorted(s["inputs"]["x"] for s in claimed) == ["0", "1", "2", "3", "4"]
    for state in claimed:  # the x input tells which run the state belongs to
        graph_view = await api.run_graph(runs[int(state["inputs"]["x"])])
        assert [n["id"] for n in graph_view["nodes"]] == [state["state_id"]]
        assert _statuses(graph_view) == [("a", "QUEUED")]
    # batch_size above the server's maximum is capped, not an error.
    await api.trigger("g")
    assert len(await api.claim("A", batch_size=10**9)) == 1


async def test_concurrent_claimers_get_disjoint_states(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _two_step(api)
    for i in range(12):
        await api.trigger("g", store={"k": str(i)})
    batches = await asyncio.gather(*(api.claim("A", batch_size=3) for _ in range(6)))
    ids = [s["state_id"] for batch in batches for s in batch]
    assert len(ids) == 12
    assert len(set(ids)) == 12


async def test_enqueue_long_poll_returns_work_that_arrives_while_waiting(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await _two_step(api)
    # Nothing arrives: the call returns empty once its wait is over.
    assert await api.claim("A", wait_ms=50) == []
    waiting = asyncio.create_task(api.claim("A", "B", wait_ms=20_000))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    run_id = await api.trigger("g", store={"k": "late"})
    states = await waiting
    assert [(s["identifier"], s["inputs"]) for s in states] == [("a", {"x": "late"})]
    # A successor created by a report also wakes a waiting claimer.
    waiting = asyncio.create_task(api.claim("B", wait_ms=20_000))
    await asyncio.sleep(0.2)
    await api.executed(states[0]["state_id"], {"y": "Y"})
    successors = await waiting
    assert [(s["identifier"], s["inputs"]) for s in successors] == [("b", {"z": "got Y"})]
    assert _statuses(await api.run_graph(run_id)) == [("a", "SUCCESS"), ("b", "QUEUED")]


async def test_enqueue_rejects_malformed_bodies(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    cases = [
        ({"batch_size": 1}, [("body", "nodes")]),
        ({"nodes": ["A"]}, [("body", "batch_size")]),
        ({"nodes": "A", "batch_size": 1}, [("body", "nodes")]),
        ({"nodes": [1], "batch_size": 1}, [("body", "nodes", 0)]),
        ({"nodes": ["A"], "batch_size": "many"}, [("body", "batch_size")]),
        ({"nodes": ["A"], "batch_size": 1, "wait_ms": -1}, [("body", "wait_ms")]),
    ]
    for body, locations in cases:
        assert error_locations(await api.enqueue_raw(body)) == locations, body


async def test_executed_with_zero_one_and_many_outputs(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _two_step(api)

    # One output: the state succeeds and its successor is created with rendered inputs,
    # in the same request (no background step to wait for).
    one = await api.trigger("g")
    a = await api.claim_one("A")
    r = await api.post_state(a["state_id"], "executed", {"outputs": [{"y": "1", "n": 5}]})
    assert r.status_code == 200
    assert r.json() == {"status": "EXECUTED"}
    view = await api.run_graph(one)
    assert _statuses(view) == [("a", "SUCCESS"), ("b", "CREATED")]
    details = await api.node_details("g", one, a["state_id"])
    assert (details["status"], details["outputs"], details["error"]) == (
        "SUCCESS",
        {"y": "1", "n": 5},
        None,
    )
    b = await api.claim_one("B")
    assert b["inputs"] == {"z": "got 1"}
    b_details = await api.node_details("g", one, b["state_id"])
    assert b_details["parents"] == {"a": a["state_id"]}
    await api.executed(b["state_id"])  # a leaf with no outputs
    assert _statuses(await api.run_graph(one)) == [("a", "SUCCESS"), ("b", "SUCCESS")]

    # Many outputs: one sibling per extra output, one successor per output.
    many = await api.trigger("g")
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "p"}, {"y": "q"}, {"y": "r"})
    view = await api.run_graph(many)
    assert _statuses(view) == [("a", "SUCCESS")] * 3 + [("b", "CREATED")] * 3
    bs = await api.claim("B")
    assert sorted(s["inputs"]["z"] for s in bs) == ["got p", "got q", "got r"]
    parents = set()
    for s in bs:
        parent = (await api.node_details("g", many, s["state_id"]))["parents"]["a"]
        parents.add(parent)
        sibling = await api.node_details("g", many, parent)
        assert sibling["identifier"] == "a"
        assert sibling["inputs"] == {"x": "kv"}
        assert "got " + sibling["outputs"]["y"] == s["inputs"]["z"]
    assert len(parents) == 3 and a["state_id"] in parents

    # Zero outputs: the successor's reference cannot be filled, so the report ends in
    # NEXT_CREATED_ERROR and no successor is created.
    zero = await api.trigger("g")
    a = await api.claim_one("A")
    r = await api.post_state(a["state_id"], "executed", {"outputs": []})
    assert r.status_code == 200
    assert r.json() == {"status": "EXECUTED"}
    view = await api.run_graph(zero)
    assert _statuses(view) == [("a", "NEXT_CREATED_ERROR")]
    assert view["nodes"][0]["error"] == (
        "Could not create next states: output 'a.outputs.y' was not produced"
    )
    # A non-string value cannot be put in a successor's input either.
    bad = await api.trigger("g")
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "ok"}, {"y": 5})
    view = await api.run_graph(bad)
    assert _statuses(view) == [("a", "NEXT_CREATED_ERROR")] * 2  # the whole report fails
    assert {n["error"] for n in view["nodes"]} == {
        "Could not create next states: Value of 'a.outputs.y' must be a string, got int"
    }
    assert await api.claim("B") == []


async def test_executed_errors(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _two_step(api)
    await api.trigger("g")
    sid = (await api.claim_one("A"))["state_id"]
    unclaimed = (await api.run_graph(await api.trigger("g")))["nodes"][0]["id"]

    for body, location in (
        ({}, ("body", "outputs")),
        ({"outputs": {"y": "1"}}, ("body", "outputs")),
        ({"outputs": ["y"]}, ("body", "outputs", 0)),
    ):
        assert error_locations(await api.post_state(sid, "executed", body)) == [location]
    # A state that was never claimed cannot be reported.
    r = await api.post_state(unclaimed, "executed", {"outputs": [{"y": "1"}]})
    expect_error(r, 400, "State is not queued")

    await api.executed(sid, {"y": "1"})
    # A second report for the same state changes nothing.
    r = await api.post_state(sid, "executed", {"outputs": [{"y": "2"}]})
    expect_error(r, 400, "State is not queued")
    r = await api.post_state(sid, "errored", {"error": "late"})
    expect_error(r, 400, "State is already executed")
    assert len(await api.claim("B")) == 1


async def test_executed_over_the_fan_out_limit_is_413(database_url: str, tmp_path: Path) -> None:
    settings = sm_support.test_settings(database_url, tmp_path / "data", max_fanout=2)
    with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as client:
            api = Api(client, NS)
            await _two_step(api)
            run_id = await api.trigger("g")
            sid = (await api.claim_one("A"))["state_id"]
            r = await api.post_state(sid, "executed", {"outputs": [{"y": "1"}] * 3})
            expect_error(r, 413, "3 outputs exceed the fan-out limit of 2")
            assert _statuses(await api.run_graph(run_id)) == [("a", "QUEUED")]
            await api.executed(sid, {"y": "1"}, {"y": "2"})
            assert len(await api.claim("B")) == 2


async def test_errored_creates_retries_until_the_policy_runs_out(
    client: httpx.AsyncClient, database_url: str
) -> None:
    api = Api(client, NS)
    policy = {"max_retries": 2, "strategy": "FIXED", "backoff_factor": 1}
    await _two_step(api, retry_policy=policy)
    run_id = await api.trigger("g")
    first = await api.claim_one("A")

    r = await api.post_state(first["state_id"], "errored", {"error": "first failure"})
    assert r.status_code == 200
    assert r.json() == {"status": "RETRY_CREATED", "retry_created": True}
    details = await api.node_details("g", run_id, first["state_id"])
    assert (details["status"], details["error"]) == ("RETRY_CREATED", "first failure")

    second = (await api.claim("A", wait_ms=10_000))[0]
    assert second["state_id"] != first["state_id"]
    assert (second["identifier"], second["inputs"]) == ("a", first["inputs"])
    retry = await api.node_details("g", run_id, second["state_id"])
    assert (retry["status"], retry["error"], retry["outputs"]) == ("QUEUED", None, {})
    assert await api.errored(second["state_id"], "second") == {
        "status": "RETRY_CREATED",
        "retry_created": True,
    }
    third = (await api.claim("A", wait_ms=10_000))[0]
    assert await api.errored(third["state_id"], "third") == {
        "status": "ERRORED",
        "retry_created": False,
    }
    assert await api.claim("A", wait_ms=50) == []
    view = await api.run_graph(run_id)
    assert _statuses(view) == [("a", "ERRORED"), ("a", "RETRY_CREATED"), ("a", "RETRY_CREATED")]
    rows = {row.id: row for row in await read_states(database_url, NS, run_id)}
    attempts = [rows[s["state_id"]] for s in (first, second, third)]
    assert [row.retry_count for row in attempts] == [0, 1, 2]
    shown = {n["id"]: n["retry_count"] for n in view["nodes"]}
    assert [shown[s["state_id"]] for s in (first, second, third)] == [0, 1, 2]
    assert len({row.fanout_id for row in attempts}) == 1  # retries keep the fan-out id
    assert [row.enqueue_after - row.created_at for row in attempts[1:]] == [1, 1]
    assert view["execution_summary"]["RETRY_CREATED"] == 2
    assert {n["error"] for n in view["nodes"]} == {"first failure", "second", "third"}
    run = await api.run_summary(run_id)
    assert (run["status"], run["errored_count"], run["retried_count"]) == ("FAILED", 1, 2)

    # The default policy delays a retry (2 s): not claimable right away.
    other = Api(client, "states-default")
    await other.register(node("A"))
    await other.create_graph("g", {"nodes": [template_node("A", "a", "states-default")]})
    run_default = await other.trigger("g")
    state = await other.claim_one("A")
    assert (await other.errored(state["state_id"]))["retry_created"] is True
    assert await other.claim("A") == []
    rows = await read_states(database_url, "states-default", run_default)
    retry = next(row for row in rows if row.status == "CREATED")
    assert (retry.retry_count, retry.enqueue_after - retry.created_at) == (1, 2000)


async def test_errored_errors(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _two_step(api, retry_policy={"max_retries": 0})
    await api.trigger("g")
    sid = (await api.claim_one("A"))["state_id"]
    for body, location in (
        ({}, ("body", "error")),
        ({"error": 5}, ("body", "error")),
        ({"error": None}, ("body", "error")),
    ):
        assert error_locations(await api.post_state(sid, "errored", body)) == [location]
    unclaimed = (await api.run_graph(await api.trigger("g")))["nodes"][0]["id"]
    r = await api.post_state(sid, "errored", {"error": "x", "traceback": "tolerated"})
    assert r.json() == {"status": "ERRORED", "retry_created": False}
    r = await api.post_state(sid, "errored", {"error": "again"})
    expect_error(r, 400, "State is not queued or executed")
    r = await api.post_state(sid, "executed", {"outputs": []})
    expect_error(r, 400, "State is not queued")
    r = await api.post_state(unclaimed, "errored", {"error": "x"})
    expect_error(r, 400, "State is not queued or executed")


async def test_concurrent_reports_for_one_state_succeed_exactly_once(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await _two_step(api, retry_policy={"max_retries": 0})
    run_id = await api.trigger("g")
    sid = (await api.claim_one("A"))["state_id"]
    calls = [
        *(("executed", {"outputs": [{"y": str(i)}]}) for i in range(3)),
        *(("errored", {"error": "e"}) for _ in range(3)),
        *(("prune", {"data": {}}) for _ in range(2)),
        *(("re-enqueue-after", {"enqueue_after": 3_600_000}) for _ in range(2)),
    ]
    responses = await asyncio.gather(*(api.post_state(sid, a, b) for a, b in calls))
    winners = [(a, r.json()) for (a, _), r in zip(calls, responses, strict=True) if r.is_success]
    assert len(winners) == 1, winners
    for r in responses:
        if not r.is_success:
            assert expect_error(r, 400) in (
                "State is not queued",
                "State is not queued or executed",
                "State is already executed",
            )
    action, _ = winners[0]
    expected = {
        "executed": [("a", "SUCCESS"), ("b", "CREATED")],
        "errored": [("a", "ERRORED")],
        "prune": [("a", "PRUNED")],
        "re-enqueue-after": [("a", "CREATED")],
    }[action]
    assert _statuses(await api.run_graph(run_id)) == expected


async def test_an_abandoned_long_poll_claims_nothing(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _two_step(api)
    async with httpx.AsyncClient(
        base_url=str(client.base_url), headers=dict(client.headers), timeout=0.5
    ) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post(
                f"{api.base}/states/enqueue",
                json={"nodes": ["A"], "batch_size": 1, "wait_ms": 20_000},
            )
    # The impatient client has disconnected; its request must not take the next state.
    run_id = await api.trigger("g")
    for _ in range(40):  # give an abandoned poll every chance to (wrongly) claim it
        if _statuses(await api.run_graph(run_id)) != [("a", "CREATED")]:
            break
        await asyncio.sleep(0.05)
    assert _statuses(await api.run_graph(run_id)) == [("a", "CREATED")]
    assert len(await api.claim("A")) == 1
