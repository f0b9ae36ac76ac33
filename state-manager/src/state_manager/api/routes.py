"""HTTP routes of the v0 API. Handlers parse, call one service, and shape the answer."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import (
    APIRouter,
    Depends,
    Header,
    HTTPException,
    Path,
    Request,
    Response,
    Security,
    status,
)
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader

from state_manager.api import schemas
from state_manager.api.middleware import INTERNAL_ERROR
from state_manager.api.openapi import errors
from state_manager.domain.models import NAME_MAX_LENGTH, GraphSpec, StateStatus
from state_manager.errors import InvalidRequest, StateManagerError
from state_manager.services import graphs, runs, states
from state_manager.services.context import Context, iso
from state_manager.services.ops import (
    Errored,
    Executed,
    Heartbeat,
    Pruned,
    Requeued,
    StateOp,
)
from state_manager.store.contract import ClaimedRow, GraphStateRow, TemplateRow
from state_manager.store.failures import unavailable


async def get_context(request: Request) -> Context:
    context: Context = request.app.state.context
    return context


logger = logging.getLogger(__name__)

ContextDep = Annotated[Context, Depends(get_context)]
# Path names are bounded like body names: they are stored in indexed columns.
Namespace = Annotated[str, Path(max_length=NAME_MAX_LENGTH)]
GraphName = Annotated[str, Path(max_length=NAME_MAX_LENGTH)]
RunId = Annotated[str, Path(max_length=NAME_MAX_LENGTH)]
MAX_PAGE = 1_000_000_000
# Bounds the handlers check themselves (answering 400, as the v0 API does), in the schema.
Page = Annotated[int, Path(json_schema_extra={"minimum": 1, "maximum": MAX_PAGE})]
PageSize = Annotated[
    int, Path(json_schema_extra={"minimum": 1}, description="At most MAX_PAGE_SIZE.")
]
NodeId = Annotated[
    str, Path(json_schema_extra={"pattern": "^[0-9a-fA-F]{24}$"}, description="A state id.")
]

api_key_header = APIKeyHeader(
    name="x-api-key",
    auto_error=False,
    description="Equal to the server's STATE_MANAGER_SECRET.",
)


async def require_api_key(
    request: Request, x_api_key: Annotated[str | None, Security(api_key_header)]
) -> None:
    """Every /v0 route needs ``x-api-key`` equal to ``STATE_MANAGER_SECRET`` (constant time)."""
    if not api_key_accepted(request.app.state.context, x_api_key):
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="Invalid API key")


def api_key_accepted(ctx: Context, key: str | None) -> bool:
    """Whether ``key`` equals ``STATE_MANAGER_SECRET`` (compared in constant time)."""
    expected = ctx.settings.state_manager_secret
    return key is not None and hmac.compare_digest(key.encode("utf-8"), expected.encode("utf-8"))


def refusal(exc: Exception, path: str) -> JSONResponse | None:
    """The answer to a request that ``exc`` stopped: a domain error's status with its
    ``detail`` (and ``code``), a 503 when the database cannot serve (logged). None for
    any other exception: a bug, which the request middleware logs and answers 500."""
    error = exc if isinstance(exc, StateManagerError) else unavailable(exc)
    if error is None:
        return None
    if error is not exc:
        logger.warning("database unavailable: %s", type(exc).__name__, extra={"path": path})
    body = {"detail": error.detail}
    if error.code is not None:
        body["code"] = error.code
    return JSONResponse(body, status_code=error.status_code)


# Every /v0 route can answer these; routes add theirs (404, 409) with ``errors``.
v0 = APIRouter(
    prefix="/v0",
    dependencies=[Depends(require_api_key)],
    responses=errors(400, 401, 413, 500, 503),
)
ns = APIRouter(prefix="/namespace/{namespace_name}")
NOT_FOUND = errors(404)
# Reports, heartbeats and retries: 409 for a state of a cancelled run (code run_cancelled).
STATE_ERRORS = errors(404, 409)


# -- nodes and namespaces ---------------------------------------------------------


@v0.get("/namespaces", tags=["namespaces"])
async def list_namespaces(ctx: ContextDep) -> schemas.NamespacesResponse:
    names = await graphs.list_namespaces(ctx)
    return schemas.NamespacesResponse(namespaces=names, count=len(names))


@ns.put("/nodes/", tags=["nodes"])
async def register_nodes(
    namespace_name: Namespace, body: schemas.RegisterNodesRequest, ctx: ContextDep
) -> schemas.RegisterNodesResponse:
    await graphs.register_nodes(
        ctx, namespace_name, body.runtime_name, [n.model_dump() for n in body.nodes]
    )
    return schemas.RegisterNodesResponse(
        runtime_name=body.runtime_name, registered_nodes=body.nodes
    )


@ns.get("/nodes/", tags=["nodes"])
async def list_nodes(namespace_name: Namespace, ctx: ContextDep) -> schemas.ListNodesResponse:
    rows = await graphs.list_nodes(ctx, namespace_name)
    nodes = [
        schemas.RegisteredNodeDocument(
            **{**row, "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"])}
        )
        for row in rows
    ]
    return schemas.ListNodesResponse(namespace=namespace_name, count=len(nodes), nodes=nodes)


# -- graph templates ----------------------------------------------------------------


def _graph_fields(template: TemplateRow) -> dict[str, Any]:
    spec = GraphSpec.model_validate(template.spec)
    return {
        "nodes": spec.nodes,
        "secrets": dict.fromkeys(template.secrets, True),
        "retry_policy": spec.retry_policy,
        "store_config": spec.store_config,
        "triggers": spec.triggers,
        "timeout": spec.timeout,
        "created_at": iso(template.created_at),
        "updated_at": iso(template.updated_at),
        "validation_status": template.validation_status,
        "validation_errors": template.validation_errors,
    }


@ns.put("/graph/{graph_name}", status_code=status.HTTP_201_CREATED, tags=["graphs"])
async def upsert_graph(
    namespace_name: Namespace,
    graph_name: GraphName,
    body: schemas.UpsertGraphRequest,
    ctx: ContextDep,
) -> schemas.GraphResponse:
    spec = GraphSpec(
        nodes=body.nodes,
        retry_policy=body.retry_policy,
        store_config=body.store_config,
        triggers=body.triggers,
        timeout=body.timeout,
    )
    template = await graphs.upsert_graph(ctx, namespace_name, graph_name, spec, body.secrets)
    return schemas.GraphResponse(**_graph_fields(template))


@ns.get("/graph/{graph_name}", tags=["graphs"], responses=NOT_FOUND)
async def get_graph(
    namespace_name: Namespace, graph_name: GraphName, ctx: ContextDep
) -> schemas.GraphResponse:
    template = await graphs.get_graph(ctx, namespace_name, graph_name)
    return schemas.GraphResponse(**_graph_fields(template))


@ns.get("/graphs/", tags=["graphs"])
async def list_graphs(namespace_name: Namespace, ctx: ContextDep) -> schemas.ListGraphsResponse:
    templates = [
        schemas.GraphDocument(id=t.id, name=t.name, namespace=t.namespace, **_graph_fields(t))
        for t in await graphs.list_graphs(ctx, namespace_name)
    ]
    return schemas.ListGraphsResponse(
        namespace=namespace_name, count=len(templates), templates=templates
    )


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=runs.IDEMPOTENCY_KEY_MAX_LENGTH,
        # Printable ASCII, checked by the service (400).
        json_schema_extra={"pattern": schemas.IDEMPOTENCY_KEY_PATTERN},
        description=(
            "Extension: a retry with the same key (per namespace, within "
            "EXOSPHERE_IDEMPOTENCY_TTL_SECONDS) answers the first run's id and starts "
            "nothing; the same key with another graph or body is a 409."
        ),
    ),
]


@ns.post("/graph/{graph_name}/trigger", tags=["runs"], responses=errors(404, 409))
async def trigger_graph(
    namespace_name: Namespace,
    graph_name: GraphName,
    body: schemas.TriggerRequest,
    ctx: ContextDep,
    idempotency_key: IdempotencyKey = None,
) -> schemas.TriggerResponse:
    run_id = await runs.trigger(
        ctx,
        namespace_name,
        graph_name,
        body.store,
        body.inputs,
        body.start_delay,
        idempotency_key=idempotency_key,
    )
    return schemas.TriggerResponse(run_id=run_id)


@ns.post("/graph/{graph_name}/runs", tags=["runs"], responses=errors(404, 409))
async def start_runs(
    namespace_name: Namespace,
    graph_name: GraphName,
    body: schemas.StartRunsRequest,
    ctx: ContextDep,
) -> schemas.StartRunsResponse:
    """Extension: start several runs of one graph in one request and one transaction;
    all of them or, when one cannot start (400 naming it), none."""
    if len(body.runs) > ctx.settings.max_batch_size:
        raise InvalidRequest(
            f"{len(body.runs)} runs exceed the limit of {ctx.settings.max_batch_size}"
        )
    run_ids = await runs.trigger_many(
        ctx,
        namespace_name,
        graph_name,
        [
            runs.run_request(
                graph_name, run.store, run.inputs, run.start_delay, run.idempotency_key
            )
            for run in body.runs
        ],
    )
    return schemas.StartRunsResponse(run_ids=run_ids)


# -- states -------------------------------------------------------------------------


def _json(payload: Any) -> Response:
    """A JSON answer serialised once. The hot routes return it: their ``response_model``
    documents the shape, and FastAPI would otherwise validate and serialise it again."""
    return Response(orjson.dumps(payload), media_type="application/json")


@ns.post("/states/enqueue", tags=["states"], response_model=schemas.EnqueueResponse)
async def enqueue_states(
    namespace_name: Namespace, body: schemas.EnqueueRequest, ctx: ContextDep, request: Request
) -> Response:
    claimed = await states.enqueue(
        ctx,
        namespace_name,
        body.nodes,
        body.batch_size,
        body.wait_ms,
        caller_gone=request.is_disconnected,
    )
    return _json(
        {
            "count": len(claimed),
            "namespace": namespace_name,
            "status": "QUEUED",
            "states": _enqueued(claimed),
        }
    )


def _enqueued(claimed: list[ClaimedRow]) -> list[dict[str, Any]]:
    """Claimed states as ``EnqueuedState`` documents."""
    return [
        {
            "state_id": s.id,
            "node_name": s.node_name,
            "identifier": s.identifier,
            "inputs": s.inputs,
            "created_at": iso(s.created_at),
        }
        for s in claimed
    ]


@ns.post("/states/exchange", tags=["states"], response_model=schemas.ExchangeResponse)
async def exchange_states(
    namespace_name: Namespace, body: schemas.ExchangeRequest, ctx: ContextDep, request: Request
) -> Response:
    """Extension: several reports and a claim in one request and one transaction.

    Each report gets the status and body its own route would have answered; the claim
    already sees the states those reports created.
    """
    # Only requests that api.hot passes on get here (it answers the acceptable ones).
    return await exchange_answer(ctx, namespace_name, body, request.is_disconnected)


async def exchange_answer(
    ctx: Context,
    namespace_name: str,
    body: schemas.ExchangeRequest,
    caller_gone: Callable[[], Awaitable[bool]],
) -> Response:
    """The answer to a valid exchange request (see :func:`exchange_states`)."""
    if len(body.reports) > ctx.settings.max_batch_size:
        raise InvalidRequest(
            f"{len(body.reports)} reports exceed the limit of {ctx.settings.max_batch_size}"
        )
    seen: set[str] = set()
    for report in body.reports:
        if report.state_id.lower() in seen:
            raise InvalidRequest(f"State {report.state_id} is reported more than once")
        seen.add(report.state_id.lower())
    claim = body.claim
    outcomes, claimed = await states.exchange(
        ctx,
        namespace_name,
        [_report_op(namespace_name, report) for report in body.reports],
        states.ClaimRequest(claim.nodes, claim.batch_size, claim.wait_ms) if claim else None,
        caller_gone=caller_gone,
    )
    return _json(
        {
            "namespace": namespace_name,
            "results": [_report_result(r, o) for r, o in zip(body.reports, outcomes, strict=True)],
            "states": _enqueued(claimed),
        }
    )


def _report_op(namespace: str, report: schemas.Report) -> StateOp[Any]:
    if isinstance(report, schemas.ExecutedReport):
        return Executed(namespace, report.state_id, report.outputs)
    if isinstance(report, schemas.ErroredReport):
        return Errored(namespace, report.state_id, report.error)
    if isinstance(report, schemas.PruneReport):
        return Pruned(namespace, report.state_id, report.data)
    if isinstance(report, schemas.ReEnqueueAfterReport):
        return Requeued(namespace, report.state_id, report.enqueue_after)
    return Heartbeat(namespace, report.state_id)


def _report_result(report: schemas.Report, outcome: Any) -> dict[str, Any]:
    """The answer the report's own route would have given, as a ``ReportResult``."""
    status, body, detail, code = 200, None, None, None
    if isinstance(outcome, StateManagerError):
        status, detail, code = outcome.status_code, outcome.detail, outcome.code
    elif isinstance(outcome, BaseException):
        logger.error("report of state %s failed", report.state_id, exc_info=outcome)
        status, detail = 500, INTERNAL_ERROR
    elif isinstance(report, schemas.ExecutedReport):
        body = {"status": "EXECUTED"}
    elif isinstance(report, schemas.ErroredReport):
        body = {"status": outcome.status.value, "retry_created": outcome.retry_created}
    elif isinstance(report, schemas.PruneReport):
        body = {"enqueue_after": outcome, "status": "PRUNED"}
    elif isinstance(report, schemas.ReEnqueueAfterReport):
        body = {"enqueue_after": outcome, "status": "CREATED"}
    else:
        body = {"lease_expires_at": outcome}
    result = {"state_id": report.state_id, "status_code": status, "body": body, "detail": detail}
    if code is not None:
        result["code"] = code
    return result


