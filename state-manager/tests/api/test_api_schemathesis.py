"""The OpenAPI schema tells the truth: schemathesis against a live server, on both backends.

Runs the schemathesis CLI (``--checks all``; coverage, fuzzing and stateful phases,
authenticated with the API key) against the server's own ``/openapi.json`` and fails on
any failure or error. So that requests reach real resources and not only 404s, the test
first makes some (nodes, a valid graph, runs, claimed states) and lets schemathesis draw
path parameters from their names and ids half of the time.
``EXOSPHERE_SCHEMATHESIS_EXAMPLES`` sets the examples per operation (CI size by default);
``EXOSPHERE_SCHEMATHESIS_SEED`` the seed (``random`` for a new one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sm_api import node, template_node
from sm_support import API_KEY, make_database, serve, test_settings

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = int(os.environ.get("EXOSPHERE_SCHEMATHESIS_EXAMPLES", "10"))
SEED = os.environ.get("EXOSPHERE_SCHEMATHESIS_SEED", "20261203")
# Long polls are capped at MAX_WAIT_MS: a short cap keeps fuzzed waits short.
MAX_WAIT_MS = 500


def seed(base_url: str) -> dict[str, list[str]]:
    """Resources to test against: path parameter name -> values."""
    namespace, graph = "seeded", "g"
    with httpx.Client(
        base_url=f"{base_url}/v0/namespace/{namespace}", headers={"x-api-key": API_KEY}, timeout=30
    ) as http:
        r = http.put(
            "/nodes/",
            json={"runtime_name": "rt", "nodes": [node("A", ("x",), ("y",)), node("B", ("z",))]},
        )
        assert r.status_code == 200, r.text
        nodes = [
            template_node("A", "a", namespace, {"x": "${{ store.k }}"}, ["b"]),
            template_node("B", "b", namespace, {"z": "${{ a.outputs.y }}"}),
        ]
        body = {
            "secrets": {"s": "v"},
            "nodes": nodes,
            "store_config": {"default_values": {"k": "1"}},
        }
        r = http.put(f"/graph/{graph}", json=body)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while http.get(f"/graph/{graph}").json()["validation_status"] != "VALID":
            assert time.monotonic() < deadline, "the seeded graph never became VALID"
            time.sleep(0.05)
        runs = [http.post(f"/graph/{graph}/trigger", json={}).json()["run_id"] for _ in range(6)]
        claimed = http.post("/states/enqueue", json={"nodes": ["A"], "batch_size": 4}).json()
        states = [s["state_id"] for s in claimed["states"]]
        assert len(states) == 4, claimed
        r = http.post(f"/state/{states[0]}/executed", json={"outputs": [{"y": "2"}]})
        assert r.status_code == 200, r.text
    return {
        "namespace_name": [namespace],
        "graph_name": [graph],
        "run_id": runs,
        "state_id": states,
        "node_id": states,
    }


def config_with(resources: dict[str, list[str]], path: Path) -> Path:
    """The schemathesis configuration, with path parameters drawn from ``resources`` half
    of the time."""
    text = CONFIG.read_text() + "\n# Resources made by the test.\n[parameters]\n"
    for name in resources:
        text += f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}\n'
    for name, values in resources.items():
        text += f"\n[dictionaries.{name}]\nvalues = {json.dumps(values)}\n"
    path.write_text(text)
    return path


def summary(output: str) -> str:
    """The CLI's own figures: operations tested, test cases, and the closing line."""
    lines = [line.strip() for line in output.splitlines()]
    picked = [line for line in lines if line.startswith("Tested:")]
    picked += [line for line in lines if " generated, " in line]
    picked += [line.strip("= ") for line in lines[-3:] if line.startswith("=")]
    return "; ".join(picked)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_schemathesis_finds_nothing(backend: str, tmp_path: Path) -> None:
    with make_database(backend, tmp_path) as database:
        settings = test_settings(database.url, tmp_path / "data", max_wait_ms=MAX_WAIT_MS)
        with serve(settings) as server:
            config = config_with(seed(server.base_url), tmp_path / "schemathesis.toml")
            command = [
                sys.executable, "-m", "schemathesis.cli",
                "--config-file", str(config),
                "run", f"{server.base_url}/openapi.json",
                "--checks", "all",
                "--phases", "coverage,fuzzing,stateful",
                "--max-examples", str(EXAMPLES),
                "--workers", "2",
                "--request-timeout", "10",
                "--no-color",
            ]  # fmt: skip
            if SEED != "random":
                command += ["--seed", SEED]
            result = subprocess.run(
                command,
                env={**os.environ, "EXOSPHERE_API_KEY": API_KEY},
                capture_output=True,
                text=True,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                timeout=1700,
            )
    print(f"schemathesis on {backend}: {summary(result.stdout)}")
    assert result.returncode == 0, f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    closing = [line for line in result.stdout.splitlines() if line.startswith("=")][-1]
    assert "failure" not in closing and "error" not in closing, result.stdout[-3000:]
    assert " 0 passed" not in result.stdout and " passed" in result.stdout, result.stdout[-3000:]
