"""Applying a batch of operations in one transaction, with a few statements per batch.

The committer hands :func:`run_batch` every operation queued at one moment. They take
effect as if applied one after the other in this order: the batch's first claim (unless
the batch cancels a run), changes to existing states (reports, signals, heartbeats,
manual retries, expired leases), new runs, run cancellations, then the other claims.
The first claim takes the states that were waiting and, up to its limit, the states
that the batch's reports and triggers create and it would find claimable (not retries
and fan-in successors, whose insert depends on what the database already holds): those
are written claimed. So a worker that reports and claims in one request gets the
successors of its reports at once, and a cancellation catches every state its batch
creates. Each operation gets its own outcome: a value, or the domain error a client
would get had it been alone. A refused operation writes nothing, so refusals never undo
the others.

Statements per batch, whatever its size: lock the target states together with the
first claim, look up the graphs, stores and ancestor outputs they need, update the
states and insert the new states, runs and store entries, open fan-in groups and adjust
each touched group once, and one claim statement per further claim operation. Triggers
with idempotency keys add one insert of their keys (and one read of the keys already
held) per round: triggers of one batch sharing a key go in successive rounds, as if they
had come one after the other.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from state_manager.domain import retry as retry_rules
from state_manager.domain import templating, timeouts
from state_manager.domain.buckets import PENDING_STATUSES
from state_manager.domain.ids import is_object_id
from state_manager.domain.models import StateStatus, ValidationStatus
from state_manager.domain.transitions import ALREADY_RETRIED, refusal
from state_manager.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    RunCancelled,
    StateManagerError,
)
from state_manager.services.context import CompiledGraph, Context, retry_transient
from state_manager.services.ops import (
    Cancelled,
    CancelRun,
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
    RunRequest,
    StateOp,
    Trigger,
)
from state_manager.services.progress import (
    GroupLedger,
    Resolver,
    derived_row,
    settle_groups,
    state_row,
    successor_rows,
)
from state_manager.store.contract import (
    ClaimedRow,
    ClaimQuery,
    StateCore,
    TemplateRow,
    Transaction,
)

logger = logging.getLogger(__name__)

# Policies without max_delay can ask for astronomically long waits; a year is the most we keep.
MAX_RETRY_DELAY_MS = 365 * 24 * 3_600_000


@retry_transient
async def run_batch(ctx: Context, ops: Sequence[Op[Any]]) -> list[Any]:
    """Apply ``ops`` in one transaction and return their outcomes once it has committed."""
    batch = _Batch(ctx, ctx.clock())
    async with ctx.db.write(batch=True) as tx:
        outcomes = await batch.apply(tx, ops)
    for effect in batch.after_commit:
        effect()
    return outcomes


async def start_runs(ctx: Context, tx: Transaction, op: Trigger) -> list[str]:
    """Start runs inside the caller's transaction (cron); raises before writing anything
    when one cannot start."""
    batch = _Batch(ctx, ctx.clock())
    template = await tx.get_template(op.namespace, op.graph_name)
    run_ids = await batch.plan_runs(tx, op, template)
    await batch.write(tx)
    return run_ids


def _change(state: StateCore, **values: Any) -> dict[str, Any]:
    """A change to ``state`` (``values``: the columns it sets), ready for ``update_states``."""
    return {**values, "id": state.id, "namespace": state.namespace}


@dataclass
class _Accepted:
    """A state operation that passed its checks, with the state it applies to."""

    index: int
    op: StateOp[Any]
    state: StateCore


@dataclass
class _Batch:
    """What one batch will write, gathered before any of it is written."""

    ctx: Context
    now: int
    graphs: dict[str, CompiledGraph] = field(default_factory=dict)
    updates: list[dict[str, Any]] = field(default_factory=list)
    inserts: list[dict[str, Any]] = field(default_factory=list)
    # New states that a unique key may already hold, each with what to do once it is known.
    optional: list[tuple[dict[str, Any], Callable[[bool], None]]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    stores: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    opened: set[str] = field(default_factory=set)
    ledger: GroupLedger = field(default_factory=GroupLedger)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    early: _EarlyClaim | None = None

    async def apply(self, tx: Transaction, ops: Sequence[Op[Any]]) -> list[Any]:
        outcomes: list[Any] = [None] * len(ops)
        self.early = self._early_claim(ops)
        state_ops = [(i, op) for i, op in enumerate(ops) if isinstance(op, StateOp)]
        if state_ops:
            await self._change_states(tx, state_ops, outcomes)
        elif self.early is not None:
            self.early.claimed = await tx.claim(*self.early.query)
        triggers = [(i, op) for i, op in enumerate(ops) if isinstance(op, Trigger)]
        if triggers:
            await self._start_runs(tx, triggers, outcomes)
        if self.early is not None:
            self._hand_over(self.early)
        await self.write(tx)
        for index, op in enumerate(ops):
            if isinstance(op, CancelRun):
                try:
                    outcomes[index] = await self._cancel(tx, op)
                except StateManagerError as exc:
                    outcomes[index] = exc
        for index, op in enumerate(ops):
            if not isinstance(op, Claim):
                continue
            if self.early is not None and index == self.early.index:
                outcomes[index] = self.early.claimed
            else:
                outcomes[index] = await self._claim(tx, op)
        return outcomes

    def lease_until(self, claimed_at: int, timeout_ms: int | None) -> int:
        """When the lease of a state claimed at ``claimed_at`` ends if granted or renewed
        now. Every path that claims a state or renews its lease uses this one rule
        (:func:`state_manager.domain.timeouts.lease_until`)."""
        lease_ms = self.ctx.settings.lease_seconds * 1000
        return timeouts.lease_until(self.now, lease_ms, claimed_at, timeout_ms)

    async def write(self, tx: Transaction) -> None:
        """Write everything gathered, then settle the fan-in groups it touched."""
        if self.optional:
            inserted = await tx.insert_states_unless_exist([row for row, _ in self.optional])
            for row, then in self.optional:
                then(row["id"] in inserted)
        await tx.insert_runs(self.runs, self.stores)
        await tx.write_states(self.updates, self.inserts)
        await tx.create_groups(self.groups)
        await settle_groups(tx, self.graphs, self.ledger, self.now, opened=self.opened)

    # -- changes to existing states ---------------------------------------------------

    async def _change_states(
        self, tx: Transaction, items: list[tuple[int, StateOp[Any]]], outcomes: list[Any]
    ) -> None:
        ids = [op.state_id.lower() for _, op in items if is_object_id(op.state_id)]
        if self.early is not None:
            locked, self.early.claimed = await tx.lock_and_claim(ids, self.early.query)
        else:
            locked = await tx.lock_states(ids)
        found, cancelled = locked.states, locked.cancelled_runs
        accepted: list[_Accepted] = []
        for index, op in items:
            state = found.get(op.state_id.lower()) if is_object_id(op.state_id) else None
            if state is None or op.namespace not in (None, state.namespace):
                outcomes[index] = False if isinstance(op, LeaseExpired) else _not_found()
                continue
            if state.run_id in cancelled:
                outcomes[index] = self._refuse_cancelled(state, op)
                continue
            problem = refusal(op.change, StateStatus(state.status))
            if isinstance(op, LeaseExpired):
                lease = state.lease_expires_at
                if problem is not None or lease is None or lease >= self.now:
                    outcomes[index] = False  # reported, re-enqueued or extended meanwhile
                    continue
            elif problem is not None:
                outcomes[index] = InvalidRequest(problem)
                continue
            accepted.append(_Accepted(index, op, state))
        if not accepted:
            return
        self.graphs.update(await self.ctx.graphs.for_runs(tx, {a.state.run_id for a in accepted}))
        executed = [a for a in accepted if isinstance(a.op, Executed)]
        if executed:
            await self._executed(tx, executed, outcomes)
        for item in accepted:
            op, state = item.op, item.state
            if isinstance(op, Errored):
                outcomes[item.index] = self._fail(state, op.error)
                self._count_report(state, "errored")
            elif isinstance(op, LeaseExpired):
                if timeouts.timed_out(self.now, state.claimed_at, state.timeout_ms):
                    assert state.timeout_ms is not None
                    error = timeouts.timeout_error(state.timeout_ms)
                else:
                    error = f"Lease expired: no report within {self.ctx.settings.lease_seconds} s"
                self._fail(state, error)
                outcomes[item.index] = True
                self.after_commit.append(functools.partial(self._lease_expired, state))
            elif isinstance(op, Pruned):
                outcomes[item.index] = self._prune(state, op.data)
            elif isinstance(op, Requeued):
                outcomes[item.index] = self._requeue(state, op.delay_ms)
            elif isinstance(op, Heartbeat):
                claimed_at = self.now if state.claimed_at is None else state.claimed_at
                until = self.lease_until(claimed_at, state.timeout_ms)
                self.updates.append(_change(state, lease_expires_at=until))
                outcomes[item.index] = until
            elif isinstance(op, ManualRetry):
                await self._manual_retry(tx, item, op, outcomes)

    def _refuse_cancelled(self, state: StateCore, op: StateOp[Any]) -> Any:
        """The outcome of ``op`` on a state of a cancelled run: nothing goes on. A state
        still pending (one a cancellation skipped while it was locked) becomes CANCELLED."""
        if StateStatus(state.status) in PENDING_STATUSES:
            self.updates.append(
                _change(
                    state,
                    status=StateStatus.CANCELLED.value,
                    lease_expires_at=None,
                    updated_at=self.now,
                )
            )
        if isinstance(op, LeaseExpired):
            return StateStatus(state.status) in PENDING_STATUSES
        return RunCancelled(state.run_id)

    async def _executed(self, tx: Transaction, items: list[_Accepted], outcomes: list[Any]) -> None:
        """Record outputs, create fan-out siblings and every successor with its inputs."""
        resolver = Resolver(tx)
        wants = []
        for item in items:
            graph = self.graphs[item.state.run_id]
            templates = [
                template
                for successor in graph.edge_successors(item.state.identifier)
                for template in graph.parsed_inputs[successor.identifier].values()
            ]
            wants.append((item.state.run_id, templates, item.state.parents))
        await resolver.preload(wants)
        for item in items:
            assert isinstance(item.op, Executed)
            state, outputs = item.state, item.op.outputs
            graph = self.graphs[state.run_id]
            members = _members(state, outputs, graph, self.now)
            status, error = StateStatus.SUCCESS, None
            try:
                children = [
                    row for m in members for row in successor_rows(graph, resolver, m, self.now)
                ]
            except templating.TemplateError as exc:
                status = StateStatus.NEXT_CREATED_ERROR
                error = f"Could not create next states: {exc}"
                children = []
            for member in members[1:]:
                member["status"] = status.value
                member["error"] = error
            self.updates.append(
                _change(
                    state,
                    status=status.value,
                    outputs=outputs[0] if outputs else {},
                    error=error,
                    lease_expires_at=None,
                    updated_at=self.now,
                )
            )
            self.inserts += members[1:]
            self.inserts += children
            self.ledger.add(state.groups, StateStatus.QUEUED, status)
            for _sibling in members[1:]:
                self.ledger.add(state.groups, None, status)
            if state.identifier in graph.uniting_by_target and status is StateStatus.SUCCESS:
                self.groups.append(
                    {"group_id": state.id, "run_id": state.run_id, "identifier": state.identifier}
                )
                self.ledger.open(state.id, depth=len(state.groups))
                self.opened.add(state.id)
            for child in children:
                self.ledger.add(child["groups"], None, StateStatus.CREATED)
            outcomes[item.index] = None
            self._count_report(state, "executed")

    def _fail(self, state: StateCore, error: str) -> ErroredResult:
        """End an attempt in failure; create a delayed retry while the policy allows one."""
        graph = self.graphs[state.run_id]
        policy = graph.spec.retry_policy
        retry_created = False
        if state.retry_count < policy.max_retries:
            attempt = state.retry_count + 1
            delay = min(retry_rules.delay_ms(policy, attempt), MAX_RETRY_DELAY_MS)
            retry = derived_row(
                state,
                graph,
                now=self.now,
                enqueue_after=self.now + delay,
                retry_count=attempt,
                fanout_id=state.fanout_id,
            )

            def inserted(new: bool, retry: dict[str, Any] = retry) -> None:
                if new:
                    self.ledger.add(retry["groups"], None, StateStatus.CREATED)
                    metric = self.ctx.metrics.child(
                        self.ctx.metrics.retries, state.namespace, state.node_name
                    )
                    self.after_commit.append(metric.inc)

            self.optional.append((retry, inserted))
            retry_created = True  # inserted now, or already there from an earlier report
        status = StateStatus.RETRY_CREATED if retry_created else StateStatus.ERRORED
        self.updates.append(
            _change(
                state, status=status.value, error=error, lease_expires_at=None, updated_at=self.now
            )
        )
        self.ledger.add(state.groups, StateStatus.QUEUED, status)
        return ErroredResult(status=status, retry_created=retry_created)

    def _prune(self, state: StateCore, data: dict[str, Any]) -> int:
        self.updates.append(
            _change(
                state,
                status=StateStatus.PRUNED.value,
                data=data,
                lease_expires_at=None,
                updated_at=self.now,
            )
        )
        self.ledger.add(state.groups, StateStatus.QUEUED, StateStatus.PRUNED)
        self._count_report(state, "pruned")
        return state.enqueue_after

    def _requeue(self, state: StateCore, delay_ms: int) -> int:
        enqueue_at = self.now + delay_ms
        self.updates.append(
            _change(
                state,
                status=StateStatus.CREATED.value,
                enqueue_after=enqueue_at,
                lease_expires_at=None,
                claimed_at=None,
                updated_at=self.now,
            )
        )
        metrics = self.ctx.metrics
        metric = metrics.child(metrics.reports, state.namespace, state.node_name, "requeued")
        self.after_commit.append(metric.inc)
        return enqueue_at

    async def _manual_retry(
        self, tx: Transaction, item: _Accepted, op: ManualRetry, outcomes: list[Any]
    ) -> None:
        state = item.state
        before = StateStatus(state.status)
        retry = derived_row(
            state,
            self.graphs[state.run_id],
            now=self.now,
            fanout_id=op.fanout_id,
            manual_retry_fanout_id=op.fanout_id,
        )
        if await tx.state_exists(state.run_id, state.identifier, 0, op.fanout_id):
            outcomes[item.index] = Conflict("Duplicate retry state detected")
            return
        if before is StateStatus.RETRY_CREATED:
            outcomes[item.index] = InvalidRequest(ALREADY_RETRIED)
            return

        def inserted(new: bool) -> None:
            if not new:  # another server inserted it meanwhile
                outcomes[item.index] = Conflict("Duplicate retry state detected")
                return
            self.updates.append(
                _change(state, status=StateStatus.RETRY_CREATED.value, updated_at=self.now)
            )
            self.ledger.add(retry["groups"], None, StateStatus.CREATED)
            self.ledger.add(state.groups, before, StateStatus.RETRY_CREATED)
            outcomes[item.index] = str(retry["id"])

        self.optional.append((retry, inserted))

    def _count_report(self, state: StateCore, kind: str) -> None:
        metrics = self.ctx.metrics
        counter = metrics.child(metrics.reports, state.namespace, state.node_name, kind)
        self.after_commit.append(counter.inc)
        if state.claimed_at is not None:
            seconds = (self.now - state.claimed_at) / 1000
            histogram = metrics.child(metrics.transition_seconds, state.namespace, state.node_name)
            self.after_commit.append(lambda: histogram.observe(seconds))

    def _lease_expired(self, state: StateCore) -> None:
        self.ctx.metrics.lease_expiries.labels(state.namespace, state.node_name).inc()
        logger.warning(
            "lease expired",
            extra={"state_id": state.id, "namespace": state.namespace, "node": state.node_name},
        )

    # -- new runs -------------------------------------------------------------------------

    async def _start_runs(
        self, tx: Transaction, items: list[tuple[int, Trigger]], outcomes: list[Any]
    ) -> None:
        templates: dict[tuple[str, str], TemplateRow | None] = {}
        for _, op in items:
            key = (op.namespace, op.graph_name)
            if key not in templates:
                templates[key] = await tx.get_template(*key)
        waiting = items
        while waiting:
            # Triggers sharing an idempotency key go in separate rounds, one after the
            # other, so the later one finds the key the earlier one wrote (or released).
            current, waiting = _distinct_keys(waiting)
            await self._start_round(tx, current, templates, outcomes)

    async def _start_round(
        self,
        tx: Transaction,
        items: list[tuple[int, Trigger]],
        templates: dict[tuple[str, str], TemplateRow | None],
        outcomes: list[Any],
    ) -> None:
        """Start the runs of triggers whose idempotency keys are all distinct: claim the
        keys first (one statement; the unique key decides between concurrent callers),
        answer a key already held with its run, then plan the runs still to create."""
        ttl_ms = self.ctx.settings.idempotency_ttl_seconds * 1000
        run_ids: dict[int, list[str]] = {}
        claims: list[dict[str, Any]] = []
        for index, op in items:
            run_ids[index] = [new_run_id() for _ in op.runs]
            for run, run_id in zip(op.runs, run_ids[index], strict=True):
                if run.idempotency_key is not None:
                    claims.append(
                        {
                            "namespace": op.namespace,
                            "idempotency_key": run.idempotency_key,
                            "request_hash": run.request_hash,
                            "run_id": run_id,
                            "created_at": self.now,
                            "expires_at": self.now + ttl_ms,
                        }
                    )
        claimed = await tx.claim_trigger_keys(claims)
        earlier = await tx.trigger_keys(
            (c["namespace"], c["idempotency_key"])
            for c in claims
            if (c["namespace"], c["idempotency_key"]) not in claimed
        )
        released: list[tuple[str, str]] = []
        for index, op in items:
            ids = run_ids[index]
            mine: list[tuple[str, str]] = []
            fresh: list[int] = []
            error: StateManagerError | None = None
            for position, run in enumerate(op.runs):
                if run.idempotency_key is None:
                    fresh.append(position)
                    continue
                pair = (op.namespace, run.idempotency_key)
                if pair in claimed:
                    mine.append(pair)
                    fresh.append(position)
                    continue
                held = earlier.get(pair)
                if held is None:  # released meanwhile by a trigger that failed
                    error = Conflict(
                        f"Idempotency key {run.idempotency_key!r} is being released by "
                        "another request; retry"
                    )
                elif held.request_hash != run.request_hash:
                    error = Conflict(
                        f"Idempotency key {run.idempotency_key!r} was already used in "
                        f"namespace {op.namespace} for a different request (another graph "
                        "or body); use a new key for a new request"
                    )
                else:
                    ids[position] = held.run_id
                if error is not None:
                    break
            if error is None and fresh:
                try:
                    await self.plan_runs(
                        tx, op, templates[(op.namespace, op.graph_name)], ids, fresh
                    )
                except StateManagerError as exc:
                    error = exc
            if error is not None:
                outcomes[index] = error
                released += mine
                continue
            outcomes[index] = ids
            if fresh:
                metric = self.ctx.metrics.runs_triggered.labels(
                    op.namespace, op.graph_name, op.source
                )
                self.after_commit.append(functools.partial(metric.inc, len(fresh)))
        # Keys claimed for triggers that were refused point at runs that will not exist.
        await tx.delete_trigger_keys(released)

    async def plan_runs(
        self,
        tx: Transaction,
        op: Trigger,
        template: TemplateRow | None,
        run_ids: Sequence[str] | None = None,
        positions: Sequence[int] | None = None,
    ) -> list[str]:
        """Gather the records, stores and root states of the runs of ``op`` at
        ``positions`` (default: all), with ids ``run_ids`` (default: new ones); raise,
        gathering none of them, if one cannot start. Returns the ids, one per run."""
        if template is None:
            raise NotFound(f"Graph template {op.graph_name} not found in namespace {op.namespace}")
        if template.validation_status != ValidationStatus.VALID or template.version_id is None:
            raise InvalidRequest("Graph template is not valid")
        graph = await self.ctx.graphs.for_version(tx, template.version_id)
        ids = list(run_ids) if run_ids is not None else [new_run_id() for _ in op.runs]
        chosen = list(range(len(op.runs))) if positions is None else list(positions)
        roots: list[dict[str, str]] = []
        for position in chosen:
            run = op.runs[position]
            try:
                roots.append(root_inputs(graph, run.store, run.inputs))
            except InvalidRequest as exc:
                if len(op.runs) == 1:
                    raise
                raise InvalidRequest(f"Run {position + 1}: {exc.detail}") from None
        for position, inputs in zip(chosen, roots, strict=True):
            self._plan_run(op, graph, template.version_id, op.runs[position], inputs, ids[position])
        return ids

    def _plan_run(
        self,
        op: Trigger,
        graph: CompiledGraph,
        version_id: str,
        run: RunRequest,
        inputs: dict[str, str],
        run_id: str,
    ) -> None:
        self.runs.append(
            {
                "run_id": run_id,
                "namespace": op.namespace,
                "graph_name": op.graph_name,
                "version_id": version_id,
                "created_at": self.now,
            }
        )
        self.stores += [{"run_id": run_id, "key": k, "value": v} for k, v in run.store.items()]
        self.inserts.append(
            state_row(
                namespace=op.namespace,
                graph_name=op.graph_name,
                run_id=run_id,
                node=graph.root,
                inputs=inputs,
                parents={},
                groups={},
                now=self.now,
                enqueue_after=self.now + run.start_delay,
                timeout_ms=graph.timeout_ms(graph.root.identifier),
            )
        )
        self.ctx.graphs.remember_runs({run_id: version_id})

    # -- cancellations --------------------------------------------------------------------

    async def _cancel(self, tx: Transaction, op: CancelRun) -> Cancelled:
        run = await tx.lock_run(op.run_id)
        if run is None or run["namespace"] != op.namespace:
            raise NotFound(f"Run {op.run_id} not found in namespace {op.namespace}")
        if run["cancelled_at"] is None:
            counts = (await tx.status_counts([op.run_id]))[op.run_id]
            if not any(counts.get(status.value) for status in PENDING_STATUSES):
                failed = counts.get(StateStatus.ERRORED.value) or counts.get(
                    StateStatus.NEXT_CREATED_ERROR.value
                )
                outcome = "FAILED" if failed or not counts else "SUCCESS"
                raise Conflict(
                    f"Run {op.run_id} already finished ({outcome}); "
                    "only a run in progress can be cancelled"
                )
            await tx.cancel_run(op.run_id, self.now)
            cancelled_at = self.now
            logger.info("run cancelled", extra={"run_id": op.run_id, "namespace": op.namespace})
        else:
            cancelled_at = int(run["cancelled_at"])
        counts = (await tx.status_counts([op.run_id]))[op.run_id]
        return Cancelled(
            run_id=op.run_id,
            cancelled_at=cancelled_at,
            cancelled_states=counts.get(StateStatus.CANCELLED.value, 0),
        )

    # -- claims -----------------------------------------------------------------------------

    def _claim_query(self, op: Claim) -> ClaimQuery | None:
        """What ``op`` asks the store for; None when it asks for nothing."""
        limit = min(op.limit, self.ctx.settings.max_batch_size)
        if limit <= 0 or not op.node_names:
            return None
        lease_until = self.lease_until(self.now, None)
        return ClaimQuery(op.namespace, op.node_names, limit, self.now, lease_until)

    def _early_claim(self, ops: Sequence[Op[Any]]) -> _EarlyClaim | None:
        """The batch's first claim, to be applied first, unless the batch cancels a run
        (its claims then come after the cancellation, so they never take a state that
        the batch cancels)."""
        if any(isinstance(op, CancelRun) for op in ops):
            return None
        for index, op in enumerate(ops):
            if isinstance(op, Claim):
                query = self._claim_query(op)
                return None if query is None else _EarlyClaim(index, query)
        return None

    def _hand_over(self, early: _EarlyClaim) -> None:
        """Give the early claim, up to its limit, the new states of this batch it would
        find claimable (in the order they were made): they are inserted claimed. The
        waiting states it took get their leases cut to their timeouts in the same write."""
        self.updates += self._leases(early.claimed, early.query.lease_until)
        names = set(early.query.node_names)
        for row in self.inserts:
            if len(early.claimed) >= early.query.limit:
                break
            if (
                row["status"] == StateStatus.CREATED.value
                and row["namespace"] == early.query.namespace
                and row["node_name"] in names
                and row["enqueue_after"] <= self.now
            ):
                row["status"] = StateStatus.QUEUED.value
                row["claimed_at"] = self.now
                row["lease_expires_at"] = self.lease_until(self.now, row["timeout_ms"])
                early.claimed.append(ClaimedRow.from_row(row))
        self._count_claims(early.claimed)

    async def _claim(self, tx: Transaction, op: Claim) -> list[ClaimedRow]:
        query = self._claim_query(op)
        if query is None:
            return []
        claimed = await tx.claim(*query)
        await tx.update_states(self._leases(claimed, query.lease_until))
        self._count_claims(claimed)
        return claimed

    def _leases(self, claimed: Sequence[ClaimedRow], lease_until: int) -> list[dict[str, Any]]:
        """Lease changes for claimed states whose timeout ends before the lease would."""
        return [
            {"id": s.id, "namespace": s.namespace, "lease_expires_at": until}
            for s in claimed
            if s.timeout_ms is not None
            and (until := self.lease_until(self.now, s.timeout_ms)) != lease_until
        ]

    def _count_claims(self, claimed: Sequence[ClaimedRow]) -> None:
        metrics = self.ctx.metrics.states_claimed
        for state in claimed:
            self.after_commit.append(
                self.ctx.metrics.child(metrics, state.namespace, state.node_name).inc
            )


@dataclass
class _EarlyClaim:
    """A claim applied at the start of its batch (with the lock of the reported states,
    in one statement where the store allows): the states that were waiting, then new
    states of the batch handed over before they are written (:meth:`_Batch._hand_over`)."""

    index: int
    query: ClaimQuery
    claimed: list[ClaimedRow] = field(default_factory=list)


def _distinct_keys(
    items: list[tuple[int, Trigger]],
) -> tuple[list[tuple[int, Trigger]], list[tuple[int, Trigger]]]:
    """Split triggers into those whose idempotency keys no earlier one of the list
    uses (in order), and the rest."""
    taken: set[tuple[str, str]] = set()
    now: list[tuple[int, Trigger]] = []
    later: list[tuple[int, Trigger]] = []
    for index, op in items:
        keys = {(op.namespace, r.idempotency_key) for r in op.runs if r.idempotency_key}
        if keys & taken:
            later.append((index, op))
            continue
        taken |= keys
        now.append((index, op))
    return now, later


def _not_found() -> NotFound:
    return NotFound("State not found")


def _members(
    state: StateCore, outputs: list[dict[str, Any]], graph: CompiledGraph, now: int
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


def root_inputs(
    graph: CompiledGraph, store: dict[str, str], inputs: dict[str, str]
) -> dict[str, str]:
    """The root state's inputs: given values as literal text, the rest rendered from the
    store and its defaults. Raises :class:`InvalidRequest` for missing keys."""
    missing = [key for key in graph.spec.store_config.required_keys if key not in store]
    if missing:
        raise InvalidRequest(f"Missing store keys: {', '.join(missing)}")
    defaults = graph.spec.store_config.default_values

    def resolve(ref: templating.Placeholder) -> object:
        if isinstance(ref, templating.StoreRef):
            if ref.key in store:
                return store[ref.key]
            if ref.key in defaults:
                return defaults[ref.key]
            raise templating.TemplateError(f"store key '{ref.key}' has no value")
        raise templating.TemplateError(f"the root node cannot use '{ref}'")

    rendered: dict[str, str] = {}
    try:
        for name, template_input in graph.parsed_inputs[graph.root.identifier].items():
            # Values given at trigger time are literal text, not templates.
            rendered[name] = (
                inputs[name] if name in inputs else templating.render(template_input, resolve)
            )
    except templating.TemplateError as exc:
        raise InvalidRequest(f"Invalid input: {exc}") from None
    return rendered


def new_run_id() -> str:
    return str(uuid.uuid4())