@ns.post("/state/{state_id}/executed", tags=["states"], responses=STATE_ERRORS)
async def executed_state(
    namespace_name: Namespace, state_id: str, body: schemas.ExecutedRequest, ctx: ContextDep
) -> schemas.ExecutedResponse:
    await states.executed(ctx, namespace_name, state_id, body.outputs)
    return schemas.ExecutedResponse()


@ns.post("/state/{state_id}/errored", tags=["states"], responses=STATE_ERRORS)
async def errored_state(
    namespace_name: Namespace, state_id: str, body: schemas.ErroredRequest, ctx: ContextDep
) -> schemas.ErroredResponse:
    result = await states.errored(ctx, namespace_name, state_id, body.error)
    return schemas.ErroredResponse(status=result.status, retry_created=result.retry_created)


@ns.post("/state/{state_id}/prune", tags=["states"], responses=STATE_ERRORS)
async def prune_state(
    namespace_name: Namespace, state_id: str, body: schemas.PruneRequest, ctx: ContextDep
) -> schemas.PruneResponse:
    enqueue_after = await states.prune(ctx, namespace_name, state_id, body.data)
    return schemas.PruneResponse(enqueue_after=enqueue_after)


@ns.post("/state/{state_id}/re-enqueue-after", tags=["states"], responses=STATE_ERRORS)
async def re_enqueue_after(
    namespace_name: Namespace, state_id: str, body: schemas.ReEnqueueAfterRequest, ctx: ContextDep
) -> schemas.ReEnqueueAfterResponse:
    enqueue_after = await states.requeue_after(ctx, namespace_name, state_id, body.enqueue_after)
    return schemas.ReEnqueueAfterResponse(enqueue_after=enqueue_after)


