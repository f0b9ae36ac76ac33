from typing import Any

import pytest
from state_manager.domain.graph import (
    RegisteredSchema,
    available_ancestors,
    find_root,
    input_fields,
    unites_targets,
    validate_against_registry,
    validate_graph,
)
from state_manager.domain.models import GraphSpec, StoreConfig

NS = "ns"


def node(
    identifier: str,
    next_nodes: list[str] | None = None,
    inputs: dict[str, Any] | None = None,
    unites: str | None = None,
    node_name: str = "Worker",
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "node_name": node_name,
        "namespace": NS,
        "identifier": identifier,
        "inputs": inputs or {},
        "next_nodes": next_nodes,
    }
    if unites is not None:
        data["unites"] = {"identifier": unites}
    return data


def spec(*nodes: dict[str, Any], store: StoreConfig | None = None) -> GraphSpec:
    return GraphSpec.model_validate(
        {"nodes": list(nodes), "store_config": (store or StoreConfig()).model_dump()}
    )


def errors_of(graph: GraphSpec, secrets: dict[str, str] | None = None) -> list[str]:
    return validate_graph("g", NS, graph, secrets or {})


def only_error(graph: GraphSpec, *fragments: str) -> str:
    errors = errors_of(graph)
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


CHAIN = spec(node("a", ["b"]), node("b", ["c"]), node("c"))
# a -> b -> d, a -> c -> d, d -> e
DIAMOND = spec(
    node("a", ["b", "c"]), node("b", ["d"]), node("c", ["d"]), node("d", ["e"]), node("e")
)
# a -> b -> c -> u1 (unites b) -> d -> u2 (unites a)
NESTED = spec(
    node("a", ["b"]),
    node("b", ["c"]),
    node("c", ["u1"]),
    node("u1", ["d"], unites="b"),
    node("d", ["u2"]),
    node("u2", unites="a"),
)


# --- topology helpers -----------------------------------------------------------------


def test_find_root() -> None:
    assert find_root(CHAIN).identifier == "a"
    assert find_root(NESTED).identifier == "a"


def test_find_root_counts_unites_as_in_edge() -> None:
    graph = spec(node("a", ["b"]), node("b"), node("u", unites="a"))
    assert find_root(graph).identifier == "a"


@pytest.mark.parametrize(
    "graph",
    [spec(), spec(node("a"), node("b")), spec(node("a", ["b"]), node("b", ["a"]))],
)
def test_find_root_requires_exactly_one(graph: GraphSpec) -> None:
    with pytest.raises(ValueError):
        find_root(graph)


def test_unites_targets() -> None:
    graph = spec(
        node("a", ["b", "c"]),
        node("b", ["u"]),
        node("c", ["v"]),
        node("u", unites="a"),
        node("v", unites="a"),
    )
    targets = unites_targets(graph)
    assert list(targets) == ["a"]
    assert [n.identifier for n in targets["a"]] == ["u", "v"]


def test_ancestors_of_chain() -> None:
    assert available_ancestors(CHAIN) == {"a": set(), "b": {"a"}, "c": {"a", "b"}}


def test_ancestors_of_diamond_are_the_common_ones() -> None:
    ancestors = available_ancestors(DIAMOND)
    assert ancestors["d"] == {"a"}
    assert ancestors["e"] == {"a", "d"}


def test_ancestors_of_nested_unites_follow_targets() -> None:
    ancestors = available_ancestors(NESTED)
    assert ancestors["u1"] == {"a", "b"}
    assert ancestors["d"] == {"a", "b", "u1"}
    assert ancestors["u2"] == {"a"}


def test_ancestors_reject_cycles_and_unknown_edges() -> None:
    with pytest.raises(ValueError, match="cycle"):
        available_ancestors(spec(node("r", ["a"]), node("a", ["b"]), node("b", ["a"])))
    with pytest.raises(ValueError, match="zzz"):
        available_ancestors(spec(node("a", ["zzz"])))


# --- validate_graph: valid graphs -----------------------------------------------------


def test_valid_graphs_have_no_errors() -> None:
    assert errors_of(CHAIN) == []
    assert errors_of(DIAMOND) == []
    assert errors_of(NESTED) == []
    assert errors_of(spec(node("only"))) == []


