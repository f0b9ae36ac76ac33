"""Pydantic models of the control-plane API.

Two groups live here:

* the graph-template models that users pass to :meth:`StateManager.upsert_graph`
  (``GraphNodeModel``, ``UnitesModel``, ``RetryPolicyModel``, ``StoreConfigModel``,
  ``CronTrigger``). They validate on the client the same field rules that the server
  enforces with a 422, so mistakes surface before a request is sent;
* read models for the run views (``RunsPage``, ``RunSummary``, ``RunGraph``...), returned
  by the typed helpers of :class:`StateManager`. They ignore unknown fields so that a newer
  server can add some without breaking older workers.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
"""The longest node or graph timeout a server accepts (seven days)."""

__all__ = [
    "CronTrigger",
    "GraphNodeModel",
    "RegisteredNode",
    "RetryPolicyModel",
    "RetryStrategyEnum",
    "RunDetails",
    "RunGraph",
    "RunGraphEdge",
    "RunGraphNode",
    "RunNodeDetails",
    "RunStatus",
    "RunSummary",
    "RunsPage",
    "StoreConfigModel",
    "UnitesModel",
    "UnitesStrategyEnum",
]


class UnitesStrategyEnum(StrEnum):
    """When a fan-in (``unites``) node may run."""

    ALL_SUCCESS = "ALL_SUCCESS"
    """Every state descending from the united node succeeded."""
    ALL_DONE = "ALL_DONE"
    """Every state descending from the united node finished, successfully or not."""


class RetryStrategyEnum(StrEnum):
    """How the server spaces the retries of a failed node."""

    EXPONENTIAL = "EXPONENTIAL"
    EXPONENTIAL_FULL_JITTER = "EXPONENTIAL_FULL_JITTER"
    EXPONENTIAL_EQUAL_JITTER = "EXPONENTIAL_EQUAL_JITTER"
    LINEAR = "LINEAR"
    LINEAR_FULL_JITTER = "LINEAR_FULL_JITTER"
    LINEAR_EQUAL_JITTER = "LINEAR_EQUAL_JITTER"
    FIXED = "FIXED"
    FIXED_FULL_JITTER = "FIXED_FULL_JITTER"
    FIXED_EQUAL_JITTER = "FIXED_EQUAL_JITTER"


def _non_blank(value: str, what: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError(f"{what} cannot be empty")
    return stripped


class UnitesModel(BaseModel):
    """Fan-in declaration: run once all states descending from ``identifier`` are done."""

    identifier: str = Field(..., description="Identifier of the node whose descendants are joined")
    strategy: UnitesStrategyEnum = Field(
        default=UnitesStrategyEnum.ALL_SUCCESS, description="When the join may fire"
    )

    @field_validator("identifier")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        return _non_blank(value, "Unites identifier")


class GraphNodeModel(BaseModel):
    """One node of a graph template."""

    node_name: str = Field(..., description="Class name of a registered node")
    namespace: str = Field(..., description="Namespace where the node is registered")
    identifier: str = Field(..., description="Identifier of this node within the graph")
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description="Input values; may contain ${{ node.outputs.field }} or ${{ store.key }}",
    )
    next_nodes: list[str] | None = Field(default=None, description="Identifiers of successors")
    unites: UnitesModel | None = Field(default=None, description="Fan-in declaration")
    timeout: int | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_SECONDS,
        description="Seconds a claimed state of this node may run before the server takes "
        "it back as a failed attempt (retried under the retry policy); default: the "
        "graph's timeout, else only the server's lease. Needs a server with timeouts.",
    )

    @field_validator("node_name")
    @classmethod
    def _check_node_name(cls, value: str) -> str:
        return _non_blank(value, "Node name")

    @field_validator("identifier")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        value = _non_blank(value, "Node identifier")
        if value == "store":
            raise ValueError("Node identifier cannot be reserved word 'store'")
        return value

    @field_validator("next_nodes")
    @classmethod
    def _check_next_nodes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        seen: list[str] = []
        for raw in value:
            item = _non_blank(raw, "Next node identifier")
            if item in seen:
                raise ValueError(f"Next node identifier {item} is not unique")
            seen.append(item)
        return seen


class RetryPolicyModel(BaseModel):
    """Retry policy of a graph: how often and how far apart failed nodes are retried."""

    max_retries: int = Field(default=3, ge=0, description="Retries after the first attempt")
    strategy: RetryStrategyEnum = Field(
        default=RetryStrategyEnum.EXPONENTIAL, description="Spacing of the retries"
    )
    backoff_factor: int = Field(default=2000, gt=0, description="Base delay in milliseconds")
    exponent: int = Field(default=2, gt=0, description="Growth factor of exponential strategies")
    max_delay: int | None = Field(
        default=None, gt=0, description="Upper bound of a delay in milliseconds (None: no bound)"
    )


def _check_store_key(raw: str) -> str:
    key = raw.strip()
    if not key:
        raise ValueError("Key cannot be empty or contain only whitespace")
    if "." in key:
        raise ValueError(f"Key '{key}' cannot contain '.' character")
    return key


class StoreConfigModel(BaseModel):
    """Keys of the per-run store: which ones a trigger must give, and default values."""

    required_keys: list[str] = Field(
        default_factory=list, description="Keys every trigger must provide"
    )
    default_values: dict[str, str] = Field(
        default_factory=dict, description="Values used when a trigger omits a key"
    )

    @field_validator("required_keys")
    @classmethod
    def _check_required_keys(cls, value: list[str]) -> list[str]:
        keys: list[str] = []
        problems: list[str] = []
        for raw in value:
            try:
                key = _check_store_key(raw)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if key in keys:
                problems.append(f"Key '{key}' is duplicated")
            else:
                keys.append(key)
        if problems:
            raise ValueError("; ".join(problems))
        return keys

    @field_validator("default_values")
    @classmethod
    def _check_default_values(cls, value: dict[str, str]) -> dict[str, str]:
        result: dict[str, str] = {}
        problems: list[str] = []
        for raw, item in value.items():
            try:
                key = _check_store_key(raw)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if key in result:
                problems.append(f"Key '{key}' is duplicated")
            else:
                result[key] = item
        if problems:
            raise ValueError("; ".join(problems))
        return result


class CronTrigger(BaseModel):
    """A cron schedule (five fields, server time) that triggers the graph."""

    expression: str = Field(..., description="Cron expression, e.g. '*/5 * * * *'")


# --- read models for run views -------------------------------------------------------------


class _ReadModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RunStatus(StrEnum):
    """Derived status of a run."""

    SUCCESS = "SUCCESS"
    PENDING = "PENDING"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class RunSummary(_ReadModel):
    """One run in the runs listing, with state counts."""

    run_id: str
    graph_name: str
    success_count: int
    pending_count: int
    errored_count: int
    retried_count: int
    total_count: int
    status: RunStatus
    created_at: str | None = None


class RunDetails(RunSummary):
    """One run as the run route describes it: the listing's fields, the namespace, and the
    number of its states in every state status (``counts``)."""

    namespace: str
    counts: dict[str, int]

    @property
    def finished(self) -> int:
        """States that reached a final status (every state that is not pending)."""
        return self.total_count - self.pending_count


class RunsPage(_ReadModel):
    """A page of the runs listing of a namespace, newest first."""

    namespace: str
    total: int
    page: int
    size: int
    runs: list[RunSummary]


class RunGraphNode(_ReadModel):
    """One state of a run, as drawn in a run's graph."""

    id: str
    node_name: str
    identifier: str
    status: str
    error: str | None = None
    retry_count: int = 0
    """Automatic retries before this state (0: a first attempt or a manual retry). Servers
    that do not send it leave it 0."""