@ns.post("/state/{state_id}/manual-retry", tags=["states"], responses=STATE_ERRORS)
async def manual_retry(
    namespace_name: Namespace, state_id: str, body: schemas.ManualRetryRequest, ctx: ContextDep
) -> schemas.ManualRetryResponse:
    new_id = await states.manual_retry(ctx, namespace_name, state_id, body.fanout_id)
    return schemas.ManualRetryResponse(id=new_id)


@ns.post("/state/{state_id}/heartbeat", tags=["states"], responses=STATE_ERRORS)
async def heartbeat(
    namespace_name: Namespace, state_id: str, ctx: ContextDep
) -> schemas.HeartbeatResponse:
    until = await states.heartbeat(ctx, namespace_name, state_id)
    return schemas.HeartbeatResponse(lease_expires_at=until)


@ns.get("/state/{state_id}/secrets", tags=["states"], responses=NOT_FOUND)
async def get_secrets(
    namespace_name: Namespace, state_id: str, ctx: ContextDep
) -> schemas.SecretsResponse:
    return schemas.SecretsResponse(secrets=await states.secrets_for(ctx, namespace_name, state_id))


# -- runs ---------------------------------------------------------------------------


@ns.get("/runs/{page}/{size}", tags=["runs"])
async def list_runs(
    namespace_name: Namespace, page: Page, size: PageSize, ctx: ContextDep
) -> schemas.RunsResponse:
    if not 1 <= page <= MAX_PAGE:
        raise InvalidRequest(f"page must be between 1 and {MAX_PAGE}")
    if not 1 <= size <= ctx.settings.max_page_size:
        raise InvalidRequest(f"size must be between 1 and {ctx.settings.max_page_size}")
    total, summaries = await runs.list_runs(ctx, namespace_name, page, size)
    return schemas.RunsResponse(
        namespace=namespace_name,
        total=total,
        page=page,
        size=size,
        runs=[schemas.RunListItem(**_run_fields(s)) for s in summaries],
    )