def test_diamond_references() -> None:
    def diamond(e_inputs: dict[str, Any]) -> GraphSpec:
        return spec(
            node("a", ["b", "c"]),
            node("b", ["d"]),
            node("c", ["d"]),
            node("d", ["e"]),
            node("e", inputs=e_inputs),
        )

    ok = diamond({"x": "${{ a.outputs.v }}", "y": "${{ d.outputs.v }}"})
    assert errors_of(ok) == []
    for bad in ("b", "c"):
        message = only_error(diamond({"x": f"${{{{ {bad}.outputs.v }}}}"}), f"'{bad}'", "'e'")
        assert "available: a, d" in message


def test_nested_unites_references() -> None:
    def nested(u1_inputs: dict[str, Any], u2_inputs: dict[str, Any]) -> GraphSpec:
        return spec(
            node("a", ["b"]),
            node("b", ["c"]),
            node("c", ["u1"]),
            node("u1", ["d"], unites="b", inputs=u1_inputs),
            node("d", ["u2"]),
            node("u2", unites="a", inputs=u2_inputs),
        )

    ok = nested({"x": "${{ a.outputs.v }}${{ b.outputs.v }}"}, {"x": "${{ a.outputs.v }}"})
    assert errors_of(ok) == []
    only_error(nested({"x": "${{ c.outputs.v }}"}, {}), "'c.outputs.v'", "'u1'")
    only_error(nested({}, {"x": "${{ d.outputs.v }}"}), "'d.outputs.v'", "'u2'")
    only_error(nested({}, {"x": "${{ b.outputs.v }}"}), "'b.outputs.v'", "'u2'")


# --- validate_graph: one failing graph per rule ------------------------------------------


def test_empty_graph_name_and_namespace() -> None:
    assert validate_graph("  ", NS, CHAIN, {}) == ["Graph name cannot be empty"]
    assert validate_graph("g", " ", CHAIN, {}) == ["Namespace cannot be empty"]


def test_duplicate_identifiers() -> None:
    only_error(spec(node("a", ["b"]), node("b"), node("b")), "'b'", "2 nodes")


def test_identifier_with_dot() -> None:
    only_error(spec(node("a.x", ["b"]), node("b")), "'a.x'", "'.'")


def test_unknown_next_node() -> None:
    only_error(spec(node("a", ["b", "zzz"]), node("b")), "'a'", "'zzz'", "does not exist")


def test_unknown_unites_target() -> None:
    only_error(spec(node("a", ["b"]), node("b", unites="zzz")), "'b'", "'zzz'")


def test_unites_on_itself() -> None:
    only_error(spec(node("a", ["b"]), node("b", unites="b")), "'b'", "itself")


def test_no_nodes() -> None:
    only_error(spec(), "no nodes")


def test_no_root() -> None:
    errors = errors_of(spec(node("a", ["b"]), node("b", ["a"])))
    assert any("no root" in e for e in errors)
    assert any("cycle" in e for e in errors)


def test_two_roots() -> None:
    only_error(spec(node("a", ["c"]), node("b", ["c"]), node("c")), "2 root nodes", "a, b")


def test_disconnected_part_is_reported() -> None:
    # With one root and no cycle every node is reachable, so a disconnected part always
    # shows up as a second root or as a cycle.
    graph = spec(node("a", ["b"]), node("b"), node("c", ["d"]), node("d"))
    only_error(graph, "2 root nodes", "a, c")
    graph = spec(node("a", ["b"]), node("b"), node("c", ["d"]), node("d", ["c"]))
    only_error(graph, "cycle", "c, d")


def test_cycle_through_unites() -> None:
    # 'u' waits for 'v', which only 'u' leads to.
    graph = spec(node("a", ["u"]), node("u", ["v"], unites="v"), node("v"))
    only_error(graph, "cycle", "u, v")


def test_cycle() -> None:
    graph = spec(node("r", ["a"]), node("a", ["b"]), node("b", ["c"]), node("c", ["a"]))
    only_error(graph, "cycle", "a, b, c")


def test_self_loop_is_a_cycle() -> None:
    graph = spec(node("r", ["a"]), node("a", ["a"]))
    only_error(graph, "cycle", "a")


def test_non_string_input() -> None:
    only_error(spec(node("a", inputs={"x": 5})), "Input 'x' of node 'a'", "string", "int")


def test_unparseable_input() -> None:
    only_error(spec(node("a", inputs={"x": "${{ store.k"})), "Input 'x' of node 'a'", "not closed")


def test_invalid_placeholder_input() -> None:
    only_error(spec(node("a", inputs={"x": "${{ a.b }}"})), "Input 'x' of node 'a'", "a.b")


def test_root_may_only_reference_store() -> None:
    graph = spec(node("a", ["b"], inputs={"x": "${{ b.outputs.v }}"}), node("b"))
    only_error(graph, "'b.outputs.v'", "only reference store keys")


