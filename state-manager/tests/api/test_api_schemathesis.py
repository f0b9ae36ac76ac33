"""The OpenAPI schema tells the truth: schemathesis against a live server, on both backends.

Runs the schemathesis CLI (``--checks all``; coverage, fuzzing and stateful phases,
authenticated with the API key) against the server's own ``/openapi.json`` and fails on
any failure or error. ``EXOSPHERE_SCHEMATHESIS_EXAMPLES`` sets the examples per operation
(CI size by default); ``EXOSPHERE_SCHEMATHESIS_SEED`` the seed (``random`` for a new one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sm_support import API_KEY, make_database, serve, test_settings

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = int(os.environ.get("EXOSPHERE_SCHEMATHESIS_EXAMPLES", "10"))
SEED = os.environ.get("EXOSPHERE_SCHEMATHESIS_SEED", "20261203")
# Long polls are capped at MAX_WAIT_MS: a short cap keeps fuzzed waits short.
MAX_WAIT_MS = 500


def summary(events: Path) -> dict[str, object]:
    """Counts from the NDJSON event stream: operations, test cases, failures, errors."""
    operations: set[str] = set()
    cases = failures = errors = 0
    for line in events.read_text().splitlines():
        event = json.loads(line)
        for kind, body in event.items():
            if kind == "ScenarioFinished":
                recorder = body.get("recorder", {})
                cases += len(recorder.get("cases", {}))
                label = recorder.get("label", "")
                if label:
                    operations.add(label)
                for checks in recorder.get("checks", {}).values():
                    failures += sum(1 for check in checks if check.get("status") == "FAILURE")
            elif kind == "NonFatalError":
                errors += 1
    return {"operations": len(operations), "cases": cases, "failures": failures, "errors": errors}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_schemathesis_finds_nothing(backend: str, tmp_path: Path) -> None:
    with make_database(backend, tmp_path) as database:
        settings = test_settings(database.url, tmp_path / "data", max_wait_ms=MAX_WAIT_MS)
        with serve(settings) as server:
            events = tmp_path / "events.ndjson"
            command = [
                sys.executable, "-m", "schemathesis.cli",
                "--config-file", str(CONFIG),
                "run", f"{server.base_url}/openapi.json",
                "--checks", "all",
                "--phases", "coverage,fuzzing,stateful",
                "--max-examples", str(EXAMPLES),
                "--workers", "2",
                "--request-timeout", "10",
                "--report", "ndjson", "--report-ndjson-path", str(events),
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
    counts = summary(events) if events.exists() else {}
    print(f"schemathesis on {backend}: {counts}")
    tail = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    assert "0 failures" in tail or " passed" in tail, tail