def _run_fields(summary: runs.RunSummary) -> dict[str, Any]:
    return {
        "run_id": summary.run_id,
        "graph_name": summary.graph_name,
        "success_count": summary.success_count,
        "pending_count": summary.pending_count,
        "errored_count": summary.errored_count,
        "retried_count": summary.retried_count,
        "total_count": summary.total_count,
        "status": summary.status,
        "created_at": iso(summary.created_at),
    }


@ns.get("/run/{run_id}", tags=["runs"], responses=NOT_FOUND)
async def run_summary(
    namespace_name: Namespace, run_id: RunId, ctx: ContextDep
) -> schemas.RunSummaryResponse:
    """One run's status and its states counted by status (not in the original v0 API)."""
    summary = await runs.run_summary(ctx, namespace_name, run_id)
    counts = {status: summary.counts.get(status.value, 0) for status in StateStatus}
    return schemas.RunSummaryResponse(
        **_run_fields(summary), namespace=namespace_name, counts=counts
    )


@ns.post(
    "/run/{run_id}/cancel",
    tags=["runs"],
    responses=errors(404, 409),
)
async def cancel_run(
    namespace_name: Namespace, run_id: RunId, ctx: ContextDep
) -> schemas.CancelRunResponse:
    """Extension: cancel a run. Its pending states become CANCELLED and never start; its
    states being executed are refused (409, code ``run_cancelled``) on their next report
    or heartbeat. Cancelling a cancelled run answers the same again; a finished run is a
    409."""
    cancelled = await runs.cancel(ctx, namespace_name, run_id)
    return schemas.CancelRunResponse(
        run_id=cancelled.run_id,
        namespace=namespace_name,
        cancelled_at=iso(cancelled.cancelled_at),
        cancelled_states=cancelled.cancelled_states,
    )


