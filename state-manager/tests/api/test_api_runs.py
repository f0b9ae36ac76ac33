"""E16 runs listing, E17 run graph structure, E18 node run details."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

import httpx
from sm_api import Api, error_locations, expect_error, node, template_node

NS = "runs"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
STATUSES = (
    "CREATED",
    "QUEUED",
    "EXECUTED",
    "SUCCESS",
    "ERRORED",
    "NEXT_CREATED_ERROR",
    "PRUNED",
    "RETRY_CREATED",
    "CANCELLED",
)
ALL_ZERO = dict.fromkeys(STATUSES, 0)


async def _graphs(api: Api) -> None:
    """g: a (A) -> b (B, z from a.y); h: a single node c (C). No automatic retries."""
    await api.register(
        node("A", inputs=("x",), outputs=("y",)), node("B", inputs=("z",)), node("C")
    )
    await api.create_graph(
        "g",
        {
            "nodes": [
                template_node("A", "a", NS, {"x": "${{ store.k }}"}, ["b"]),
                template_node("B", "b", NS, {"z": "${{ a.outputs.y }}"}),
            ],
            "store_config": {"required_keys": ["k"]},
            "retry_policy": {"max_retries": 0},
        },
    )
    await api.create_graph(
        "h", {"nodes": [template_node("C", "c", NS)], "retry_policy": {"max_retries": 0}}
    )


async def _list(api: Api, page: int, size: int) -> dict[str, Any]:
    r = await api.client.get(f"{api.base}/runs/{page}/{size}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_runs_listing_counts_statuses_and_pages(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graphs(api)
    expected: dict[str, tuple[str, int, int, int, int, int, str]] = {}

    # SUCCESS: a fans out to 2, both b's succeed (states are counted, not nodes).
    run = await api.trigger("g", store={"k": "1"})
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "1"}, {"y": "2"})
    for b in await api.claim("B"):
        await api.executed(b["state_id"])
    expected[run] = ("g", 4, 0, 0, 0, 4, "SUCCESS")
    # PENDING: a succeeded, b waiting.
    run = await api.trigger("g", store={"k": "2"})
    await api.executed((await api.claim_one("A"))["state_id"], {"y": "1"})
    expected[run] = ("g", 1, 1, 0, 0, 2, "PENDING")
    # FAILED: errored with no retry left.
    run = await api.trigger("h")
    await api.errored((await api.claim_one("C"))["state_id"])
    expected[run] = ("h", 0, 0, 1, 0, 1, "FAILED")
    # FAILED: successor creation failed (no output y).
    run = await api.trigger("g", store={"k": "3"})
    await api.executed((await api.claim_one("A"))["state_id"])
    expected[run] = ("g", 0, 0, 1, 0, 1, "FAILED")
    # PRUNED counts as success.
    run = await api.trigger("h")
    r = await api.post_state((await api.claim_one("C"))["state_id"], "prune", {"data": {}})
    assert r.status_code == 200
    expected[run] = ("h", 1, 0, 0, 0, 1, "SUCCESS")
    # A manual retry: the errored state is retried (RETRY_CREATED), the retry pending.
    run = await api.trigger("h")
    sid = (await api.claim_one("C"))["state_id"]
    await api.errored(sid)
    r = await api.post_state(sid, "manual-retry", {"fanout_id": str(uuid.uuid4())})
    assert r.status_code == 200
    expected[run] = ("h", 0, 1, 0, 1, 2, "PENDING")
    # A root that is merely CREATED is pending.
    run = await api.trigger("h")
    expected[run] = ("h", 0, 1, 0, 0, 1, "PENDING")
    # Another namespace's runs are not listed.
    other = Api(client, "runs-other")
    await other.register(node("C"))
    await other.create_graph("h", {"nodes": [template_node("C", "c", "runs-other")]})
    await other.trigger("h")

    listing = await _list(api, 1, 100)
    assert (listing["namespace"], listing["total"], listing["page"], listing["size"]) == (
        NS,
        7,
        1,
        100,
    )
    runs = listing["runs"]
    assert {r["run_id"] for r in runs} == set(expected)
    for item in runs:
        assert set(item) == {
            "run_id",
            "graph_name",
            "success_count",
            "pending_count",
            "errored_count",
            "retried_count",
            "total_count",
            "status",
            "created_at",
        }
        assert ISO_UTC.match(item["created_at"])
        got = (
            item["graph_name"],
            item["success_count"],
            item["pending_count"],
            item["errored_count"],
            item["retried_count"],
            item["total_count"],
            item["status"],
        )
        assert got == expected[item["run_id"]], item
    created = [datetime.fromisoformat(item["created_at"]) for item in runs]
    assert created == sorted(created, reverse=True)  # newest first

    # Pages partition the same order.
    pages = [await _list(api, page, 3) for page in (1, 2, 3, 4)]
    assert [len(p["runs"]) for p in pages] == [3, 3, 1, 0]
    assert all((p["total"], p["size"]) == (7, 3) for p in pages)
    assert [p["page"] for p in pages] == [1, 2, 3, 4]
    assert [r["run_id"] for p in pages for r in p["runs"]] == [r["run_id"] for r in runs]
    other_listing = await _list(other, 1, 10)
    assert (other_listing["total"], len(other_listing["runs"])) == (1, 1)
    empty = await _list(Api(client, "nothing-here"), 1, 10)
    assert empty == {"namespace": "nothing-here", "total": 0, "page": 1, "size": 10, "runs": []}

    # One run's summary agrees with its listing entry and counts every status.
    for item in runs:
        r = await client.get(f"{api.base}/run/{item['run_id']}")
        assert r.status_code == 200, r.text
        summary = r.json()
        assert summary == {**item, "namespace": NS, "counts": summary["counts"]}
        assert set(summary["counts"]) == set(STATUSES)
        assert sum(summary["counts"].values()) == item["total_count"]
        assert summary["counts"]["RETRY_CREATED"] == item["retried_count"]
    other_run = other_listing["runs"][0]["run_id"]
    for run_id in (other_run, str(uuid.uuid4()), "not-a-run"):
        detail = f"Run {run_id} not found in namespace {NS}"
        expect_error(await client.get(f"{api.base}/run/{run_id}"), 404, detail)


async def test_runs_listing_rejects_bad_pages(client: httpx.AsyncClient) -> None:
    base = f"/v0/namespace/{NS}/runs"
    for page, size, detail in (
        (0, 10, "page must be between 1 and 1000000000"),
        (-1, 10, "page must be between 1 and 1000000000"),
        (1_000_000_001, 10, "page must be between 1 and 1000000000"),
        (1, 0, "size must be between 1 and 1000"),
        (1, -5, "size must be between 1 and 1000"),
        (1, 1001, "size must be between 1 and 1000"),
    ):
        expect_error(await client.get(f"{base}/{page}/{size}"), 400, detail)
    assert (await client.get(f"{base}/1/1000")).status_code == 200
    for page, size, location in (
        ("x", "10", ("path", "page")),
        ("1.5", "10", ("path", "page")),
        ("1", "ten", ("path", "size")),
    ):
        assert error_locations(await client.get(f"{base}/{page}/{size}")) == [location]


async def test_run_graph_structure(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graphs(api)
    run_id = await api.trigger("g", store={"k": "v"})
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "1"}, {"y": "2"})
    bs = await api.claim("B")
    await api.executed(bs[0]["state_id"])
    await api.errored(bs[1]["state_id"], "it broke")

    view = await api.run_graph(run_id)
    assert set(view) == {
        "root_states",
        "graph_name",
        "nodes",
        "edges",
        "node_count",
        "edge_count",
        "execution_summary",
        "status",
    }
    assert view["graph_name"] == "g"
    nodes = {n["id"]: n for n in view["nodes"]}
    assert len(nodes) == view["node_count"] == 4
    for n in view["nodes"]:
        assert set(n) == {"id", "node_name", "identifier", "status", "error", "retry_count"}
        assert n["retry_count"] == 0
    a_ids = {i for i, n in nodes.items() if n["identifier"] == "a"}
    assert a["state_id"] in a_ids and len(a_ids) == 2
    assert sorted(view["root_states"], key=lambda n: n["id"]) == sorted(
        (nodes[i] for i in a_ids), key=lambda n: n["id"]
    )
    b0, b1 = (nodes[s["state_id"]] for s in bs)
    assert (b0["node_name"], b0["status"], b0["error"]) == ("B", "SUCCESS", None)
    assert (b1["status"], b1["error"]) == ("ERRORED", "it broke")
    parents = {
        s["state_id"]: (await api.node_details("g", run_id, s["state_id"]))["parents"]["a"]
        for s in bs
    }
    assert view["edge_count"] == 2
    assert sorted((e["source"], e["target"]) for e in view["edges"]) == sorted(
        (parent, child) for child, parent in parents.items()
    )
    assert set(parents.values()) == a_ids
    assert view["execution_summary"] == {**ALL_ZERO, "SUCCESS": 3, "ERRORED": 1}

    # A uniting node appears once its target's whole fan-out group is done, with an edge
    # from the target state (its direct parent).
    await api.register(node("J", inputs=("w",)))
    await api.create_graph(
        "u",
        {
            "nodes": [
                template_node("A", "a", NS, {"x": "1"}, ["b"]),
                template_node("B", "b", NS, {"z": "${{ a.outputs.y }}"}),
                template_node(
                    "J", "j", NS, {"w": "${{ a.outputs.y }}"}, unites={"identifier": "a"}
                ),
            ]
        },
    )
    joined = await api.trigger("u")
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "1"}, {"y": "2"})
    bs = await api.claim("B")
    await api.executed(bs[0]["state_id"])
    assert await api.claim("J") == []
    await api.executed(bs[1]["state_id"])
    j = await api.claim_one("J")
    assert j["inputs"] == {"w": "1"}  # from the target state the group is named after
    view = await api.run_graph(joined)
    assert view["node_count"] == 5 and view["edge_count"] == 3
    assert {"source": a["state_id"], "target": j["state_id"]} in view["edges"]
    details = await api.node_details("u", joined, j["state_id"])
    assert details["parents"] == {"a": a["state_id"]}
    assert view["execution_summary"] == {**ALL_ZERO, "SUCCESS": 4, "QUEUED": 1}

    # Unknown runs, and runs of another namespace, give an empty structure (not 404).
    empty = {
        "root_states": [],
        "graph_name": "",
        "nodes": [],
        "edges": [],
        "node_count": 0,
        "edge_count": 0,
        "execution_summary": ALL_ZERO,
        "status": None,
    }
    assert await api.run_graph(str(uuid.uuid4())) == empty
    assert await api.run_graph("not-a-uuid") == empty
    assert await Api(client, "elsewhere").run_graph(run_id) == empty


async def test_node_run_details(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graphs(api)
    run_id = await api.trigger("g", store={"k": "v"})
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "out", "extra": 1})
    b = await api.claim_one("B")

    details = await api.node_details("g", run_id, a["state_id"])
    assert set(details) == {
        "id",
        "node_name",
        "identifier",
        "graph_name",
        "run_id",
        "status",
        "inputs",
        "outputs",
        "error",
        "parents",
        "created_at",
        "updated_at",
    }
    assert {k: v for k, v in details.items() if k not in ("created_at", "updated_at")} == {
        "id": a["state_id"],
        "node_name": "A",
        "identifier": "a",
        "graph_name": "g",
        "run_id": run_id,
        "status": "SUCCESS",
        "inputs": {"x": "v"},
        "outputs": {"y": "out", "extra": 1},
        "error": None,
        "parents": {},
    }
    assert ISO_UTC.match(details["created_at"]) and ISO_UTC.match(details["updated_at"])
    times = [datetime.fromisoformat(details[k]) for k in ("created_at", "updated_at")]
    assert times[1] >= times[0]
    assert details["created_at"] == a["created_at"]
    b_details = await api.node_details("g", run_id, b["state_id"])
    assert (b_details["status"], b_details["inputs"], b_details["outputs"]) == (
        "QUEUED",
        {"z": "out"},
        {},
    )
    assert b_details["parents"] == {"a": a["state_id"]}

    sid = a["state_id"]
    for bad in ("nope", "123", sid + "0", sid[:-1] + "g"):
        r = await client.get(f"{api.base}/graph/g/run/{run_id}/node/{bad}")
        expect_error(r, 400, f"Invalid node ID format: {bad}")
    other_run = await api.trigger("h")
    unknown = "0123456789abcdef01234567"
    for namespace, graph, run, state in (
        (NS, "g", run_id, unknown),
        (NS, "g", other_run, sid),  # wrong run
        (NS, "h", run_id, sid),  # wrong graph
        ("elsewhere", "g", run_id, sid),  # wrong namespace
    ):
        r = await client.get(f"/v0/namespace/{namespace}/graph/{graph}/run/{run}/node/{state}")
        expect_error(
            r,
            404,
            f"Node {state} not found in run {run} of graph {graph} in namespace {namespace}",
        )
