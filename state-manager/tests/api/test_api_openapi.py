"""The OpenAPI schema and the server agree: statuses, strict integers, bounds, Allow, /metrics.

The thorough check is schemathesis (test_api_schemathesis.py); these are the precise cases.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from sm_api import Api, error_locations, expect_error, node

NS = "openapi"


async def _schema(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    schema: dict[str, Any] = r.json()
    return schema


async def test_every_v0_route_documents_its_errors_with_one_model(
    client: httpx.AsyncClient,
) -> None:
    schema = await _schema(client)
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema["paths"].items():
        if not path.startswith("/v0/"):
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("400", "401", "413", "500", "503"):
                assert responses[status]["content"]["application/json"]["schema"] == error, (
                    method,
                    path,
                    status,
                )
            if "{state_id}" in path or path.endswith("/run/{run_id}"):
                assert "404" in responses, (method, path)
            assert operation["security"] == [{"APIKeyHeader": []}]
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "Equal to the server's STATE_MANAGER_SECRET.",
    }
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


async def test_schema_forbids_nul_and_states_bounds(client: httpx.AsyncClient) -> None:
    schema = await _schema(client)
    components = schema["components"]["schemas"]
    enqueue = components["EnqueueRequest"]
    assert enqueue["properties"]["nodes"]["items"]["pattern"] == "^[^\\u0000]*$"
    assert enqueue["additionalProperties"] == {"$ref": "#/components/schemas/JsonValue"}
    assert "maximum" not in enqueue["properties"]["batch_size"]
    assert "maximum" not in enqueue["properties"]["wait_ms"]
    assert "MAX_WAIT_MS is 30000" in enqueue["properties"]["wait_ms"]["description"]
    assert components["StartRunsRequest"]["properties"]["runs"]["maxItems"] == 1000
    assert components["UpsertGraphRequest"]["properties"]["nodes"]["minItems"] == 1
    runs = schema["paths"]["/v0/namespace/{namespace_name}/runs/{page}/{size}"]["get"]
    bounds = {p["name"]: p["schema"] for p in runs["parameters"]}
    assert (bounds["page"]["minimum"], bounds["page"]["maximum"]) == (1, 1_000_000_000)
    assert (bounds["size"]["minimum"], bounds["size"]["maximum"]) == (1, 1000)
    blank = re.compile(components["NodeTemplate"]["properties"]["identifier"]["pattern"])
    assert blank.fullmatch("a") and not blank.fullmatch(" \t\u3000")


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"nodes": ["A"], "batch_size": True}, ("body", "batch_size")),
        ({"nodes": ["A"], "batch_size": "5"}, ("body", "batch_size")),
        ({"nodes": ["A"], "batch_size": 1, "wait_ms": False}, ("body", "wait_ms")),
        ({"nodes": ["A"], "batch_size": 1.5}, ("body", "batch_size")),
    ],
)
async def test_a_boolean_or_a_string_is_not_an_integer(
    client: httpx.AsyncClient, body: dict[str, Any], location: tuple[str, ...]
) -> None:
    r = await Api(client, NS).enqueue_raw(body)
    assert r.status_code == 422, r.text
    assert location in error_locations(r)


async def test_integral_numbers_and_caps_are_accepted(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    r = await api.enqueue_raw({"nodes": ["A"], "batch_size": 5.0, "wait_ms": 0})
    assert r.status_code == 200, r.text
    r = await api.enqueue_raw({"nodes": ["A"], "batch_size": 10**12, "wait_ms": 0})
    assert r.status_code == 200, r.text
    r = await api.trigger_raw("nothing", {"start_delay": True})
    expect_error(r, 422)


async def test_405_allow_lists_every_documented_method(client: httpx.AsyncClient) -> None:
    await Api(client, NS).register(node("A"))
    r = await client.delete(f"/v0/namespace/{NS}/nodes/")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, PUT"
    r = await client.post(f"/v0/namespace/{NS}/graph/g")
    assert r.headers["allow"] == "GET, PUT"
    r = await client.delete("/metrics")
    assert r.headers["allow"] == "GET"


async def test_metrics_is_text_plain(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")


async def test_bounds_use_json_schema_keywords(client: httpx.AsyncClient) -> None:
    """pydantic leaves some bounds as ``gt``/``le``, which no JSON Schema tool reads."""
    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            found.extend(f"{where}.{k}" for k in ("gt", "ge", "lt", "le") if k in value)
            for key, sub in value.items():
                walk(sub, f"{where}.{key}")
        elif isinstance(value, list):
            for index, sub in enumerate(value):
                walk(sub, f"{where}[{index}]")

    schema = await _schema(client)
    walk(schema["components"], "components")
    assert found == []
    policy = schema["components"]["schemas"]["RetryPolicy"]["properties"]["max_delay"]
    assert {"type": "integer", "exclusiveMinimum": 0} in policy["anyOf"]
