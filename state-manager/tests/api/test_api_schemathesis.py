"""The OpenAPI schema tells the truth: schemathesis against a live server, on both backends.

Runs the schemathesis CLI (``--checks all``; coverage, fuzzing and stateful phases,
authenticated with the API key) against the server's own ``/openapi.json`` and fails on
any failure or error. ``EXOSPHERE_SCHEMATHESIS_EXAMPLES`` sets the examples per operation
(CI size by default); ``EXOSPHERE_SCHEMATHESIS_SEED`` the seed (``random`` for a new one).
"""

from __future__ import annotations

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
            command = [
                sys.executable, "-m", "schemathesis.cli",
                "--config-file", str(CONFIG),
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