def test_reference_to_descendant() -> None:
    graph = spec(node("a", ["b"]), node("b", ["c"], inputs={"x": "${{ c.outputs.v }}"}), node("c"))
    only_error(graph, "'c.outputs.v'", "'b'")


def test_reference_to_unknown_node() -> None:
    graph = spec(node("a", ["b"]), node("b", inputs={"x": "${{ ghost.outputs.v }}"}))
    only_error(graph, "'ghost'", "does not exist")


def test_reference_to_sibling_branch() -> None:
    graph = spec(node("a", ["b", "c"]), node("b"), node("c", inputs={"x": "${{ b.outputs.v }}"}))
    only_error(graph, "'b.outputs.v'", "available: a")


def test_store_keys_must_be_declared() -> None:
    store = StoreConfig(required_keys=["r"], default_values={"d": "1"})
    ok = spec(node("a", inputs={"x": "${{ store.r }}${{ store.d }}${{ store.outputs.r }}"}))
    ok = ok.model_copy(update={"store_config": store})
    assert errors_of(ok) == []
    bad = spec(node("a", inputs={"x": "${{ store.nope }}"}), store=store)
    only_error(bad, "'nope'", "required_keys", "default_values")


def test_uniting_node_predecessor_must_descend_from_target() -> None:
    # 'b' is on the 'a' -> 'b' branch, the target 'c' on another branch.
    graph = spec(node("a", ["b", "c"]), node("b", ["u"]), node("c"), node("u", unites="c"))
    only_error(graph, "'b'", "'u'", "'c'", "descendants")


def test_uniting_node_predecessor_may_be_target_itself() -> None:
    graph = spec(node("a", ["b"]), node("b", ["u"]), node("u", unites="b"))
    assert errors_of(graph) == []


def test_uniting_node_without_predecessors_is_allowed() -> None:
    graph = spec(node("a", ["b"]), node("b"), node("u", unites="a"))
    assert errors_of(graph) == []


def test_empty_secret_name_and_value() -> None:
    assert errors_of(CHAIN, {"": "v"}) == ["Secret name cannot be empty"]
    assert errors_of(CHAIN, {"key": ""}) == ["Secret 'key' cannot have an empty value"]
    assert errors_of(CHAIN, {"key": "v"}) == []


def test_all_errors_are_listed_at_once() -> None:
    graph = spec(
        node("a.b", ["a"]),
        node("a", ["ghost"], inputs={"x": 1, "y": "${{ store.undeclared }}"}),
        node("c", unites="c", inputs={"z": "${{ broken"}),
    )
    errors = validate_graph(" ", "", graph, {"s": ""})
    expected_fragments = [
        "Graph name cannot be empty",
        "Namespace cannot be empty",
        "'ghost'",
        "itself",
        "'a.b' must not contain '.'",
        "must be a string, got int",
        "'undeclared'",
        "not closed",
        "Secret 's'",
    ]
    assert len(errors) == len(expected_fragments), errors
    for fragment in expected_fragments:
        assert any(fragment in e for e in errors), fragment


def test_topology_errors_are_listed_together() -> None:
    graph = spec(
        node("a", ["b", "c"]),
        node("r2"),
        node("b", ["u"]),
        node("c"),
        node("u", unites="c"),
    )
    errors = errors_of(graph)
    assert len(errors) == 2, errors
    assert "2 root nodes (a, r2)" in errors[0]
    assert "'b' lists uniting node 'u'" in errors[1]


def test_cycle_suppresses_cascading_errors() -> None:
    graph = spec(
        node("r", ["x"], inputs={"v": "${{ y.outputs.o }}"}),
        node("x", ["y"]),
        node("y", ["x", "u"]),
        node("u", unites="r"),
    )
    assert errors_of(graph) == ["Graph has a cycle through nodes: x, y"]


# --- validate_against_registry ------------------------------------------------------


