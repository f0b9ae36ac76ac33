"""Use cases on single states: claim, report, signal, retry, secrets, lease expiry.

Each public function is one transaction. Every transition is a compare-and-set on
the state's status, so two reports for one state can never both succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from state_manager.domain import retry as retry_rules
from state_manager.domain import templating
from state_manager.domain.buckets import TERMINAL_STATUSES
from state_manager.domain.ids import is_object_id
from state_manager.domain.models import StateStatus
from state_manager.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from state_manager.services.context import CompiledGraph, Context, retry_transient
from state_manager.services.progress import (
    GroupLedger,
    Resolver,
    derived_row,
    settle_groups,
    successor_rows,
)
from state_manager.store.queries import StateRow, Tx

logger = logging.getLogger(__name__)

QUEUED = (StateStatus.QUEUED,)
# Policies without max_delay can ask for astronomically long waits; a year is the most we keep.
MAX_RETRY_DELAY_MS = 365 * 24 * 3_600_000


async def _load(tx: Tx, namespace: str, state_id: str) -> StateRow:
    """The state ``state_id`` of ``namespace``; 404 for unknown, malformed or foreign ids."""
    state = await tx.get_state(state_id.lower()) if is_object_id(state_id) else None
    if state is None or state.namespace != namespace:
        raise NotFound("State not found")
    return state


async def _take_queued(tx: Tx, namespace: str, state_id: str, values: dict[str, Any]) -> StateRow:
    """Apply ``values`` to a QUEUED state in one statement; 404 or 400 explain a refusal."""
    state = None
    if is_object_id(state_id):
        state = await tx.transition(state_id.lower(), QUEUED, values, namespace=namespace)
    if state is None:
        await _load(tx, namespace, state_id)  # raises 404 when it does not exist here
        raise InvalidRequest("State is not queued")
    return state


def _seconds_since_claim(state: StateRow, now: int) -> float | None:
    return (now - state.claimed_at) / 1000 if state.claimed_at is not None else None


# -- claiming ---------------------------------------------------------------------


async def enqueue(
    ctx: Context,
    namespace: str,
    node_names: Sequence[str],
    batch_size: int,
    wait_ms: int = 0,
    caller_gone: Callable[[], Awaitable[bool]] | None = None,
) -> list[StateRow]:
    """Claim up to ``batch_size`` ready states, waiting up to ``wait_ms`` for one to appear.

    ``caller_gone`` is asked before every claim after a wait: a long poll whose client
    disconnected must not claim states nobody will receive.
    """
    if batch_size <= 0 or not node_names:
        return []
    batch_size = min(batch_size, ctx.settings.max_batch_size)
    wait_ms = max(0, min(wait_ms, ctx.settings.max_wait_ms))
    lease_ms = ctx.settings.lease_seconds * 1000
    deadline = ctx.clock() + wait_ms
    waited = False
    while True:
        waiter = ctx.notifier.waiter(namespace)
        try:
            if waited and caller_gone is not None and await caller_gone():
                return []
            now = ctx.clock()
            async with ctx.db.write() as tx:
                claimed = await tx.claim(namespace, node_names, batch_size, now, now + lease_ms)
            if claimed or now >= deadline:
                for state in claimed:
                    ctx.metrics.states_claimed.labels(namespace, state.node_name).inc()
                return claimed
            async with ctx.db.read() as tx:
                next_at = await tx.next_claimable_at(namespace, node_names)
            # Another process may add work without telling us (SQLite shared by
            # several servers), so never sleep longer than a short re-check.
            recheck = 5_000 if ctx.db.dialect == "postgresql" else 500
            wake_at = min(deadline, now + recheck, next_at if next_at is not None else deadline)
            timeout = max(0.0, (wake_at - now) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            waited = True
        finally:
            ctx.notifier.discard(namespace, waiter)


@retry_transient
async def heartbeat(ctx: Context, namespace: str, state_id: str) -> int:
    """Extend the lease of a claimed state; returns the new expiry (ms)."""
    now = ctx.clock()
    until = now + ctx.settings.lease_seconds * 1000
    async with ctx.db.write() as tx:
        await _take_queued(tx, namespace, state_id, {"lease_expires_at": until})
    return until


# -- reports ----------------------------------------------------------------------


@retry_transient
async def executed(
    ctx: Context, namespace: str, state_id: str, outputs: list[dict[str, Any]]
) -> None:
    """Record a node's outputs and create its successors in the same transaction."""
    if len(outputs) > ctx.settings.max_fanout:
        raise PayloadTooLarge(
            f"{len(outputs)} outputs exceed the fan-out limit of {ctx.settings.max_fanout}"
        )
    now = ctx.clock()
    async with ctx.db.write() as tx:
        state = await _take_queued(
            tx,
            namespace,
            state_id,
            {
                "status": StateStatus.SUCCESS.value,
                "outputs": outputs[0] if outputs else {},
                "lease_expires_at": None,
                "updated_at": now,
            },
        )
        graph = await ctx.graphs.for_run(tx, state.run_id)
        members = _members(state, outputs, graph, now)
        ledger = GroupLedger()
        status, error, children = await _successors(tx, graph, state, members, now)
        for member in members[1:]:
            member["status"] = status.value
            member["error"] = error
        if status is not StateStatus.SUCCESS:
            await tx.transition(
                state.id, (StateStatus.SUCCESS,), {"status": status.value, "error": error}
            )
        await tx.insert_states(members[1:] + children)
        ledger.add(state.groups, StateStatus.QUEUED, status)
        for _sibling in members[1:]:
            ledger.add(state.groups, None, status)
        opened: set[str] = set()
        if state.identifier in graph.uniting_by_target and status is StateStatus.SUCCESS:
            await tx.create_group(state.id, state.run_id, state.identifier, pending=0)
            ledger.open(state.id, depth=len(state.groups))
            opened.add(state.id)
        for child in children:
            ledger.add(child["groups"], None, StateStatus.CREATED)
        await settle_groups(tx, graph, ledger, now, opened=opened)
    ctx.metrics.reports.labels(namespace, state.node_name, "executed").inc()
    _observe(ctx, state, now)


