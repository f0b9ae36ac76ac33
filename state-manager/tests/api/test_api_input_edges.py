"""Client input at the edges of what the database can hold must never produce a 500."""

from __future__ import annotations

import secrets

import httpx
from sm_api import REQUEST_ID_HEADER, Api, error_locations, expect_error, node, template_node

NS = "edges"
TOO_BIG = 10**20  # beyond a signed 64-bit integer


async def _graph(api: Api) -> None:
    await api.register(node("A", inputs=("x",), outputs=("y",)))
    await api.create_graph(
        "g",
        {"nodes": [template_node("A", "a", NS, {"x": "1"})], "retry_policy": {"max_retries": 0}},
    )


def _problem(label: str, r: httpx.Response, allowed: tuple[int, ...]) -> str | None:
    """``None`` when ``r`` has an allowed status and a JSON body (with a detail if an error)."""
    try:
        body = r.json()
    except ValueError:
        return f"{label}: {r.status_code} with a non-JSON body"
    if r.status_code not in allowed or REQUEST_ID_HEADER not in r.headers:
        return f"{label}: {r.status_code} {r.text[:120]}"
    if r.status_code >= 400 and "detail" not in body:
        return f"{label}: {r.status_code} without a detail: {r.text[:120]}"
    return None


async def test_out_of_range_integers_are_client_errors(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    await api.trigger("g")
    sid = (await api.claim_one("A"))["state_id"]
    problems = [
        _problem(
            "runs page",
            await client.get(f"{api.base}/runs/{TOO_BIG}/10"),
            (200, 400, 422),
        ),
        _problem(
            "trigger start_delay",
            await api.trigger_raw("g", {"start_delay": TOO_BIG}),
            (400, 422),
        ),
        _problem(
            "re-enqueue-after",
            await api.post_state(sid, "re-enqueue-after", {"enqueue_after": TOO_BIG}),
            (400, 422),
        ),
    ]
    assert [p for p in problems if p] == []
    # Exactly: a page past the bound is 400, a delay past ten years is 422.
    ten_years_ms = 10 * 365 * 24 * 3_600_000
    r = await client.get(f"{api.base}/runs/{TOO_BIG}/10")
    expect_error(r, 400, "page must be between 1 and 1000000000")
    assert (await client.get(f"{api.base}/runs/1000000000/10")).json()["runs"] == []
    r = await api.trigger_raw("g", {"start_delay": ten_years_ms + 1})
    assert error_locations(r) == [("body", "start_delay")]
    r = await api.post_state(sid, "re-enqueue-after", {"enqueue_after": ten_years_ms + 1})
    assert error_locations(r) == [("body", "enqueue_after")]
    r = await api.trigger_raw("g", {"start_delay": ten_years_ms})
    assert r.status_code == 200, r.text
    # The state is untouched by the rejected requests.
    await api.executed(sid, {"y": "1"})


async def test_nul_characters_in_text_are_never_a_500(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await _graph(api)
    ok = (200, 201, 400, 404, 422)
    await api.trigger("g")
    await api.trigger("g")
    first, second = (s["state_id"] for s in await api.claim("A"))
    await api.errored(second)
    checks: list[tuple[str, httpx.Response]] = [
        ("errored, error", await api.post_state(first, "errored", {"error": "e\x00"})),
        ("manual-retry", await api.post_state(second, "manual-retry", {"fanout_id": "f\x00"})),
        ("GET graph, namespace", await client.get("/v0/namespace/a%00/graph/g")),
        ("GET graphs, namespace", await client.get("/v0/namespace/a%00/graphs/")),
        ("GET nodes, namespace", await client.get("/v0/namespace/a%00/nodes/")),
        ("GET runs, namespace", await client.get("/v0/namespace/a%00/runs/1/10")),
        ("run graph, run id", await client.get(f"{api.base}/states/run/a%00/graph")),
        (
            "upsert, graph name",
            await api.upsert("g%00", {"nodes": [template_node("A", "a", NS, {"x": "1"})]}),
        ),
        ("trigger, store", await api.trigger_raw("g", {"store": {"k": "v\x00"}})),
        ("enqueue, nodes", await api.enqueue_raw({"nodes": ["A\x00"], "batch_size": 1})),
        (
            "register, names",
            await client.put(
                f"{api.base}/nodes/", json={"runtime_name": "r\x00", "nodes": [node("B\x00")]}
            ),
        ),
    ]
    problems = [_problem(label, r, ok) for label, r in checks]
    assert [p for p in problems if p] == []
    # Both backends refuse a NUL the same way, before anything is stored.
    for label, r in checks:
        where = "path" if label.startswith(("GET", "run graph", "upsert")) else "body"
        assert (r.status_code, r.json()) == (
            400,
            {"detail": f"The request {where} contains a NUL character"},
        ), label
    await api.executed(first, {"y": "1"})  # still QUEUED: the refused report changed nothing
    r = await api.post_state(second, "manual-retry", {"fanout_id": "f"})
    assert r.status_code == 200, r.text


async def test_long_names_are_never_a_500(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await api.register(node("A", inputs=("x",)))
    long = secrets.token_hex(4500)
    ok = (200, 201, 400, 413, 422)
    checks: list[tuple[str, httpx.Response]] = [
        (
            "register, namespace",
            await client.put(
                f"/v0/namespace/{long}/nodes/", json={"runtime_name": "r", "nodes": [node("A")]}
            ),
        ),
        (
            "register, node name",
            await client.put(
                f"{api.base}/nodes/", json={"runtime_name": "r", "nodes": [node("N" + long)]}
            ),
        ),
        (
            "upsert, graph name",
            await api.upsert(long, {"nodes": [template_node("A", "a", NS, {"x": "1"})]}),
        ),
    ]
    await api.create_graph("short", {"nodes": [template_node("A", "a", NS, {"x": "1"})]})
    r = await api.trigger_raw("short", {"store": {long: "v"}})
    checks.append(("trigger, store key", r))
    r = await api.upsert("g", {"nodes": [template_node("A", "i" + long, NS, {"x": "1"})]})
    checks.append(("upsert, identifier", r))
    if r.status_code == 201 and (await api.wait_validated("g"))["validation_status"] == "VALID":
        checks.append(("trigger, identifier", await api.trigger_raw("g", {})))
    problems = [_problem(label, r, ok) for label, r in checks]
    assert [p for p in problems if p] == []
    # Exactly: names are limited to 255 characters, checked as request validation.
    locations = {
        "register, namespace": ("path", "namespace_name"),
        "register, node name": ("body", "nodes", 0, "name"),
        "upsert, graph name": ("path", "graph_name"),
        "trigger, store key": ("body", "store", long, "[key]"),
        "upsert, identifier": ("body", "nodes", 0, "identifier"),
    }
    assert {label: error_locations(r)[0] for label, r in checks} == locations
    longest = "n" * 255
    await api.register(node(longest))
    r = await api.upsert(longest, {"nodes": [template_node(longest, longest, NS)]})
    assert r.status_code == 201, r.text
    assert (await api.wait_validated(longest))["validation_status"] == "VALID"
    await api.trigger(longest, store={longest: "v"})
    assert len(await api.claim(longest)) == 1


async def test_the_text_backslash_u0000_is_not_a_nul_character(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await _graph(api)
    run_id = await api.trigger("g")
    sid = (await api.claim_one("A"))["state_id"]
    text = "C:\\u0000dir"  # a backslash, then 'u0000': ordinary text
    assert b'"C:\\\\u0000dir"' in httpx.Request("POST", "/", json={"e": text}).content
    r = await api.post_state(sid, "errored", {"error": text})
    assert r.status_code == 200, r.text
    assert (await api.node_details("g", run_id, sid))["error"] == text
    r = await api.trigger_raw("g", {"store": {"k": text}})
    assert r.status_code == 200, r.text
