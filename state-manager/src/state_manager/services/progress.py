"""Making progress through a graph: new state rows, successors, and fan-in groups.

All of it runs inside the caller's write transaction, so a report, the states it
creates and the fan-in bookkeeping commit together or not at all.

Fan-in: when a state of an identifier that some node ``unites`` on reports
``executed``, it opens a *group* (the state and the siblings created by the same
report). Each state records, in ``groups``, the group it descends from for each
such identifier. A group row counts its descendants that are pending and failed;
every status change adjusts the counters of the changed state's groups, so the
cost of finishing a branch does not depend on the width of the fan-out. When a
group has no pending descendant, its uniting nodes are created, once each: the
state fingerprint is unique.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from state_manager.domain import buckets, templating
from state_manager.domain.fingerprint import fingerprint
from state_manager.domain.ids import new_object_id
from state_manager.domain.models import NodeTemplate, StateStatus
from state_manager.services.context import CompiledGraph
from state_manager.store.contract import StateCore, StateRow, Transaction


def state_row(
    *,
    namespace: str,
    graph_name: str,
    run_id: str,
    node: NodeTemplate,
    inputs: Mapping[str, str],
    parents: Mapping[str, str],
    groups: Mapping[str, str],
    now: int,
    status: StateStatus = StateStatus.CREATED,
    enqueue_after: int | None = None,
    retry_count: int = 0,
    fanout_id: str | None = None,
    manual_retry_fanout_id: str = "",
    outputs: Mapping[str, Any] | None = None,
    error: str | None = None,
    group_id: str | None = None,
    state_id: str | None = None,
    timeout_ms: int | None = None,
) -> dict[str, Any]:
    """A complete row for a new state (``timeout_ms``: its node's, see
    :meth:`CompiledGraph.timeout_ms`)."""
    state_id = state_id or new_object_id()
    does_unites = node.unites is not None
    row: dict[str, Any] = {
        "id": state_id,
        "namespace": namespace,
        "node_name": node.node_name,
        "identifier": node.identifier,
        "graph_name": graph_name,
        "run_id": run_id,
        "status": status.value,
        "inputs": dict(inputs),
        "outputs": dict(outputs or {}),
        "data": {},
        "error": error,
        "parents": dict(parents),
        "groups": dict(groups),
        "group_id": group_id or state_id,
        "does_unites": does_unites,
        "state_fingerprint": None,
        "enqueue_after": now if enqueue_after is None else enqueue_after,
        "retry_count": retry_count,
        "fanout_id": fanout_id or str(uuid.uuid4()),
        "manual_retry_fanout_id": manual_retry_fanout_id,
        "lease_expires_at": None,
        "claimed_at": None,
        "created_at": now,
        "updated_at": now,
        "timeout_ms": timeout_ms,
    }
    if does_unites:
        row["state_fingerprint"] = fingerprint(
            {
                "node_name": row["node_name"],
                "namespace_name": namespace,
                "identifier": row["identifier"],
                "graph_name": graph_name,
                "run_id": run_id,
                "retry_count": retry_count,
                "parents": row["parents"],
                "manual_retry_fanout_id": manual_retry_fanout_id,
            }
        )
    return row


def derived_row(
    state: StateCore, graph: CompiledGraph, *, now: int, **overrides: Any
) -> dict[str, Any]:
    """A new state of ``state``'s node with the same inputs, parents and groups.

    Used for retries (automatic and manual) and for fan-out siblings.
    """
    return state_row(
        namespace=state.namespace,
        graph_name=state.graph_name,
        run_id=state.run_id,
        node=graph.node(state.identifier),
        inputs=state.inputs,
        parents=state.parents,
        groups=state.groups,
        now=now,
        timeout_ms=graph.timeout_ms(state.identifier),
        **overrides,
    )


class Resolver:
    """Resolves placeholders for states of several runs, loading what they need at once."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx
        self._stores: dict[str, dict[str, str]] = {}
        self._outputs: dict[str, dict[str, Any]] = {}

    async def preload(
        self,
        wants: Iterable[tuple[str, Sequence[templating.ParsedTemplate], Mapping[str, str]]],
    ) -> None:
        """Fetch the stores and ancestor outputs that templates refer to, in two queries
        at most. ``wants`` holds (run id, templates, parents of the state rendering them)."""
        runs: set[str] = set()
        states: set[str] = set()
        for run_id, templates, parents in wants:
            for template in templates:
                for ref in template.references():
                    if isinstance(ref, templating.StoreRef):
                        runs.add(run_id)
                    elif ref.identifier in parents:
                        states.add(parents[ref.identifier])
        runs -= self._stores.keys()
        states -= self._outputs.keys()
        if runs:
            self._stores.update(await self._tx.get_stores(runs))
        if states:
            for state_id, state in (await self._tx.get_states(states)).items():
                self._outputs[state_id] = state.outputs

    def render(
        self,
        graph: CompiledGraph,
        run_id: str,
        templates: Mapping[str, templating.ParsedTemplate],
        *,
        own_identifier: str,
        own_outputs: Mapping[str, Any],
        parents: Mapping[str, str],
    ) -> dict[str, str]:
        store = self._stores.get(run_id, {})
        defaults = graph.spec.store_config.default_values

        def resolve(ref: templating.Placeholder) -> object:
            if isinstance(ref, templating.StoreRef):
                if ref.key in store:
                    return store[ref.key]
                if ref.key in defaults:
                    return defaults[ref.key]
                raise templating.TemplateError(f"store key '{ref.key}' has no value in this run")
            if ref.identifier == own_identifier:
                outputs: Mapping[str, Any] = own_outputs
            elif ref.identifier in parents:
                outputs = self._outputs.get(parents[ref.identifier], {})
            else:
                raise templating.TemplateError(f"'{ref}' is not an ancestor of this state")
            if ref.field not in outputs:
                raise templating.TemplateError(f"output '{ref}' was not produced")
            return outputs[ref.field]

        return {name: templating.render(t, resolve) for name, t in templates.items()}


