"""Extension: ``POST .../states/exchange``, several reports and a claim in one request."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sm_api import Api, error_locations, expect_error, node, template_node

NS = "exchange"


async def _graph(api: Api) -> None:
    """a (A) -> b (B, z from a.y); a failure is retried once, immediately."""
    await api.register(node("A", outputs=("y",)), node("B", inputs=("z",)))
    await api.create_graph(
        "g",
        {
            "nodes": [
                template_node("A", "a", NS, {}, ["b"]),
                template_node("B", "b", NS, {"z": "${{ a.outputs.y }}"}),
            ],
            "retry_policy": {"max_retries": 1, "strategy": "FIXED", "backoff_factor": 1},
        },
    )


async def _exchange(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    r = await api.client.post(f"{api.base}/states/exchange", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def _claim_a(api: Api, runs: int) -> list[str]:
    for _ in range(runs):
        await api.trigger("g")
    return [s["state_id"] for s in await api.claim("A", batch_size=runs)]


async def test_reports_and_claim_in_one_transaction(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    fan, failing, pruned, requeued, beating = await _claim_a(api, 5)

    answer = await _exchange(
        api,
        {
            "reports": [
                {"state_id": fan, "kind": "executed", "outputs": [{"y": "1"}, {"y": "2"}]},
                {"state_id": failing, "kind": "errored", "error": "it broke"},
                {"state_id": pruned, "kind": "prune", "data": {"why": "enough"}},
                {"state_id": requeued, "kind": "re-enqueue-after", "enqueue_after": 60_000},
                {"state_id": beating, "kind": "heartbeat"},
            ],
            "claim": {"nodes": ["B"], "batch_size": 10},
        },
    )
    assert answer["namespace"] == NS
    results = {r["state_id"]: r for r in answer["results"]}
    assert [r["state_id"] for r in answer["results"]] == [fan, failing, pruned, requeued, beating]
    assert results[fan] == {
        "state_id": fan,
        "status_code": 200,
        "body": {"status": "EXECUTED"},
        "detail": None,
    }
    assert results[failing]["body"] == {"status": "RETRY_CREATED", "retry_created": True}
    assert results[pruned]["body"]["status"] == "PRUNED"
    assert isinstance(results[pruned]["body"]["enqueue_after"], int)
    assert results[requeued]["body"]["status"] == "CREATED"
    assert results[beating]["body"]["lease_expires_at"] > 0
    # The claim saw both successors of the fan-out created by the same request.
    assert sorted(s["inputs"]["z"] for s in answer["states"]) == ["1", "2"]
    assert {s["node_name"] for s in answer["states"]} == {"B"}

    # Every report took effect, exactly as through its own route.
    retry = await api.claim_one("A")  # the retry of the failed state, due at once
    assert retry["state_id"] not in {fan, failing, pruned, requeued, beating}
    again = await _exchange(
        api,
        {
            "reports": [
                {"state_id": fan, "kind": "executed", "outputs": []},
                {"state_id": beating, "kind": "executed", "outputs": [{"y": "3"}]},
            ]
        },
    )
    assert [(r["status_code"], r["detail"]) for r in again["results"]] == [
        (400, "State is not queued"),
        (200, None),
    ]
    assert again["states"] == []


async def test_refusals_are_per_report(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    first, second = await _claim_a(api, 2)
    too_many = [{"y": str(i)} for i in range(10_001)]
    answer = await _exchange(
        api,
        {
            "reports": [
                {"state_id": "0" * 24, "kind": "executed", "outputs": []},
                {"state_id": "not-an-id", "kind": "errored", "error": "x"},
                {"state_id": first, "kind": "executed", "outputs": too_many},
                {"state_id": second, "kind": "executed", "outputs": [{"y": "ok"}]},
            ]
        },
    )
    got = [(r["status_code"], r["detail"]) for r in answer["results"]]
    assert got == [
        (404, "State not found"),
        (404, "State not found"),
        (413, "10001 outputs exceed the fan-out limit of 10000"),
        (200, None),
    ]
    # The refused report changed nothing: the state can still report.
    r = await api.post_state(first, "executed", {"outputs": [{"y": "late"}]})
    assert r.status_code == 200, r.text
    # A state of another namespace is not found here either.
    other = Api(client, "exchange-other")
    foreign = await _exchange(
        other, {"reports": [{"state_id": second, "kind": "heartbeat"}], "claim": None}
    )
    assert foreign["results"][0]["status_code"] == 404


async def test_errored_and_heartbeat_answers_match_their_routes(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    via_route, via_exchange = await _claim_a(api, 2)
    route = await api.errored(via_route, "same")
    answer = await _exchange(
        api, {"reports": [{"state_id": via_exchange, "kind": "errored", "error": "same"}]}
    )
    assert answer["results"][0]["body"] == route
    for state_id in (via_route, via_exchange):
        for kind, body in (("errored", {"error": "again"}), ("heartbeat", {})):
            direct = await api.post_state(state_id, kind, body)
            batched = await _exchange(
                api, {"reports": [{"state_id": state_id, "kind": kind, **body}]}
            )
            result = batched["results"][0]
            assert (result["status_code"], result["detail"]) == (
                direct.status_code,
                direct.json()["detail"],
            )


async def test_a_claim_alone_long_polls_like_enqueue(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    poll = asyncio.create_task(
        _exchange(api, {"claim": {"nodes": ["A"], "batch_size": 5, "wait_ms": 10_000}})
    )
    await asyncio.sleep(0.3)
    assert not poll.done()
    await api.trigger("g")
    answer = await asyncio.wait_for(poll, 5)
    assert answer["results"] == [] and len(answer["states"]) == 1
    empty = await _exchange(api, {"claim": {"nodes": ["A"], "batch_size": 5}})
    assert empty == {"namespace": NS, "results": [], "states": []}


async def test_malformed_exchanges_are_refused_whole(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    (state,) = await _claim_a(api, 1)
    url = f"{api.base}/states/exchange"
    twice = [
        {"state_id": state, "kind": "heartbeat"},
        {"state_id": state.upper(), "kind": "heartbeat"},
    ]
    expect_error(
        await client.post(url, json={"reports": twice}),
        400,
        f"State {state.upper()} is reported more than once",
    )
    too_many = [{"state_id": f"{i:024x}", "kind": "heartbeat"} for i in range(1001)]
    expect_error(
        await client.post(url, json={"reports": too_many}),
        400,
        "1001 reports exceed the limit of 1000",
    )
    unknown_kind = {"reports": [{"state_id": state, "kind": "finished"}]}
    assert error_locations(await client.post(url, json=unknown_kind)) == [("body", "reports", 0)]
    missing = {"reports": [{"state_id": state, "kind": "errored"}]}
    assert error_locations(await client.post(url, json=missing)) == [
        ("body", "reports", 0, "errored", "error")
    ]
    # Nothing of a refused request was applied: the state is still queued.
    r = await api.post_state(state, "executed", {"outputs": [{"y": "1"}]})
    assert r.status_code == 200, r.text


async def test_exchanges_are_timed_under_their_route_template(client: httpx.AsyncClient) -> None:
    """Answered on the short path (200) or by FastAPI (422), the request is labelled with
    the route's template, as every other route's requests are."""
    api = Api(client, NS)
    await _graph(api)
    route = "/v0/namespace/{namespace_name}/states/exchange"

    async def count(status: str) -> float:
        text = (await client.get("/metrics")).text
        wanted = f'method="POST",route="{route}",status="{status}"'
        for line in text.splitlines():
            if line.startswith("exosphere_http_request_duration_seconds_count{") and wanted in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok, invalid = await count("200"), await count("422")
    await _exchange(api, {"claim": {"nodes": ["A"], "batch_size": 1}})
    r = await client.post(f"{api.base}/states/exchange", json={"reports": [{"kind": "x"}]})
    assert r.status_code == 422
    assert (await count("200"), await count("422")) == (ok + 1, invalid + 1)


async def test_a_claim_takes_waiting_states_first_then_those_its_batch_creates(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await _graph(api)
    one, two, three = await _claim_a(api, 3)
    await api.executed(one, {"y": "1"})  # its B waits
    answer = await _exchange(
        api,
        {
            "reports": [
                {"state_id": two, "kind": "executed", "outputs": [{"y": "2"}]},
                {"state_id": three, "kind": "executed", "outputs": [{"y": "3"}]},
            ],
            "claim": {"nodes": ["B"], "batch_size": 2},
        },
    )
    # The waiting one first, then the first one the reports created; the limit holds.
    assert [s["inputs"]["z"] for s in answer["states"]] == ["1", "2"]
    assert [s["inputs"]["z"] for s in await api.claim("B", batch_size=5)] == ["3"]
    for state in answer["states"]:
        assert (
            await api.post_state(state["state_id"], "executed", {"outputs": []})
        ).status_code == 200
