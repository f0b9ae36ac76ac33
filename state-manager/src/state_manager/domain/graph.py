"""Structural validation of graph templates and the topology helpers behind it.

Edges of a graph are the ``next_nodes`` links plus one edge from every ``unites`` target
to its uniting node. A node may reference the outputs of its *available ancestors*: the
nodes guaranteed to have run on every path from the root to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from state_manager.domain.models import GraphSpec, NodeTemplate
from state_manager.domain.templating import OutputRef, StoreRef, TemplateError, parse


def unites_targets(spec: GraphSpec) -> dict[str, list[NodeTemplate]]:
    """Map each ``unites`` target identifier to the uniting nodes that target it."""
    targets: dict[str, list[NodeTemplate]] = {}
    for node in spec.nodes:
        if node.unites is not None:
            targets.setdefault(node.unites.identifier, []).append(node)
    return targets


def _in_degrees(spec: GraphSpec) -> dict[str, int]:
    degrees = {node.identifier: 0 for node in spec.nodes}
    for node in spec.nodes:
        for successor in node.successors():
            if successor in degrees:
                degrees[successor] += 1
        if node.unites is not None:
            degrees[node.identifier] += 1
    return degrees


def _roots(spec: GraphSpec) -> list[str]:
    return [identifier for identifier, degree in _in_degrees(spec).items() if degree == 0]


def find_root(spec: GraphSpec) -> NodeTemplate:
    """The unique node with in-degree 0; ``ValueError`` if there is not exactly one."""
    roots = _roots(spec)
    if len(roots) != 1:
        raise ValueError(f"Expected exactly one root node, found {len(roots)}: {roots}")
    node = spec.node(roots[0])
    assert node is not None
    return node


def _edges(spec: GraphSpec) -> dict[str, list[str]]:
    """Adjacency lists over known identifiers (unknown targets are dropped)."""
    known = {node.identifier for node in spec.nodes}
    edges: dict[str, list[str]] = {identifier: [] for identifier in known}
    for node in spec.nodes:
        edges[node.identifier].extend(s for s in node.successors() if s in known)
        if node.unites is not None and node.unites.identifier in known:
            edges[node.unites.identifier].append(node.identifier)
    return edges


def _reachable(edges: Mapping[str, list[str]], start: str) -> set[str]:
    """Every identifier reachable from ``start``, including ``start`` itself."""
    seen = {start}
    stack = [start]
    while stack:
        for successor in edges[stack.pop()]:
            if successor not in seen:
                seen.add(successor)
                stack.append(successor)
    return seen


def _topological_order(edges: Mapping[str, list[str]]) -> list[str] | None:
    """Kahn's algorithm; ``None`` when the graph has a cycle."""
    degrees = dict.fromkeys(edges, 0)
    for successors in edges.values():
        for successor in successors:
            degrees[successor] += 1
    ready = [identifier for identifier, degree in degrees.items() if degree == 0]
    order: list[str] = []
    while ready:
        identifier = ready.pop()
        order.append(identifier)
        for successor in edges[identifier]:
            degrees[successor] -= 1
            if degrees[successor] == 0:
                ready.append(successor)
    return order if len(order) == len(edges) else None


