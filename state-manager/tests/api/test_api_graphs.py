"""E5 upsert graph, E6 get graph, E7 list graphs, and template validation."""

from __future__ import annotations

import re
from typing import Any

import httpx
from sm_api import Api, error_locations, expect_error, node, template_node

NS = "graphs"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
PREFIX = "Error validating graph template: "
DEFAULT_POLICY = {
    "max_retries": 3,
    "strategy": "EXPONENTIAL",
    "backoff_factor": 2000,
    "exponent": 2,
    "max_delay": None,
}


def _n(identifier: str, next_nodes: list[str] | None = None, **inputs: str) -> dict[str, Any]:
    return template_node("A", identifier, NS, dict(inputs), next_nodes)


async def test_upsert_returns_201_normalised_and_get_returns_what_was_stored(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await api.register(node("A", inputs=("x",), outputs=("y",), secrets=("tok",)), node("B"))

    def raw_b(identifier: str) -> dict[str, Any]:
        return {"node_name": "B", "namespace": NS, "identifier": identifier, "inputs": {}}

    body = {
        "secrets": {"tok": "plain-text", "other": "v"},
        "nodes": [
            {
                "node_name": "  A ",
                "namespace": NS,
                "identifier": " a ",
                "inputs": {"x": "${{ store.k }}"},
                "next_nodes": [" b ", "c"],
            },
            # explicit null next_nodes becomes [] ...
            {**raw_b("b"), "next_nodes": None},
            # ... and so does an omitted one; unites' strategy defaults to ALL_SUCCESS
            raw_b("c"),
            {**raw_b("j"), "unites": {"identifier": " a"}},
        ],
        "retry_policy": {
            "max_retries": 5,
            "strategy": "LINEAR",
            "backoff_factor": 10,
            "max_delay": 50,
        },
        "store_config": {"required_keys": [" k "], "default_values": {"d": "1"}},
        "triggers": [{"type": "CRON", "value": {"expression": " 0 3 * * 1 "}}],
        "extra_field": "tolerated",
    }
    r = await client.put(f"{api.base}/graph/g", json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    expected_nodes = [
        {
            "node_name": "A",
            "namespace": NS,
            "identifier": "a",
            "inputs": {"x": "${{ store.k }}"},
            "next_nodes": ["b", "c"],
            "unites": None,
            "timeout": None,
        },
        {"node_name": "B", "namespace": NS, "identifier": "b", "inputs": {},
         "next_nodes": [], "unites": None, "timeout": None},
        {"node_name": "B", "namespace": NS, "identifier": "c", "inputs": {},
         "next_nodes": [], "unites": None, "timeout": None},
        {"node_name": "B", "namespace": NS, "identifier": "j", "inputs": {},
         "next_nodes": [], "unites": {"identifier": "a", "strategy": "ALL_SUCCESS"},
         "timeout": None},
    ]  # fmt: skip
    stored = {
        "nodes": expected_nodes,
        "secrets": {"tok": True, "other": True},
        "retry_policy": {
            "max_retries": 5,
            "strategy": "LINEAR",
            "backoff_factor": 10,
            "exponent": 2,
            "max_delay": 50,
        },
        "store_config": {"required_keys": ["k"], "default_values": {"d": "1"}},
        "triggers": [{"type": "CRON", "value": {"expression": "0 3 * * 1"}}],
        "timeout": None,
    }
    assert set(created) == {*stored, "created_at", "updated_at", "validation_status",
                            "validation_errors"}  # fmt: skip
    for key, value in stored.items():
        assert created[key] == value, key
    assert (created["validation_status"], created["validation_errors"]) == ("PENDING", [])
    assert ISO_UTC.match(created["created_at"]) and ISO_UTC.match(created["updated_at"])

    got = await api.wait_validated("g")
    assert (got["validation_status"], got["validation_errors"]) == ("VALID", [])
    assert {k: got[k] for k in stored} == stored  # the stored policy, store config, triggers
    assert got["created_at"] == created["created_at"]

    # Update: everything is replaced (omitted secrets disappear), again 201 and PENDING.
    r = await api.upsert("g", {"secrets": {"tok": "new"}, "nodes": [_n("a", x="lit")]})
    assert r.status_code == 201, r.text
    updated = r.json()
    assert updated["validation_status"] == "PENDING"
    assert updated["secrets"] == {"tok": True}
    assert updated["retry_policy"] == DEFAULT_POLICY
    assert updated["store_config"] == {"required_keys": [], "default_values": {}}
    assert updated["triggers"] == []
    assert [n["identifier"] for n in updated["nodes"]] == ["a"]
    assert updated["created_at"] == created["created_at"]
    got = await api.wait_validated("g")
    assert got["validation_status"] == "VALID"
    assert {k: got[k] for k in ("nodes", "secrets", "retry_policy", "store_config")} == {
        k: updated[k] for k in ("nodes", "secrets", "retry_policy", "store_config")
    }


async def test_get_unknown_graph_is_404_and_listing_hides_secret_values(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    r = await client.get(f"{api.base}/graph/nope")
    expect_error(r, 404, f"Graph template nope not found in namespace {NS}")
    await api.register(node("A", inputs=("x",)))
    r = await client.get(f"{api.base}/graphs/")
    assert r.status_code == 200
    assert r.json() == {"namespace": NS, "count": 0, "templates": []}
    await api.upsert("zz", {"secrets": {"s1": "secret-value-1"}, "nodes": [_n("a", x="1")]})
    await api.create_graph("aa", {"nodes": [_n("a", x="1")], "retry_policy": {"max_retries": 0}})
    await api.wait_validated("zz")
    # Another namespace's graph of the same name is not listed, nor found.
    other = Api(client, "other-ns")
    await other.register(node("A", inputs=("x",)))
    await other.create_graph("aa", {"nodes": [template_node("A", "a", "other-ns", {"x": "2"})]})
    expect_error(await client.get(f"{other.base}/graph/zz"), 404)

    r = await client.get(f"{api.base}/graphs/")
    assert r.status_code == 200
    listed = r.json()
    assert (listed["namespace"], listed["count"]) == (NS, 2)
    assert "secret-value-1" not in r.text
    aa, zz = listed["templates"]
    assert (aa["name"], zz["name"]) == ("aa", "zz")
    assert set(zz) == {
        "_id",
        "timeout",
        "name",
        "namespace",
        "nodes",
        "secrets",
        "retry_policy",
        "store_config",
        "triggers",
        "created_at",
        "updated_at",
        "validation_status",
        "validation_errors",
    }
    assert re.fullmatch(r"[0-9a-f]{24}", zz["_id"]) and zz["_id"] != aa["_id"]
    assert zz["namespace"] == NS
    assert zz["secrets"] == {"s1": True}
    assert aa["secrets"] == {}
    assert aa["retry_policy"] == {**DEFAULT_POLICY, "max_retries": 0}
    assert zz["retry_policy"] == DEFAULT_POLICY
    assert (aa["validation_status"], zz["validation_status"]) == ("VALID", "VALID")
    assert aa["nodes"] == (await api.get_graph("aa"))["nodes"]
    r = await client.get(f"{other.base}/graphs/")
    assert [t["namespace"] for t in r.json()["templates"]] == ["other-ns"]


async def test_structural_errors_are_400_listing_every_problem(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await api.register(node("A", inputs=("x",)))
    await api.create_graph("kept", {"nodes": [_n("a", x="original")]})

    cases: list[tuple[dict[str, Any], list[str]]] = [
        (
            {"nodes": [_n("a", ["b", "ghost"]), _n("b"), _n("b")]},
            [
                "Node identifier 'b' is used by 2 nodes",
                "Node 'a' lists next node 'ghost', which does not exist",
            ],
        ),
        (
            {
                "nodes": [
                    _n("a", ["b"]),
                    {**_n("b"), "unites": {"identifier": "b"}},
                    {**_n("c"), "unites": {"identifier": "nowhere"}},
                ]
            },
            [
                "Node 'b' cannot unite on itself",
                "Node 'c' unites on 'nowhere', which does not exist",
            ],
        ),
        ({"nodes": []}, ["Graph has no nodes"]),
        (
            {
                "nodes": [
                    _n("r", ["t", "x"]),
                    _n("t"),
                    _n("x", ["u"]),
                    {**_n("u"), "unites": {"identifier": "t"}},
                ]
            },
            [
                "Node 'x' lists uniting node 'u' as next node but is neither 't' nor one of "
                "its descendants"
            ],
        ),
        ({"nodes": [_n("a"), _n("b")]}, ["Graph has 2 root nodes (a, b); exactly one is required"]),
        (
            {"nodes": [_n("r", ["a"]), _n("a", ["b"]), _n("b", ["a"])]},
            ["Graph has a cycle through nodes: a, b"],
        ),
        (
            {"nodes": [_n("a", ["b"]), _n("b", x="${{ a.outputs.y"), _n("c.d")]},
            ["Node identifier 'c.d' must not contain '.'", "Input 'x' of node 'b'"],
        ),
        (
            {
                "nodes": [
                    {**_n("a", ["b"]), "inputs": {"x": 5, "y": "${{ store.nokey }}"}},
                    _n("b", z="${{ a.outputs.o }} ${{ b.outputs.o }}"),
                ]
            },
            [
                "Input 'x' of node 'a' must be a string, got int",
                "Input 'y' of node 'a' references store key 'nokey', which is in neither "
                "store_config.required_keys nor store_config.default_values",
                "Input 'z' of node 'b' references 'b.outputs.o' but 'b' is not guaranteed "
                "to run before it (available: a)",
            ],
        ),
        (
            {
                "nodes": [
                    _n("a", ["b", "c"]),
                    _n("b", ["d"]),
                    _n("c", ["d"]),
                    _n("d", x="${{ b.outputs.o }}", y="${{ ghost.outputs.o }}"),
                ]
            },
            [
                "Input 'x' of node 'd' references 'b.outputs.o' but 'b' is not guaranteed "
                "to run before it (available: a)",
                "Input 'y' of node 'd' references 'ghost.outputs.o' but node 'ghost' does "
                "not exist",
            ],
        ),
        (
            {"nodes": [_n("a", x="${{ a.outputs.y }}")]},
            [
                "Input 'x' of node 'a' references 'a.outputs.y' but this node can only "
                "reference store keys"
            ],
        ),
        (
            {"nodes": [template_node("A", "a", "elsewhere", {"x": "1"})]},
            [
                "Nodes must be registered in the graph's namespace 'graphs', found "
                "namespace(s) 'elsewhere'"
            ],
        ),
        (
            {"nodes": [_n("a", x="1")], "secrets": {"empty": "  ", " ": "v"}},
            ["Secret 'empty' cannot have an empty value", "Secret name cannot be empty"],
        ),
    ]
    for body, messages in cases:
        for graph in ("fresh", "kept"):
            r = await api.upsert(graph, body)
            detail = expect_error(r, 400)
            assert detail.startswith(PREFIX), detail
            for message in messages:
                assert message in detail, (message, detail)
    # Nothing was stored: the new graph does not exist, the old one is unchanged.
    expect_error(await client.get(f"{api.base}/graph/fresh"), 404)
    kept = await api.get_graph("kept")
    assert kept["nodes"][0]["inputs"] == {"x": "original"}
    assert kept["validation_status"] == "VALID"


async def test_field_level_violations_are_422(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    ok = _n("a", x="1")
    policy_cases = [
        {"max_retries": -1},
        {"strategy": "SOMETIMES"},
        {"backoff_factor": 0},
        {"exponent": 0},
        {"max_delay": 0},
    ]

    def with_node(**changes: Any) -> dict[str, Any]:
        return {"secrets": {}, "nodes": [{**ok, **changes}]}

    def with_field(name: str, value: Any) -> dict[str, Any]:
        return {"secrets": {}, "nodes": [ok], name: value}

    def cron(expression: str, kind: str = "CRON") -> dict[str, Any]:
        return with_field("triggers", [{"type": kind, "value": {"expression": expression}}])

    first = ("body", "nodes", 0)
    no_inputs = {"secrets": {}, "nodes": [{k: v for k, v in ok.items() if k != "inputs"}]}
    cases: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
        ({"nodes": [ok]}, ("body", "secrets")),
        ({"secrets": {}}, ("body", "nodes")),
        ({"secrets": {"a": 1}, "nodes": [ok]}, ("body", "secrets", "a")),
        (with_node(identifier="store"), (*first, "identifier")),
        (with_node(identifier="  "), (*first, "identifier")),
        (with_node(node_name=""), (*first, "node_name")),
        (with_node(next_nodes=["b", " b"]), (*first, "next_nodes")),
        (with_node(next_nodes=[""]), (*first, "next_nodes")),
        (with_node(unites={"identifier": " "}), (*first, "unites", "identifier")),
        (with_node(unites={"identifier": "b", "strategy": "ANY"}), (*first, "unites", "strategy")),
        (no_inputs, (*first, "inputs")),
        (with_field("store_config", {"required_keys": ["a.b"]}), ("body", "store_config")),
        (with_field("store_config", {"required_keys": ["k", " k"]}), ("body", "store_config")),
        (with_field("store_config", {"default_values": {"": "v"}}), ("body", "store_config")),
        (cron("* * *"), ("body", "triggers", 0, "value", "expression")),
        (cron("61 * * * *"), ("body", "triggers", 0, "value", "expression")),
        (cron("* * * * *", kind="WEBHOOK"), ("body", "triggers", 0, "type")),
        (
            with_field("triggers", [{"type": "CRON", "value": {}}]),
            ("body", "triggers", 0, "value", "expression"),
        ),
    ] + [
        (with_field("retry_policy", p), ("body", "retry_policy", next(iter(p))))
        for p in policy_cases
    ]
    for body, location in cases:
        r = await client.put(f"{api.base}/graph/g", json=body)
        assert location in error_locations(r), (body, r.text)
    expect_error(await client.get(f"{api.base}/graph/g"), 404)


async def test_validation_against_registered_nodes(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await api.register(
        node("Src", inputs=("x",), outputs=("out",), secrets=("tok", "other")),
        {
            "name": "Typed",
            "inputs_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
            "outputs_schema": {"type": "object", "properties": {"num": {"type": "integer"}}},
            "secrets": [],
        },
        node("Sink", inputs=("a", "b")),
    )
    body = {
        "secrets": {"tok": "t"},
        "nodes": [
            template_node("Src", "s", NS, {"x": "1"}, ["t", "k", "g"]),
            template_node("Typed", "t", NS, {"n": "1"}, ["u"]),
            template_node("Sink", "k", NS, {"a": "${{ s.outputs.missing }}", "extra": "ok"}),
            template_node("Ghost", "g", NS, {"z": "${{ s.outputs.out }}"}),
            template_node("Sink", "u", NS, {"a": "${{ t.outputs.num }}", "b": "1"}),
        ],
    }
    r = await api.upsert("g", body)
    assert r.status_code == 201, r.text
    result = await api.wait_validated("g")
    assert result["validation_status"] == "INVALID"
    assert sorted(result["validation_errors"]) == sorted(
        [
            "Secret 'other' required by node 'Src' in namespace 'graphs' is not defined in "
            "the graph's secrets",
            "Input field 'n' of registered node 'Typed' is not string-typed (node 't')",
            "Node 'k' does not provide input 'b' required by registered node 'Sink'",
            "Node 'g' uses 'Ghost' in namespace 'graphs', which is not registered",
            "Input 'a' of node 'k' references 's.outputs.missing' but registered node 'Src' "
            "has no output 'missing'",
            "Input 'a' of node 'u' references 't.outputs.num' but output 'num' of "
            "registered node 'Typed' is not string-typed",
        ]
    )
    # Fixing the template makes it VALID; PENDING is the only intermediate status.
    fixed = {
        "secrets": {"tok": "t", "other": "o"},
        "nodes": [
            template_node("Src", "s", NS, {"x": "1"}, ["k"]),
            template_node("Sink", "k", NS, {"a": "${{ s.outputs.out }}", "b": "lit"}),
        ],
    }
    r = await api.upsert("g", fixed)
    assert r.json()["validation_status"] == "PENDING"
    result = await api.wait_validated("g")
    assert (result["validation_status"], result["validation_errors"]) == ("VALID", [])


async def test_runs_in_flight_keep_the_version_they_were_triggered_with(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await api.register(node("A", inputs=("x",), outputs=("y",)), node("B", inputs=("z",)))

    def version(text: str, default: str, retries: int) -> dict[str, Any]:
        return {
            "nodes": [
                template_node("A", "a", NS, {"x": "1"}, ["b"]),
                template_node(
                    "B", "b", NS, {"z": f"{text} ${{{{ store.d }}}} ${{{{ a.outputs.y }}}}"}
                ),
            ],
            "store_config": {"default_values": {"d": default}},
            "retry_policy": {"max_retries": retries, "strategy": "FIXED", "backoff_factor": 1},
        }

    await api.create_graph("g", version("v1", "d1", 0))
    old_run = await api.trigger("g")
    old_a = await api.claim_one("A")
    await api.create_graph("g", version("v2", "d2", 1))
    new_run = await api.trigger("g")
    new_a = await api.claim_one("A")

    await api.executed(old_a["state_id"], {"y": "Y"})
    await api.executed(new_a["state_id"], {"y": "Y"})
    bs = {s["state_id"]: s["inputs"]["z"] for s in await api.claim("B")}
    old_b = next(sid for sid, z in bs.items() if z.startswith("v1"))
    new_b = next(sid for sid, z in bs.items() if z.startswith("v2"))
    assert sorted(bs.values()) == ["v1 d1 Y", "v2 d2 Y"]
    # The retry policy is the run's too: no retry for the old run, one for the new.
    assert (await api.errored(old_b))["retry_created"] is False
    assert (await api.errored(new_b))["retry_created"] is True
    assert (await api.run_summary(old_run))["status"] == "FAILED"
    assert (await api.run_summary(new_run))["status"] == "PENDING"

    # A re-upsert that is still PENDING (or even INVALID) does not stop a run in flight.
    third = await api.trigger("g")
    a = await api.claim_one("A")
    r = await api.upsert("g", {"nodes": [template_node("Unregistered", "u", NS)]})
    assert r.status_code == 201
    assert (await api.wait_validated("g"))["validation_status"] == "INVALID"
    await api.executed(a["state_id"], {"y": "Z"})
    retry, b = sorted(await api.claim("B"), key=lambda s: s["inputs"]["z"])
    assert (retry["inputs"]["z"], b["inputs"]["z"]) == ("v2 d2 Y", "v2 d2 Z")
    await api.executed(b["state_id"])
    assert (await api.run_summary(third))["status"] == "SUCCESS"
    expect_error(await api.trigger_raw("g", {}), 400, "Graph template is not valid")
