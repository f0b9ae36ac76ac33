"""Read use cases of the dashboard: what each page shows, bounded whatever a run's size.

A run page never loads a run's states one by one: it counts them per node and
status, lists a node's states a page at a time, and loads the payloads of one
state only when it is opened.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from state_manager.domain import graph as graph_rules
from state_manager.domain.buckets import TERMINAL_STATUSES
from state_manager.domain.models import GraphSpec, NodeTemplate, StateStatus
from state_manager.errors import InvalidRequest
from state_manager.services import graphs, runs, states
from state_manager.services.context import Context
from state_manager.store.queries import (
    FaninGroup,
    NodeCounts,
    StateBrief,
    StateRow,
    TemplateRow,
    Tx,
)

# A node with at most this many states shows each of them on the run graph.
SMALL_GROUP = 12
MAX_GROUP_PAGE = 200
ATTEMPTS_SHOWN = 50
JOINS_SHOWN = 5
OPEN_BRANCHES_SHOWN = 10
TRIGGERS_SHOWN = 20


# -- overview and graph templates -----------------------------------------------------


@dataclass(frozen=True)
class Overview:
    namespace: str
    namespaces: list[str]
    nodes: list[dict[str, Any]]
    templates: list[TemplateRow]


async def overview(ctx: Context, namespace: str | None) -> Overview:
    """Registered nodes and graph templates of ``namespace`` (default: the first one)."""
    namespaces = await graphs.list_namespaces(ctx)
    chosen = namespace if namespace is not None else (namespaces[0] if namespaces else "default")
    return Overview(
        namespace=chosen,
        namespaces=namespaces,
        nodes=await graphs.list_nodes(ctx, chosen),
        templates=await graphs.list_graphs(ctx, chosen),
    )


@dataclass(frozen=True)
class GraphPage:
    template: TemplateRow
    spec: GraphSpec
    triggers: list[dict[str, Any]]  # cron fire records: scheduled, fired, failed
    root: NodeTemplate | None
    root_inputs: list[str]  # input names of the root node, for the trigger form


async def graph_page(ctx: Context, namespace: str, name: str) -> GraphPage:
    template = await graphs.get_graph(ctx, namespace, name)
    spec = GraphSpec.model_validate(template.spec)
    async with ctx.db.read() as tx:
        triggers = await tx.recent_triggers(namespace, name, TRIGGERS_SHOWN)
    try:
        root: NodeTemplate | None = graph_rules.find_root(spec)
    except ValueError:  # an INVALID template has no single root; it cannot be triggered
        root = None
    return GraphPage(
        template=template,
        spec=spec,
        triggers=triggers,
        root=root,
        root_inputs=sorted(root.inputs) if root is not None else [],
    )


# -- runs ---------------------------------------------------------------------------


@dataclass
class NodeBox:
    """One node of a run's graph: its states counted by status, and (if few) the states."""

    node: NodeTemplate
    counts: NodeCounts
    states: list[StateBrief]  # every state when there are at most SMALL_GROUP
    joins: list[FaninGroup]  # a uniting node without states: the joins it waits for


@dataclass(frozen=True)
class RunView:
    summary: runs.RunSummary
    namespace: str
    spec: GraphSpec
    revision: int
    boxes: dict[str, NodeBox]


async def run_view(ctx: Context, namespace: str, run_id: str) -> RunView:
    """A run's status and its graph of node boxes (404 for a run of another namespace)."""
    summary = await runs.run_summary(ctx, namespace, run_id)
    async with ctx.db.read() as tx:
        graph = (await ctx.graphs.for_runs(tx, [run_id]))[run_id]
        counts = await tx.run_node_counts(run_id, namespace)
        boxes: dict[str, NodeBox] = {}
        for node in graph.spec.nodes:
            found = counts.get(node.identifier, NodeCounts(statuses={}, fanout_members=0))
            box = NodeBox(node=node, counts=found, states=[], joins=[])
            if 0 < found.total <= SMALL_GROUP:
                box.states = await tx.run_states_page(
                    run_id, namespace, node.identifier, [], 0, SMALL_GROUP
                )
            if node.unites is not None and found.total == 0:  # where does its join stand?
                box.joins = await tx.opened_groups(run_id, node.unites.identifier, JOINS_SHOWN)
            boxes[node.identifier] = box
    return RunView(
        summary=summary,
        namespace=namespace,
        spec=graph.spec,
        revision=graph.version.revision,
        boxes=boxes,
    )


