"""Fixtures of the dashboard's browser tests: a real server process, a real worker
process (our SDK's Runtime), graphs to run, and Debian's Chromium driven by Playwright.

Chromium is ``/usr/bin/chromium`` (``.ci/run`` installs Debian's package when it is
missing); Playwright never downloads a browser of its own. Set
``EXOSPHERE_DASHBOARD_SCREENSHOTS=docs/images`` to write the screenshots of the docs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dashboard_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    WORKER,
    Dash,
    create_graph,
    graphs,
    sign_in,
    wait_registered,
)
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from sm_api import node
from sm_support import make_database, server_process, stop_process, unique_namespace


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def dash(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dash]:
    """A server process on ``backend``, a worker process, and the test graphs (VALID)."""
    backend: str = request.param
    workdir = tmp_path_factory.mktemp(f"dashboard-{backend}")
    database = make_database(backend, workdir, prefix="exo_dash_")
    namespace = unique_namespace("dash")
    gates = workdir / "gates"
    gates.mkdir()
    try:
        with (
            server_process(database.url, workdir / "data") as server,
            httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as http,
            (workdir / "worker.log").open("wb") as log,
        ):
            worker = subprocess.Popen(
                [sys.executable, str(WORKER), namespace],
                env=server.client_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_registered(http, namespace, worker)
                # ``Idle`` is registered but no worker serves it: its states stay CREATED.
                r = http.put(
                    f"/v0/namespace/{namespace}/nodes/",
                    json={"runtime_name": "nobody", "nodes": [node("Idle", ("item",), ("x",))]},
                )
                assert r.status_code == 200, r.text
                for name, body in graphs(namespace).items():
                    create_graph(http, namespace, name, body)
                yield Dash(backend, server, namespace, gates, http)
            finally:
                stop_process(worker)
    finally:
        database.drop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for one test module; closed with it, so Playwright's event loop never
    outlives the browser tests."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies), 1440 by 900."""
    fresh = browser.new_context(viewport={"width": 1440, "height": 900})
    fresh.set_default_timeout(30_000)
    try:
        yield fresh
    finally:
        fresh.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture
def signed_in(page: Page, dash: Dash) -> Page:
    sign_in(page, dash)
    return page
