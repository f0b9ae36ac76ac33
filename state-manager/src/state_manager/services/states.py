"""Use cases on single states: claim, report, signal, retry, secrets, lease expiry.

Every change goes through the committer (:mod:`state_manager.services.committer`):
each call builds an operation, and the operation is applied, in one transaction
shared with whatever else is being written at that moment, by
:mod:`state_manager.services.writes`. Every transition checks the state's status
under a lock, so two reports for one state can never both succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from state_manager.domain.ids import is_object_id
from state_manager.errors import NotFound, PayloadTooLarge
from state_manager.services.context import Context
from state_manager.services.ops import (
    Claim,
    Errored,
    ErroredResult,
    Executed,
    Heartbeat,
    LeaseExpired,
    ManualRetry,
    Op,
    Pruned,
    Requeued,
    StateOp,
)
from state_manager.store.contract import ClaimedRow, StateRow, Transaction

logger = logging.getLogger(__name__)


async def _load(tx: Transaction, namespace: str, state_id: str) -> StateRow:
    """The state ``state_id`` of ``namespace``; 404 for unknown, malformed or foreign ids."""
    state = await tx.get_state(state_id.lower()) if is_object_id(state_id) else None
    if state is None or state.namespace != namespace:
        raise NotFound("State not found")
    return state


# -- claiming ---------------------------------------------------------------------


async def enqueue(
    ctx: Context,
    namespace: str,
    node_names: Sequence[str],
    batch_size: int,
    wait_ms: int = 0,
    caller_gone: Callable[[], Awaitable[bool]] | None = None,
) -> list[ClaimedRow]:
    """Claim up to ``batch_size`` ready states, waiting up to ``wait_ms`` for one to appear.

    ``caller_gone`` is asked before every claim after a wait: a long poll whose client
    disconnected must not claim states nobody will receive.
    """
    if batch_size <= 0 or not node_names:
        return []
    batch_size = min(batch_size, ctx.settings.max_batch_size)
    wait_ms = max(0, min(wait_ms, ctx.settings.max_wait_ms))
    deadline = ctx.clock() + wait_ms
    waited = False
    while True:
        waiter = ctx.notifier.waiter(namespace)
        try:
            if waited and caller_gone is not None and await caller_gone():
                return []
            now = ctx.clock()
            claimed = await ctx.committer.submit(Claim(namespace, tuple(node_names), batch_size))
            if claimed or now >= deadline:
                return claimed
            async with ctx.db.read() as tx:
                next_at = await tx.next_claimable_at(namespace, node_names)
            # Another process may add work without a wake-up reaching us (SQLite shared
            # by several servers, a lost listener), so never sleep past a re-check.
            recheck = ctx.db.recheck_ms
            wake_at = min(deadline, now + recheck, next_at if next_at is not None else deadline)
            timeout = max(0.0, (wake_at - now) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            waited = True
        finally:
            ctx.notifier.discard(namespace, waiter)


async def exchange(
    ctx: Context,
    namespace: str,
    reports: Sequence[StateOp[Any]],
    claim: ClaimRequest | None = None,
    caller_gone: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[list[Any], list[ClaimedRow]]:
    """Apply several reports and claim in one transaction.

    Returns each report's outcome (a value, or the error refusing it) and the claimed
    states. When the claim finds nothing and ``claim.wait_ms`` allows, it then waits
    like :func:`enqueue` (the reports are committed before the wait).
    """
    outcomes: list[Any] = [None] * len(reports)
    ops: list[Op[Any]] = []
    positions: list[int] = []
    for position, report in enumerate(reports):
        if isinstance(report, Executed) and len(report.outputs) > ctx.settings.max_fanout:
            outcomes[position] = _too_many_outputs(ctx, report.outputs)
            continue
        ops.append(report)
        positions.append(position)
    wanted = claim is not None and claim.batch_size > 0 and bool(claim.nodes)
    if claim is not None and wanted:
        limit = min(claim.batch_size, ctx.settings.max_batch_size)
        ops.append(Claim(namespace, tuple(claim.nodes), limit))
    applied = await ctx.committer.submit_all(ops) if ops else []
    claimed: list[ClaimedRow] = []
    if wanted:
        last = applied.pop()
        if isinstance(last, BaseException):
            raise last
        claimed = last
    for position, outcome in zip(positions, applied, strict=True):
        outcomes[position] = outcome
    if claim is not None and wanted and not claimed and claim.wait_ms > 0:
        claimed = await enqueue(
            ctx, namespace, claim.nodes, claim.batch_size, claim.wait_ms, caller_gone
        )
    return outcomes, claimed


@dataclass(frozen=True)
class ClaimRequest:
    nodes: list[str]
    batch_size: int
    wait_ms: int = 0


# -- reports ----------------------------------------------------------------------


async def executed(
    ctx: Context, namespace: str, state_id: str, outputs: list[dict[str, Any]]
) -> None:
    """Record a node's outputs and create its successors in the same transaction."""
    check_fanout(ctx, outputs)
    await ctx.committer.submit(Executed(namespace, state_id, outputs))


def check_fanout(ctx: Context, outputs: list[dict[str, Any]]) -> None:
    """Refuse more outputs than the fan-out limit allows (413)."""
    if len(outputs) > ctx.settings.max_fanout:
        raise _too_many_outputs(ctx, outputs)


def _too_many_outputs(ctx: Context, outputs: list[dict[str, Any]]) -> PayloadTooLarge:
    limit = ctx.settings.max_fanout
    return PayloadTooLarge(f"{len(outputs)} outputs exceed the fan-out limit of {limit}")


async def errored(ctx: Context, namespace: str, state_id: str, error: str) -> ErroredResult:
    """Record a failure; create a delayed retry while the policy allows one."""
    return await ctx.committer.submit(Errored(namespace, state_id, error))


async def prune(ctx: Context, namespace: str, state_id: str, data: dict[str, Any]) -> int:
    """End a branch on purpose. Returns the state's ``enqueue_after``."""
    return await ctx.committer.submit(Pruned(namespace, state_id, data))


async def requeue_after(ctx: Context, namespace: str, state_id: str, delay_ms: int) -> int:
    """Hand a claimed state back, to be claimed again after ``delay_ms``."""
    return await ctx.committer.submit(Requeued(namespace, state_id, delay_ms))


async def heartbeat(ctx: Context, namespace: str, state_id: str) -> int:
    """Extend the lease of a claimed state; returns the new expiry (ms)."""
    return await ctx.committer.submit(Heartbeat(namespace, state_id))


async def manual_retry(ctx: Context, namespace: str, state_id: str, fanout_id: str) -> str:
    """Run a finished state's node again as a new state. Returns the new state's id."""
    return await ctx.committer.submit(ManualRetry(namespace, state_id, fanout_id))


async def expire_leases(ctx: Context, limit: int = 100) -> int:
    """Take back claimed states whose lease ran out; each counts as a failed attempt."""
    async with ctx.db.read() as tx:
        candidates = await tx.expired_leases(ctx.clock(), limit)
    if not candidates:
        return 0
    outcomes = await ctx.committer.submit_all([LeaseExpired(None, i) for i in candidates])
    return sum(1 for taken in outcomes if taken is True)


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