@dataclass(frozen=True)
class Registration:
    """Who last registered a node name in a namespace, and when (ms)."""

    runtime_name: str
    updated_at: int


async def _registration(tx: Tx, namespace: str, node_name: str) -> Registration | None:
    found = await tx.registered_nodes_for([(node_name, namespace)])
    row = found.get((node_name, namespace))
    return Registration(row["runtime_name"], row["updated_at"]) if row else None


@dataclass(frozen=True)
class NodeStates:
    """One page of a run's states of one node."""

    node: NodeTemplate
    statuses: list[str]  # the status filter; empty for all
    page: int
    size: int
    total: int
    states: list[StateBrief]
    joins: list[tuple[FaninGroup, list[StateBrief]]]  # a uniting node: open branches
    registration: Registration | None  # of the node, to explain waiting states
    now: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))


async def node_states(
    ctx: Context,
    namespace: str,
    run_id: str,
    identifier: str,
    statuses: list[str],
    page: int,
    size: int,
) -> NodeStates:
    """A page of a node's states in a run, and what a uniting node's joins wait for."""
    unknown = [s for s in statuses if s not in StateStatus.__members__]
    if unknown:
        raise InvalidRequest(f"Unknown status: {', '.join(unknown)}")
    if page < 1 or not 1 <= size <= MAX_GROUP_PAGE:
        raise InvalidRequest(f"page must be ≥ 1 and size between 1 and {MAX_GROUP_PAGE}")
    now = ctx.clock()
    async with ctx.db.read() as tx:
        graph = (await ctx.graphs.for_runs(tx, [run_id]))[run_id]
        node = graph.node(identifier)
        total = await tx.count_run_states(run_id, namespace, identifier, statuses)
        found = await tx.run_states_page(
            run_id, namespace, identifier, statuses, (page - 1) * size, size
        )
        registration = await _registration(tx, namespace, node.node_name)
        joins: list[tuple[FaninGroup, list[StateBrief]]] = []
        if node.unites is not None:
            for group in await tx.opened_groups(run_id, node.unites.identifier, JOINS_SHOWN):
                open_ones = await tx.open_descendants(
                    run_id, group.identifier, group.group_id, OPEN_BRANCHES_SHOWN
                )
                joins.append((group, open_ones))
    return NodeStates(
        node=node,
        statuses=statuses,
        page=page,
        size=size,
        total=total,
        states=found,
        joins=joins,
        registration=registration,
        now=now,
    )


@dataclass(frozen=True)
class StateDetails:
    state: StateRow
    attempts: list[StateBrief]
    registration: Registration | None  # of the state's node, to explain a wait
    now: int
    retryable: bool  # finished, not already retried, and its run not cancelled


async def state_details(
    ctx: Context, namespace: str, graph_name: str, run_id: str, state_id: str
) -> StateDetails:
    """One state with its payloads and attempts (400/404 like the v0 node details)."""
    state = await runs.node_details(ctx, namespace, graph_name, run_id, state_id)
    async with ctx.db.read() as tx:
        attempts = await tx.state_attempts(state, ATTEMPTS_SHOWN)
        registration = await _registration(tx, namespace, state.node_name)
        run = await tx.get_run(run_id)
    status = StateStatus(state.status)
    cancelled = run is not None and run["cancelled_at"] is not None
    return StateDetails(
        state=state,
        attempts=attempts,
        registration=registration,
        now=ctx.clock(),
        retryable=status in TERMINAL_STATUSES
        and status is not StateStatus.RETRY_CREATED
        and not cancelled,  # nothing starts again in a cancelled run
    )


# -- actions ------------------------------------------------------------------------


async def trigger(
    ctx: Context,
    namespace: str,
    graph_name: str,
    store: dict[str, str],
    inputs: dict[str, str],
    start_delay: int,
) -> str:
    """Start a run from the dashboard; returns its id."""
    return await runs.trigger(
        ctx, namespace, graph_name, store, inputs, start_delay, source="dashboard"
    )


async def cancel(ctx: Context, namespace: str, run_id: str) -> None:
    """Cancel a run (404 unknown, 409 finished; cancelling twice is harmless)."""
    await runs.cancel(ctx, namespace, run_id)


async def retry(ctx: Context, namespace: str, state_id: str) -> str:
    """Manually retry a finished state; returns the new attempt's id."""
    return await states.manual_retry(ctx, namespace, state_id, str(uuid.uuid4()))
