"""Use cases on runs: trigger, listing, run graph, node details, cron fires."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from state_manager.domain import cron
from state_manager.domain.ids import is_object_id, new_object_id
from state_manager.domain.models import RunStatus, StateStatus, TriggerStatus
from state_manager.errors import InvalidRequest, NotFound, StateManagerError
from state_manager.services import writes
from state_manager.services.context import Context
from state_manager.services.ops import Cancelled, CancelRun, RunRequest, Trigger
from state_manager.store.queries import GraphStateRow, StateRow

logger = logging.getLogger(__name__)


async def trigger(
    ctx: Context,
    namespace: str,
    graph_name: str,
    store: dict[str, str],
    inputs: dict[str, str],
    start_delay: int,
    source: str = "api",
) -> str:
    """Start a run: the run record, its store and the root state, in one transaction."""
    (run_id,) = await trigger_many(
        ctx, namespace, graph_name, [RunRequest(store, inputs, start_delay)], source
    )
    return run_id


async def trigger_many(
    ctx: Context,
    namespace: str,
    graph_name: str,
    runs: Sequence[RunRequest],
    source: str = "api",
) -> list[str]:
    """Start several runs of one graph in one transaction, all or none."""
    return await ctx.committer.submit(Trigger(namespace, graph_name, tuple(runs), source))


async def cancel(ctx: Context, namespace: str, run_id: str) -> Cancelled:
    """Cancel a run (see :class:`CancelRun`): 404 unknown, 409 finished, idempotent."""
    return await ctx.committer.submit(CancelRun(namespace, run_id))


# -- cron ---------------------------------------------------------------------------


async def fire_due_trigger(ctx: Context) -> bool:
    """Fire one due cron record, if any, and record the next fire time. True if one fired."""
    now = ctx.clock()
    retention = ctx.settings.trigger_retention_hours * 3_600_000
    async with ctx.db.read() as tx:
        due = await tx.next_trigger_time()
    if due is None or due > now:
        return False  # nothing to claim: no write transaction
    async with ctx.db.write() as tx:
        record = await tx.claim_due_trigger(now)
        if record is None:
            return False
        run_id: str | None = None
        error: str | None = None
        try:
            # Raises before writing anything when the run cannot start.
            (run_id,) = await writes.start_runs(
                ctx, tx, Trigger(record.namespace, record.graph_name, (RunRequest({}, {}),), "cron")
            )
        except StateManagerError as exc:
            error = exc.detail
        status = TriggerStatus.TRIGGERED if error is None else TriggerStatus.FAILED
        await tx.finish_trigger(record.id, status, now + retention, run_id, error)
        template = await tx.get_template(record.namespace, record.graph_name)
        still_declared = template is not None and any(
            t.get("value", {}).get("expression") == record.expression
            for t in template.spec.get("triggers", [])
        )
        if still_declared:
            # The next time strictly after now: after downtime a missed time fires once.
            after = datetime.fromtimestamp(max(now, record.trigger_time) / 1000, UTC)
            next_at = int(cron.next_fire(record.expression, after).timestamp() * 1000)
            await tx.insert_trigger(
                {
                    "id": new_object_id(),
                    "namespace": record.namespace,
                    "graph_name": record.graph_name,
                    "expression": record.expression,
                    "trigger_time": next_at,
                    "trigger_status": TriggerStatus.PENDING.value,
                    "expires_at": None,
                    "run_id": None,
                    "error": None,
                }
            )
    ctx.metrics.cron_fires.labels(status.value.lower()).inc()
    if run_id is not None:
        ctx.metrics.runs_triggered.labels(record.namespace, record.graph_name, "cron").inc()
    else:
        logger.warning(
            "cron trigger failed",
            extra={"graph": record.graph_name, "namespace": record.namespace, "error": error},
        )
    return True


async def purge_expired_triggers(ctx: Context) -> int:
    async with ctx.db.write() as tx:
        return await tx.delete_expired_triggers(ctx.clock())


# -- views --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    graph_name: str
    created_at: int
    counts: dict[str, int]
    cancelled_at: int | None = None

    def count(self, *statuses: StateStatus) -> int:
        return sum(self.counts.get(s.value, 0) for s in statuses)

    @property
    def success_count(self) -> int:
        return self.count(StateStatus.SUCCESS, StateStatus.PRUNED)

    @property
    def pending_count(self) -> int:
        return self.count(StateStatus.CREATED, StateStatus.QUEUED, StateStatus.EXECUTED)

    @property
    def errored_count(self) -> int:
        return self.count(StateStatus.ERRORED, StateStatus.NEXT_CREATED_ERROR)

    @property
    def retried_count(self) -> int:
        return self.count(StateStatus.RETRY_CREATED)

    @property
    def total_count(self) -> int:
        return sum(self.counts.values())

    @property
    def status(self) -> RunStatus:
        if self.cancelled_at is not None:
            return RunStatus.CANCELLED
        if self.pending_count > 0:
            return RunStatus.PENDING
        if self.errored_count > 0 or self.total_count == 0:
            return RunStatus.FAILED
        return RunStatus.SUCCESS


async def list_runs(
    ctx: Context, namespace: str, page: int, size: int
) -> tuple[int, list[RunSummary]]:
    async with ctx.db.read() as tx:
        total = await tx.count_runs(namespace)
        rows = await tx.list_runs(namespace, (page - 1) * size, size)
        counts = await tx.status_counts([row["run_id"] for row in rows])
    return total, [
        RunSummary(
            run_id=row["run_id"],
            graph_name=row["graph_name"],
            created_at=row["created_at"],
            counts=counts[row["run_id"]],
            cancelled_at=row["cancelled_at"],
        )
        for row in rows
    ]


async def run_summary(ctx: Context, namespace: str, run_id: str) -> RunSummary:
    """One run's status and its states counted by status; 404 for a run of another namespace."""
    async with ctx.db.read() as tx:
        run = await tx.get_run(run_id)
        if run is None or run["namespace"] != namespace:
            raise NotFound(f"Run {run_id} not found in namespace {namespace}")
        counts = await tx.status_counts([run_id])
    return RunSummary(
        run_id=run_id,
        graph_name=run["graph_name"],
        created_at=run["created_at"],
        counts=counts[run_id],
        cancelled_at=run["cancelled_at"],
    )


