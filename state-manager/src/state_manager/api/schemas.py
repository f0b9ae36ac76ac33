"""Request and response bodies of the v0 API (field names are part of the wire contract)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from state_manager.domain.models import (
    MAX_DELAY_MS,
    JsonInt,
    Name,
    NodeTemplate,
    RetryPolicy,
    RunStatus,
    StateStatus,
    StoreConfig,
    TimeoutSeconds,
    Trigger,
    ValidationStatus,
)


class Body(BaseModel):
    """Request bodies tolerate extra fields (older and newer clients send some)."""

    model_config = ConfigDict(extra="ignore")


# -- nodes ------------------------------------------------------------------------


class NodeRegistration(Body):
    name: Name
    inputs_schema: dict[str, Any]
    outputs_schema: dict[str, Any]
    secrets: list[Name]


class RegisterNodesRequest(Body):
    runtime_name: Name
    nodes: list[NodeRegistration]


class RegisterNodesResponse(BaseModel):
    runtime_name: str
    registered_nodes: list[NodeRegistration]


class RegisteredNodeDocument(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(serialization_alias="_id")
    created_at: str
    updated_at: str
    name: str
    namespace: str
    runtime_name: str
    runtime_namespace: str
    inputs_schema: dict[str, Any]
    outputs_schema: dict[str, Any]
    secrets: list[str]


class ListNodesResponse(BaseModel):
    namespace: str
    count: int
    nodes: list[RegisteredNodeDocument]


class NamespacesResponse(BaseModel):
    namespaces: list[str]
    count: int


# -- graphs -----------------------------------------------------------------------


class UpsertGraphRequest(Body):
    secrets: dict[Name, str]
    # An empty graph has no root: refused with 400 as a template rule (contract 4.3).
    nodes: list[NodeTemplate] = Field(json_schema_extra={"minItems": 1})
    retry_policy: RetryPolicy = Field(default_factory=RetryPolicy)
    store_config: StoreConfig = Field(default_factory=StoreConfig)
    triggers: list[Trigger] = Field(default_factory=list)
    timeout: TimeoutSeconds | None = Field(
        default=None,
        description="Extension: default timeout (seconds) of nodes without their own.",
    )


class GraphResponse(BaseModel):
    nodes: list[NodeTemplate]
    secrets: dict[str, bool]
    retry_policy: RetryPolicy
    store_config: StoreConfig
    triggers: list[Trigger]
    timeout: int | None = None
    created_at: str
    updated_at: str
    validation_status: ValidationStatus
    validation_errors: list[str]


class GraphDocument(GraphResponse):
    """A stored template as listed by ``GET /graphs/``: secrets shown as flags only."""

    id: str = Field(serialization_alias="_id")
    name: str
    namespace: str


class ListGraphsResponse(BaseModel):
    namespace: str
    count: int
    templates: list[GraphDocument]


# -- runs -------------------------------------------------------------------------


IDEMPOTENCY_KEY_PATTERN = "^[ -~]*$"


class TriggerRequest(Body):
    store: dict[Name, str] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)
    start_delay: JsonInt = Field(default=0, ge=0, le=MAX_DELAY_MS)


class TriggerResponse(BaseModel):
    status: Literal["CREATED"] = "CREATED"
    run_id: str


class StartRunItem(TriggerRequest):
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        # Printable ASCII, checked by the service (400).
        json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
        description=(
            "Optional: a run already started with this key in the namespace (within "
            "EXOSPHERE_IDEMPOTENCY_TTL_SECONDS) is answered instead of a new one; the same "
            "key with another graph or body is a 409. Distinct within one request."
        ),
    )


class StartRunsRequest(Body):
    """Extension: several runs of one graph in one request, each as a trigger body."""

    runs: list[StartRunItem] = Field(min_length=1)


class StartRunsResponse(BaseModel):
    status: Literal["CREATED"] = "CREATED"
    run_ids: list[str]


class RunListItem(BaseModel):
    run_id: str
    graph_name: str
    success_count: int
    pending_count: int
    errored_count: int
    retried_count: int
    total_count: int
    status: RunStatus
    created_at: str


class CancelRunResponse(BaseModel):
    """Extension: a cancelled run (the same answer however often it is cancelled)."""

    run_id: str
    namespace: str
    status: RunStatus = RunStatus.CANCELLED
    cancelled_at: str
    cancelled_states: int = Field(description="States of the run that are CANCELLED.")


class ErrorResponse(BaseModel):
    """The body of every error answer except 422 (which lists the invalid fields)."""

    detail: str
    code: str | None = Field(
        default=None, description="A stable name of the refusal, where it has one."
    )


class RunSummaryResponse(RunListItem):
    """One run (an extension of the v0 API): the listing's fields plus counts per status."""

    namespace: str
    counts: dict[StateStatus, int]


