"""Every query of the state manager, written once for both SQL dialects.

A :class:`Tx` wraps one connection inside one transaction; services get one
from ``Database.write()`` or ``Database.read()`` and never see SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection

from state_manager.domain.models import (
    RUN_PENDING_STATE_STATUSES,
    StateStatus,
    TriggerStatus,
    ValidationStatus,
)
from state_manager.store import hot
from state_manager.store.contract import ClaimQuery, Transaction
from state_manager.store.rows import (
    MUTABLE_STATE_COLUMNS,
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
from state_manager.store.tables import (
    cron_triggers,
    fanin_groups,
    graph_templates,
    graph_versions,
    registered_nodes,
    runs,
    states,
    store_entries,
    trigger_keys,
)

Rows = CursorResult[*tuple[Any, ...]]


class HotDriver(Protocol):
    """A PostgreSQL driver connection taking hand-written SQL with ``$n`` parameters."""

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]: ...


def _ids(name: str = "ids") -> sa.BindParameter[Any]:
    return sa.bindparam(name, expanding=True)


# The statements of the hot paths (reports, claims, triggers), built once: building a
# SQLAlchemy statement costs more than running it on SQLite.
_STATES_BY_ID = sa.select(states).where(states.c.id.in_(_ids()))
_STATE_BY_ID = sa.select(states).where(states.c.id == sa.bindparam("id"))
_INSERT_STATES_UNLESS_EXIST = {
    dialect: module.insert(states).on_conflict_do_nothing().returning(states.c.id)
    for dialect, module in (("sqlite", sqlite_dialect), ("postgresql", pg_dialect))
}
_STORES = sa.select(store_entries).where(store_entries.c.run_id.in_(_ids()))
_RUN_VERSIONS = sa.select(runs.c.run_id, runs.c.version_id).where(runs.c.run_id.in_(_ids()))
_PENDING = sorted(s.value for s in RUN_PENDING_STATE_STATUSES)
_CREATE_GROUPS = fanin_groups.insert()


def _wrapped(sql: str, params: Any, error: sqlite3.Error) -> StatementError:
    """A driver error as SQLAlchemy would have raised it (a ``DBAPIError``), so callers see
    one kind of error whichever way a statement was sent (transient retries, 503s)."""
    return DBAPIError.instance(sql, params, error, sqlite3.Error)


class Tx(Transaction):
    """Typed queries over one connection in one transaction."""

    def __init__(
        self,
        connection: AsyncConnection | Connection,
        dialect: str,
        driver: HotDriver | None = None,
    ) -> None:
        self.connection = connection
        self.dialect = dialect
        # Where the hot statements go straight to asyncpg (the committer's batches).
        self.driver = driver
        # States this transaction made claimable and did not claim itself, by namespace:
        # who waits for work there must be woken once it commits.
        self._work: dict[str, set[str]] = {}

    # -- helpers ------------------------------------------------------------------

    async def _execute(self, statement: Any, parameters: Any = None) -> Rows:
        """Run one statement: awaited on PostgreSQL, directly on SQLite (see database.py)."""
        if isinstance(self.connection, AsyncConnection):
            result: Rows = await self.connection.execute(statement, parameters)
            return result
        return self.connection.execute(statement, parameters)

    async def _driver(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        """Run hand-written SQL (:mod:`state_manager.store.hot`) on the driver itself."""
        if self.driver is not None:
            return await self.driver.fetch(sql, params)
        if isinstance(self.connection, AsyncConnection):
            result = await self.connection.exec_driver_sql(sql, tuple(params))
            return list(result) if result.returns_rows else []
        try:
            cursor = self._sqlite().execute(sql, hot.sqlite_params(params))
            rows: list[Sequence[Any]] = cursor.fetchall()
        except sqlite3.Error as exc:
            raise _wrapped(sql, params, exc) from exc
        return rows

    async def _driver_rows(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run a row-wise statement of :mod:`hot` for every row of values: as one
        statement with one array per column where the dialect takes them
        (:data:`hot.ROW_ARRAYS`), else once per row."""
        if self.dialect in hot.ROW_ARRAYS:
            await self._driver(sql, hot.as_arrays(rows))
            return
        try:
            self._sqlite().executemany(sql, [hot.sqlite_params(row) for row in rows])
        except sqlite3.Error as exc:
            raise _wrapped(sql, rows, exc) from exc

    def _sqlite(self) -> sqlite3.Connection:
        assert isinstance(self.connection, Connection)
        driver = self.connection.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        return driver

    async def _scalar(self, statement: Any) -> Any:
        return (await self._execute(statement)).scalar()

    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    async def _insert_ignoring_conflict(self, table: sa.Table, values: Mapping[str, Any]) -> bool:
        """Insert one row unless it violates a unique constraint; True if inserted."""
        statement = self._insert(table).values(**values).on_conflict_do_nothing()
        result = await self._execute(statement.returning(sa.literal(1)))
        return result.first() is not None

    # -- registered nodes ---------------------------------------------------------

    async def upsert_registered_node(self, values: Mapping[str, Any]) -> None:
        statement = self._insert(registered_nodes).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=["namespace", "name"],
            set_={
                key: statement.excluded[key]
                for key in (
                    "runtime_name",
                    "runtime_namespace",
                    "inputs_schema",
                    "outputs_schema",
                    "secrets",
                    "updated_at",
                )
            },
        )
        await self._execute(statement)

    async def list_registered_nodes(self, namespace: str) -> list[dict[str, Any]]:
        result = await self._execute(
            sa.select(registered_nodes)
            .where(registered_nodes.c.namespace == namespace)
            .order_by(registered_nodes.c.name)
        )
        return [dict(row) for row in result.mappings()]

    async def registered_nodes_for(
        self, pairs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        wanted = set(pairs)
        if not wanted:
            return {}
        namespaces = {ns for _, ns in wanted}
        result = await self._execute(
            sa.select(registered_nodes).where(registered_nodes.c.namespace.in_(namespaces))
        )
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for row in result.mappings():
            key = (row["name"], row["namespace"])
            if key in wanted:
                found[key] = dict(row)
        return found

    async def list_namespaces(self) -> list[str]:
        result = await self._execute(
            sa.select(registered_nodes.c.namespace)
            .where(registered_nodes.c.namespace != "")
            .distinct()
            .order_by(registered_nodes.c.namespace)
        )
        return [row[0] for row in result]

    # -- graph templates ----------------------------------------------------------

    async def get_template(self, namespace: str, name: str) -> TemplateRow | None:
        rows = await self._driver(hot.template_by_name(self.dialect), [namespace, name])
        return TemplateRow(**hot.template_values(rows[0])) if rows else None

    async def save_template(self, values: Mapping[str, Any]) -> TemplateRow:
        """Insert or replace a template by (namespace, name); bumps ``revision``."""
        statement = self._insert(graph_templates).values(**values, revision=1)
        statement = statement.on_conflict_do_update(
            index_elements=["namespace", "name"],
            set_={
                "spec": statement.excluded.spec,
                "secrets": statement.excluded.secrets,
                "validation_status": statement.excluded.validation_status,
                "validation_errors": statement.excluded.validation_errors,
                "updated_at": statement.excluded.updated_at,
                "revision": graph_templates.c.revision + 1,
            },
        ).returning(*graph_templates.c)
        result = await self._execute(statement)
        return TemplateRow.from_row(result.mappings().one())

    async def list_templates(self, namespace: str) -> list[TemplateRow]:
        result = await self._execute(
            sa.select(graph_templates)
            .where(graph_templates.c.namespace == namespace)
            .order_by(graph_templates.c.name)
        )
        return [TemplateRow.from_row(row) for row in result.mappings()]

    async def pending_templates(self, limit: int) -> list[TemplateRow]:
        result = await self._execute(
            sa.select(graph_templates)
            .where(graph_templates.c.validation_status == ValidationStatus.PENDING.value)
            .order_by(graph_templates.c.updated_at)
            .limit(limit)
        )
        return [TemplateRow.from_row(row) for row in result.mappings()]

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
        values: dict[str, Any] = {
            "validation_status": status.value,
            "validation_errors": errors,
            "updated_at": now,
        }
        if version_id is not None:
            values["version_id"] = version_id
        result = await self._execute(
            graph_templates.update()
            .where(
                graph_templates.c.id == template_id,
                graph_templates.c.revision == revision,
                graph_templates.c.validation_status == ValidationStatus.PENDING.value,
            )
            .values(**values)
        )
        return bool(result.rowcount)

    async def insert_version(self, values: Mapping[str, Any]) -> None:
        await self._insert_ignoring_conflict(graph_versions, values)

    async def get_version(self, version_id: str) -> VersionRow | None:
        result = await self._execute(
            sa.select(graph_versions).where(graph_versions.c.id == version_id)
        )
        row = result.mappings().first()
        return VersionRow.from_row(row) if row else None

    async def get_version_by_revision(
        self, namespace: str, graph_name: str, revision: int
    ) -> VersionRow | None:
        result = await self._execute(
            sa.select(graph_versions).where(
                graph_versions.c.namespace == namespace,
                graph_versions.c.graph_name == graph_name,
                graph_versions.c.revision == revision,
            )
        )
        row = result.mappings().first()
        return VersionRow.from_row(row) if row else None

    # -- runs and stores ----------------------------------------------------------

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        result = await self._execute(sa.select(runs).where(runs.c.run_id == run_id))
        row = result.mappings().first()
        return dict(row) if row else None

    async def get_store(self, run_id: str) -> dict[str, str]:
        result = await self._execute(
            sa.select(store_entries.c.key, store_entries.c.value).where(
                store_entries.c.run_id == run_id
            )
        )
        return {row.key: row.value for row in result}

    async def get_stores(self, run_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """The stores of several runs (a run without entries maps to ``{}``)."""
        ids = list(set(run_ids))
        found: dict[str, dict[str, str]] = {run_id: {} for run_id in ids}
        if not ids:
            return found
        result = await self._execute(_STORES, {"ids": ids})
        for row in result:
            found[row.run_id][row.key] = row.value
        return found

    async def run_versions(self, run_ids: Iterable[str]) -> dict[str, str]:
        """The graph version each of these runs is pinned to."""
        ids = list(set(run_ids))
        if not ids:
            return {}
        result = await self._execute(_RUN_VERSIONS, {"ids": ids})
        return {row.run_id: row.version_id for row in result}

    async def insert_runs(
        self, rows: Sequence[Mapping[str, Any]], stores: Sequence[Mapping[str, Any]]
    ) -> None:
        """Insert run records and their store entries (``run_id``, ``key``, ``value``)."""
        for table, columns, values in (
            ("runs", hot.RUN_COLUMNS, rows),
            ("store_entries", hot.STORE_COLUMNS, stores),
        ):
            if values:
                await self._driver_rows(
                    hot.insert_rows(self.dialect, table, columns),
                    [tuple(value[c] for c in columns) for value in values],
                )

    async def lock_run(self, run_id: str) -> dict[str, Any] | None:
        """The run ``run_id``, locked until the transaction ends (waits for reports in
        flight on its states, see :meth:`lock_states`)."""
        result = await self._execute(
            sa.select(runs).where(runs.c.run_id == run_id).with_for_update()
        )
        row = result.mappings().first()
        return dict(row) if row else None

    async def cancel_run(self, run_id: str, now: int) -> int:
        """Mark the run cancelled and its pending states CANCELLED. States locked by
        a transaction in flight are skipped; their next report finds the run cancelled.
        Returns how many states were cancelled."""
        await self._execute(
            runs.update()
            .where(runs.c.run_id == run_id, runs.c.cancelled_at.is_(None))
            .values(cancelled_at=now)
        )
        pending = (
            sa.select(states.c.id)
            .where(states.c.run_id == run_id, states.c.status.in_(_PENDING))
            .with_for_update(skip_locked=True)
        )
        result = await self._execute(
            states.update()
            .where(states.c.id.in_(pending.scalar_subquery()))
            .values(status=StateStatus.CANCELLED.value, lease_expires_at=None, updated_at=now)
        )
        return int(result.rowcount or 0)

    async def count_runs(self, namespace: str) -> int:
        value = await self._scalar(
            sa.select(sa.func.count()).select_from(runs).where(runs.c.namespace == namespace)
        )
        return int(value or 0)

    async def list_runs(self, namespace: str, offset: int, limit: int) -> list[dict[str, Any]]:
        result = await self._execute(
            sa.select(runs)
            .where(runs.c.namespace == namespace)
            .order_by(runs.c.created_at.desc(), runs.c.run_id.desc())
            .offset(offset)
            .limit(limit)
        )
        return [dict(row) for row in result.mappings()]

    async def status_counts(self, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
        if not run_ids:
            return counts
        result = await self._execute(
            sa.select(states.c.run_id, states.c.status, sa.func.count())
            .where(states.c.run_id.in_(run_ids))
            .group_by(states.c.run_id, states.c.status)
        )
        for run_id, status, count in result:
            counts[run_id][status] = int(count)
        return counts

    # -- states -------------------------------------------------------------------

    async def insert_states(self, rows: Sequence[Mapping[str, Any]]) -> None:
        await self.write_states((), rows)

    @property
    def work_namespaces(self) -> set[str]:
        """Namespaces where this transaction left work claimable (for wake-ups)."""
        return {namespace for namespace, ids in self._work.items() if ids}

    def _note_work(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            if row.get("status") == StateStatus.CREATED.value:
                self._work.setdefault(row["namespace"], set()).add(row["id"])

    async def get_state(self, state_id: str) -> StateRow | None:
        result = await self._execute(_STATE_BY_ID, {"id": state_id})
        row = result.mappings().first()
        return StateRow.from_row(row) if row else None

    async def get_states(self, state_ids: Iterable[str]) -> dict[str, StateRow]:
        ids = list(set(state_ids))
        if not ids:
            return {}
        result = await self._execute(_STATES_BY_ID, {"ids": ids})
        return {row["id"]: StateRow.from_row(row) for row in result.mappings()}

    async def lock_states(self, state_ids: Iterable[str]) -> LockedStates:
        """The states ``state_ids`` (those that exist), locked until the transaction ends,
        and which of their runs are cancelled; one statement (:func:`hot.lock_states`).

        On PostgreSQL the rows are locked in id order, so two transactions locking
        overlapping sets never deadlock on them, and the runs are held (key share) until
        commit, so a cancellation (``FOR UPDATE`` of the run) waits for changes in
        flight and then sees every state they created; on SQLite the write transaction
        already excludes every other writer.
        """
        ids = sorted(set(state_ids))
        if not ids:
            return LockedStates({}, frozenset())
        sql = hot.lock_states(self.dialect, len(ids))
        return _locked(await self._driver(sql, hot.lock_params(self.dialect, ids)))

    async def lock_and_claim(
        self, state_ids: Iterable[str], claim: ClaimQuery
    ) -> tuple[LockedStates, list[ClaimedRow]]:
        """On PostgreSQL one statement (:func:`hot.lock_and_claim`)."""
        ids = sorted(set(state_ids))
        if self.dialect != "postgresql" or not ids:
            return await super().lock_and_claim(ids, claim)
        params = hot.claim_params(
            self.dialect,
            claim.now,
            claim.lease_until,
            claim.namespace,
            list(claim.node_names),
            claim.limit,
        )
        rows = await self._driver(hot.lock_and_claim(), [*params, ids])
        locked = _locked([row[1:] for row in rows if row[0] == 0])
        claimed = [ClaimedRow(**hot.claimed_from_core(row[1:])) for row in rows if row[0] == 1]
        return locked, self._claimed(claim.namespace, claimed)

    async def update_states(self, changes: Sequence[Mapping[str, Any]]) -> None:
        await self.write_states(changes, ())

    async def write_states(
        self, changes: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Change locked states (see :meth:`update_states`) and insert new ones: on
        PostgreSQL in one statement (:func:`hot.write_states`), elsewhere one statement
        per set of changed columns and one for the inserts."""
        shapes: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for change in changes:
            columns = tuple(c for c in MUTABLE_STATE_COLUMNS if c in change)
            shapes.setdefault(columns, []).append(hot.update_params(columns, change))
        new = [hot.state_params(row) for row in rows]
        if self.dialect in hot.ROW_ARRAYS:
            # One statement: a state changed twice in it would get either change.
            assert len({change["id"] for change in changes}) == len(changes)
            if shapes or new:
                params = [array for p in shapes.values() for array in hot.as_arrays(p)]
                if new:
                    params += hot.as_arrays(new)
                await self._driver(hot.write_states(tuple(shapes), bool(new)), params)
        else:
            for columns, values in shapes.items():
                await self._driver_rows(hot.update_states(self.dialect, columns), values)
            if new:
                statement = hot.insert_rows(self.dialect, "states", hot.STATE_COLUMNS)
                await self._driver_rows(statement, new)
        self._note_work(changes)
        self._note_work(rows)

    async def insert_states_unless_exist(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Insert states, skipping any a unique key (retry key, fingerprint) already holds.

        Returns the ids of the rows inserted.
        """
        if not rows:
            return set()
        statement = _INSERT_STATES_UNLESS_EXIST[self.dialect]
        result = await self._execute(statement, [dict(r) for r in rows])
        inserted = {row[0] for row in result}
        self._note_work(r for r in rows if r["id"] in inserted)
        return inserted

    async def state_exists(
        self, run_id: str, identifier: str, retry_count: int, fanout_id: str
    ) -> bool:
        """Whether the retry key (run, identifier, retry count, fan-out id) is taken."""
        value = await self._scalar(
            sa.select(states.c.id).where(
                states.c.run_id == run_id,
                states.c.identifier == identifier,
                states.c.retry_count == retry_count,
                states.c.fanout_id == fanout_id,
            )
        )
        return value is not None

    async def claim(
        self, namespace: str, node_names: Sequence[str], limit: int, now: int, lease_until: int
    ) -> list[ClaimedRow]:
        """Atomically move up to ``limit`` claimable states to QUEUED, oldest first."""
        names = list(node_names)
        rows = await self._driver(
            hot.claim(self.dialect, len(names)),
            hot.claim_params(self.dialect, now, lease_until, namespace, names, limit),
        )
        return self._claimed(namespace, [ClaimedRow(**hot.claimed_values(row)) for row in rows])

    def _claimed(self, namespace: str, claimed: list[ClaimedRow]) -> list[ClaimedRow]:
        """Claimed states in claim order; they are no longer work to wake anyone for."""
        claimed.sort(key=lambda s: (s.enqueue_after, s.id))
        self._work.get(namespace, set()).difference_update(s.id for s in claimed)
        return claimed

    async def next_claimable_at(self, namespace: str, node_names: Sequence[str]) -> int | None:
        """The earliest ``enqueue_after`` among waiting states of these nodes."""
        value = await self._scalar(
            sa.select(sa.func.min(states.c.enqueue_after)).where(
                states.c.namespace == namespace,
                states.c.status == StateStatus.CREATED.value,
                states.c.node_name.in_(list(node_names)),
            )
        )
        return int(value) if value is not None else None

    async def expired_leases(self, now: int, limit: int) -> list[str]:
        result = await self._execute(
            sa.select(states.c.id)
            .where(states.c.status == StateStatus.QUEUED.value, states.c.lease_expires_at < now)
            .order_by(states.c.lease_expires_at)
            .limit(limit)
        )
        return [row[0] for row in result]

    async def run_graph_states(self, run_id: str, namespace: str) -> list[GraphStateRow]:
        """Every state of a run, oldest first, without payloads."""
        result = await self._execute(
            sa.select(*GraphStateRow.columns())
            .where(states.c.run_id == run_id, states.c.namespace == namespace)
            .order_by(states.c.created_at, states.c.id)
        )
        return [GraphStateRow.from_row(row) for row in result.mappings()]

    async def run_states(self, run_id: str, namespace: str) -> list[StateRow]:
        result = await self._execute(
            sa.select(states)
            .where(states.c.run_id == run_id, states.c.namespace == namespace)
            .order_by(states.c.created_at, states.c.id)
        )
        return [StateRow.from_row(row) for row in result.mappings()]

    async def count_active_states(self) -> dict[tuple[str, str, str], int]:
        """Count waiting (CREATED) and claimed (QUEUED) states by (namespace, node_name,
        status), for metrics. Both are read from partial indexes, so the cost follows
        the work in flight, not the history kept."""
        counts: dict[tuple[str, str, str], int] = {}
        for status in (StateStatus.CREATED, StateStatus.QUEUED):
            result = await self._execute(
                sa.select(states.c.namespace, states.c.node_name, sa.func.count())
                .where(states.c.status == status.value)
                .group_by(states.c.namespace, states.c.node_name)
            )
            for namespace, node_name, count in result:
                counts[(namespace, node_name, status.value)] = int(count)
        return counts

    async def claimable_backlog(self, now: int) -> dict[tuple[str, str], int]:
        result = await self._execute(
            sa.select(states.c.namespace, states.c.node_name, sa.func.count())
            .where(states.c.status == StateStatus.CREATED.value, states.c.enqueue_after <= now)
            .group_by(states.c.namespace, states.c.node_name)
        )
        return {(ns, node): int(n) for ns, node, n in result}

    # -- fan-in groups ------------------------------------------------------------

    async def create_groups(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Open fan-in groups (``group_id``, ``run_id``, ``identifier``), counters at zero."""
        if rows:
            await self._execute(
                _CREATE_GROUPS, [{**row, "pending": 0, "failed": 0} for row in rows]
            )

    async def adjust_group(
        self, group_id: str, pending: int, failed: int
    ) -> tuple[int, int] | None:
        """Add to a group's counters and return them (pending, failed) after the change."""
        rows = await self._driver(hot.adjust_group(self.dialect), [group_id, pending, failed])
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    # -- cron triggers ------------------------------------------------------------

    async def delete_pending_triggers(self, namespace: str, graph_name: str) -> None:
        await self._execute(
            cron_triggers.delete().where(
                cron_triggers.c.namespace == namespace,
                cron_triggers.c.graph_name == graph_name,
                cron_triggers.c.trigger_status == TriggerStatus.PENDING.value,
            )
        )

    async def insert_trigger(self, values: Mapping[str, Any]) -> bool:
        return await self._insert_ignoring_conflict(cron_triggers, values)

    async def next_trigger_time(self) -> int | None:
        """When the earliest pending cron record is due (ms), if there is one."""
        value = await self._scalar(
            sa.select(sa.func.min(cron_triggers.c.trigger_time)).where(
                cron_triggers.c.trigger_status == TriggerStatus.PENDING.value
            )
        )
        return int(value) if value is not None else None

    async def claim_due_trigger(self, now: int) -> TriggerRow | None:
        candidate = (
            sa.select(cron_triggers.c.id)
            .where(
                cron_triggers.c.trigger_status == TriggerStatus.PENDING.value,
                cron_triggers.c.trigger_time <= now,
            )
            .order_by(cron_triggers.c.trigger_time)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        result = await self._execute(
            cron_triggers.update()
            .where(cron_triggers.c.id.in_(candidate.scalar_subquery()))
            .values(trigger_status=TriggerStatus.TRIGGERING.value)
            .returning(
                cron_triggers.c.id,
                cron_triggers.c.namespace,
                cron_triggers.c.graph_name,
                cron_triggers.c.expression,
                cron_triggers.c.trigger_time,
                cron_triggers.c.trigger_status,
            )
        )
        row = result.first()
        return TriggerRow(*row) if row else None

    async def finish_trigger(
        self,
        trigger_id: str,
        status: TriggerStatus,
        expires_at: int,
        run_id: str | None,
        error: str | None,
    ) -> None:
        await self._execute(
            cron_triggers.update()
            .where(cron_triggers.c.id == trigger_id)
            .values(trigger_status=status.value, expires_at=expires_at, run_id=run_id, error=error)
        )

    async def list_triggers(self, namespace: str, graph_name: str) -> list[dict[str, Any]]:
        result = await self._execute(
            sa.select(cron_triggers)
            .where(cron_triggers.c.namespace == namespace, cron_triggers.c.graph_name == graph_name)
            .order_by(cron_triggers.c.trigger_time)
        )
        return [dict(row) for row in result.mappings()]

    async def delete_expired_triggers(self, now: int) -> int:
        result = await self._execute(
            cron_triggers.delete().where(
                cron_triggers.c.expires_at.is_not(None),
                cron_triggers.c.expires_at <= now,
                cron_triggers.c.trigger_status.in_(
                    [TriggerStatus.TRIGGERED.value, TriggerStatus.FAILED.value]
                ),
            )
        )
        return int(result.rowcount or 0)

    # -- idempotency keys of triggers ---------------------------------------------

    async def claim_trigger_keys(self, rows: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
        """Insert idempotency keys (``namespace``, ``idempotency_key``, ``request_hash``,
        ``run_id``, ``created_at``, ``expires_at``; each key at most once), taking over
        a row whose ``expires_at`` has passed. Returns the (namespace, key) pairs now
        held by these rows; the others belong to an earlier trigger (:meth:`trigger_keys`).

        One statement, keys in sorted order: two transactions claiming overlapping keys
        wait for each other instead of deadlocking, and the unique key decides.
        """
        if not rows:
            return set()
        ordered = sorted(rows, key=lambda r: (r["namespace"], r["idempotency_key"]))
        statement = self._insert(trigger_keys).values([dict(r) for r in ordered])
        excluded = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=["namespace", "idempotency_key"],
            set_={
                "request_hash": excluded.request_hash,
                "run_id": excluded.run_id,
                "created_at": excluded.created_at,
                "expires_at": excluded.expires_at,
            },
            where=trigger_keys.c.expires_at <= excluded.created_at,
        ).returning(trigger_keys.c.namespace, trigger_keys.c.idempotency_key)
        result = await self._execute(statement)
        return {(row[0], row[1]) for row in result}

    async def trigger_keys(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], TriggerKey]:
        """The stored rows of these (namespace, key) pairs (those that exist)."""
        pairs = sorted(set(keys))
        if not pairs:
            return {}
        result = await self._execute(
            sa.select(
                trigger_keys.c.namespace,
                trigger_keys.c.idempotency_key,
                trigger_keys.c.run_id,
                trigger_keys.c.request_hash,
            ).where(sa.tuple_(trigger_keys.c.namespace, trigger_keys.c.idempotency_key).in_(pairs))
        )
        return {(row[0], row[1]): TriggerKey(run_id=row[2], request_hash=row[3]) for row in result}

    async def delete_trigger_keys(self, keys: Iterable[tuple[str, str]]) -> None:
        pairs = sorted(set(keys))
        if pairs:
            await self._execute(
                trigger_keys.delete().where(
                    sa.tuple_(trigger_keys.c.namespace, trigger_keys.c.idempotency_key).in_(pairs)
                )
            )

    async def delete_expired_trigger_keys(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` keys whose ``expires_at`` has passed (by its index)."""
        expired = (
            sa.select(trigger_keys.c.namespace, trigger_keys.c.idempotency_key)
            .where(trigger_keys.c.expires_at <= now)
            .order_by(trigger_keys.c.expires_at)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            expired = expired.with_for_update(skip_locked=True)
        result = await self._execute(
            trigger_keys.delete().where(
                sa.tuple_(trigger_keys.c.namespace, trigger_keys.c.idempotency_key).in_(expired)
            )
        )
        return int(result.rowcount or 0)

    # -- retention ------------------------------------------------------------------

    async def runs_created_before(
        self, cutoff: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        """Up to ``limit`` (created_at, run_id) of runs created before ``cutoff``, oldest
        first, after the position ``after`` (by the index ``ix_runs_created_at``)."""
        query = sa.select(runs.c.created_at, runs.c.run_id).where(runs.c.created_at < cutoff)
        if after is not None:
            query = query.where(sa.tuple_(runs.c.created_at, runs.c.run_id) > sa.tuple_(*after))
        result = await self._execute(query.order_by(runs.c.created_at, runs.c.run_id).limit(limit))
        return [(int(row[0]), row[1]) for row in result]

    async def finished_before(self, run_ids: Sequence[str], cutoff: int) -> dict[str, int]:
        """Those of ``run_ids`` with no pending state and no state changed since ``cutoff``
        (a run without states counts from its creation), each with its number of states.
        Reads each run's states by ``ix_states_run_id``."""
        if not run_ids:
            return {}
        pending = sa.case(
            (states.c.status.in_([s.value for s in RUN_PENDING_STATE_STATUSES]), 1), else_=0
        )
        activity = (
            sa.select(
                states.c.run_id.label("run_id"),
                sa.func.sum(pending).label("pending"),
                sa.func.max(states.c.updated_at).label("last"),
                sa.func.count().label("states"),
            )
            .where(states.c.run_id.in_(list(run_ids)))
            .group_by(states.c.run_id)
            .subquery()
        )
        result = await self._execute(
            sa.select(runs.c.run_id, sa.func.coalesce(activity.c.states, 0))
            .select_from(runs.outerjoin(activity, activity.c.run_id == runs.c.run_id))
            .where(
                runs.c.run_id.in_(list(run_ids)),
                sa.func.coalesce(activity.c.pending, 0) == 0,
                sa.func.coalesce(activity.c.last, runs.c.created_at) < cutoff,
            )
            .order_by(runs.c.run_id)
        )
        return {row[0]: int(row[1]) for row in result}

    async def lock_runs_for_deletion(self, run_ids: Sequence[str]) -> list[str]:
        """On PostgreSQL, lock the runs that no other transaction holds (skipping the
        others: another replica is deleting them) and then all their states, in id order,
        so a report or retry on one of them waits for the deletion (and then finds
        nothing) or the deletion waits for it (and sees what it wrote). SQLite's write
        transaction already excludes every other writer."""
        ids = sorted(set(run_ids))
        if not ids or self.dialect != "postgresql":
            return ids
        result = await self._execute(
            sa.select(runs.c.run_id)
            .where(runs.c.run_id.in_(ids))
            .order_by(runs.c.run_id)
            .with_for_update(skip_locked=True)
        )
        locked = [row[0] for row in result]
        if locked:
            await self._execute(
                sa.select(states.c.id)
                .where(states.c.run_id.in_(locked))
                .order_by(states.c.id)
                .with_for_update()
            )
        return locked

    async def delete_runs(self, run_ids: Sequence[str]) -> int:
        """Delete runs and every row that belongs to them. Returns the runs deleted."""
        ids = list(set(run_ids))
        if not ids:
            return 0
        # A fan-in group's id is the id of the state that opened it: found by primary key.
        opened_by = sa.select(states.c.id).where(states.c.run_id.in_(ids))
        await self._execute(fanin_groups.delete().where(fanin_groups.c.group_id.in_(opened_by)))
        await self._execute(states.delete().where(states.c.run_id.in_(ids)))
        await self._execute(store_entries.delete().where(store_entries.c.run_id.in_(ids)))
        await self._execute(trigger_keys.delete().where(trigger_keys.c.run_id.in_(ids)))
        result = await self._execute(runs.delete().where(runs.c.run_id.in_(ids)))
        return int(result.rowcount or 0)

    # == dashboard reads ==========================================================
    # Read-only queries of the dashboard (services/views.py). Each answer is bounded
    # by a page size or by the size of a graph template, never by a run's history.

    async def run_node_counts(self, run_id: str, namespace: str) -> dict[str, NodeCounts]:
        """Per identifier of a run: its states counted by status, and how many of them
        are extra outputs of a fan-out (members of another state's group)."""
        sibling = sa.case((states.c.group_id != states.c.id, 1), else_=0)
        result = await self._execute(
            sa.select(states.c.identifier, states.c.status, sa.func.count(), sa.func.sum(sibling))
            .where(states.c.run_id == run_id, states.c.namespace == namespace)
            .group_by(states.c.identifier, states.c.status)
        )
        found: dict[str, NodeCounts] = {}
        for identifier, status, count, siblings in result:
            entry = found.setdefault(identifier, NodeCounts(statuses={}, fanout_members=0))
            entry.statuses[status] = int(count)
            entry.fanout_members += int(siblings or 0)
        return found

    def _run_states_filter(
        self, run_id: str, namespace: str, identifier: str, statuses: Sequence[str]
    ) -> sa.ColumnElement[bool]:
        condition = sa.and_(
            states.c.run_id == run_id,
            states.c.namespace == namespace,
            states.c.identifier == identifier,
        )
        if statuses:
            condition = sa.and_(condition, states.c.status.in_(list(statuses)))
        return condition

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
        result = await self._execute(
            sa.select(*StateBrief.columns())
            .where(self._run_states_filter(run_id, namespace, identifier, statuses))
            .order_by(states.c.created_at, states.c.id)
            .offset(offset)
            .limit(limit)
        )
        return [StateBrief.from_row(row) for row in result.mappings()]

    async def count_run_states(
        self, run_id: str, namespace: str, identifier: str, statuses: Sequence[str]
    ) -> int:
        value = await self._scalar(
            sa.select(sa.func.count())
            .select_from(states)
            .where(self._run_states_filter(run_id, namespace, identifier, statuses))
        )
        return int(value or 0)

    async def state_attempts(self, state: StateRow, limit: int) -> list[StateBrief]:
        """The attempts of ``state``'s task: states of its run with the same identifier and
        parents (automatic and manual retries), oldest first. Other members of a fan-out
        share both but are separate tasks, so they are left out."""
        condition = sa.and_(
            states.c.run_id == state.run_id,
            states.c.identifier == state.identifier,
            sa.or_(states.c.group_id == states.c.id, states.c.id == state.id),
        )
        if state.parents:
            key, parent_id = list(state.parents.items())[-1]
            condition = sa.and_(condition, states.c.parents[key].as_string() == parent_id)
        result = await self._execute(
            sa.select(*StateBrief.columns(), states.c.parents)
            .where(condition)
            .order_by(states.c.created_at, states.c.id)
            .limit(limit)
        )
        return [
            StateBrief.from_row(row) for row in result.mappings() if row["parents"] == state.parents
        ]

    async def opened_groups(self, run_id: str, identifier: str, limit: int) -> list[FaninGroup]:
        """Fan-in groups opened by states of ``identifier`` in a run, with their counters
        and how many states descend from each (the branches a join waits for)."""
        openers = (
            sa.select(states.c.id)
            .where(
                states.c.run_id == run_id,
                states.c.identifier == identifier,
                states.c.group_id == states.c.id,
            )
            .order_by(states.c.created_at, states.c.id)
            .scalar_subquery()
        )
        result = await self._execute(
            sa.select(fanin_groups)
            .where(fanin_groups.c.group_id.in_(openers))
            .order_by(fanin_groups.c.group_id)
            .limit(limit)
        )
        groups = [dict(row) for row in result.mappings()]
        found: list[FaninGroup] = []
        for group in groups:
            member = states.c.groups[identifier].as_string() == group["group_id"]
            total = await self._scalar(
                sa.select(sa.func.count())
                .select_from(states)
                .where(states.c.run_id == run_id, member)
            )
            found.append(
                FaninGroup(
                    group_id=group["group_id"],
                    identifier=identifier,
                    pending=int(group["pending"]),
                    failed=int(group["failed"]),
                    descendants=int(total or 0),
                )
            )
        return found

    async def recent_triggers(
        self, namespace: str, graph_name: str, limit: int
    ) -> list[dict[str, Any]]:
        """The latest cron fire records of a graph (scheduled, fired or failed), oldest
        first; at most ``limit`` of the many that retention keeps."""
        result = await self._execute(
            sa.select(cron_triggers)
            .where(cron_triggers.c.namespace == namespace, cron_triggers.c.graph_name == graph_name)
            .order_by(cron_triggers.c.trigger_time.desc(), cron_triggers.c.id.desc())
            .limit(limit)
        )
        return [dict(row) for row in reversed(result.mappings().all())]

    async def open_descendants(
        self, run_id: str, identifier: str, group_id: str, limit: int
    ) -> list[StateBrief]:
        """States below a fan-in group that are still pending (what a join waits for)."""
        pending = [StateStatus.CREATED.value, StateStatus.QUEUED.value, StateStatus.EXECUTED.value]
        result = await self._execute(
            sa.select(*StateBrief.columns())
            .where(
                states.c.run_id == run_id,
                states.c.status.in_(pending),
                states.c.groups[identifier].as_string() == group_id,
            )
            .order_by(states.c.created_at, states.c.id)
            .limit(limit)
        )
        return [StateBrief.from_row(row) for row in result.mappings()]


def _locked(rows: Iterable[Sequence[Any]]) -> LockedStates:
    """The rows of :func:`hot.lock_states` as the states they lock."""
    found: dict[str, StateCore] = {}
    cancelled: set[str] = set()
    for row in rows:
        state = StateCore(**hot.core_values(row))
        found[state.id] = state
        if hot.run_cancelled(row):
            cancelled.add(state.run_id)
    return LockedStates(found, frozenset(cancelled))
