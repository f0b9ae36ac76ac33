"""The dashboard's rules over plain HTTP, on both backends: sign-in, sessions, CSRF and
origin checks, error pages, the trigger form, secrets, and the air-gapped API docs."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sm_api import Api, node, template_node
from sm_support import API_KEY, ENCRYPTION_KEY, RunningServer
from state_manager.dashboard import session

NS = "dash-http"
SECRET = "secret-value-that-must-not-leak"


@dataclass
class Visitor:
    """An httpx client that signs in like the sign-in page does."""

    http: httpx.AsyncClient
    origin: str
    csrf: str = ""

    async def sign_in(self, key: str = API_KEY, next_url: str = "/dashboard/") -> httpx.Response:
        page = await self.http.get("/dashboard/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text)
        assert nonce, page.text
        return await self.http.post(
            "/dashboard/login",
            data={"api_key": key, "nonce": nonce.group(1), "next": next_url},
            headers={"Origin": self.origin},
        )

    async def page(self, path: str) -> httpx.Response:
        response = await self.http.get(path)
        found = re.search(r'name="csrf_token" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    async def post(self, path: str, data: dict[str, str], **headers: str) -> httpx.Response:
        return await self.http.post(path, data=data, headers={"Origin": self.origin, **headers})


@pytest.fixture
async def visitor(server: RunningServer) -> AsyncIterator[Visitor]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        yield Visitor(http, server.base_url)


@pytest.fixture
async def signed_in(visitor: Visitor) -> Visitor:
    response = await visitor.sign_in()
    assert response.status_code == 303, response.text
    await visitor.page("/dashboard/")
    assert visitor.csrf
    return visitor


async def _failed_run(client: httpx.AsyncClient) -> tuple[str, str]:
    """A run of graph ``one`` whose only state ERRORED (no retries)."""
    api = Api(client, NS)
    await api.register(node("One", inputs=("x",), outputs=("y",)))
    await api.create_graph(
        "one",
        {
            "nodes": [template_node("One", "one", NS, {"x": "${{ store.x }}"})],
            "secrets": {"token": SECRET},
            "retry_policy": {"max_retries": 0},
            "store_config": {"required_keys": ["x"]},
        },
    )
    run_id = await api.trigger("one", store={"x": "1"})
    state = await api.claim_one("One")
    await api.errored(state["state_id"], "it broke")
    return run_id, state["state_id"]


def _retry_path(run_id: str, state_id: str) -> str:
    return f"/dashboard/namespaces/{NS}/runs/{run_id}/states/{state_id}/retry"


async def _status(client: httpx.AsyncClient, run_id: str, state_id: str) -> str:
    details = await Api(client, NS).node_details("one", run_id, state_id)
    status: str = details["status"]
    return status


PAGES = (
    "/dashboard/",
    f"/dashboard/namespaces/{NS}",
    f"/dashboard/namespaces/{NS}/runs?page=2&size=50",
    f"/dashboard/namespaces/{NS}/runs/some-run?state=abc",
    f"/dashboard/namespaces/{NS}/graphs/one",
)


async def test_every_page_leads_to_sign_in_and_back(visitor: Visitor) -> None:
    for path in PAGES:
        response = await visitor.http.get(path)
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/login?next=" + quote(path, safe="")
        signed = await visitor.sign_in(next_url=path)
        assert signed.status_code == 303
        assert signed.headers["location"] == path
        visitor.http.cookies.clear()


async def test_sign_in_rules(visitor: Visitor) -> None:
    wrong = await visitor.sign_in(key="wrong")
    assert wrong.status_code == 401 and "Wrong API key." in wrong.text
    assert session.SESSION_COOKIE not in wrong.headers.get("set-cookie", "")
    # Anything but a local dashboard path is replaced by the home page.
    for target in ("https://evil.example/", "//evil.example/x", "/v0/namespaces"):
        redirected = await visitor.sign_in(next_url=target)
        assert redirected.headers["location"] == "/dashboard/", target
    ok = await visitor.sign_in()
    cookie = ok.headers["set-cookie"]
    assert cookie.startswith(session.SESSION_COOKIE + "=")
    for flag in ("HttpOnly", "SameSite=strict", "Path=/dashboard"):
        assert flag.lower() in cookie.lower(), cookie
    assert API_KEY not in cookie and API_KEY not in ok.headers["location"]


async def test_sign_in_needs_its_own_form_and_origin(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        # No nonce cookie from the sign-in page: a form posted from elsewhere.
        forged = await http.post(
            "/dashboard/login",
            data={"api_key": API_KEY, "nonce": "made-up"},
            headers={"Origin": server.base_url},
        )
        assert forged.status_code == 400
        page = await http.get("/dashboard/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page.text)
        assert nonce
        cross = await http.post(
            "/dashboard/login",
            data={"api_key": API_KEY, "nonce": nonce.group(1)},
            headers={"Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        assert session.SESSION_COOKIE not in http.cookies


async def test_actions_need_the_session_its_csrf_token_and_our_origin(
    signed_in: Visitor, client: httpx.AsyncClient, server: RunningServer
) -> None:
    run_id, state_id = await _failed_run(client)
    path = _retry_path(run_id, state_id)
    token = signed_in.csrf
    refused = [
        await signed_in.post(path, {}),
        await signed_in.post(path, {"csrf_token": token + "x"}),
        await signed_in.post(path, {"csrf_token": token}, Origin="http://evil.example"),
        await signed_in.http.post(
            path, data={"csrf_token": token}, headers={"Referer": "http://evil.example/x"}
        ),
        await signed_in.http.post(
            path, json={"csrf_token": token}, headers={"Origin": server.base_url}
        ),
    ]
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        refused.append(
            await anonymous.post(
                path, data={"csrf_token": token}, headers={"Origin": server.base_url}
            )
        )
    for response in refused:
        assert response.status_code == 403, response.text
        assert response.headers["content-type"].startswith("text/html")
    assert await _status(client, run_id, state_id) == "ERRORED"
    accepted = await signed_in.post(path, {"csrf_token": token})
    assert accepted.status_code == 303, accepted.text
    new_id = accepted.headers["location"].split("state=")[1]
    assert new_id != state_id
    assert await _status(client, run_id, state_id) == "RETRY_CREATED"
    # A retried state cannot be retried again: the page says why.
    again = await signed_in.post(path, {"csrf_token": token})
    assert again.status_code == 400 and "already retried" in again.text


async def test_cancel_needs_the_csrf_token_and_a_run_in_flight(
    signed_in: Visitor, client: httpx.AsyncClient
) -> None:
    api = Api(client, NS)
    await api.register(node("Timed"))
    await api.create_graph("timed", {"nodes": [template_node("Timed", "t", NS)], "timeout": 90})
    run_id = await api.trigger("timed")
    state = await api.claim_one("Timed")
    page = await signed_in.page(
        f"/dashboard/namespaces/{NS}/runs/{run_id}?state={state['state_id']}"
    )
    assert 'id="cancel-button"' in page.text
    assert re.search(r'id="state-timeout">90 s after its claim<', page.text), page.text
    path = f"/dashboard/namespaces/{NS}/runs/{run_id}/cancel"
    for refused in (
        await signed_in.post(path, {}),
        await signed_in.post(path, {"csrf_token": signed_in.csrf}, Origin="http://evil.example"),
    ):
        assert refused.status_code == 403, refused.text
    assert (await api.run_summary(run_id))["status"] == "PENDING"
    accepted = await signed_in.post(path, {"csrf_token": signed_in.csrf})
    assert accepted.status_code == 303, accepted.text
    assert accepted.headers["location"] == f"/dashboard/namespaces/{NS}/runs/{run_id}"
    assert (await api.run_summary(run_id))["status"] == "CANCELLED"
    page = await signed_in.page(accepted.headers["location"])
    assert 'data-run-status="CANCELLED"' in page.text
    assert 'id="cancel-button"' not in page.text
    # Twice is harmless; a finished run is an error page that says why.
    again = await signed_in.post(path, {"csrf_token": signed_in.csrf})
    assert again.status_code == 303, again.text
    finished, _ = await _failed_run(client)
    refused = await signed_in.post(
        f"/dashboard/namespaces/{NS}/runs/{finished}/cancel", {"csrf_token": signed_in.csrf}
    )
    assert refused.status_code == 409 and "already finished (FAILED)" in refused.text


async def test_forged_expired_and_rotated_sessions_are_refused(
    visitor: Visitor, server: RunningServer
) -> None:
    good = session.Signer(session.signing_key(API_KEY, ENCRYPTION_KEY))
    now = int(time.time())
    _s, valid = good.new_session(now, 600)
    _s, expired = good.new_session(now - 7200, 3600)
    _s, other_key = session.Signer(
        session.signing_key("an-old-api-key", ENCRYPTION_KEY)
    ).new_session(now, 600)
    body, mac = valid.split(".")
    tampered = body[:-1] + ("A" if body[-1] != "A" else "B") + "." + mac
    for cookie in (valid, expired, other_key, tampered, "garbage"):
        visitor.http.cookies.set(session.SESSION_COOKIE, cookie, path="/dashboard")
        response = await visitor.http.get("/dashboard/")
        expected = 200 if cookie is valid else 303
        assert response.status_code == expected, cookie
        visitor.http.cookies.clear()


async def test_sign_out_needs_the_csrf_token(signed_in: Visitor) -> None:
    refused = await signed_in.post("/dashboard/logout", {})
    assert refused.status_code == 403
    out = await signed_in.post("/dashboard/logout", {"csrf_token": signed_in.csrf})
    assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
    assert session.SESSION_COOKIE not in signed_in.http.cookies
    assert (await signed_in.http.get("/dashboard/")).status_code == 303


async def test_pages_carry_security_headers_and_errors_are_pages(
    signed_in: Visitor, client: httpx.AsyncClient
) -> None:
    run_id, _state_id = await _failed_run(client)
    ok = await signed_in.page(f"/dashboard/namespaces/{NS}/runs/{run_id}")
    assert ok.status_code == 200
    assert "default-src 'self'" in ok.headers["content-security-policy"]
    assert ok.headers["x-frame-options"] == "DENY"
    assert ok.headers["cache-control"] == "no-store"
    cases: list[tuple[str, int, str]] = [
        (f"/dashboard/namespaces/{NS}/runs/no-such-run", 404, "not found"),
        (f"/dashboard/namespaces/{NS}/runs/{run_id}?state=not-an-id", 400, "Invalid node ID"),
        (f"/dashboard/namespaces/{NS}/runs/{run_id}?node=one&status=NOPE", 400, "Unknown status"),
        (f"/dashboard/namespaces/{NS}/runs/{run_id}?node=nope", 404, "not part of graph"),
        (f"/dashboard/namespaces/{NS}/graphs/missing", 404, "not found"),
        (f"/dashboard/namespaces/{NS}/runs?page=0", 400, "page"),
        ("/dashboard/no/such/page", 404, "No dashboard page at /dashboard/no/such/page"),
    ]
    for path, status, text in cases:
        response = await signed_in.http.get(path)
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"].startswith("text/html")
        assert text in response.text, (path, response.text)
        assert "default-src 'self'" in response.headers["content-security-policy"]


async def test_trigger_form(signed_in: Visitor, client: httpx.AsyncClient) -> None:
    await _failed_run(client)
    path = f"/dashboard/namespaces/{NS}/graphs/one/trigger"
    token = signed_in.csrf
    missing = await signed_in.post(path, {"csrf_token": token})
    assert missing.status_code == 400 and "Missing store keys: x" in missing.text
    for bad, text in (
        ({"store.x": "a\x00b"}, "NUL"),
        ({"store.x": "1", "start_delay": "-5"}, "start_delay"),
        ({"store.x": "1", "more_store": "junk"}, "key=value"),
    ):
        response = await signed_in.post(path, {"csrf_token": token, **bad})
        assert response.status_code == 400 and text in response.text, response.text
    started = await signed_in.post(
        path, {"csrf_token": token, "store.x": "7", "more_store": "extra=yes"}
    )
    assert started.status_code == 303, started.text
    run_id = started.headers["location"].rsplit("/", 1)[1]
    summary = await client.get(f"/v0/namespace/{NS}/run/{run_id}")
    assert summary.status_code == 200 and summary.json()["total_count"] == 1
    state = await Api(client, NS).claim_one("One")
    assert state["inputs"] == {"x": "7"}


async def test_secret_values_are_never_shown(signed_in: Visitor, client: httpx.AsyncClient) -> None:
    run_id, state_id = await _failed_run(client)
    for path in (
        "/dashboard/",
        f"/dashboard/namespaces/{NS}",
        f"/dashboard/namespaces/{NS}/graphs/one",
        f"/dashboard/namespaces/{NS}/runs/{run_id}?state={state_id}",
    ):
        response = await signed_in.http.get(path)
        assert response.status_code == 200
        assert SECRET not in response.text, path
    graph_page = await signed_in.http.get(f"/dashboard/namespaces/{NS}/graphs/one")
    assert "<code>token</code>" in graph_page.text


async def test_api_docs_are_served_from_the_server(visitor: Visitor) -> None:
    docs = await visitor.http.get("/docs")
    assert docs.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", docs.text)
    assert len(assets) >= 3, docs.text
    assert all(a.startswith("/dashboard/static/vendor/swagger-ui/") for a in assets), assets
    assert "https://" not in docs.text and "http://" not in docs.text
    assert '"validatorUrl": null' in docs.text
    expected: dict[str, Any] = {
        "swagger-ui-bundle.js": ("javascript", "SwaggerUIBundle"),
        "swagger-ui.css": ("text/css", ".swagger-ui"),
        "favicon-32x32.png": ("image/png", ""),
    }
    for asset in assets:
        response = await visitor.http.get(asset)
        assert response.status_code == 200, asset
        kind, marker = next(v for k, v in expected.items() if k in asset)
        assert kind in response.headers["content-type"]
        assert marker in response.text if marker else response.content
    schema = (await visitor.http.get("/openapi.json")).json()
    assert not [p for p in schema["paths"] if p.startswith("/dashboard")]
    assert (await visitor.http.get("/redoc")).status_code == 404


async def test_graph_page_shows_cron_triggers_and_their_fire_records(
    signed_in: Visitor, client: httpx.AsyncClient
) -> None:
    api = Api(client, NS)
    await api.register(node("One", inputs=("x",), outputs=("y",)))
    await api.create_graph(
        "cron",
        {
            "nodes": [template_node("One", "one", NS, {"x": "1"})],
            "triggers": [{"type": "CRON", "value": {"expression": "*/5 * * * *"}}],
        },
    )
    page = await signed_in.http.get(f"/dashboard/namespaces/{NS}/graphs/cron")
    assert page.status_code == 200
    assert "<code>CRON */5 * * * *</code>" in page.text
    scheduled = re.findall(r"<td><code>\*/5 \* \* \* \*</code></td><td>PENDING</td>", page.text)
    assert len(scheduled) == 1, page.text