async def run_graph_states(
    ctx: Context, namespace: str, run_id: str
) -> tuple[list[GraphStateRow], RunStatus | None]:
    """A run's states without payloads, and the run's status (``None``: no such run)."""
    async with ctx.db.read() as tx:
        found = await tx.run_graph_states(run_id, namespace)
        run = await tx.get_run(run_id)
    if run is None or run["namespace"] != namespace:
        return found, None
    counts: dict[str, int] = {}
    for state in found:
        counts[state.status] = counts.get(state.status, 0) + 1
    summary = RunSummary(run_id, run["graph_name"], run["created_at"], counts, run["cancelled_at"])
    return found, summary.status


async def node_details(
    ctx: Context, namespace: str, graph_name: str, run_id: str, node_id: str
) -> StateRow:
    if not is_object_id(node_id):
        raise InvalidRequest(f"Invalid node ID format: {node_id}")
    async with ctx.db.read() as tx:
        state = await tx.get_state(node_id.lower())
    if (
        state is None
        or state.namespace != namespace
        or state.graph_name != graph_name
        or state.run_id != run_id
    ):
        raise NotFound(
            f"Node {node_id} not found in run {run_id} of graph {graph_name} "
            f"in namespace {namespace}"
        )
    return state


def summary_of(states: list[GraphStateRow]) -> dict[str, Any]:
    """Count per status, with every status present."""
    summary = {status.value: 0 for status in StateStatus}
    for state in states:
        summary[state.status] = summary.get(state.status, 0) + 1
    return summary
