"""The storage interface the services depend on, whichever database holds the data.

A :class:`Store` opens transactions; a :class:`Transaction` offers every query the
services run. The SQL backends implement them in :mod:`state_manager.store.database`
and :mod:`state_manager.store.queries`, MongoDB in :mod:`state_manager.store.mongo`
and :mod:`state_manager.store.mongo_queries`. Every implementation passes the same
contract suite (tests/store/test_store_contract.py).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from state_manager.domain.models import TriggerStatus, ValidationStatus
from state_manager.store.rows import (
    ClaimedRow,
    FaninGroup,
    GraphStateRow,
    LockedStates,
    NodeCounts,
    StateBrief,
    StateCore,
    StateRow,
    TemplateRow,
    TriggerKey,
    TriggerRow,
    VersionRow,
)


class ClaimQuery(NamedTuple):
    """The arguments of :meth:`Transaction.claim`."""

    namespace: str
    node_names: Sequence[str]
    limit: int
    now: int
    lease_until: int


class Transaction(abc.ABC):
    """Typed queries inside one transaction.

    Guarantees every backend keeps: what a write transaction did commits together or
    not at all; :meth:`lock_states` excludes every other locker of those states until
    the transaction ends; a claim never hands a state to two transactions; unique keys
    (retry key, fingerprint, cron fire time) are enforced by the database.
    """

    @abc.abstractmethod
    async def upsert_registered_node(self, values: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    async def list_registered_nodes(self, namespace: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def registered_nodes_for(
        self, pairs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any]]: ...

    @abc.abstractmethod
    async def list_namespaces(self) -> list[str]: ...

    @abc.abstractmethod
    async def get_template(self, namespace: str, name: str) -> TemplateRow | None: ...

    @abc.abstractmethod
    async def save_template(self, values: Mapping[str, Any]) -> TemplateRow:
        """Insert or replace a template by (namespace, name); bumps ``revision``."""

    @abc.abstractmethod
    async def list_templates(self, namespace: str) -> list[TemplateRow]: ...

    @abc.abstractmethod
    async def pending_templates(self, limit: int) -> list[TemplateRow]: ...

    @abc.abstractmethod
    async def finish_validation(
        self,
        template_id: str,
        revision: int,
        status: ValidationStatus,
        errors: list[str],
        version_id: str | None,
        now: int,
    ) -> bool:
        """Record a validation outcome unless the template changed meanwhile."""

    @abc.abstractmethod
    async def insert_version(self, values: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    async def get_version(self, version_id: str) -> VersionRow | None: ...

    @abc.abstractmethod
    async def get_version_by_revision(
        self, namespace: str, graph_name: str, revision: int
    ) -> VersionRow | None: ...

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def get_store(self, run_id: str) -> dict[str, str]: ...

    @abc.abstractmethod
    async def get_stores(self, run_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """The stores of several runs (a run without entries maps to ``{}``)."""

    @abc.abstractmethod
    async def run_versions(self, run_ids: Iterable[str]) -> dict[str, str]:
        """The graph version each of these runs is pinned to."""

    @abc.abstractmethod
    async def insert_runs(
        self, rows: Sequence[Mapping[str, Any]], stores: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert run records and their store entries (``run_id``, ``key``, ``value``)."""

    @abc.abstractmethod
    async def count_runs(self, namespace: str) -> int: ...

    @abc.abstractmethod
    async def list_runs(self, namespace: str, offset: int, limit: int) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def status_counts(self, run_ids: Sequence[str]) -> dict[str, dict[str, int]]: ...

    @abc.abstractmethod
    async def insert_states(self, rows: Sequence[Mapping[str, Any]]) -> None: ...

    @property
    @abc.abstractmethod
    def work_namespaces(self) -> set[str]:
        """Namespaces where this transaction left work claimable (for wake-ups)."""

    @abc.abstractmethod
    async def get_state(self, state_id: str) -> StateRow | None: ...

    @abc.abstractmethod
    async def get_states(self, state_ids: Iterable[str]) -> dict[str, StateRow]: ...

    @abc.abstractmethod
    async def lock_states(self, state_ids: Iterable[str]) -> LockedStates:
        """The states ``state_ids`` (those that exist), locked until the transaction ends,
        and which of their runs are cancelled. Every change to a run's states starts
        here: a cancellation committing meanwhile either waits for this transaction or
        makes it see the run cancelled."""

    @abc.abstractmethod
    async def update_states(self, changes: Sequence[Mapping[str, Any]]) -> None:
        """Write changes to several locked states. Each change holds ``id``,
        ``namespace`` and the columns it sets, all among ``MUTABLE_STATE_COLUMNS``."""

    async def write_states(
        self, changes: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """:meth:`update_states` with ``changes``, then :meth:`insert_states` with
        ``rows``: a batch's writes, which a store may send together (so at most one
        change per state, and no new state among those changed)."""
        await self.update_states(changes)
        await self.insert_states(rows)

    @abc.abstractmethod
    async def insert_states_unless_exist(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Insert states, skipping any a unique key (retry key, fingerprint) already holds."""

    @abc.abstractmethod
    async def state_exists(
        self, run_id: str, identifier: str, retry_count: int, fanout_id: str
    ) -> bool:
        """Whether the retry key (run, identifier, retry count, fan-out id) is taken."""

    @abc.abstractmethod
    async def claim(
        self, namespace: str, node_names: Sequence[str], limit: int, now: int, lease_until: int
    ) -> list[ClaimedRow]:
        """Atomically move up to ``limit`` claimable states to QUEUED, oldest first."""

    async def lock_and_claim(
        self, state_ids: Iterable[str], claim: ClaimQuery
    ) -> tuple[LockedStates, list[ClaimedRow]]:
        """:meth:`lock_states`, then :meth:`claim`: the first statements of a batch that
        reports and claims, which a store may send together."""
        return await self.lock_states(state_ids), await self.claim(*claim)

    @abc.abstractmethod
    async def next_claimable_at(self, namespace: str, node_names: Sequence[str]) -> int | None:
        """The earliest ``enqueue_after`` among waiting states of these nodes."""

    @abc.abstractmethod
    async def expired_leases(self, now: int, limit: int) -> list[str]: ...

    @abc.abstractmethod
    async def run_graph_states(self, run_id: str, namespace: str) -> list[GraphStateRow]:
        """Every state of a run, oldest first, without payloads."""

    @abc.abstractmethod
    async def run_states(self, run_id: str, namespace: str) -> list[StateRow]: ...

    @abc.abstractmethod
    async def count_active_states(self) -> dict[tuple[str, str, str], int]:
        """Count waiting (CREATED) and claimed (QUEUED) states by (namespace, node_name,
        status), for metrics. Both are read from partial indexes, so the cost follows
        the work in flight, not the history kept."""

    @abc.abstractmethod
    async def claimable_backlog(self, now: int) -> dict[tuple[str, str], int]: ...

    @abc.abstractmethod
    async def create_groups(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Open fan-in groups (``group_id``, ``run_id``, ``identifier``), counters at zero."""

    @abc.abstractmethod
    async def adjust_group(
        self, group_id: str, pending: int, failed: int
    ) -> tuple[int, int] | None:
        """Add to a group's counters and return them (pending, failed) after the change."""

    @abc.abstractmethod
    async def delete_pending_triggers(self, namespace: str, graph_name: str) -> None: ...

    @abc.abstractmethod
    async def insert_trigger(self, values: Mapping[str, Any]) -> bool: ...

    @abc.abstractmethod
    async def next_trigger_time(self) -> int | None:
        """When the earliest pending cron record is due (ms), if there is one."""

    @abc.abstractmethod
    async def claim_due_trigger(self, now: int) -> TriggerRow | None: ...

    @abc.abstractmethod
    async def finish_trigger(
        self,
        trigger_id: str,
        status: TriggerStatus,
        expires_at: int,
        run_id: str | None,
        error: str | None,
    ) -> None: ...

    @abc.abstractmethod
    async def list_triggers(self, namespace: str, graph_name: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def delete_expired_triggers(self, now: int) -> int: ...

    @abc.abstractmethod
    async def run_node_counts(self, run_id: str, namespace: str) -> dict[str, NodeCounts]:
        """Per identifier of a run: its states counted by status, and how many of them
        are extra outputs of a fan-out (members of another state's group)."""

    @abc.abstractmethod
    async def run_states_page(
        self,
        run_id: str,
        namespace: str,
        identifier: str,
        statuses: Sequence[str],
        offset: int,
        limit: int,
    ) -> list[StateBrief]:
        """One page of a run's states of ``identifier`` (oldest first), without payloads."""

    @abc.abstractmethod
    async def count_run_states(
        self, run_id: str, namespace: str, identifier: str, statuses: Sequence[str]
    ) -> int: ...

    @abc.abstractmethod
    async def state_attempts(self, state: StateRow, limit: int) -> list[StateBrief]:
        """The attempts of ``state``'s task: states of its run with the same identifier and
        parents (automatic and manual retries), oldest first. Other members of a fan-out
        share both but are separate tasks, so they are left out."""

    @abc.abstractmethod
    async def opened_groups(self, run_id: str, identifier: str, limit: int) -> list[FaninGroup]:
        """Fan-in groups opened by states of ``identifier`` in a run, with their counters
        and how many states descend from each (the branches a join waits for)."""

    @abc.abstractmethod
    async def recent_triggers(
        self, namespace: str, graph_name: str, limit: int
    ) -> list[dict[str, Any]]:
        """The latest cron fire records of a graph (scheduled, fired or failed), oldest
        first; at most ``limit`` of the many that retention keeps."""

    @abc.abstractmethod
    async def open_descendants(
        self, run_id: str, identifier: str, group_id: str, limit: int
    ) -> list[StateBrief]:
        """States below a fan-in group that are still pending (what a join waits for)."""

    # -- idempotency keys of triggers -------------------------------------------------

    @abc.abstractmethod
    async def claim_trigger_keys(self, rows: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
        """Insert idempotency keys (``namespace``, ``idempotency_key``, ``request_hash``,
        ``run_id``, ``created_at``, ``expires_at``; each key at most once), taking over
        a row whose ``expires_at`` has passed. Returns the (namespace, key) pairs now
        held by these rows; the others belong to an earlier trigger."""

    @abc.abstractmethod
    async def trigger_keys(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], TriggerKey]:
        """The stored rows of these (namespace, key) pairs (those that exist)."""

    @abc.abstractmethod
    async def delete_trigger_keys(self, keys: Iterable[tuple[str, str]]) -> None: ...

    @abc.abstractmethod
    async def delete_expired_trigger_keys(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` keys whose ``expires_at`` has passed."""

    # -- cancellation -----------------------------------------------------------------

    @abc.abstractmethod
    async def lock_run(self, run_id: str) -> dict[str, Any] | None:
        """The run ``run_id``, excluding other cancellers of it until the transaction
        ends (and waiting for changes in flight on its states)."""

    @abc.abstractmethod
    async def cancel_run(self, run_id: str, now: int) -> int:
        """Mark the run cancelled and its pending states CANCELLED. Returns how many
        states were cancelled."""

    # -- retention --------------------------------------------------------------------

    @abc.abstractmethod
    async def runs_created_before(
        self, cutoff: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        """Up to ``limit`` (created_at, run_id) of runs created before ``cutoff``, oldest
        first, after the position ``after``."""

    @abc.abstractmethod
    async def finished_before(self, run_ids: Sequence[str], cutoff: int) -> dict[str, int]:
        """Those of ``run_ids`` with no pending state and no state changed since ``cutoff``
        (a run without states counts from its creation), each with its number of states."""

    @abc.abstractmethod
    async def lock_runs_for_deletion(self, run_ids: Sequence[str]) -> list[str]:
        """The runs among ``run_ids`` this transaction may delete, excluding other
        deleters (and reports on their states) until it ends."""

    @abc.abstractmethod
    async def delete_runs(self, run_ids: Sequence[str]) -> int:
        """Delete runs and every row that belongs to them. Returns the runs deleted."""


class Store(abc.ABC):
    """One database: transactions, schema migrations and cross-process wake-ups."""

    #: Short name of the backend, for logs ("sqlite", "postgresql", "mongodb").
    dialect: str
    #: Called with a namespace when work may have become claimable there (set by the app).
    on_work: Callable[[str], None] | None
    #: A long poll looks for work again at least this often (ms), in case a wake-up
    #: from another process was missed or cannot be delivered.
    recheck_ms: int
    #: Whether long write transactions hold up everyone else (SQLite's single writer,
    #: its statements on the event loop): bulk work such as retention then runs in
    #: small transactions.
    short_transactions: bool = False

    @abc.abstractmethod
    def write(self, *, batch: bool = False) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A read-write transaction, committed when the block exits without error.
        ``batch``: the committer's transaction (one at a time per process)."""

    @abc.abstractmethod
    def read(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A read-only transaction on a consistent snapshot."""

    @abc.abstractmethod
    async def current_version(self) -> int:
        """The schema version the database is at (0: never migrated)."""

    @abc.abstractmethod
    def latest_version(self) -> int:
        """The schema version this release needs."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Bring the schema up to date; returns the versions applied."""

    async def check_migrated(self) -> None:
        """Raise :class:`DatabaseNotMigrated` unless the schema is at the latest version."""
        from state_manager.errors import DatabaseNotMigrated

        current = await self.current_version()
        latest = self.latest_version()
        if current < latest:
            raise DatabaseNotMigrated(current=current, latest=latest)

    @abc.abstractmethod
    async def start_listening(self) -> None:
        """Forward wake-ups sent by other processes to :attr:`on_work`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every connection."""


__all__ = [
    "ClaimQuery",
    "ClaimedRow",
    "FaninGroup",
    "GraphStateRow",
    "LockedStates",
    "NodeCounts",
    "StateBrief",
    "StateCore",
    "StateRow",
    "Store",
    "TemplateRow",
    "Transaction",
    "TriggerKey",
    "TriggerRow",
    "VersionRow",
]