def _members(
    state: StateRow, outputs: list[dict[str, Any]], graph: CompiledGraph, now: int
) -> list[dict[str, Any]]:
    """Rows for the executed state (first) and one sibling per extra output."""
    first = {
        "id": state.id,
        "namespace": state.namespace,
        "graph_name": state.graph_name,
        "run_id": state.run_id,
        "identifier": state.identifier,
        "parents": state.parents,
        "groups": state.groups,
        "group_id": state.id,
        "outputs": outputs[0] if outputs else {},
    }
    siblings = [
        derived_row(
            state, graph, now=now, status=StateStatus.EXECUTED, outputs=extra, group_id=state.id
        )
        for extra in outputs[1:]
    ]
    for sibling in siblings:
        sibling["claimed_at"] = state.claimed_at
    return [first, *siblings]


async def _successors(
    tx: Tx,
    graph: CompiledGraph,
    state: StateRow,
    members: list[dict[str, Any]],
    now: int,
) -> tuple[StateStatus, str | None, list[dict[str, Any]]]:
    """Render every successor; on any failure the report ends NEXT_CREATED_ERROR, no children."""
    node = graph.node(state.identifier)
    templates = [
        template
        for successor in node.successors()
        for template in graph.parsed_inputs[successor].values()
    ]
    resolver = Resolver(tx, graph, state.run_id)
    try:
        await resolver.preload(templates, state.parents)
        children = [row for m in members for row in successor_rows(graph, resolver, m, now)]
    except templating.TemplateError as exc:
        return StateStatus.NEXT_CREATED_ERROR, f"Could not create next states: {exc}", []
    return StateStatus.SUCCESS, None, children


def _observe(ctx: Context, state: StateRow, now: int) -> None:
    seconds = _seconds_since_claim(state, now)
    if seconds is not None:
        ctx.metrics.transition_seconds.labels(state.namespace, state.node_name).observe(seconds)


@dataclass(frozen=True)
class ErroredResult:
    status: StateStatus
    retry_created: bool


@retry_transient
async def errored(ctx: Context, namespace: str, state_id: str, error: str) -> ErroredResult:
    """Record a failure; create a delayed retry while the policy allows one."""
    now = ctx.clock()
    async with ctx.db.write() as tx:
        state = await _load(tx, namespace, state_id)
        if state.status != StateStatus.QUEUED:
            if state.status in (
                StateStatus.EXECUTED,
                StateStatus.SUCCESS,
                StateStatus.NEXT_CREATED_ERROR,
            ):
                raise InvalidRequest("State is already executed")
            raise InvalidRequest("State is not queued or executed")
        result = await _fail(ctx, tx, state, error, now)
    ctx.metrics.reports.labels(namespace, state.node_name, "errored").inc()
    _observe(ctx, state, now)
    return result


async def _fail(ctx: Context, tx: Tx, state: StateRow, error: str, now: int) -> ErroredResult:
    graph = await ctx.graphs.for_run(tx, state.run_id)
    policy = graph.spec.retry_policy
    ledger = GroupLedger()
    retry_created = False
    if state.retry_count < policy.max_retries:
        attempt = state.retry_count + 1
        retry = derived_row(
            state,
            graph,
            now=now,
            enqueue_after=now + min(retry_rules.delay_ms(policy, attempt), MAX_RETRY_DELAY_MS),
            retry_count=attempt,
            fanout_id=state.fanout_id,
        )
        if await tx.insert_state_unless_exists(retry):
            ledger.add(retry["groups"], None, StateStatus.CREATED)
            ctx.metrics.retries.labels(state.namespace, state.node_name).inc()
        retry_created = True  # inserted now, or already there from an earlier report
    status = StateStatus.RETRY_CREATED if retry_created else StateStatus.ERRORED
    updated = await tx.transition(
        state.id,
        QUEUED,
        {"status": status.value, "error": error, "lease_expires_at": None, "updated_at": now},
    )
    if updated is None:
        raise InvalidRequest("State is not queued")
    ledger.add(state.groups, StateStatus.QUEUED, status)
    await settle_groups(tx, graph, ledger, now)
    return ErroredResult(status=status, retry_created=retry_created)


