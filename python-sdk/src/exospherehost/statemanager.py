"""``StateManager``: the control-plane client (graphs, triggers, run views).

One instance keeps one pooled HTTP client per event loop, created on first use, so it may
be built at import time and used from ``asyncio.run`` calls one after another. Close it
with ``await sm.aclose()`` or use it as ``async with StateManager(...) as sm``.

Reads and idempotent writes (``get_graph``, ``upsert_graph``, run views) are retried on
network errors and 5xx answers. ``trigger`` and ``retry_state`` are not retried once the
request may have reached the server, since that could start a run twice, except a
``trigger`` given an ``idempotency_key``: every attempt sends the same key, so the server
starts the run once.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from ._http import ApiClient, Backoff, is_retryable_status
from .errors import ApiError, GraphValidationError, GraphValidationTimeout, UnexpectedResponse
from .models import (
    MAX_TIMEOUT_SECONDS,
    CronTrigger,
    GraphNodeModel,
    RegisteredNode,
    RetryPolicyModel,
    RunDetails,
    RunGraph,
    RunNodeDetails,
    RunsPage,
    RunStatus,
    RunSummary,
    StoreConfigModel,
)

__all__ = ["StateManager"]

# Statuses during which the server is still validating a graph template.
_VALIDATING = frozenset({"PENDING", "ONGOING"})


class StateManager:
    """Client of the state manager for one namespace.

    Args:
        namespace: Namespace of the graphs and runs.
        state_manager_uri: Base URL; default from ``EXOSPHERE_STATE_MANAGER_URI``.
        key: API key; default from ``EXOSPHERE_API_KEY``.
        state_manager_version: API version path segment.
        timeout: Timeout of one HTTP request, in seconds.
        retries: Extra attempts of a retryable request.
        retry_backoff: Spacing of those attempts.
        transport: Custom httpx transport (tests use ``httpx.MockTransport``).
    """

    def __init__(
        self,
        namespace: str,
        state_manager_uri: str | None = None,
        key: str | None = None,
        state_manager_version: str = "v0",
        *,
        timeout: float = 30.0,
        retries: int = 3,
        retry_backoff: Backoff | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        uri = state_manager_uri or os.environ.get("EXOSPHERE_STATE_MANAGER_URI")
        api_key = key or os.environ.get("EXOSPHERE_API_KEY")
        problems = []
        if not namespace:
            problems.append("namespace must not be empty")
        if not uri:
            problems.append(
                "state_manager_uri is not set (pass it or set EXOSPHERE_STATE_MANAGER_URI)"
            )
        if not api_key:
            problems.append("key is not set (pass it or set EXOSPHERE_API_KEY)")
        if problems:
            raise ValueError("invalid StateManager configuration: " + "; ".join(problems))
        assert uri is not None and api_key is not None
        self._namespace = namespace
        self._uri = uri
        self._key = api_key
        self._version = state_manager_version
        self._timeout = timeout
        self._retries = retries
        self._backoff = retry_backoff or Backoff(base=0.25, cap=5.0)
        self._transport = transport
        self._api: ApiClient | None = None
        self._api_loop: asyncio.AbstractEventLoop | None = None
        # Whether the state manager offers POST .../graph/{name}/runs (None: not known yet).
        self._batch_trigger: bool | None = None

    @property
    def namespace(self) -> str:
        """Namespace this client works in."""
        return self._namespace

    # --- graphs --------------------------------------------------------------------------

    async def get_graph(self, graph_name: str) -> dict[str, Any]:
        """The graph template as stored, with ``validation_status`` and ``validation_errors``."""
        api = self._client()
        return _as_dict(await self._call("GET", api.url("graph", graph_name)))

    async def upsert_graph(
        self,
        graph_name: str,
        graph_nodes: list[GraphNodeModel],
        secrets: dict[str, str],
        retry_policy: RetryPolicyModel | None = None,
        store_config: StoreConfigModel | None = None,
        triggers: list[CronTrigger] | None = None,
        validation_timeout: float = 60,
        polling_interval: float = 1,
        timeout: int | None = None,  # noqa: ASYNC109 - the graph's node timeout, not this call's
    ) -> dict[str, Any]:
        """Create or replace a graph template and wait until the server has validated it.

        Returns the template once ``VALID``. Raises :class:`GraphValidationError` (with the
        server's ``validation_errors``) if it ends ``INVALID``, and
        :class:`GraphValidationTimeout` if validation takes longer than
        ``validation_timeout`` seconds. ``timeout`` (seconds) is the default timeout of
        nodes without their own (:attr:`GraphNodeModel.timeout`); servers without
        timeouts ignore both.
        """
        nodes = [node.model_dump(mode="json") for node in graph_nodes]
        for node in nodes:
            if node.get("timeout") is None:
                node.pop("timeout", None)  # what older servers were always sent
        body: dict[str, Any] = {"secrets": dict(secrets), "nodes": nodes}
        if timeout is not None:
            if isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT_SECONDS:
                raise ValueError(f"timeout must be 1 to {MAX_TIMEOUT_SECONDS} seconds")
            body["timeout"] = timeout
        if retry_policy is not None:
            body["retry_policy"] = retry_policy.model_dump(mode="json")
        if store_config is not None:
            body["store_config"] = store_config.model_dump(mode="json")
        if triggers is not None:
            body["triggers"] = [
                {"type": "CRON", "value": {"expression": trigger.expression}}
                for trigger in triggers
            ]
        api = self._client()
        graph = _as_dict(
            await self._call("PUT", api.url("graph", graph_name), json=body, ok=(200, 201))
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + validation_timeout
        while graph.get("validation_status") in _VALIDATING:
            if loop.time() >= deadline:
                raise GraphValidationTimeout(
                    graph_name, str(graph.get("validation_status")), validation_timeout
                )
            await asyncio.sleep(polling_interval)
            graph = await self.get_graph(graph_name)
        status = str(graph.get("validation_status"))
        if status != "VALID":
            errors = graph.get("validation_errors") or []
            raise GraphValidationError(graph_name, status, [str(error) for error in errors])
        return graph

    async def list_graphs(self) -> list[dict[str, Any]]:
        """Every graph template of the namespace, as ``GET /graphs/`` lists them (with
        ``name``, ``validation_status``, ``validation_errors``; secrets as flags)."""
        api = self._client()
        body = _as_dict(await self._call("GET", api.url("graphs", trailing_slash=True)))
        templates = body.get("templates", [])
        if not isinstance(templates, list):
            raise UnexpectedResponse(f"expected a list of templates, got {templates!r}")
        return [_as_dict(template) for template in templates]

    async def list_nodes(self) -> list[RegisteredNode]:
        """The node types runtimes registered in the namespace, with their field schemas."""
        api = self._client()
        body = _as_dict(await self._call("GET", api.url("nodes", trailing_slash=True)))
        return [RegisteredNode.model_validate(node) for node in body.get("nodes", [])]

    # --- runs ----------------------------------------------------------------------------

    async def trigger(
        self,
        graph_name: str,
        inputs: dict[str, str] | None = None,
        store: dict[str, str] | None = None,
        start_delay: int = 0,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a run of ``graph_name``; returns ``{"status": "CREATED", "run_id": ...}``.

        ``store`` fills the run's key/value store, ``inputs`` overrides root inputs and
        ``start_delay`` (ms) delays the root state.

        ``idempotency_key`` (sent as the ``Idempotency-Key`` header): a trigger with a key
        the namespace saw within the server's window answers the first run's id and
        starts nothing, so the call is retried on network errors and 5xx answers like a
        read; the same key with another graph or body raises :class:`ApiError` (409).
        """
        body = {"start_delay": start_delay, "inputs": inputs or {}, "store": store or {}}
        api = self._client()
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        return _as_dict(
            await self._call(
                "POST",
                api.url("graph", graph_name, "trigger"),
                json=body,
                idempotent=idempotency_key is not None,
                headers=headers,
            )
        )

    async def trigger_many(
        self,
        graph_name: str,
        runs: Sequence[Mapping[str, Any]],
        *,
        chunk_size: int = 500,
    ) -> list[str]:
        """Start several runs of ``graph_name``; returns their run ids, in order.

        Each run is a mapping with the arguments of :meth:`trigger` (``store``,
        ``inputs``, ``start_delay``, ``idempotency_key``), all optional. Runs travel
        ``chunk_size`` per request and each request starts all of its runs or none; a
        state manager without the batch route gets one :meth:`trigger` per run. A run
        whose ``idempotency_key`` already started one is answered with that run's id;
        a request whose runs all carry keys is retried like a read.
        """
        run_ids: list[str] = []
        api = self._client()
        for start in range(0, len(runs), chunk_size):
            chunk = [
                (
                    dict(run.get("store") or {}),
                    dict(run.get("inputs") or {}),
                    int(run.get("start_delay", 0)),
                    run.get("idempotency_key"),
                )
                for run in runs[start : start + chunk_size]
            ]
            if self._batch_trigger is not False:
                items: list[dict[str, Any]] = []
                for store, inputs, delay, key in chunk:
                    item: dict[str, Any] = {"store": store, "inputs": inputs, "start_delay": delay}
                    if key is not None:
                        item["idempotency_key"] = str(key)
                    items.append(item)
                try:
                    body = await self._call(
                        "POST",
                        api.url("graph", graph_name, "runs"),
                        json={"runs": items},
                        idempotent=all(key is not None for *_, key in chunk),
                    )
                except ApiError as exc:
                    if not (exc.status_code in (404, 405) and exc.body == {"detail": "Not Found"}):
                        raise
                    self._batch_trigger = False
                else:
                    self._batch_trigger = True
                    run_ids += [str(run_id) for run_id in _as_dict(body)["run_ids"]]
                    continue
            for store, inputs, delay, key in chunk:
                started = await self.trigger(
                    graph_name, inputs, store, delay, None if key is None else str(key)
                )
                run_ids.append(str(started["run_id"]))
        return run_ids

    async def list_runs(self, page: int = 1, size: int = 20) -> RunsPage:
        """One page of the namespace's runs, newest first, with per-status counts."""
        api = self._client()
        body = await self._call("GET", api.url("runs", str(page), str(size)))
        return RunsPage.model_validate(body)

    async def get_run(self, run_id: str, *, page_size: int = 100) -> RunSummary:
        """The runs-listing entry of one run (searched page by page, newest first)."""
        page = 1
        while True:
            listing = await self.list_runs(page, page_size)
            for run in listing.runs:
                if run.run_id == run_id:
                    return run
            if not listing.runs or page * page_size >= listing.total:
                raise LookupError(f"run {run_id!r} not found in namespace {self._namespace!r}")
            page += 1

    async def get_run_details(self, run_id: str) -> RunDetails:
        """One run's status and its states counted by status, in one request.

        Uses the run route of this state manager (``GET .../run/{run_id}``, not in the
        original v0 API); an unknown run raises :class:`ApiError` with status 404.
        """
        api = self._client()
        return RunDetails.model_validate(await self._call("GET", api.url("run", run_id)))

    async def get_run_graph(self, run_id: str) -> RunGraph:
        """Every state of a run with its status, the links between them, and counts."""
        api = self._client()
        body = await self._call("GET", api.url("states", "run", run_id, "graph"))
        return RunGraph.model_validate(body)

    async def get_run_node(self, graph_name: str, run_id: str, state_id: str) -> RunNodeDetails:
        """One state of a run with its inputs, outputs, error and parents."""
        api = self._client()
        path = api.url("graph", graph_name, "run", run_id, "node", state_id)
        return RunNodeDetails.model_validate(await self._call("GET", path))

    async def retry_state(self, state_id: str, fanout_id: str | None = None) -> str:
        """Run a finished state again (manual retry); returns the id of the new state.

        ``fanout_id`` makes the request idempotent: the server refuses (409) a second
        retry with the same one. By default a fresh one is generated. The server also
        refuses (400) a state that is not finished or was already retried.
        """
        api = self._client()
        body = {"fanout_id": fanout_id or str(uuid.uuid4())}
        path = api.url("state", state_id, "manual-retry")
        # Sent again only when it never reached the server: a lost answer would otherwise
        # turn into a confusing 409 for a retry that did happen.
        answer = _as_dict(await self._call("POST", path, json=body, idempotent=False))
        return str(answer["id"])

    async def cancel_run(self, run_id: str) -> dict[str, Any]:
        """Cancel a run: its pending states never start, and states being executed are
        refused when their worker reports them. Returns the server's answer (``run_id``,
        ``status`` CANCELLED, ``cancelled_at``, ``cancelled_states``); cancelling again
        answers the same. A finished run raises :class:`ApiError` with status 409, an
        unknown one 404 (a server without cancellation answers 404 or 405 too)."""
        api = self._client()
        return _as_dict(await self._call("POST", api.url("run", run_id, "cancel")))

    async def wait_for_run(
        self,
        run_id: str,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109 - a deadline for the polling, not one call
        poll_interval: float = 0.5,
    ) -> RunGraph:
        """Poll a run's graph until no state is pending or the run is cancelled; raise
        ``TimeoutError`` after ``timeout`` seconds. Check ``.status`` of the result for
        SUCCESS/FAILED/CANCELLED."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            graph = await self.get_run_graph(run_id)
            if (graph.nodes and not graph.pending) or graph.status == RunStatus.CANCELLED:
                return graph
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"run {run_id} still has {graph.pending} pending state(s) after {timeout} s"
                )
            await asyncio.sleep(poll_interval)

    # --- plumbing ------------------------------------------------------------------------

    def _client(self) -> ApiClient:
        loop = asyncio.get_running_loop()
        if self._api is None or self._api_loop is not loop or self._api_loop.is_closed():
            # A pool belongs to the loop that opened its connections; a new loop (another
            # asyncio.run) gets a new pool. The old one's connections died with its loop.
            self._api = ApiClient(
                self._uri,
                self._key,
                self._namespace,
                self._version,
                timeout=self._timeout,
                transport=self._transport,
            )
            self._api_loop = loop
        return self._api

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        ok: tuple[int, ...] = (200,),
        idempotent: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        api = self._client()
        attempt = 0
        while True:
            try:
                return await api.call(method, path, json=json, ok=ok, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                # The request never reached the server: always safe to send again.
                if attempt >= self._retries:
                    raise
            except httpx.RequestError:
                if not idempotent or attempt >= self._retries:
                    raise
            except ApiError as exc:
                if not idempotent or attempt >= self._retries:
                    raise
                if not is_retryable_status(exc.status_code):
                    raise
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._api is not None:
            api, self._api = self._api, None
            await api.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _as_dict(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise UnexpectedResponse(
            f"expected a JSON object from the state manager, got {_excerpt(body)}"
        )
    return body


def _excerpt(body: Any, limit: int = 80) -> str:
    text = " ".join(repr(body).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
