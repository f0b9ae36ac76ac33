"""Hand-written SQL for the statements that every report and claim runs.

Reports and claims are the server's hot path, and for them SQLAlchemy's statement
handling (parameter processing, result rows, per-column type processors) costs more
than the database itself does. These few statements are therefore written out once per
dialect, sent to the driver as they are, and their rows converted here. The columns
come from :mod:`state_manager.store.tables`, so a schema change that forgets them fails
loudly. Everything else in :mod:`state_manager.store.queries` stays SQLAlchemy Core.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from state_manager.domain.models import StateStatus
from state_manager.store.tables import graph_templates, runs, states, store_entries

STATE_COLUMNS = tuple(column.name for column in states.columns)
JSON_COLUMNS = frozenset(c.name for c in states.columns if isinstance(c.type, sa.JSON))
# A state without its payloads: what a change to it needs (see queries.StateCore).
CORE_COLUMNS = tuple(c for c in STATE_COLUMNS if c not in ("outputs", "data"))
# What a trigger reads and writes besides states.
TEMPLATE_COLUMNS = tuple(column.name for column in graph_templates.columns)
TEMPLATE_JSON_COLUMNS = frozenset(
    c.name for c in graph_templates.columns if isinstance(c.type, sa.JSON)
)
RUN_COLUMNS = tuple(c.name for c in runs.columns if c.name != "cancelled_at")
STORE_COLUMNS = tuple(column.name for column in store_entries.columns)
CLAIMED_COLUMNS = (
    "id",
    "namespace",
    "node_name",
    "identifier",
    "inputs",
    "enqueue_after",
    "created_at",
    "timeout_ms",
)
_CORE_POSITION = {column: position for position, column in enumerate(CORE_COLUMNS)}


def dumps_json(value: Any) -> str:
    """JSON text of a column value (orjson, which keeps key order; the standard library
    for what orjson refuses, such as integers beyond 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def loads_json(value: Any) -> Any:
    """A JSON column as read: text on SQLite, already decoded on PostgreSQL."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _marks(dialect: str, count: int) -> list[str]:
    """Numbered placeholders (a number may appear several times in one statement);
    SQLite takes them by name (see :func:`sqlite_params`)."""
    prefix = ":p" if dialect == "sqlite" else "$"
    return [f"{prefix}{i}" for i in range(1, count + 1)]


def sqlite_params(params: Sequence[Any]) -> dict[str, Any]:
    """Positional parameters as the named ones of :func:`_marks` on SQLite."""
    return {f"p{i}": value for i, value in enumerate(params, 1)}


def state_params(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A new state's values in :data:`STATE_COLUMNS` order, JSON columns as text."""
    return tuple(dumps_json(row[c]) if c in JSON_COLUMNS else row[c] for c in STATE_COLUMNS)


ROW_ARRAYS = frozenset({"postgresql"})
"""Dialects whose row-wise statements (:func:`insert_rows`, :func:`write_states`) take
one array per column, all rows at once (:func:`as_arrays`); elsewhere they take one row's
values and run once per row (:func:`insert_rows`, :func:`update_states`)."""


def as_arrays(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Row tuples as one list per column: the parameters of a statement for
    :data:`ROW_ARRAYS` dialects."""
    return [list(column) for column in zip(*rows, strict=True)]


_TABLES = {table.name: table for table in (graph_templates, runs, states, store_entries)}


def _unnest(table: str, columns: Sequence[str], first: int = 1) -> str:
    """``unnest($<first>::<type>[], ...)``: PostgreSQL rows from one array per column."""
    types = _TABLES[table].columns
    pg = postgresql.dialect()  # type: ignore[no-untyped-call]  # (SQLAlchemy leaves it bare)
    arrays = (f"${i}::{types[c].type.compile(dialect=pg)}[]" for i, c in enumerate(columns, first))
    return f"unnest({', '.join(arrays)})"


def _insert_arrays(table: str, columns: Sequence[str], first: int = 1) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM {_unnest(table, columns, first)}"
    )


def _update_arrays(columns: Sequence[str], first: int = 1) -> str:
    names = (*columns, "id")
    sets = ", ".join(f"{column} = changed.{column}" for column in columns)
    return (
        f"UPDATE states SET {sets} FROM {_unnest('states', names, first)} "
        f"AS changed({', '.join(names)}) WHERE states.id = changed.id"
    )


@functools.cache
def insert_rows(dialect: str, table: str, columns: tuple[str, ...]) -> str:
    """Insert rows of ``columns`` into ``table`` (parameters: see :data:`ROW_ARRAYS`).

    On PostgreSQL one statement inserts them all: one plan and one execution, where a
    statement per row costs PostgreSQL a plan and an execution each."""
    if dialect in ROW_ARRAYS:
        return _insert_arrays(table, columns)
    marks = ", ".join(_marks(dialect, len(columns)))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"


@functools.cache
def template_by_name(dialect: str) -> str:
    """A graph template by namespace and name (what every trigger reads first)."""
    namespace, name = _marks(dialect, 2)
    return (
        f"SELECT {', '.join(TEMPLATE_COLUMNS)} FROM graph_templates "
        f"WHERE namespace = {namespace} AND name = {name}"
    )


def template_values(row: Sequence[Any]) -> dict[str, Any]:
    """A row of :func:`template_by_name` as keyword arguments of ``TemplateRow``."""
    values = dict(zip(TEMPLATE_COLUMNS, row, strict=True))
    for column in TEMPLATE_JSON_COLUMNS:
        values[column] = loads_json(values[column])
    return values


@functools.cache
def adjust_group(dialect: str) -> str:
    """Add to a fan-in group's counters (parameters: group id, pending, failed) and
    return them after the change (what every report of a fan-out child runs)."""
    group_id, pending, failed = _marks(dialect, 3)
    return (
        f"UPDATE fanin_groups SET pending = pending + {pending}, failed = failed + {failed} "
        f"WHERE group_id = {group_id} RETURNING pending, failed"
    )


def _lock(dialect: str, count: int, first: int = 1) -> tuple[str, str]:
    """The common table expressions of :func:`lock_states` and their final select."""
    if dialect == "postgresql":
        ids, state_lock, run_lock = f"= ANY(${first})", " FOR UPDATE", " FOR KEY SHARE"
    else:
        ids, state_lock, run_lock = f"IN ({', '.join(_marks(dialect, count))})", "", ""
    ctes = (
        f"locked AS (SELECT {', '.join(CORE_COLUMNS)} FROM states "
        f"WHERE id {ids} ORDER BY id{state_lock}), "
        "their_runs AS (SELECT run_id, cancelled_at FROM runs "
        f"WHERE run_id IN (SELECT run_id FROM locked){run_lock})"
    )
    select = (
        f"SELECT {', '.join(f'locked.{c}' for c in CORE_COLUMNS)}, their_runs.cancelled_at "
        "FROM locked LEFT JOIN their_runs ON their_runs.run_id = locked.run_id"
    )
    return ctes, select


@functools.cache
def lock_states(dialect: str, count: int) -> str:
    """The payload-free columns of ``count`` states by id (:func:`lock_params`), then
    their run's ``cancelled_at`` (NULL: not cancelled, or no run). On PostgreSQL the states
    are locked in id order and their runs held (key share) until the transaction ends,
    so a cancellation, which locks its run for update, either waits for this transaction
    or makes it see the run cancelled. PostgreSQL takes the ids as one array, so one
    prepared statement serves every count."""
    ctes, select = _lock(dialect, count)
    return f"WITH {ctes} {select}"


@functools.cache
def lock_and_claim() -> str:
    """PostgreSQL: :func:`lock_states` and :func:`claim` in one statement, so a batch
    that reports and claims spends one round trip on both (parameters: those of
    :func:`claim_params`, then the array of ids). Each row starts with its kind: 0, then
    a row of :func:`lock_states`; 1, then a claimed state in the same layout (its
    :data:`CLAIMED_COLUMNS`, the others NULL). Both parts read one snapshot: a state
    that is both locked and claimed (a report of a state nobody had claimed) is read as
    CREATED, so its report is refused."""
    ctes, select = _lock("postgresql", 0, first=6)
    claimed = ", ".join(f"claimed.{c}" if c in CLAIMED_COLUMNS else "NULL" for c in CORE_COLUMNS)
    return (
        f"WITH {ctes}, claimed AS ({claim('postgresql', 0)}) "
        f"SELECT 0, {select.removeprefix('SELECT ')} "
        f"UNION ALL SELECT 1, {claimed}, NULL FROM claimed"
    )


def claimed_from_core(row: Sequence[Any]) -> dict[str, Any]:
    """A claimed state of :func:`lock_and_claim` (after its kind) as keyword arguments
    of ``ClaimedRow``."""
    return claimed_values([row[_CORE_POSITION[c]] for c in CLAIMED_COLUMNS])


def lock_params(dialect: str, ids: list[str]) -> list[Any]:
    """The parameters of :func:`lock_states` for ``ids``."""
    return [ids] if dialect == "postgresql" else ids


def core_values(row: Sequence[Any]) -> dict[str, Any]:
    """The state of a row of :func:`lock_states` as keyword arguments of ``StateCore``."""
    values = dict(zip(CORE_COLUMNS, row[: len(CORE_COLUMNS)], strict=True))
    for column in JSON_COLUMNS.intersection(values):
        values[column] = loads_json(values[column])
    values["does_unites"] = bool(values["does_unites"])
    return values


def run_cancelled(row: Sequence[Any]) -> bool:
    """Whether the run of a row of :func:`lock_states` is cancelled."""
    return row[len(CORE_COLUMNS)] is not None


@functools.cache
def update_states(dialect: str, columns: tuple[str, ...]) -> str:
    """Set ``columns`` of states by id, one state per parameter tuple
    (:func:`update_params`). PostgreSQL writes a batch with :func:`write_states`."""
    assert dialect not in ROW_ARRAYS
    marks = _marks(dialect, len(columns) + 1)
    sets = ", ".join(f"{column} = {mark}" for column, mark in zip(columns, marks, strict=False))
    return f"UPDATE states SET {sets} WHERE id = {marks[-1]}"


@functools.cache
def write_states(updates: tuple[tuple[str, ...], ...], insert: bool) -> str:
    """PostgreSQL: one statement that updates states, one set of columns per entry of
    ``updates`` (:func:`update_states`), and inserts new ones (:func:`insert_rows`), so a
    batch's writes cost one round trip. The parameters are the arrays of each update in
    order, then those of the insert. The parts touch different rows (new states are not
    among those changed), so running them on one snapshot changes nothing."""
    parts: list[str] = []
    first = 1
    for columns in updates:
        parts.append(_update_arrays(columns, first))
        first += len(columns) + 1
    if insert:
        parts.append(_insert_arrays("states", STATE_COLUMNS, first))
    *ctes, main = parts
    if not ctes:
        return main
    named = ", ".join(f"write{i} AS ({part})" for i, part in enumerate(ctes))
    return f"WITH {named} {main}"


def update_params(columns: tuple[str, ...], change: Mapping[str, Any]) -> tuple[Any, ...]:
    """A change's values for :func:`update_states`: the columns, then the id."""
    values = [dumps_json(change[c]) if c in JSON_COLUMNS else change[c] for c in columns]
    return (*values, change["id"])


@functools.cache
def claim(dialect: str, node_count: int) -> str:
    """Move up to a limit of claimable states of some nodes to QUEUED, oldest first,
    returning what a worker receives (parameters: :func:`claim_params`).

    The claimable index is ordered by ``enqueue_after`` within each node, so each node's
    oldest are read from its own range and merged. On PostgreSQL, one range per node name
    (a lateral join over the array of names, one prepared statement for any number):
    asked for several names at once, its planner would otherwise read and sort every
    claimable state of those nodes, a cost that grows with the backlog. Each range locks
    (``SKIP LOCKED``) at most the limit; rows locked and not taken are released at
    commit. SQLite merges the ranges of an ``IN`` list itself."""
    queued = (
        f"UPDATE states SET status = '{StateStatus.QUEUED.value}', claimed_at = {{now}}, "
        "lease_expires_at = {lease_until}, updated_at = {now} WHERE id IN ({chosen}) "
        f"RETURNING {', '.join(CLAIMED_COLUMNS)}"
    )
    ready = f"status = '{StateStatus.CREATED.value}' AND enqueue_after <= {{now}}"
    if dialect == "postgresql":
        chosen = (
            "SELECT ready.id FROM unnest($4::text[]) AS node(name), LATERAL ("
            f"SELECT id, enqueue_after FROM states WHERE namespace = $3 AND {ready} "
            "AND node_name = node.name ORDER BY enqueue_after LIMIT $5 "
            "FOR UPDATE SKIP LOCKED) AS ready ORDER BY ready.enqueue_after LIMIT $5"
        )
        return queued.format(now="$1", lease_until="$2", chosen=chosen.format(now="$1"))
    now, lease_until, namespace, *nodes, limit = _marks(dialect, node_count + 4)
    chosen = (
        f"SELECT id FROM states WHERE namespace = {namespace} AND {ready} "
        f"AND node_name IN ({', '.join(nodes)}) ORDER BY enqueue_after LIMIT {limit}"
    )
    return queued.format(now=now, lease_until=lease_until, chosen=chosen.format(now=now))


def claim_params(
    dialect: str, now: int, lease_until: int, namespace: str, names: list[str], limit: int
) -> list[Any]:
    """The parameters of :func:`claim`."""
    if dialect == "postgresql":
        return [now, lease_until, namespace, names, limit]
    return [now, lease_until, namespace, *names, limit]


def claimed_values(row: Sequence[Any]) -> dict[str, Any]:
    values = dict(zip(CLAIMED_COLUMNS, row, strict=True))
    values["inputs"] = loads_json(values["inputs"])
    return values
