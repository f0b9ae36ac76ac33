"""E2 namespaces, E3 register nodes, E4 list nodes."""

from __future__ import annotations

import re
from typing import Any

import httpx
from sm_api import error_locations, node, schema

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")


def _url(namespace: str) -> str:
    return f"/v0/namespace/{namespace}/nodes/"


async def test_register_list_overwrite_and_namespaces(client: httpx.AsyncClient) -> None:
    r = await client.get("/v0/namespaces")
    assert r.status_code == 200
    assert r.json() == {"namespaces": [], "count": 0}
    r = await client.get(_url("ns-b"))
    assert r.json() == {"namespace": "ns-b", "count": 0, "nodes": []}

    first = node("Zeta", inputs=("a", "b"), outputs=("c",), secrets=("api_key",))
    second = node("Alpha")
    # The SDK sends extra keys (runtime_namespace, per-node namespace); they are tolerated
    # and the URL namespace wins.
    body: dict[str, Any] = {
        "runtime_name": "runtime-1",
        "runtime_namespace": "elsewhere",
        "nodes": [{**first, "namespace": "elsewhere"}, second],
    }
    r = await client.put(_url("ns-b"), json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"runtime_name": "runtime-1", "registered_nodes": [first, second]}

    r = await client.get(_url("ns-b"))
    assert r.status_code == 200
    listed = r.json()
    assert (listed["namespace"], listed["count"]) == ("ns-b", 2)
    by_name = {n["name"]: n for n in listed["nodes"]}
    assert [n["name"] for n in listed["nodes"]] == ["Alpha", "Zeta"]
    zeta = by_name["Zeta"]
    assert set(zeta) == {
        "_id",
        "created_at",
        "updated_at",
        "name",
        "namespace",
        "runtime_name",
        "runtime_namespace",
        "inputs_schema",
        "outputs_schema",
        "secrets",
    }
    assert OBJECT_ID.match(zeta["_id"])
    assert ISO_UTC.match(zeta["created_at"]) and ISO_UTC.match(zeta["updated_at"])
    assert (zeta["namespace"], zeta["runtime_namespace"]) == ("ns-b", "ns-b")
    assert zeta["runtime_name"] == "runtime-1"
    assert zeta["inputs_schema"] == schema("a", "b")
    assert zeta["outputs_schema"] == schema("c")
    assert zeta["secrets"] == ["api_key"]

    # Re-registration overwrites runtime name, schemas and secrets (last writer wins).
    changed = node("Zeta", inputs=("x",), outputs=(), secrets=())
    r = await client.put(_url("ns-b"), json={"runtime_name": "runtime-2", "nodes": [changed]})
    assert r.status_code == 200
    r = await client.get(_url("ns-b"))
    listed = r.json()
    assert listed["count"] == 2
    zeta2 = {n["name"]: n for n in listed["nodes"]}["Zeta"]
    assert zeta2["runtime_name"] == "runtime-2"
    assert (zeta2["inputs_schema"], zeta2["outputs_schema"]) == (schema("x"), schema())
    assert zeta2["secrets"] == []
    assert zeta2["_id"] == zeta["_id"]
    assert zeta2["created_at"] == zeta["created_at"]

    # The same name in another namespace is another node; namespaces are listed sorted.
    await client.put(_url("ns-a"), json={"runtime_name": "r", "nodes": [node("Zeta")]})
    r = await client.put(_url("ns-empty"), json={"runtime_name": "r", "nodes": []})
    assert r.json() == {"runtime_name": "r", "registered_nodes": []}
    r = await client.get("/v0/namespaces")
    assert r.json() == {"namespaces": ["ns-a", "ns-b"], "count": 2}
    r = await client.get(_url("ns-a"))
    assert [(n["name"], n["namespace"]) for n in r.json()["nodes"]] == [("Zeta", "ns-a")]
    assert (await client.get(_url("ns-b"))).json()["count"] == 2


async def test_register_rejects_malformed_bodies(client: httpx.AsyncClient) -> None:
    full = node("A")
    cases: list[tuple[dict[str, Any], list[tuple[Any, ...]]]] = [
        ({"nodes": [full]}, [("body", "runtime_name")]),
        ({"runtime_name": "r"}, [("body", "nodes")]),
        ({"runtime_name": "r", "nodes": "A"}, [("body", "nodes")]),
        (
            {"runtime_name": "r", "nodes": [{"name": "A"}]},
            [
                ("body", "nodes", 0, "inputs_schema"),
                ("body", "nodes", 0, "outputs_schema"),
                ("body", "nodes", 0, "secrets"),
            ],
        ),
        (
            {"runtime_name": "r", "nodes": [{**full, "secrets": [1]}]},
            [("body", "nodes", 0, "secrets", 0)],
        ),
        (
            {"runtime_name": "r", "nodes": [{**full, "inputs_schema": []}]},
            [("body", "nodes", 0, "inputs_schema")],
        ),
    ]
    for body, locations in cases:
        r = await client.put(_url("bad"), json=body)
        assert error_locations(r) == locations, body
    r = await client.get(_url("bad"))
    assert r.json()["count"] == 0
    r = await client.get("/v0/namespaces")
    assert r.json() == {"namespaces": [], "count": 0}
