"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) against a
real server process and a real worker process, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
from typing import Any

from dashboard_support import BIG_FANOUT, SECRET_VALUE, Dash, screenshot, sign_in
from playwright.sync_api import BrowserContext, Page, Route, expect


def _box(page: Page, identifier: str) -> Any:
    return page.locator(f'g.box[data-identifier="{identifier}"]')


def _dots(page: Page, identifier: str, status: str) -> Any:
    return _box(page, identifier).locator(f"circle.dot.st-{status}")


def test_sign_in_redirects_back_to_the_asked_page(page: Page, dash: Dash) -> None:
    asked = f"/dashboard/namespaces/{dash.namespace}/runs?size=50"
    page.goto(dash.url(asked))
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    page.get_by_label("API key").fill("not-the-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong API key.")
    page.get_by_label("API key").fill(dash.server.key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(dash.url(asked))
    expect(page.locator("#runs-controls select[name=size]")).to_have_value("50")
    expect(page.locator("#runs-live")).to_be_visible()
    [cookie] = [c for c in page.context.cookies() if c["name"] == "exo_dashboard_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    assert dash.server.key not in page.url
    stored = page.evaluate("JSON.stringify([localStorage, sessionStorage, document.cookie])")
    assert dash.server.key not in stored and "exo_dashboard_session" not in stored


def test_runs_table_refreshes_itself(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    page.goto(dash.url(f"/dashboard/namespaces/{dash.namespace}/runs?refresh=1"))
    page.evaluate("window.__notReloaded = true")
    run_id = dash.trigger("flaky", gate=str(dash.gate("table-never")))
    row = page.locator(f'tr[data-run-id="{run_id}"]')
    expect(row).to_be_visible(timeout=15_000)
    expect(row.locator(".badge")).to_have_text("FAILED", timeout=15_000)
    expect(row.locator("td.num").nth(2)).to_have_text("1")  # errored
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#refresh-select")).to_have_value("1")


def test_overview_shows_nodes_schemas_and_templates(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    page.goto(dash.url(f"/dashboard/namespaces/{dash.namespace}"))
    nodes = page.locator("#registered-nodes")
    for name in ("Fan", "Hold", "Flaky", "Gather", "Idle"):
        expect(nodes.locator(f'details[data-node="{name}"]')).to_be_visible()
    fan = nodes.locator('details[data-node="Fan"]')
    fan.locator("summary").click()
    expect(fan.locator("td.mono", has_text="count").first).to_be_visible()
    templates = page.locator("#graph-templates")
    for name in ("live", "flaky", "big"):
        item = templates.locator(f'li[data-graph="{name}"]')
        expect(item.locator(".badge")).to_have_text("VALID")
    screenshot(page, dash, "overview")
    page.locator('li[data-graph="live"] a').click()
    expect(page.locator("#secret-names")).to_contain_text("api_token")
    expect(page.locator("svg.graph path.edge-unites")).to_have_count(1)
    expect(page.locator("svg.graph path.edge-next")).to_have_count(1)
    screenshot(page, dash, "graph")
    assert SECRET_VALUE not in page.content()


def test_run_graph_fills_in_live_while_the_worker_executes_it(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    gate = dash.gate("live-open")
    run_id = dash.trigger("live", count="3", gate=str(gate))
    page.goto(dash.run_url(run_id))
    page.evaluate("window.__notReloaded = true")
    # The worker holds three fan-out branches until the gate opens.
    expect(_dots(page, "hold", "QUEUED")).to_have_count(3, timeout=30_000)
    expect(_box(page, "fan")).to_contain_text("fan-out of 3")
    expect(_box(page, "gather")).to_contain_text("join: 0 of 3 finished")
    _dots(page, "hold", "QUEUED").first.click()
    expect(_box(page, "hold").locator("circle.dot.selected")).to_have_count(1)
    why = page.locator("#why-waiting")
    expect(why).to_contain_text("Held by a worker")
    expect(why).to_contain_text("lease ends")
    screenshot(page, dash, "run-live")
    gate.touch()
    expect(page.locator("main")).to_have_attribute("data-run-status", "SUCCESS", timeout=30_000)
    expect(_dots(page, "hold", "SUCCESS")).to_have_count(3)
    expect(_dots(page, "gather", "SUCCESS")).to_have_count(1)
    expect(page.locator('.tile[data-status="SUCCESS"] .tile-count')).to_have_text("7")
    assert page.evaluate("window.__notReloaded") is True  # updated in place, no reload


def _failed_flaky_run(dash: Dash, gate_name: str) -> tuple[str, str]:
    run_id = dash.trigger("flaky", gate=str(dash.gate(gate_name)))
    dash.wait_run(run_id, lambda r: r["status"] == "FAILED")
    [state] = dash.states(run_id)
    return run_id, state["id"]


def test_node_details_and_retry_from_the_page(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    run_id, state_id = _failed_flaky_run(dash, "flaky-open")
    page.goto(dash.run_url(run_id))
    _dots(page, "flaky", "ERRORED").click()
    details = page.locator("#state-details")
    expect(details).to_have_attribute("data-state-id", state_id)
    expect(details.locator("h2 .badge")).to_have_text("ERRORED")
    expect(page.locator("#state-error")).to_contain_text("is closed")
    expect(page.locator("#state-inputs")).to_contain_text("flaky-open")
    expect(page.locator("#attempts tbody tr")).to_have_count(1)
    assert f"state={state_id}" in page.url  # a deep link to this state
    screenshot(page, dash, "run-failed")
    dash.gate("flaky-open").touch()
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#retry-button").click()
    expect(page).not_to_have_url(re.compile(state_id))
    expect(details.locator("h2 .badge")).to_have_text("SUCCESS", timeout=30_000)
    expect(page.locator("#attempts tbody tr")).to_have_count(2)
    expect(page.locator("#attempts tbody tr").first).to_contain_text("RETRY_CREATED")
    assert dash.run(run_id)["status"] == "SUCCESS"


def test_cancel_a_run_from_its_page(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    gate = dash.gate("cancel-open")
    run_id = dash.trigger("live", count="2", gate=str(gate))
    page.goto(dash.run_url(run_id))
    expect(_dots(page, "hold", "QUEUED")).to_have_count(2, timeout=30_000)
    cancel_url = dash.url(f"/dashboard/namespaces/{dash.namespace}/runs/{run_id}/cancel")
    # Signed in, but without the page's CSRF token: refused, and nothing is cancelled.
    forged = page.request.post(cancel_url, form={"csrf_token": "guessed"}, max_redirects=0)
    assert forged.status == 403, forged.status
    assert dash.run(run_id)["status"] == "PENDING"

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel-button").click()
    expect(page.locator("main")).to_have_attribute("data-run-status", "CANCELLED")
    expect(page.locator(".tile-status .badge")).to_have_text("CANCELLED")
    expect(_dots(page, "hold", "CANCELLED")).to_have_count(2)
    expect(page.locator("#cancel-button")).to_have_count(0)  # only a run in flight has it
    expect(page.locator('.tile[data-status="CANCELLED"] .tile-count')).to_have_text("2")
    assert dash.run(run_id)["status"] == "CANCELLED"
    gate.touch()  # the worker finishes, is refused, and frees its slots
    _dots(page, "hold", "CANCELLED").first.click()
    expect(page.locator("#state-details h2 .badge")).to_have_text("CANCELLED")
    expect(page.locator("#retry-button")).to_have_count(0)  # nothing restarts in it
    # The worker's late reports changed nothing.
    time.sleep(0.5)
    assert {s["status"] for s in dash.states(run_id)} == {"SUCCESS", "CANCELLED"}


def test_trigger_a_run_from_the_graph_page(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    page.goto(dash.url(f"/dashboard/namespaces/{dash.namespace}/graphs/live"))
    form = page.locator("#trigger-form")
    expect(form.locator('label[for="store-2"] .required')).to_have_text("required")
    expect(form.locator('input[name="input.gate"]')).to_have_attribute(
        "placeholder", "${{ store.gate }}"
    )
    # Without a required key the server refuses and says which one (the browser's own
    # check is taken away to reach the server).
    form.locator('input[name="store.count"]').fill("2")
    page.evaluate(
        "document.querySelectorAll('#trigger-form [required]')"
        ".forEach(e => e.removeAttribute('required'))"
    )
    page.locator("#trigger-button").click()
    expect(page.locator("#trigger-error")).to_contain_text("Missing store keys: gate")
    gate = dash.gate("trigger-open")
    gate.touch()
    page.locator('#trigger-form input[name="store.gate"]').fill(str(gate))
    page.locator("#trigger-button").click()
    page.wait_for_url(lambda url: "/runs/" in url)
    run_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("main")).to_have_attribute("data-run-status", "SUCCESS", timeout=30_000)
    expect(_dots(page, "hold", "SUCCESS")).to_have_count(2)
    assert dash.run(run_id)["success_count"] == 5


def test_a_10000_state_run_page(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    run_id = dash.trigger("big", count=str(BIG_FANOUT), gate=str(dash.gate("never")))
    dash.wait_run(run_id, lambda r: r["total_count"] == 2 * BIG_FANOUT, limit_s=120)
    url = dash.run_url(run_id)
    loads: list[float] = []
    server_ms: list[float] = []
    for _ in range(3):
        started = time.perf_counter()
        response = page.goto(url, wait_until="load")
        loads.append((time.perf_counter() - started) * 1000)
        assert response is not None and response.status == 200
        server_ms.append(
            page.evaluate(
                "(() => { const t = performance.getEntriesByType('navigation')[0];"
                " return t.responseStart - t.requestStart; })()"
            )
        )
    size = len(response.body())
    print(
        f"\n[dashboard] {dash.backend}: run page of {2 * BIG_FANOUT:,} states, "
        f"{size / 1024:.0f} KiB of HTML; load in ms {', '.join(f'{t:.0f}' for t in loads)}"
        f" (server answered in {', '.join(f'{t:.0f}' for t in server_ms)})"
    )
    # What is shipped is bounded by the template, not by the run: no row per state.
    assert size < 100_000, size
    expect(_box(page, "fan")).to_contain_text(f"{BIG_FANOUT:,} states · fan-out of {BIG_FANOUT:,}")
    expect(_box(page, "idle")).to_contain_text(f"{BIG_FANOUT:,} states")
    expect(_box(page, "gather")).to_contain_text(f"join: 0 of {BIG_FANOUT:,} finished")
    screenshot(page, dash, "run-10000")
    _box(page, "idle").locator("a.box-link").click()
    listing = page.locator("#node-states")
    expect(listing).to_contain_text(f"page 1 of {BIG_FANOUT // 50}")
    expect(page.locator("#node-states-table tbody tr")).to_have_count(50)
    expect(listing).to_contain_text("no registered runtime has claimed it")
    page.locator("#next-page").click()
    expect(listing).to_contain_text(f"page 2 of {BIG_FANOUT // 50}")
    _box(page, "gather").locator("a.box-link").click()
    expect(page.locator("#node-states .join")).to_contain_text("still open")


def test_sign_out(signed_in: Page, dash: Dash) -> None:
    page = signed_in
    page.goto(dash.url(f"/dashboard/namespaces/{dash.namespace}/runs?refresh=0"))
    screenshot(page, dash, "runs")
    page.locator("#sign-out").click()
    page.wait_for_url(lambda url: "/dashboard/login" in url)
    assert not [c for c in page.context.cookies() if c["name"] == "exo_dashboard_session"]
    page.goto(dash.url(f"/dashboard/namespaces/{dash.namespace}/runs"))
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))


def _forged_form(action: str) -> str:
    return (
        "<html><body><form id=f method=post action='" + action + "'>"
        "<input name=csrf_token value=guessed></form>"
        "<script>document.getElementById('f').submit()</script></body></html>"
    )


def test_requests_without_the_cookie_or_from_forged_forms_are_refused(
    context: BrowserContext, dash: Dash
) -> None:
    run_id, state_id = _failed_flaky_run(dash, "forged-never")
    retry = dash.url(
        f"/dashboard/namespaces/{dash.namespace}/runs/{run_id}/states/{state_id}/retry"
    )
    page = context.new_page()
    # No cookie: a page redirects to sign-in, an action is refused.
    page.goto(dash.run_url(run_id))
    assert "/dashboard/login" in page.url
    refused = page.request.post(retry, form={"csrf_token": "x"}, max_redirects=0)
    assert refused.status == 403, refused.status
    sign_in(page, dash)
    # A forged form on another site: SameSite=Strict keeps the cookie home.
    evil_site = "http://evil.invalid/attack"
    # The same site on another port gets the cookie, but not our Origin or CSRF token.
    same_site = dash.server.base_url.rsplit(":", 1)[0] + ":9/attack"
    for origin_page in (evil_site, same_site):
        page.route(
            origin_page,
            lambda route: route.fulfill(body=_forged_form(retry), content_type="text/html"),
        )
        with page.expect_response(retry) as answer:
            page.goto(origin_page)
        assert answer.value.status == 403, (origin_page, answer.value.status)
        expect(page.locator("#error-message")).to_be_visible()
    assert dash.states(run_id)[0]["status"] == "ERRORED"  # nothing was retried


def test_api_docs_render_without_internet(context: BrowserContext, dash: Dash) -> None:
    """/docs draws Swagger UI from the server's own files; any other host is cut off."""
    elsewhere: list[str] = []

    def only_local(route: Route) -> None:
        if route.request.url.startswith(dash.server.base_url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    page.goto(dash.url("/docs"))
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Exosphere State Manager")
    expect(page.locator(".opblock").first).to_be_visible()
    assert page.locator(".opblock").count() > 15
    assert elsewhere == []
