"""Use cases on runs: trigger, listing, run graph, node details, cron fires."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from state_manager.domain import cron
from state_manager.domain.ids import is_object_id, new_object_id
from state_manager.domain.models import (
    RUN_PENDING_STATE_STATUSES,
    RunStatus,
    StateStatus,
    TriggerStatus,
)
from state_manager.errors import InvalidRequest, NotFound, StateManagerError
from state_manager.services import writes
from state_manager.services.context import Context
from state_manager.services.ops import Cancelled, CancelRun, RunRequest, Trigger
from state_manager.store.queries import GraphStateRow, StateRow

logger = logging.getLogger(__name__)


IDEMPOTENCY_KEY_MAX_LENGTH = 255


def run_request(
    graph_name: str,
    store: dict[str, str],
    inputs: dict[str, str],
    start_delay: int,
    idempotency_key: str | None = None,
) -> RunRequest:
    """A run to start; with an idempotency key, also the hash that tells a retry of the
    same request (graph name and canonical JSON of the body) from another one."""
    if idempotency_key is None:
        return RunRequest(store, inputs, start_delay)
    if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX_LENGTH or not all(
        " " <= c <= "~" for c in idempotency_key
    ):
        raise InvalidRequest(
            f"An idempotency key must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} printable "
            "ASCII characters"
        )
    body = {"store": store, "inputs": inputs, "start_delay": start_delay}
    canonical = orjson.dumps([graph_name, body], option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(canonical).hexdigest()
    return RunRequest(store, inputs, start_delay, idempotency_key, digest)


async def trigger(
    ctx: Context,
    namespace: str,
    graph_name: str,
    store: dict[str, str],
    inputs: dict[str, str],
    start_delay: int,
    source: str = "api",
    idempotency_key: str | None = None,
) -> str:
    """Start a run: the run record, its store and the root state, in one transaction.
    With ``idempotency_key``, the run an earlier trigger with that key started, if any."""
    run = run_request(graph_name, store, inputs, start_delay, idempotency_key)
    (run_id,) = await trigger_many(ctx, namespace, graph_name, [run], source)
    return run_id


async def trigger_many(
    ctx: Context,
    namespace: str,
    graph_name: str,
    runs: Sequence[RunRequest],
    source: str = "api",
) -> list[str]:
    """Start several runs of one graph in one transaction, all or none. A run whose
    idempotency key already started one is answered with that run instead."""
    keys = [run.idempotency_key for run in runs if run.idempotency_key is not None]
    if len(keys) != len(set(keys)):
        raise InvalidRequest("Each run of a request needs its own idempotency key")
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


# -- expiry and retention -------------------------------------------------------------

KEY_PURGE_BATCH = 1000
# A SQLite deletion holds the only write lock: smaller transactions let reports through
# (measured here: 2000 states of 20 per run took 85-135 ms to delete).
SQLITE_RETENTION_RUNS = 100
SQLITE_RETENTION_STATES = 1000


def _chunks(expired: dict[str, int], small: bool) -> list[list[str]]:
    """The runs to delete, one list per transaction: all at once, or (``small``) at most
    :data:`SQLITE_RETENTION_RUNS` runs and about :data:`SQLITE_RETENTION_STATES` states."""
    if not small:
        return [list(expired)] if expired else []
    chunks: list[list[str]] = []
    current: list[str] = []
    weight = 0
    for run_id, count in expired.items():
        if current and (
            len(current) >= SQLITE_RETENTION_RUNS or weight + count > SQLITE_RETENTION_STATES
        ):
            chunks.append(current)
            current, weight = [], 0
        current.append(run_id)
        weight += count
    if current:
        chunks.append(current)
    return chunks


async def purge_expired_trigger_keys(ctx: Context) -> int:
    """Delete up to :data:`KEY_PURGE_BATCH` expired idempotency keys; returns how many."""
    async with ctx.db.write() as tx:
        return await tx.delete_expired_trigger_keys(ctx.clock(), KEY_PURGE_BATCH)


@dataclass
class RetentionCursor:
    """Where retention's walk over old runs stands (oldest first; ``None``: the start).

    Runs created before the cutoff that cannot go yet (still pending, or finished too
    recently) are passed over; the next pass starts again from the oldest."""

    after: tuple[int, str] | None = None


async def delete_expired_runs(ctx: Context, cursor: RetentionCursor) -> int:
    """One step of retention: among the next ``retention_batch_runs`` runs created before
    the cutoff, delete those finished (no pending state) with no change since the
    cutoff, with every row that belongs to them. Returns how many were deleted.

    Finding them reads the oldest runs by ``ix_runs_created_at`` and their states by
    ``ix_states_run_id``: the cost follows the batch, not the history kept. Deleting
    locks the runs with SKIP LOCKED and their states on PostgreSQL, and checks again
    under those locks, so replicas share the work and a manual retry racing the
    deletion either lands first (the run stays) or finds the state gone.
    """
    days = ctx.settings.retention_days
    if days <= 0:
        return 0
    cutoff = ctx.clock() - days * 86_400_000
    limit = ctx.settings.retention_batch_runs
    if ctx.db.dialect == "sqlite":  # its statements run on the event loop: keep them short
        limit = min(limit, SQLITE_RETENTION_RUNS)
    async with ctx.db.read() as tx:
        candidates = await tx.runs_created_before(cutoff, cursor.after, limit)
        expired = await tx.finished_before([run_id for _, run_id in candidates], cutoff)
    cursor.after = candidates[-1] if len(candidates) == limit else None
    deleted = 0
    for chunk in _chunks(expired, ctx.db.dialect == "sqlite"):
        async with ctx.db.write() as tx:
            locked = await tx.lock_runs_for_deletion(chunk)
            deleted += await tx.delete_runs(list(await tx.finished_before(locked, cutoff)))
    if deleted:
        ctx.metrics.runs_deleted.inc(deleted)
        logger.info("retention deleted %d finished run(s)", deleted)
    return deleted


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
        return self.count(*RUN_PENDING_STATE_STATUSES)

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
