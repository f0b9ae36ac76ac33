"""Small helpers for driving the v0 API in tests (one place for URLs and polling)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx

REQUEST_ID_HEADER = "x-exosphere-request-id"


def expect_error(response: httpx.Response, status: int, detail: Any = None) -> Any:
    """Check an error response: status, a JSON body with ``detail``, and a request id.

    ``detail`` (when given) must equal the body's ``detail`` exactly. Returns the detail.
    """
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and "detail" in body, body
    uuid.UUID(response.headers[REQUEST_ID_HEADER])
    if detail is not None:
        assert body["detail"] == detail, body
    return body["detail"]


def error_locations(response: httpx.Response) -> list[tuple[Any, ...]]:
    """The ``loc`` of every item of a 422 validation error body."""
    expect_error(response, 422)
    return [tuple(item["loc"]) for item in response.json()["detail"]]


def schema(*fields: str) -> dict[str, Any]:
    """A pydantic-style JSON schema of string fields, as runtimes register them."""
    return {
        "type": "object",
        "title": "Model",
        "properties": {f: {"type": "string", "title": f} for f in fields},
        "required": list(fields),
    }


def node(
    name: str,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    secrets: tuple[str, ...] = (),
) -> dict[str, Any]:
    return {
        "name": name,
        "inputs_schema": schema(*inputs),
        "outputs_schema": schema(*outputs),
        "secrets": list(secrets),
    }


def template_node(
    node_name: str,
    identifier: str,
    namespace: str,
    inputs: dict[str, str] | None = None,
    next_nodes: list[str] | None = None,
    unites: dict[str, str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "node_name": node_name,
        "namespace": namespace,
        "identifier": identifier,
        "inputs": inputs or {},
        "next_nodes": next_nodes or [],
    }
    if unites is not None:
        body["unites"] = unites
    return body


class Api:
    """The v0 API of one namespace."""

    def __init__(self, client: httpx.AsyncClient, namespace: str) -> None:
        self.client = client
        self.ns = namespace
        self.base = f"/v0/namespace/{namespace}"

    async def register(self, *nodes: dict[str, Any], runtime: str = "test-runtime") -> None:
        r = await self.client.put(
            f"{self.base}/nodes/", json={"runtime_name": runtime, "nodes": list(nodes)}
        )
        assert r.status_code == 200, r.text

    async def upsert(self, graph: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.put(f"{self.base}/graph/{graph}", json={"secrets": {}, **body})

    async def wait_validated(self, graph: str, limit_s: float = 15.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + limit_s
        while True:
            r = await self.client.get(f"{self.base}/graph/{graph}")
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["validation_status"] != "PENDING":
                return body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"graph {graph} still PENDING after {limit_s}s")
            await asyncio.sleep(0.05)

    async def create_graph(self, graph: str, body: dict[str, Any]) -> dict[str, Any]:
        """Upsert and wait until VALID."""
        r = await self.upsert(graph, body)
        assert r.status_code == 201, r.text
        result = await self.wait_validated(graph)
        assert result["validation_status"] == "VALID", result
        return result

    async def trigger(self, graph: str, **body: Any) -> str:
        r = await self.client.post(f"{self.base}/graph/{graph}/trigger", json=body)
        assert r.status_code == 200, r.text
        run_id: str = r.json()["run_id"]
        return run_id

    async def get_graph(self, graph: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.base}/graph/{graph}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def trigger_raw(self, graph: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(f"{self.base}/graph/{graph}/trigger", json=body)

    async def enqueue_raw(self, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(f"{self.base}/states/enqueue", json=body)

    async def claim_one(self, *nodes: str) -> dict[str, Any]:
        """Claim exactly one state of ``nodes`` (fails if there is not exactly one)."""
        states = await self.claim(*nodes)
        assert len(states) == 1, states
        return states[0]

    async def node_details(self, graph: str, run_id: str, state_id: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.base}/graph/{graph}/run/{run_id}/node/{state_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def claim(
        self, *nodes: str, batch_size: int = 100, wait_ms: int = 0
    ) -> list[dict[str, Any]]:
        r = await self.client.post(
            f"{self.base}/states/enqueue",
            json={"nodes": list(nodes), "batch_size": batch_size, "wait_ms": wait_ms},
        )
        assert r.status_code == 200, r.text
        states: list[dict[str, Any]] = r.json()["states"]
        return states

    async def post_state(self, state_id: str, action: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(f"{self.base}/state/{state_id}/{action}", json=body)

    async def executed(self, state_id: str, *outputs: dict[str, str]) -> None:
        r = await self.post_state(state_id, "executed", {"outputs": list(outputs)})
        assert r.status_code == 200, r.text

    async def errored(self, state_id: str, error: str = "boom") -> dict[str, Any]:
        r = await self.post_state(state_id, "errored", {"error": error})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def run_graph(self, run_id: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.base}/states/run/{run_id}/graph")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def run_summary(self, run_id: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.base}/runs/1/1000")
        assert r.status_code == 200, r.text
        for run in r.json()["runs"]:
            if run["run_id"] == run_id:
                found: dict[str, Any] = run
                return found
        raise AssertionError(f"run {run_id} not listed")