@dataclass
class GroupLedger:
    """Counter changes for fan-in groups, applied deepest group first."""

    changes: dict[str, list[int]] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)

    def add(
        self, groups: Mapping[str, str], before: StateStatus | None, after: StateStatus
    ) -> None:
        pending, failed = buckets.delta(before, after)
        if pending == 0 and failed == 0:
            return
        for position, group_id in enumerate(groups.values()):
            entry = self.changes.setdefault(group_id, [0, 0])
            entry[0] += pending
            entry[1] += failed
            self.depth[group_id] = max(self.depth.get(group_id, 0), position)

    def open(self, group_id: str, depth: int) -> None:
        """Make sure a newly opened group is checked even if nothing was added to it."""
        self.changes.setdefault(group_id, [0, 0])
        self.depth[group_id] = depth

    def pop_deepest(self) -> tuple[str, int, int] | None:
        if not self.changes:
            return None
        group_id = max(self.changes, key=lambda g: (self.depth[g], g))
        pending, failed = self.changes.pop(group_id)
        return group_id, pending, failed


async def settle_groups(
    tx: Transaction,
    graphs: Mapping[str, CompiledGraph],
    ledger: GroupLedger,
    now: int,
    *,
    opened: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Apply the ledger and create uniting states for groups that finished.

    ``graphs`` maps the run of every state in the ledger to its graph. Returns the
    uniting state rows that were inserted.
    """
    created: list[dict[str, Any]] = []
    opened = opened or set()
    while (item := ledger.pop_deepest()) is not None:
        group_id, pending, failed = item
        if pending == 0 and failed == 0 and group_id not in opened:
            continue
        counters = await tx.adjust_group(group_id, pending, failed)
        if counters is None or counters[0] != 0:
            continue
        target = await tx.get_state(group_id)
        if target is None:
            continue
        graph = graphs[target.run_id]
        for uniting in graph.uniting_by_target.get(target.identifier, []):
            assert uniting.unites is not None
            if not buckets.ready(uniting.unites.strategy, counters[0], counters[1]):
                continue
            row = await _uniting_row(tx, graph, target, uniting, now)
            if await tx.insert_states_unless_exist([row]):
                created.append(row)
                ledger.add(row["groups"], None, StateStatus(row["status"]))
    return created


async def _uniting_row(
    tx: Transaction, graph: CompiledGraph, target: StateRow, uniting: NodeTemplate, now: int
) -> dict[str, Any]:
    """The state of ``uniting`` built from the target state that opened the group."""
    templates = graph.parsed_inputs[uniting.identifier]
    resolver = Resolver(tx)
    await resolver.preload([(target.run_id, list(templates.values()), target.parents)])
    try:
        inputs = resolver.render(
            graph,
            target.run_id,
            templates,
            own_identifier=target.identifier,
            own_outputs=target.outputs,
            parents=target.parents,
        )
        status, error = StateStatus.CREATED, None
    except templating.TemplateError as exc:
        inputs, status, error = {}, StateStatus.NEXT_CREATED_ERROR, str(exc)
    return state_row(
        namespace=target.namespace,
        graph_name=target.graph_name,
        run_id=target.run_id,
        node=uniting,
        inputs=inputs,
        parents={**target.parents, target.identifier: target.id},
        groups=target.groups,
        now=now,
        status=status,
        error=error,
        timeout_ms=graph.timeout_ms(uniting.identifier),
    )


def successor_rows(
    graph: CompiledGraph,
    resolver: Resolver,
    member: Mapping[str, Any],
    now: int,
) -> list[dict[str, Any]]:
    """CREATED states for every non-uniting successor of one executed state.

    ``member`` is the executed state's row (or one of its siblings). Raises
    :class:`templating.TemplateError` when an input cannot be rendered.
    """
    identifier = member["identifier"]
    parents = {**member["parents"], identifier: member["id"]}
    groups = dict(member["groups"])
    if identifier in graph.uniting_by_target:
        groups[identifier] = member["group_id"]
    rows: list[dict[str, Any]] = []
    for successor in graph.edge_successors(identifier):
        successor_id = successor.identifier
        inputs = resolver.render(
            graph,
            member["run_id"],
            graph.parsed_inputs[successor_id],
            own_identifier=identifier,
            own_outputs=member["outputs"],
            parents=member["parents"],
        )
        rows.append(
            state_row(
                namespace=member["namespace"],
                graph_name=member["graph_name"],
                run_id=member["run_id"],
                node=successor,
                inputs=inputs,
                parents=parents,
                groups=groups,
                now=now,
                timeout_ms=graph.timeout_ms(successor_id),
            )
        )
    return rows