class RunsResponse(BaseModel):
    namespace: str
    total: int
    page: int
    size: int
    runs: list[RunListItem]


class GraphNode(BaseModel):
    id: str
    node_name: str
    identifier: str
    status: StateStatus
    error: str | None
    retry_count: int = Field(
        description="Extension: automatic retries before this state (0 for a first attempt)."
    )


class GraphEdge(BaseModel):
    source: str
    target: str


class RunGraphResponse(BaseModel):
    root_states: list[GraphNode]
    graph_name: str
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    node_count: int
    edge_count: int
    execution_summary: dict[str, int]
    status: RunStatus | None = Field(
        default=None,
        description="Extension: the run's status (CANCELLED once cancelled); null for an "
        "unknown run.",
    )


class NodeRunDetails(BaseModel):
    id: str
    node_name: str
    identifier: str
    graph_name: str
    run_id: str
    status: StateStatus
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    error: str | None
    parents: dict[str, str]
    created_at: str
    updated_at: str


# -- states -----------------------------------------------------------------------


class EnqueueRequest(Body):
    nodes: list[Name]
    batch_size: JsonInt = Field(
        description="Most states to claim. Any integer: 0 or less claims nothing; more "
        "than MAX_BATCH_SIZE claims at most MAX_BATCH_SIZE (a cap, not a limit)."
    )
    wait_ms: JsonInt = Field(
        default=0,
        ge=0,
        description="Extension: hold the request up to this long (ms) until work is "
        "claimable. Longer waits are served at MAX_WAIT_MS (a cap, not a limit).",
    )


class EnqueuedState(BaseModel):
    state_id: str
    node_name: str
    identifier: str
    inputs: dict[str, Any]
    created_at: str


class EnqueueResponse(BaseModel):
    count: int
    namespace: str
    status: Literal["QUEUED"] = "QUEUED"
    states: list[EnqueuedState]


class ExecutedRequest(Body):
    outputs: list[dict[str, Any]]


class ExecutedResponse(BaseModel):
    status: Literal["EXECUTED"] = "EXECUTED"


class ErroredRequest(Body):
    error: str


class ErroredResponse(BaseModel):
    status: StateStatus
    retry_created: bool


class PruneRequest(Body):
    data: dict[str, Any]


class PruneResponse(BaseModel):
    enqueue_after: int
    status: Literal["PRUNED"] = "PRUNED"


class ReEnqueueAfterRequest(Body):
    enqueue_after: JsonInt = Field(
        gt=0, le=MAX_DELAY_MS, description="Delay in milliseconds, relative to now."
    )


class ReEnqueueAfterResponse(BaseModel):
    enqueue_after: int
    status: Literal["CREATED"] = "CREATED"


class ManualRetryRequest(Body):
    fanout_id: str = Field(min_length=1, max_length=64)


class ManualRetryResponse(BaseModel):
    id: str
    status: Literal["CREATED"] = "CREATED"


class HeartbeatResponse(BaseModel):
    lease_expires_at: int


class SecretsResponse(BaseModel):
    secrets: dict[str, str]


# -- exchange (extension: several reports and a claim in one request) --------------------


class _Report(Body):
    state_id: str = Field(max_length=64)


class ExecutedReport(_Report, ExecutedRequest):
    kind: Literal["executed"]


class ErroredReport(_Report, ErroredRequest):
    kind: Literal["errored"]


class PruneReport(_Report, PruneRequest):
    kind: Literal["prune"]


class ReEnqueueAfterReport(_Report, ReEnqueueAfterRequest):
    kind: Literal["re-enqueue-after"]


class HeartbeatReport(_Report):
    kind: Literal["heartbeat"]


Report = Annotated[
    ExecutedReport | ErroredReport | PruneReport | ReEnqueueAfterReport | HeartbeatReport,
    Field(discriminator="kind"),
]


class ExchangeRequest(Body):
    """Reports of several states (each as its v0 route's body plus ``state_id`` and
    ``kind``, the route's last path segment) and an optional claim, applied in one
    transaction: the claim already sees the states the reports created."""

    reports: list[Report] = Field(default_factory=list)
    claim: EnqueueRequest | None = None


class ReportResult(BaseModel):
    """What the report's own v0 route would have answered: ``status_code`` and the body
    (``body`` when 200, ``detail`` otherwise)."""

    state_id: str
    status_code: int
    body: dict[str, Any] | None = None
    detail: str | None = None
    code: str | None = Field(
        default=None,
        description="Extension: a stable name of the refusal, e.g. run_cancelled.",
    )


class ExchangeResponse(BaseModel):
    namespace: str
    results: list[ReportResult]
    states: list[EnqueuedState]
