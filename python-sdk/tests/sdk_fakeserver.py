"""An in-memory stand-in for the state manager, served through ``httpx.MockTransport``.

It implements the routes the SDK uses, keeps every request for assertions, and can be told
to misbehave on chosen routes: answer 5xx, drop the connection, answer slowly, time out,
or apply a request and then lose the answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from exospherehost._http import Backoff

# Retries in tests are spaced by milliseconds so fault scenarios finish quickly.
FAST_BACKOFF = Backoff(base=0.005, cap=0.02)

ALL_STATUSES = (
    "CREATED",
    "QUEUED",
    "EXECUTED",
    "SUCCESS",
    "ERRORED",
    "NEXT_CREATED_ERROR",
    "PRUNED",
    "RETRY_CREATED",
)


@dataclass
class FakeState:
    id: str
    node_name: str
    inputs: dict[str, Any]
    status: str = "CREATED"
    enqueue_after: float = 0.0  # seconds, time.monotonic() scale
    outputs: list[dict[str, Any]] | None = None
    error: str | None = None
    data: dict[str, Any] | None = None
    heartbeats: int = 0
    claims: int = 0
    lease_until: float = 0.0
    run_cancelled: bool = False  # reports and heartbeats answer 409 run_cancelled


@dataclass
class Fault:
    """Misbehave on requests whose method and path match, ``times`` times."""

    method: str
    path_regex: str
    kind: str  # status, html, drop, refuse, timeout, slow, lose_answer
    times: int = 1
    status: int = 500
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.hits < self.times
            and method == self.method
            and re.search(self.path_regex, path) is not None
        )


@dataclass
class Call:
    method: str
    path: str
    body: Any
    user_agent: str = ""
    status: int | None = None  # None when the fake raised a transport error
    idempotency_key: str | None = None


@dataclass
class FakeStateManager:
    namespace: str = "test"
    key: str = "test-key"
    secrets: dict[str, str] = field(default_factory=dict)
    heartbeat_route: bool = True
    long_poll: bool = True
    # Offer states/exchange (reports sent together with a claim); off like the original.
    exchange: bool = False
    on_executed: Callable[[FakeState, list[dict[str, Any]]], None] | None = None
    lease_seconds: float = 3600.0
    chaos: float = 0.0  # probability that any request meets a random fault
    rng: random.Random = field(default_factory=lambda: random.Random(1234))

    states: dict[str, FakeState] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    graph_status_sequence: list[str] = field(default_factory=list)
    graph_errors: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    max_queued: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # --- test-side helpers ---------------------------------------------------------------

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    @property
    def uri(self) -> str:
        return "http://fake-state-manager"

    def add_state(self, node_name: str, inputs: dict[str, Any] | None = None) -> str:
        state_id = f"{next(self._ids):024x}"
        self.states[state_id] = FakeState(state_id, node_name, dict(inputs or {}))
        return state_id

    def fail(self, method: str, path_regex: str, kind: str, **options: Any) -> Fault:
        fault = Fault(method, path_regex, kind, **options)
        self.faults.append(fault)
        return fault

    def by_status(self, status: str) -> list[FakeState]:
        return [state for state in self.states.values() if state.status == status]

    def calls_to(self, method: str, path_regex: str) -> list[Call]:
        return [
            call
            for call in self.calls
            if call.method == method and re.search(path_regex, call.path) is not None
        ]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (it reads plain attributes, hence polling)."""
        async with asyncio.timeout(within):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    # --- the server ----------------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        method = request.method
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        call = Call(
            method,
            path,
            body,
            request.headers.get("user-agent", ""),
            idempotency_key=request.headers.get("idempotency-key"),
        )
        self.calls.append(call)
        if request.headers.get("x-api-key") != self.key:
            call.status = 401
            return httpx.Response(401, json={"detail": "Invalid API key"})
        lose_answer = False
        faults = list(self.faults)
        if self.chaos and self.rng.random() < self.chaos:
            kind = self.rng.choice(["status", "drop", "refuse", "timeout", "slow", "lose_answer"])
            faults.insert(0, Fault(method, "", kind, status=503, delay=0.01))
        for fault in faults:
            if not fault.matches(method, path):
                continue
            fault.hits += 1
            if fault.kind == "status":
                call.status = fault.status
                return httpx.Response(fault.status, json={"detail": "injected failure"})
            if fault.kind == "html":  # e.g. a proxy's error page
                call.status = fault.status
                return httpx.Response(fault.status, text="<html>bad gateway</html>")
            if fault.kind == "drop":
                raise httpx.RemoteProtocolError("server disconnected", request=request)
            if fault.kind == "refuse":
                raise httpx.ConnectError("connection refused", request=request)
            if fault.kind == "timeout":
                await asyncio.sleep(fault.delay)
                raise httpx.ReadTimeout("timed out", request=request)
            if fault.kind == "slow":
                await asyncio.sleep(fault.delay)
            if fault.kind == "lose_answer":
                lose_answer = True
            break
        status, payload = await self._route(method, path, body)
        if lose_answer:
            raise httpx.RemoteProtocolError("connection lost after the request", request=request)
        call.status = status
        return httpx.Response(status, json=payload)

    async def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        prefix = f"/v0/namespace/{self.namespace}/"
        if not path.startswith(prefix):
            return 404, {"detail": "Not Found"}
        rest = path[len(prefix) :]
        if method == "PUT" and rest == "nodes/":
            return 200, {"runtime_name": body["runtime_name"], "registered_nodes": body["nodes"]}
        if method == "POST" and rest == "states/enqueue":
            return 200, await self._enqueue(body)
        if method == "POST" and rest == "states/exchange" and self.exchange:
            return 200, await self._exchange(body)
        match = re.fullmatch(r"state/([^/]+)/([a-z-]+)", rest)
        if match:
            return self._state_route(method, match.group(1), match.group(2), body)
        match = re.fullmatch(r"graph/([^/]+)(/trigger)?", rest)
        if match:
            return self._graph_route(method, match.group(1), bool(match.group(2)), body)
        match = re.fullmatch(r"runs/(\d+)/(\d+)", rest)
        if match and method == "GET":
            page, size = int(match.group(1)), int(match.group(2))
            chunk = self.runs[(page - 1) * size : page * size]
            return 200, {
                "namespace": self.namespace,
                "total": len(self.runs),
                "page": page,
                "size": size,
                "runs": chunk,
            }
        match = re.fullmatch(r"states/run/([^/]+)/graph", rest)
        if match and method == "GET":
            return 200, self._run_graph()
        return 404, {"detail": "Not Found"}

    def _claimable(self, names: list[str]) -> list[FakeState]:
        now = time.monotonic()
        return [
            state
            for state in self.states.values()
            if state.node_name in names
            and (
                (state.status == "CREATED" and state.enqueue_after <= now)
                # A claim whose lease ran out (its worker vanished) is handed out again.
                or (state.status == "QUEUED" and state.lease_until <= now)
            )
        ]

    async def _enqueue(self, body: dict[str, Any]) -> dict[str, Any]:
        names = list(body["nodes"])
        batch = int(body["batch_size"])
        wait_ms = int(body.get("wait_ms", 0)) if self.long_poll else 0
        ready = self._claimable(names)
        if not ready and wait_ms > 0:
            # Long poll: hold the request until something is claimable or the wait passes.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_ms / 1000
            while not ready and loop.time() < deadline:
                await asyncio.sleep(0.005)
                ready = self._claimable(names)
        claimed = ready[: max(batch, 0)]
        for state in claimed:
            state.status = "QUEUED"
            state.claims += 1
            state.lease_until = time.monotonic() + self.lease_seconds
        self.max_queued = max(self.max_queued, len(self.by_status("QUEUED")))
        return {
            "count": len(claimed),
            "namespace": self.namespace,
            "status": "QUEUED",
            "states": [
                {
                    "state_id": state.id,
                    "node_name": state.node_name,
                    "identifier": state.node_name.lower(),
                    "inputs": state.inputs,
                    "created_at": "2026-01-01T00:00:00",
                }
                for state in claimed
            ],
        }

    async def _exchange(self, body: dict[str, Any]) -> dict[str, Any]:
        """Each report as its own route would answer it (a ``status`` fault on that route's
        path applies to the report), then the claim."""
        results = []
        for report in body["reports"]:
            state_id, kind = report["state_id"], report["kind"]
            path = f"/v0/namespace/{self.namespace}/state/{state_id}/{kind}"
            status, payload = self._injected_status(path) or self._state_route(
                "POST", state_id, kind, report
            )
            result = {"state_id": state_id, "status_code": status, "body": None, "detail": None}
            result["body" if status == 200 else "detail"] = (
                payload if status == 200 else payload["detail"]
            )
            if status != 200 and "code" in payload:
                result["code"] = payload["code"]
            results.append(result)
        claim = body.get("claim")
        states = (await self._enqueue(claim))["states"] if claim else []
        return {"namespace": self.namespace, "results": results, "states": states}

    def _injected_status(self, path: str) -> tuple[int, Any] | None:
        for fault in self.faults:
            if fault.kind == "status" and fault.matches("POST", path):
                fault.hits += 1
                return fault.status, {"detail": "injected failure"}
        return None

    def _state_route(self, method: str, state_id: str, action: str, body: Any) -> tuple[int, Any]:
        state = self.states.get(state_id)
        if action == "heartbeat" and not self.heartbeat_route:
            return 404, {"detail": "Not Found"}
        if state is None:
            return 404, {"detail": "State not found"}
        if method == "GET" and action == "secrets":
            return 200, {"secrets": dict(self.secrets)}
        if method != "POST":
            return 405, {"detail": "Method Not Allowed"}
        if state.run_cancelled:
            state.status = "CANCELLED"
            return 409, {"detail": "Run r was cancelled", "code": "run_cancelled"}
        if action == "re-enqueue-after":
            state.status = "CREATED"
            state.enqueue_after = time.monotonic() + body["enqueue_after"] / 1000
            return 200, {"enqueue_after": 1, "status": "CREATED"}
        if state.status != "QUEUED":
            return 400, {"detail": "State is not queued"}
        if action == "heartbeat":
            state.heartbeats += 1
            state.lease_until = time.monotonic() + self.lease_seconds
            return 200, {"lease_expires_at": 1}
        if action == "executed":
            state.status = "EXECUTED"
            state.outputs = list(body["outputs"])
            if self.on_executed is not None:
                self.on_executed(state, state.outputs)
            return 200, {"status": "EXECUTED"}
        if action == "errored":
            state.status = "ERRORED"
            state.error = body["error"]
            return 200, {"status": "ERRORED", "retry_created": False}
        if action == "prune":
            state.status = "PRUNED"
            state.data = body["data"]
            return 200, {"enqueue_after": 1, "status": "PRUNED"}
        return 404, {"detail": "Not Found"}

    def _graph_route(self, method: str, name: str, trigger: bool, body: Any) -> tuple[int, Any]:
        if trigger:
            if name not in self.graphs:
                return 404, {"detail": f"Graph template {name} not found"}
            run_id = f"run-{len(self.runs) + 1}"
            self.runs.insert(
                0,
                {
                    "run_id": run_id,
                    "graph_name": name,
                    "success_count": 0,
                    "pending_count": 1,
                    "errored_count": 0,
                    "retried_count": 0,
                    "total_count": 1,
                    "status": "PENDING",
                    "created_at": "2026-01-01T00:00:00",
                },
            )
            return 200, {"status": "CREATED", "run_id": run_id}
        if method == "PUT":
            graph = dict(body)
            graph["secrets"] = dict.fromkeys(body["secrets"], True)
            graph["validation_status"] = "PENDING"
            graph["validation_errors"] = []
            self.graphs[name] = graph
            return 201, graph
        if method == "GET":
            graph = self.graphs.get(name)
            if graph is None:
                return 404, {"detail": f"Graph template {name} not found"}
            if graph["validation_status"] == "PENDING" and self.graph_status_sequence:
                graph["validation_status"] = self.graph_status_sequence.pop(0)
                if graph["validation_status"] == "INVALID":
                    graph["validation_errors"] = list(self.graph_errors)
            return 200, graph
        return 405, {"detail": "Method Not Allowed"}

    def _run_graph(self) -> dict[str, Any]:
        nodes = [
            {
                "id": state.id,
                "node_name": state.node_name,
                "identifier": state.node_name.lower(),
                "status": state.status,
                "error": state.error,
            }
            for state in self.states.values()
        ]
        summary = dict.fromkeys(ALL_STATUSES, 0)
        for state in self.states.values():
            summary[state.status] = summary.get(state.status, 0) + 1
        return {
            "root_states": nodes[:1],
            "graph_name": "g",
            "nodes": nodes,
            "edges": [],
            "node_count": len(nodes),
            "edge_count": 0,
            "execution_summary": summary,
        }