def _graph_node(state: GraphStateRow) -> schemas.GraphNode:
    return schemas.GraphNode(
        id=state.id,
        node_name=state.node_name,
        identifier=state.identifier,
        status=StateStatus(state.status),
        error=state.error,
        retry_count=state.retry_count,
    )


@ns.get("/states/run/{run_id}/graph", tags=["runs"])
async def run_graph(
    namespace_name: Namespace, run_id: RunId, ctx: ContextDep
) -> schemas.RunGraphResponse:
    found, run_status = await runs.run_graph_states(ctx, namespace_name, run_id)
    ids = {s.id for s in found}
    edges = [
        schemas.GraphEdge(source=list(s.parents.values())[-1], target=s.id)
        for s in found
        if s.parents and list(s.parents.values())[-1] in ids
    ]
    nodes = [_graph_node(s) for s in found]
    return schemas.RunGraphResponse(
        root_states=[_graph_node(s) for s in found if not s.parents],
        graph_name=found[0].graph_name if found else "",
        nodes=nodes,
        edges=edges,
        node_count=len(nodes),
        edge_count=len(edges),
        execution_summary=runs.summary_of(found),
        status=run_status,
    )


@ns.get("/graph/{graph_name}/run/{run_id}/node/{node_id}", tags=["runs"], responses=NOT_FOUND)
async def node_run_details(
    namespace_name: Namespace,
    graph_name: GraphName,
    run_id: RunId,
    node_id: NodeId,
    ctx: ContextDep,
) -> schemas.NodeRunDetails:
    state = await runs.node_details(ctx, namespace_name, graph_name, run_id, node_id)
    return schemas.NodeRunDetails(
        id=state.id,
        node_name=state.node_name,
        identifier=state.identifier,
        graph_name=state.graph_name,
        run_id=state.run_id,
        status=StateStatus(state.status),
        inputs=state.inputs,
        outputs=state.outputs,
        error=state.error,
        parents=state.parents,
        created_at=iso(state.created_at),
        updated_at=iso(state.updated_at),
    )


v0.include_router(ns)