def schema(*fields: str, **typed: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {f: {"title": f, "type": "string"} for f in fields}
    properties.update(typed)
    return {"properties": properties, "type": "object", "title": "Model"}


def registered(
    inputs: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    secrets: list[str] | None = None,
) -> RegisteredSchema:
    return RegisteredSchema(inputs or schema(), outputs or schema(), secrets or [])


PIPE = spec(
    node("a", ["b"], node_name="Fetch", inputs={"url": "${{ store.u }}"}),
    node("b", node_name="Parse", inputs={"body": "${{ a.outputs.body }}", "extra": "x"}),
    store=StoreConfig(required_keys=["u"]),
)


def registry(**overrides: RegisteredSchema) -> dict[tuple[str, str], RegisteredSchema]:
    entries = {
        "Fetch": registered(schema("url"), schema("body"), ["token"]),
        "Parse": registered(schema("body")),
    }
    entries.update(overrides)
    return {(name, NS): value for name, value in entries.items()}


def test_registry_valid() -> None:
    assert errors_of(PIPE) == []
    assert validate_against_registry(PIPE, {"token"}, registry()) == []


def test_registry_node_not_registered() -> None:
    reg = registry()
    del reg[("Parse", NS)]
    errors = validate_against_registry(PIPE, {"token"}, reg)
    assert len(errors) == 1
    assert "'Parse'" in errors[0] and "not registered" in errors[0]


def test_registry_wrong_namespace_is_not_registered() -> None:
    reg = {(name, "other"): value for (name, _), value in registry().items()}
    errors = validate_against_registry(PIPE, {"token"}, reg)
    assert len(errors) == 2


def test_registry_missing_secret_reported_once() -> None:
    graph = spec(node("a", ["b"], node_name="Fetch"), node("b", node_name="Fetch"))
    reg = registry(Fetch=registered(secrets=["token", "other"]))
    errors = validate_against_registry(graph, {"other"}, reg)
    assert len(errors) == 1
    assert "'token'" in errors[0]


def test_registry_missing_input() -> None:
    reg = registry(Parse=registered(schema("body", "mode")))
    errors = validate_against_registry(PIPE, {"token"}, reg)
    assert len(errors) == 1
    assert "'mode'" in errors[0] and "'b'" in errors[0]


def test_registry_non_string_input_field() -> None:
    reg = registry(Parse=registered(schema("body", count={"type": "integer"})))
    graph = PIPE.model_copy(deep=True)
    graph.nodes[1].inputs["count"] = "3"
    errors = validate_against_registry(graph, {"token"}, reg)
    assert len(errors) == 1
    assert "'count'" in errors[0] and "string" in errors[0]


def test_registry_string_shapes() -> None:
    accepted: dict[str, Any] = {
        "plain": {"type": "string"},
        "default": {"default": "x", "title": "D", "type": "string"},
        "all_of": {"allOf": [{"type": "string"}], "default": "x"},
        "ref": {"$ref": "#/$defs/Colour"},
    }
    rejected: dict[str, Any] = {
        "optional": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "untyped": {"title": "U"},
        "number": {"type": "number"},
        "bad_ref": {"$ref": "#/$defs/Missing"},
    }
    inputs = schema(**accepted, **rejected)
    inputs["$defs"] = {"Colour": {"enum": ["red"], "type": "string"}}
    graph = spec(node("a", node_name="N", inputs=dict.fromkeys(inputs["properties"], "v")))
    errors = validate_against_registry(graph, (), {("N", NS): registered(inputs)})
    assert len(errors) == len(rejected)
    for name in rejected:
        assert any(f"'{name}'" in e for e in errors), name


def test_registry_output_field_missing() -> None:
    reg = registry(Fetch=registered(schema("url"), schema("status"), ["token"]))
    errors = validate_against_registry(PIPE, {"token"}, reg)
    assert len(errors) == 1
    assert "'a.outputs.body'" in errors[0] and "no output 'body'" in errors[0]


def test_registry_output_field_not_string() -> None:
    outputs = schema(body={"type": "array", "items": {"type": "string"}})
    reg = registry(Fetch=registered(schema("url"), outputs, ["token"]))
    errors = validate_against_registry(PIPE, {"token"}, reg)
    assert len(errors) == 1
    assert "'body'" in errors[0] and "string" in errors[0]


def test_registry_output_of_unregistered_node_reported_once() -> None:
    reg = registry()
    del reg[("Fetch", NS)]
    errors = validate_against_registry(PIPE, {"token"}, reg)
    assert len(errors) == 1
    assert "'Fetch'" in errors[0]


def test_registry_collects_all_errors() -> None:
    reg = registry(
        Fetch=registered(schema("url", "timeout"), schema(), ["token"]),
        Parse=registered(schema("body", "mode")),
    )
    errors = validate_against_registry(PIPE, set(), reg)
    assert len(errors) == 4, errors


def test_input_fields_in_order() -> None:
    assert input_fields(schema("b", "a", "c")) == ["b", "a", "c"]
    assert input_fields({"type": "object"}) == []
