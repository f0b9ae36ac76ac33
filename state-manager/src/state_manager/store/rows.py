"""The rows the store hands to services, whichever backend holds them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Self

import sqlalchemy as sa

from state_manager.store.tables import states


@dataclass(frozen=True)
class StateCore:
    """A state without its payloads (``outputs``, ``data``): what a change needs to know."""

    id: str
    namespace: str
    node_name: str
    identifier: str
    graph_name: str
    run_id: str
    status: str
    inputs: dict[str, Any]
    error: str | None
    parents: dict[str, str]
    groups: dict[str, str]
    group_id: str
    does_unites: bool
    state_fingerprint: str | None
    enqueue_after: int
    retry_count: int
    fanout_id: str
    manual_retry_fanout_id: str
    lease_expires_at: int | None
    claimed_at: int | None
    created_at: int
    updated_at: int
    timeout_ms: int | None

    @classmethod
    def columns(cls) -> list[sa.Column[Any]]:
        return [states.c[f.name] for f in fields(cls)]

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class LockedStates:
    """States locked for a change (those that exist, by id), and which of their runs
    are cancelled."""

    states: dict[str, StateCore]
    cancelled_runs: frozenset[str]


@dataclass(frozen=True)
class StateRow(StateCore):
    """A whole state."""

    outputs: dict[str, Any]
    data: dict[str, Any]


# The columns a state change may write; everything else is fixed at insert.
MUTABLE_STATE_COLUMNS = (
    "status",
    "outputs",
    "data",
    "error",
    "enqueue_after",
    "lease_expires_at",
    "claimed_at",
    "updated_at",
)


@dataclass(frozen=True)
class ClaimedRow:
    """What a claim hands to a worker (and counts in metrics)."""

    id: str
    namespace: str
    node_name: str
    identifier: str
    inputs: dict[str, Any]
    enqueue_after: int
    created_at: int
    timeout_ms: int | None

    @classmethod
    def columns(cls) -> list[sa.Column[Any]]:
        return [states.c[f.name] for f in fields(cls)]

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> ClaimedRow:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class GraphStateRow:
    """What a run graph shows of a state (no inputs or outputs)."""

    id: str
    node_name: str
    identifier: str
    graph_name: str
    status: str
    error: str | None
    parents: dict[str, str]
    retry_count: int

    @classmethod
    def columns(cls) -> list[sa.Column[Any]]:
        return [states.c[f.name] for f in fields(cls)]

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> GraphStateRow:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class TemplateRow:
    id: str
    namespace: str
    name: str
    spec: dict[str, Any]
    secrets: dict[str, str]
    validation_status: str
    validation_errors: list[str]
    revision: int
    version_id: str | None
    created_at: int
    updated_at: int

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> TemplateRow:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class VersionRow:
    id: str
    namespace: str
    graph_name: str
    revision: int
    spec: dict[str, Any]
    input_fields: dict[str, list[str]]
    created_at: int

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> VersionRow:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class TriggerRow:
    id: str
    namespace: str
    graph_name: str
    expression: str
    trigger_time: int
    trigger_status: str


@dataclass(frozen=True)
class TriggerKey:
    """The run an idempotency key started, and the hash of the request that started it."""

    run_id: str
    request_hash: str


@dataclass
class NodeCounts:
    """A run's states of one identifier: count per status and fan-out members."""

    statuses: dict[str, int]
    fanout_members: int

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


@dataclass(frozen=True)
class StateBrief:
    """A state without its payloads (inputs, outputs, data): what a listing needs."""

    id: str
    identifier: str
    node_name: str
    status: str
    error: str | None
    group_id: str
    retry_count: int
    enqueue_after: int
    claimed_at: int | None
    lease_expires_at: int | None
    created_at: int
    updated_at: int

    @classmethod
    def columns(cls) -> list[sa.Column[Any]]:
        return [states.c[f.name] for f in fields(cls)]

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> StateBrief:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class FaninGroup:
    """A fan-in group: the states below one fan-out that a ``unites`` waits for."""

    group_id: str
    identifier: str
    pending: int
    failed: int
    descendants: int
