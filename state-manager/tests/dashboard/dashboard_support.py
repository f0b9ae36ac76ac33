"""Support of the dashboard's browser tests: the API client of one backend, graphs,
the worker process, sign-in and screenshots (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page
from sm_api import template_node
from sm_support import ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WORKER = Path(__file__).with_name("dashboard_worker.py")
SCREENSHOTS = os.environ.get("EXOSPHERE_DASHBOARD_SCREENSHOTS", "")
SECRET_VALUE = "s3cr3t-value-never-shown"
BIG_FANOUT = 5_000  # a fan-out of 5,000 and one state below each: a 10,000-state run


@dataclass
class Dash:
    """One backend's server, worker and namespace, with a small sync API client."""

    backend: str
    server: ServerProcess
    namespace: str
    gates: Path
    http: httpx.Client

    @property
    def base(self) -> str:
        return f"/v0/namespace/{self.namespace}"

    def url(self, path: str) -> str:
        return self.server.base_url + path

    def trigger(self, graph: str, **store: str) -> str:
        r = self.http.post(f"{self.base}/graph/{graph}/trigger", json={"store": store})
        assert r.status_code == 200, r.text
        run_id: str = r.json()["run_id"]
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        r = self.http.get(f"{self.base}/run/{run_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait_run(self, run_id: str, check: Callable[[dict[str, Any]], bool], limit_s: float = 60):
        deadline = time.monotonic() + limit_s
        while True:
            summary = self.run(run_id)
            if check(summary):
                return summary
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} never reached the expected state: {summary}")
            time.sleep(0.1)

    def states(self, run_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.base}/states/run/{run_id}/graph")
        assert r.status_code == 200, r.text
        nodes: list[dict[str, Any]] = r.json()["nodes"]
        return nodes

    def gate(self, name: str) -> Path:
        return self.gates / name

    def run_url(self, run_id: str) -> str:
        return self.url(f"/dashboard/namespaces/{self.namespace}/runs/{run_id}")


def graphs(ns: str) -> dict[str, dict[str, Any]]:
    def fan(successor: str) -> dict[str, Any]:
        inputs = {"count": "${{ store.count }}", "gate": "${{ store.gate }}"}
        return template_node("Fan", "fan", ns, inputs, [successor])

    gather = template_node(
        "Gather", "gather", ns, {"count": "${{ fan.outputs.item }}"}, unites={"identifier": "fan"}
    )
    return {
        "live": {
            "nodes": [
                fan("hold"),
                template_node(
                    "Hold",
                    "hold",
                    ns,
                    {"item": "${{ fan.outputs.item }}", "gate": "${{ fan.outputs.gate }}"},
                ),
                gather,
            ],
            "secrets": {"api_token": SECRET_VALUE},
            "store_config": {"required_keys": ["count", "gate"], "default_values": {"x": "1"}},
        },
        "flaky": {
            "nodes": [template_node("Flaky", "flaky", ns, {"gate": "${{ store.gate }}"})],
            "retry_policy": {"max_retries": 0},
            "store_config": {"required_keys": ["gate"]},
        },
        "big": {
            "nodes": [
                fan("idle"),
                template_node("Idle", "idle", ns, {"item": "${{ fan.outputs.item }}"}),
                gather,
            ],
            "store_config": {"required_keys": ["count", "gate"]},
        },
    }


def wait_registered(http: httpx.Client, ns: str, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = http.get(f"/v0/namespace/{ns}/nodes/")
        if r.status_code == 200 and r.json()["count"] >= 4:
            return
        if worker.poll() is not None:
            raise RuntimeError(f"the dashboard test worker exited with {worker.returncode}")
        time.sleep(0.1)
    raise TimeoutError("the dashboard test worker did not register its nodes")


def create_graph(http: httpx.Client, ns: str, name: str, body: dict[str, Any]) -> None:
    r = http.put(f"/v0/namespace/{ns}/graph/{name}", json={"secrets": {}, **body})
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 30
    while True:
        status = http.get(f"/v0/namespace/{ns}/graph/{name}").json()["validation_status"]
        if status == "VALID":
            return
        assert status == "PENDING" and time.monotonic() < deadline, status
        time.sleep(0.05)


def sign_in(page: Page, dash: Dash, path: str = "/dashboard/") -> None:
    """Open ``path``, land on the sign-in page, sign in, and come back to ``path``."""
    page.goto(dash.url(path))
    assert "/dashboard/login" in page.url, page.url
    page.get_by_label("API key").fill(dash.server.key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(dash.url(path))


def screenshot(page: Page, dash: Dash, name: str) -> None:
    """Save a docs screenshot when asked to (SQLite run only, so each is taken once)."""
    if SCREENSHOTS and dash.backend == "sqlite":
        folder = Path(SCREENSHOTS)
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{name}.png"))