class RunGraphEdge(_ReadModel):
    """A parent-to-child link between two states of a run."""

    source: str
    target: str


class RunGraph(_ReadModel):
    """All states of one run, their links and a count per status."""

    graph_name: str
    root_states: list[RunGraphNode]
    nodes: list[RunGraphNode]
    edges: list[RunGraphEdge]
    node_count: int
    edge_count: int
    execution_summary: dict[str, int]
    run_status: str | None = Field(default=None, alias="status")
    """The run's status as the server states it (servers with cancellation)."""

    @property
    def pending(self) -> int:
        """States not finished yet (CREATED, QUEUED or EXECUTED)."""
        summary = self.execution_summary
        return sum(summary.get(status, 0) for status in ("CREATED", "QUEUED", "EXECUTED"))

    @property
    def status(self) -> RunStatus:
        """The run's status, derived the way the runs listing derives it."""
        summary = self.execution_summary
        if self.run_status == RunStatus.CANCELLED or summary.get("CANCELLED", 0):
            return RunStatus.CANCELLED
        if self.pending:
            return RunStatus.PENDING
        if summary.get("ERRORED", 0) or summary.get("NEXT_CREATED_ERROR", 0):
            return RunStatus.FAILED
        if not self.nodes:
            return RunStatus.FAILED
        return RunStatus.SUCCESS

    def count(self, *, identifier: str | None = None, status: str | None = None) -> int:
        """Number of states matching an identifier and/or a status."""
        return sum(
            1
            for node in self.nodes
            if (identifier is None or node.identifier == identifier)
            and (status is None or node.status == status)
        )


class RunNodeDetails(_ReadModel):
    """One state of a run in full: inputs, outputs, error and parents."""

    id: str
    node_name: str
    identifier: str
    graph_name: str
    run_id: str
    status: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    error: str | None = None
    parents: dict[str, str]
    created_at: str | None = None
    updated_at: str | None = None


class RegisteredNode(_ReadModel):
    """A node type that a runtime registered in a namespace, with its field schemas."""

    name: str
    namespace: str
    runtime_name: str
    inputs_schema: dict[str, Any]
    outputs_schema: dict[str, Any]
    secrets: list[str]
    created_at: str | None = None
    updated_at: str | None = None

    @property
    def input_fields(self) -> list[str]:
        """Names of the input fields (the ``properties`` of the inputs schema)."""
        return list(self.inputs_schema.get("properties", {}))

    @property
    def output_fields(self) -> list[str]:
        """Names of the output fields (the ``properties`` of the outputs schema)."""
        return list(self.outputs_schema.get("properties", {}))