@retry_transient
async def prune(ctx: Context, namespace: str, state_id: str, data: dict[str, Any]) -> int:
    """End a branch on purpose. Returns the state's ``enqueue_after``."""
    now = ctx.clock()
    async with ctx.db.write() as tx:
        state = await _take_queued(
            tx,
            namespace,
            state_id,
            {
                "status": StateStatus.PRUNED.value,
                "data": data,
                "lease_expires_at": None,
                "updated_at": now,
            },
        )
        graph = await ctx.graphs.for_run(tx, state.run_id)
        ledger = GroupLedger()
        ledger.add(state.groups, StateStatus.QUEUED, StateStatus.PRUNED)
        await settle_groups(tx, graph, ledger, now)
    ctx.metrics.reports.labels(namespace, state.node_name, "pruned").inc()
    _observe(ctx, state, now)
    return state.enqueue_after


@retry_transient
async def requeue_after(ctx: Context, namespace: str, state_id: str, delay_ms: int) -> int:
    """Hand a claimed state back, to be claimed again after ``delay_ms``."""
    now = ctx.clock()
    enqueue_at = now + delay_ms
    async with ctx.db.write() as tx:
        state = await _take_queued(
            tx,
            namespace,
            state_id,
            {
                "status": StateStatus.CREATED.value,
                "enqueue_after": enqueue_at,
                "lease_expires_at": None,
                "claimed_at": None,
                "updated_at": now,
            },
        )
    ctx.metrics.reports.labels(namespace, state.node_name, "requeued").inc()
    return enqueue_at


@retry_transient
async def manual_retry(ctx: Context, namespace: str, state_id: str, fanout_id: str) -> str:
    """Run a finished state's node again as a new state. Returns the new state's id."""
    now = ctx.clock()
    async with ctx.db.write() as tx:
        state = await _load(tx, namespace, state_id)
        before = StateStatus(state.status)
        if before not in TERMINAL_STATUSES:
            raise InvalidRequest(
                f"State is {before.value}; only a finished state can be retried manually"
            )
        graph = await ctx.graphs.for_run(tx, state.run_id)
        retry = derived_row(
            state, graph, now=now, fanout_id=fanout_id, manual_retry_fanout_id=fanout_id
        )
        if not await tx.insert_state_unless_exists(retry):
            raise Conflict("Duplicate retry state detected")
        if before is StateStatus.RETRY_CREATED:
            # Raising rolls the insert back: one retried attempt spawns one new attempt.
            raise InvalidRequest("State was already retried; retry its latest attempt instead")
        updated = await tx.transition(
            state.id, (before,), {"status": StateStatus.RETRY_CREATED.value, "updated_at": now}
        )
        if updated is None:
            raise Conflict("State changed while it was being retried; try again")
        ledger = GroupLedger()
        ledger.add(retry["groups"], None, StateStatus.CREATED)
        ledger.add(state.groups, before, StateStatus.RETRY_CREATED)
        await settle_groups(tx, graph, ledger, now)
    return str(retry["id"])


async def expire_leases(ctx: Context, limit: int = 100) -> int:
    """Take back claimed states whose lease ran out; each counts as a failed attempt.

    Each state is taken back in its own transaction, locking it before its fan-in
    groups like every report does, so expiry and reports never deadlock.
    """
    now = ctx.clock()
    async with ctx.db.read() as tx:
        candidates = await tx.expired_leases(now, limit)
    expired = 0
    for state_id in candidates:
        if await _expire_one(ctx, state_id, now):
            expired += 1
    return expired


@retry_transient
async def _expire_one(ctx: Context, state_id: str, now: int) -> bool:
    try:
        async with ctx.db.write() as tx:
            state = await tx.get_state(state_id)
            lease = state.lease_expires_at if state is not None else None
            if state is None or state.status != StateStatus.QUEUED or not lease or lease >= now:
                return False  # reported, re-enqueued or extended meanwhile
            seconds = ctx.settings.lease_seconds
            await _fail(ctx, tx, state, f"Lease expired: no report within {seconds} s", now)
    except InvalidRequest:
        return False  # a report won the race; the whole transaction was rolled back
    ctx.metrics.lease_expiries.labels(state.namespace, state.node_name).inc()
    logger.warning(
        "lease expired",
        extra={"state_id": state.id, "namespace": state.namespace, "node": state.node_name},
    )
    return True


# -- secrets ----------------------------------------------------------------------


async def secrets_for(ctx: Context, namespace: str, state_id: str) -> dict[str, str]:
    """The decrypted secrets a state's node declared when it registered."""
    async with ctx.db.read() as tx:
        state = await _load(tx, namespace, state_id)
        template = await tx.get_template(namespace, state.graph_name)
        if template is None:
            raise NotFound("Graph template not found")
        registered = await tx.registered_nodes_for([(state.node_name, namespace)])
    declared = registered.get((state.node_name, namespace), {}).get("secrets")
    names = template.secrets.keys() if declared is None else set(declared) & template.secrets.keys()
    return {name: ctx.box.decrypt(template.secrets[name]) for name in sorted(names)}
