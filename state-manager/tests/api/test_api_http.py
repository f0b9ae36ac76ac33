"""Cross-cutting HTTP behaviour: auth, request ids, generic errors, redirects, limits, docs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import sm_support
from sm_api import REQUEST_ID_HEADER, Api, error_locations, expect_error, node, template_node
from sm_support import API_KEY, RunningServer, serve

NS = "http"
OID = "0123456789abcdef01234567"
RUN = "00000000-0000-4000-8000-000000000000"

# Every /v0 route (method, path, a body that would be valid) — E2..E18 and the extensions.
V0_ROUTES: list[tuple[str, str, dict[str, object] | None]] = [
    ("GET", "/v0/namespaces", None),
    ("PUT", f"/v0/namespace/{NS}/nodes/", {"runtime_name": "r", "nodes": [node("A")]}),
    ("GET", f"/v0/namespace/{NS}/nodes/", None),
    (
        "PUT",
        f"/v0/namespace/{NS}/graph/g",
        {"secrets": {}, "nodes": [template_node("A", "a", NS)]},
    ),
    ("GET", f"/v0/namespace/{NS}/graph/g", None),
    ("GET", f"/v0/namespace/{NS}/graphs/", None),
    ("POST", f"/v0/namespace/{NS}/graph/g/trigger", {}),
    ("POST", f"/v0/namespace/{NS}/states/enqueue", {"nodes": ["A"], "batch_size": 1}),
    ("POST", f"/v0/namespace/{NS}/state/{OID}/executed", {"outputs": []}),
    ("POST", f"/v0/namespace/{NS}/state/{OID}/errored", {"error": "x"}),
    ("POST", f"/v0/namespace/{NS}/state/{OID}/prune", {"data": {}}),
    ("POST", f"/v0/namespace/{NS}/state/{OID}/re-enqueue-after", {"enqueue_after": 1}),
    ("POST", f"/v0/namespace/{NS}/state/{OID}/manual-retry", {"fanout_id": "f"}),
    ("POST", f"/v0/namespace/{NS}/state/{OID}/heartbeat", None),
    ("GET", f"/v0/namespace/{NS}/state/{OID}/secrets", None),
    ("GET", f"/v0/namespace/{NS}/runs/1/10", None),
    ("GET", f"/v0/namespace/{NS}/states/run/{RUN}/graph", None),
    ("GET", f"/v0/namespace/{NS}/graph/g/run/{RUN}/node/{OID}", None),
]


async def test_health_needs_no_key_and_touches_nothing(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        r = await anonymous.get("/health")
    assert r.status_code == 200
    assert r.json() == {"message": "OK"}
    assert r.headers["content-type"] == "application/json"
    uuid.UUID(r.headers[REQUEST_ID_HEADER])


async def test_every_v0_route_rejects_a_missing_or_wrong_key(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        for headers in ({}, {"x-api-key": API_KEY + "x"}, {"x-api-key": ""}):
            for method, path, body in V0_ROUTES:
                r = await anonymous.request(method, path, json=body, headers=headers)
                expect_error(r, 401, "Invalid API key")
        # The key is checked before path and body validation...
        r = await anonymous.post(
            f"/v0/namespace/{NS}/graph/g/trigger", json={"start_delay": -1, "store": {"k": 1}}
        )
        expect_error(r, 401, "Invalid API key")
        r = await anonymous.get(f"/v0/namespace/{NS}/runs/one/two")
        expect_error(r, 401, "Invalid API key")
        # ...but a body that is not JSON at all is rejected first (as FastAPI does).
        r = await anonymous.post(
            f"/v0/namespace/{NS}/graph/g/trigger",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert error_locations(r)[0][0] == "body"
        assert r.json()["detail"][0]["type"] == "json_invalid"
        # The header name is case-insensitive (the dashboard sends X-API-Key).
        r = await anonymous.get("/v0/namespaces", headers={"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        # None of the refused requests did anything.
        assert r.json() == {"namespaces": [], "count": 0}
        r = await anonymous.get(f"/v0/namespace/{NS}/graphs/", headers={"x-api-key": API_KEY})
        assert r.json()["count"] == 0


async def test_request_id_is_kept_when_it_is_a_uuid_and_generated_otherwise(
    client: httpx.AsyncClient,
) -> None:
    plain = str(uuid.uuid4())
    kept = [
        plain,
        plain.upper(),
        plain.replace("-", ""),
        "{" + plain + "}",
        "urn:uuid:" + plain,
    ]
    requests = [
        ("GET", "/health", 200),
        ("GET", "/v0/namespaces", 200),
        ("GET", "/no/such/path", 404),
        ("DELETE", "/health", 405),
        ("POST", f"/v0/namespace/{NS}/states/enqueue", 422),
        ("GET", f"/v0/namespace/{NS}/graph/missing", 404),
    ]
    for method, path, status in requests:
        for value in kept:
            r = await client.request(method, path, headers={REQUEST_ID_HEADER: value})
            assert r.status_code == status, (method, path, r.text)
            assert r.headers[REQUEST_ID_HEADER] == value
        seen = set()
        for headers in ({}, {REQUEST_ID_HEADER: "not-a-uuid"}, {REQUEST_ID_HEADER: ""}):
            r = await client.request(method, path, headers=headers)
            assert r.status_code == status
            generated = r.headers[REQUEST_ID_HEADER]
            assert str(uuid.UUID(generated)) == generated  # hyphenated, lowercase
            assert uuid.UUID(generated).version == 4
            seen.add(generated)
        assert len(seen) == 3  # fresh per request
    async with httpx.AsyncClient(base_url=str(client.base_url)) as anonymous:
        r = await anonymous.get("/v0/namespaces", headers={REQUEST_ID_HEADER: plain})
    expect_error(r, 401, "Invalid API key")
    assert r.headers[REQUEST_ID_HEADER] == plain


async def test_unknown_paths_and_wrong_methods_answer_json(client: httpx.AsyncClient) -> None:
    for path in ("/nope", "/v0/nope", f"/v0/namespace/{NS}/state/{OID}/nope", "/v1/namespaces"):
        expect_error(await client.get(path), 404, "Not Found")
    wrong_methods = [
        ("DELETE", "/health"),
        ("POST", "/v0/namespaces"),
        ("POST", f"/v0/namespace/{NS}/nodes/"),
        ("DELETE", f"/v0/namespace/{NS}/graph/g"),
        ("GET", f"/v0/namespace/{NS}/graph/g/trigger"),
        ("GET", f"/v0/namespace/{NS}/states/enqueue"),
        ("GET", f"/v0/namespace/{NS}/state/{OID}/executed"),
        ("PUT", f"/v0/namespace/{NS}/state/{OID}/secrets"),
    ]
    for method, path in wrong_methods:
        r = await client.request(method, path)
        expect_error(r, 405, "Method Not Allowed")


async def test_validation_errors_have_the_fastapi_shape(client: httpx.AsyncClient) -> None:
    r = await client.post(f"/v0/namespace/{NS}/states/enqueue", json={"nodes": "A"})
    detail = r.json()["detail"]
    assert error_locations(r) == [("body", "nodes"), ("body", "batch_size")]
    for item in detail:
        assert {"type", "loc", "msg", "input"} <= set(item)
    assert detail[1]["type"] == "missing"
    r = await client.get(f"/v0/namespace/{NS}/runs/x/10")
    assert error_locations(r) == [("path", "page")]


async def test_collection_routes_redirect_to_their_trailing_slash_form(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    for method, path in (("GET", "nodes"), ("PUT", "nodes"), ("GET", "graphs")):
        r = await client.request(method, f"{api.base}/{path}")
        assert r.status_code == 307, r.text
        assert r.headers["location"].endswith(f"{api.base}/{path}/")
        uuid.UUID(r.headers[REQUEST_ID_HEADER])
    # ...and the other routes redirect the slash form to the declared one.
    r = await client.get(f"{api.base}/graph/g/")
    assert r.status_code == 307
    assert r.headers["location"].endswith(f"{api.base}/graph/g")
    # A client that follows redirects keeps the method and body (307).
    r = await client.put(
        f"{api.base}/nodes",
        json={"runtime_name": "rt", "nodes": [node("A")]},
        follow_redirects=True,
    )
    assert r.status_code == 200, r.text
    assert r.json()["runtime_name"] == "rt"
    r = await client.get(f"{api.base}/graphs", follow_redirects=True)
    assert r.json() == {"namespace": NS, "count": 0, "templates": []}


async def test_docs_and_openapi_schema_are_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in r.text
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    assert schema["info"]["title"] == "Exosphere State Manager"
    paths = set(schema["paths"])
    base = "/v0/namespace/{namespace_name}"
    expected = {
        "/health",
        "/ready",
        "/metrics",
        "/v0/namespaces",
        f"{base}/nodes/",
        f"{base}/graph/{{graph_name}}",
        f"{base}/graphs/",
        f"{base}/graph/{{graph_name}}/trigger",
        f"{base}/states/enqueue",
        f"{base}/state/{{state_id}}/executed",
        f"{base}/state/{{state_id}}/errored",
        f"{base}/state/{{state_id}}/prune",
        f"{base}/state/{{state_id}}/re-enqueue-after",
        f"{base}/state/{{state_id}}/manual-retry",
        f"{base}/state/{{state_id}}/heartbeat",
        f"{base}/state/{{state_id}}/secrets",
        f"{base}/runs/{{page}}/{{size}}",
        f"{base}/states/run/{{run_id}}/graph",
        f"{base}/graph/{{graph_name}}/run/{{run_id}}/node/{{node_id}}",
    }
    assert expected <= paths, expected - paths
    assert set(schema["paths"][f"{base}/graph/{{graph_name}}"]) == {"get", "put"}


async def test_ready_and_metrics(client: httpx.AsyncClient) -> None:
    r = await client.get("/ready")
    assert r.status_code == 200
    assert r.json() == {"ready": True}
    api = Api(client, NS)
    await api.register(node("A"))
    await api.create_graph("g", {"nodes": [template_node("A", "a", NS)]})
    await api.trigger("g")
    await api.trigger("g")
    assert len(await api.claim("A", batch_size=1)) == 1  # one QUEUED, one CREATED
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE exosphere_states gauge" in text
    assert f'exosphere_states{{namespace="{NS}",node="A",status="QUEUED"}} 1.0' in text
    assert f'exosphere_states{{namespace="{NS}",node="A",status="CREATED"}} 1.0' in text
    assert f'exosphere_claimable_backlog{{namespace="{NS}",node="A"}} 1.0' in text
    assert f'exosphere_states_claimed_total{{namespace="{NS}",node="A"}} 1.0' in text
    assert f'exosphere_runs_triggered_total{{graph="g",namespace="{NS}",source="api"}} 2.0' in text
    assert "exosphere_http_request_duration_seconds_count" in text


async def test_cors_preflight_and_exposed_request_id(client: httpx.AsyncClient) -> None:
    origin = "http://localhost:3000"
    r = await client.options(
        "/v0/namespaces",
        headers={
            "origin": origin,
            "access-control-request-method": "GET",
            "access-control-request-headers": "x-api-key",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-allow-credentials"] == "true"
    # A browser may send an idempotent trigger.
    r = await client.options(
        "/v0/namespace/ns/graph/g/trigger",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key, idempotency-key, content-type",
        },
    )
    assert r.status_code == 200, r.text
    r = await client.get("/v0/namespaces", headers={"origin": origin})
    assert r.headers["access-control-allow-origin"] == origin
    assert "x-exosphere-request-id" in r.headers["access-control-expose-headers"].lower()
    r = await client.get("/v0/namespaces", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


async def _chunks(payload: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), 512):
        yield payload[start : start + 512]


async def test_request_bodies_over_the_limit_get_413_json(
    database_url: str, tmp_path: Path
) -> None:
    limit = 2048
    settings = sm_support.test_settings(database_url, tmp_path / "data", max_request_bytes=limit)
    with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as client:
            url = f"/v0/namespace/{NS}/nodes/"
            small = {"runtime_name": "r", "nodes": [node("A", inputs=("x" * 100,))]}
            r = await client.put(url, json=small)
            assert r.status_code == 200, r.text
            big = {"runtime_name": "r", "nodes": [node("A", inputs=("x" * (limit + 1),))]}
            message = f"Request body exceeds {limit} bytes"
            r = await client.put(url, json=big)  # with a content-length
            expect_error(r, 413, message)
            r = await client.put(url, json=big, headers={REQUEST_ID_HEADER: "{" + RUN + "}"})
            expect_error(r, 413, message)
            assert r.headers[REQUEST_ID_HEADER] == "{" + RUN + "}"
            # The limit applies before authentication too.
            r = await client.put(url, json=big, headers={"x-api-key": "wrong"})
            expect_error(r, 413, message)
            # Nothing from the rejected bodies was stored.
            r = await client.get(url)
            assert [n["inputs_schema"]["required"] for n in r.json()["nodes"]] == [["x" * 100]]


async def test_streamed_request_body_over_the_limit_gets_413(
    database_url: str, tmp_path: Path
) -> None:
    limit = 2048
    settings = sm_support.test_settings(database_url, tmp_path / "data", max_request_bytes=limit)
    big = {"runtime_name": "r", "nodes": [node("A", inputs=("x" * (limit + 1),))]}
    with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as client:
            r = await client.put(
                f"/v0/namespace/{NS}/nodes/",
                content=_chunks(httpx.Request("PUT", "/", json=big).content),
                headers={"content-type": "application/json"},
            )
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    expect_error(r, 413, f"Request body exceeds {limit} bytes")