def _cycles(edges: Mapping[str, list[str]]) -> list[list[str]]:
    """Strongly connected components that contain a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(edges[successor])))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    components.append(component)
    return components


def available_ancestors(spec: GraphSpec) -> dict[str, set[str]]:
    """Identifiers each node may reference: those on every path from the root to it.

    A uniting node inherits from its target (``ancestors(T) | {T}``); any other node gets
    the intersection over its ``next_nodes`` predecessors ``P`` of ``ancestors(P) | {P}``.
    Requires an acyclic graph whose edges all name existing nodes (``ValueError`` if not).
    """
    known = {node.identifier for node in spec.nodes}
    predecessors: dict[str, list[str]] = {identifier: [] for identifier in known}
    for node in spec.nodes:
        for successor in node.successors():
            if successor not in known:
                raise ValueError(f"Node '{node.identifier}' names unknown next node '{successor}'")
            predecessors[successor].append(node.identifier)
        if node.unites is not None and node.unites.identifier not in known:
            raise ValueError(
                f"Node '{node.identifier}' unites unknown node '{node.unites.identifier}'"
            )
    order = _topological_order(_edges(spec))
    if order is None:
        raise ValueError("Graph has a cycle")
    unites = {n.identifier: n.unites.identifier for n in spec.nodes if n.unites is not None}
    ancestors: dict[str, set[str]] = {}
    for identifier in order:
        if identifier in unites:
            target = unites[identifier]
            ancestors[identifier] = ancestors[target] | {target}
        elif predecessors[identifier]:
            sets = [ancestors[p] | {p} for p in predecessors[identifier]]
            ancestors[identifier] = set.intersection(*sets)
        else:
            ancestors[identifier] = set()
    return ancestors


def _identifier_syntax_errors(spec: GraphSpec) -> list[str]:
    return [
        f"Node identifier '{node.identifier}' must not contain '.'"
        for node in spec.nodes
        if "." in node.identifier
    ]


def _edge_errors(spec: GraphSpec) -> list[str]:
    """Duplicate identifiers, unknown edges, bad ``unites`` targets."""
    errors: list[str] = []
    counts = Counter(node.identifier for node in spec.nodes)
    for identifier, count in counts.items():
        if count > 1:
            errors.append(f"Node identifier '{identifier}' is used by {count} nodes")
    for node in spec.nodes:
        for successor in node.successors():
            if successor not in counts:
                errors.append(
                    f"Node '{node.identifier}' lists next node '{successor}', which does not exist"
                )
        if node.unites is not None:
            target = node.unites.identifier
            if target == node.identifier:
                errors.append(f"Node '{node.identifier}' cannot unite on itself")
            elif target not in counts:
                errors.append(
                    f"Node '{node.identifier}' unites on '{target}', which does not exist"
                )
    return errors


def _topology_errors(spec: GraphSpec, edges: Mapping[str, list[str]]) -> list[str]:
    """Root, cycles and the predecessors of uniting nodes."""
    errors: list[str] = []
    roots = _roots(spec)
    if not spec.nodes:
        errors.append("Graph has no nodes")
    elif not roots:
        errors.append("Graph has no root node (every node has a predecessor or unites)")
    elif len(roots) > 1:
        errors.append(
            f"Graph has {len(roots)} root nodes ({', '.join(roots)}); exactly one is required"
        )
    cycles = _cycles(edges)
    for component in cycles:
        members = ", ".join(sorted(component))
        errors.append(f"Graph has a cycle through nodes: {members}")
    # No reachability check is needed: in an acyclic graph every node is reachable from a
    # node without in-edges, so with exactly one root every node is reachable from it.
    if cycles:
        return errors  # descendant sets are meaningless with a cycle
    for target, uniting_nodes in unites_targets(spec).items():
        descendants = _reachable(edges, target)
        for uniting in uniting_nodes:
            for node in spec.nodes:
                if uniting.identifier in node.successors() and node.identifier not in descendants:
                    errors.append(
                        f"Node '{node.identifier}' lists uniting node '{uniting.identifier}' "
                        f"as next node but is neither '{target}' nor one of its descendants"
                    )
    return errors


def _input_errors(spec: GraphSpec, ancestors: Mapping[str, set[str]] | None) -> list[str]:
    """Input values: strings only, syntax, store keys declared, outputs of ancestors only."""
    errors: list[str] = []
    declared = set(spec.store_config.required_keys) | set(spec.store_config.default_values)
    known = {node.identifier for node in spec.nodes}
    for node in spec.nodes:
        for name, value in node.inputs.items():
            where = f"Input '{name}' of node '{node.identifier}'"
            if not isinstance(value, str):
                errors.append(f"{where} must be a string, got {type(value).__name__}")
                continue
            try:
                template = parse(value)
            except TemplateError as exc:
                errors.append(f"{where}: {exc}")
                continue
            for ref in dict.fromkeys(template.references()):
                if isinstance(ref, StoreRef):
                    if ref.key not in declared:
                        errors.append(
                            f"{where} references store key '{ref.key}', which is in neither "
                            "store_config.required_keys nor store_config.default_values"
                        )
                elif ref.identifier not in known:
                    errors.append(
                        f"{where} references '{ref}' but node '{ref.identifier}' does not exist"
                    )
                elif ancestors is not None and ref.identifier not in ancestors[node.identifier]:
                    errors.append(_ancestor_error(where, ref, ancestors[node.identifier]))
    return errors


def _ancestor_error(where: str, ref: OutputRef, available: set[str]) -> str:
    if not available:
        return f"{where} references '{ref}' but this node can only reference store keys"
    return (
        f"{where} references '{ref}' but '{ref.identifier}' is not guaranteed to run before "
        f"it (available: {', '.join(sorted(available))})"
    )


def validate_graph(
    name: str, namespace: str, spec: GraphSpec, secrets: Mapping[str, str]
) -> list[str]:
    """Every structural problem of a graph template; an empty list means valid.

    ``secrets`` maps secret names to plaintext values.
    """
    errors: list[str] = []
    if not name.strip():
        errors.append("Graph name cannot be empty")
    if not namespace.strip():
        errors.append("Namespace cannot be empty")
    edge_errors = _edge_errors(spec)
    errors += edge_errors
    errors += _identifier_syntax_errors(spec)
    ancestors: dict[str, set[str]] | None = None
    if not edge_errors:
        edges = _edges(spec)
        topology_errors = _topology_errors(spec, edges)
        errors += topology_errors
        if not topology_errors:
            ancestors = available_ancestors(spec)
    errors += _input_errors(spec, ancestors)
    for secret_name, value in secrets.items():
        if not secret_name.strip():
            errors.append("Secret name cannot be empty")
        elif not value.strip():
            errors.append(f"Secret '{secret_name}' cannot have an empty value")
    return errors


@dataclass(frozen=True)
class RegisteredSchema:
    """What a runtime registered for one node class."""

    inputs_schema: dict[str, Any]
    outputs_schema: dict[str, Any]
    secrets: list[str]


def input_fields(schema: Mapping[str, Any]) -> list[str]:
    """Property names of a JSON object schema, in declaration order."""
    properties = schema.get("properties")
    return list(properties) if isinstance(properties, Mapping) else []


def _resolve_ref(root: Mapping[str, Any], prop: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = prop.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return prop
    target: Any = root
    for key in ref[2:].split("/"):
        target = target.get(key) if isinstance(target, Mapping) else None
    return target if isinstance(target, Mapping) else prop


def _is_string_schema(root: Mapping[str, Any], prop: Any, depth: int = 0) -> bool:
    """``type: string``, directly, via a local ``$ref``, or in every branch of a combinator."""
    if not isinstance(prop, Mapping) or depth > 8:
        return False
    if "$ref" in prop:
        resolved = _resolve_ref(root, prop)
        return resolved is not prop and _is_string_schema(root, resolved, depth + 1)
    kind = prop.get("type")
    if kind is not None:
        return bool(kind == "string" or kind == ["string"])
    for combinator in ("allOf", "anyOf", "oneOf"):
        branches = prop.get(combinator)
        if isinstance(branches, list) and branches:
            return all(_is_string_schema(root, b, depth + 1) for b in branches)
    return False


def _field_schema(schema: Mapping[str, Any], field: str) -> Any:
    properties = schema.get("properties")
    return properties.get(field) if isinstance(properties, Mapping) else None


def validate_against_registry(
    spec: GraphSpec,
    secret_names: Collection[str],
    registry: Mapping[tuple[str, str], RegisteredSchema],
) -> list[str]:
    """Every mismatch between the template and the registered node schemas."""
    errors: list[str] = []
    checked_secrets: set[tuple[str, str, str]] = set()
    for node in spec.nodes:
        key = (node.node_name, node.namespace)
        schema = registry.get(key)
        if schema is None:
            errors.append(
                f"Node '{node.identifier}' uses '{node.node_name}' in namespace "
                f"'{node.namespace}', which is not registered"
            )
            continue
        for secret in schema.secrets:
            if secret not in secret_names and (*key, secret) not in checked_secrets:
                checked_secrets.add((*key, secret))
                errors.append(
                    f"Secret '{secret}' required by node '{node.node_name}' in namespace "
                    f"'{node.namespace}' is not defined in the graph's secrets"
                )
        for field in input_fields(schema.inputs_schema):
            prop = _field_schema(schema.inputs_schema, field)
            if not _is_string_schema(schema.inputs_schema, prop):
                errors.append(
                    f"Input field '{field}' of registered node '{node.node_name}' is not "
                    f"string-typed (node '{node.identifier}')"
                )
            if field not in node.inputs:
                errors.append(
                    f"Node '{node.identifier}' does not provide input '{field}' required by "
                    f"registered node '{node.node_name}'"
                )
    errors += _output_ref_errors(spec, registry)
    return errors


def _output_ref_errors(
    spec: GraphSpec, registry: Mapping[tuple[str, str], RegisteredSchema]
) -> list[str]:
    errors: list[str] = []
    for node in spec.nodes:
        for name, value in node.inputs.items():
            if not isinstance(value, str):
                continue
            try:
                refs = parse(value).references()
            except TemplateError:
                continue  # reported by validate_graph
            for ref in dict.fromkeys(refs):
                if not isinstance(ref, OutputRef):
                    continue
                where = f"Input '{name}' of node '{node.identifier}' references '{ref}'"
                source = spec.node(ref.identifier)
                if source is None:
                    errors.append(f"{where} but node '{ref.identifier}' does not exist")
                    continue
                schema = registry.get((source.node_name, source.namespace))
                if schema is None:
                    continue  # reported as an unregistered node
                prop = _field_schema(schema.outputs_schema, ref.field)
                if prop is None:
                    errors.append(
                        f"{where} but registered node '{source.node_name}' has no output "
                        f"'{ref.field}'"
                    )
                elif not _is_string_schema(schema.outputs_schema, prop):
                    errors.append(
                        f"{where} but output '{ref.field}' of registered node "
                        f"'{source.node_name}' is not string-typed"
                    )
    return errors
