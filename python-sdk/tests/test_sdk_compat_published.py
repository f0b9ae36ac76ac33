"""Compatibility: the published exospherehost 0.0.3, unchanged, against our state manager.

The published SDK is installed from PyPI into its own virtual environment (built with the
same Python 3.12 interpreter as this one; never downloaded). The environment is cached in
the temporary directory (or ``EXOSPHERE_COMPAT_VENV``), so reruns skip the install.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from exospherehost import StateManager
from exospherehost.models import RunStatus
from sm_support import ServerProcess, unique_namespace

PUBLISHED = "exospherehost==0.0.3"
SCRIPT = Path(__file__).parent / "compat" / "published_graph.py"
FAN_OUT = 20
FLAKY_FAILURES = 2
RUNS = 2


def _base_python() -> str:
    """The interpreter this venv was made from (a venv of a venv would share packages)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return str(Path(base).resolve())


def _published_venv() -> Path:
    root = Path(
        os.environ.get("EXOSPHERE_COMPAT_VENV")
        or Path(tempfile.gettempdir()) / "exosphere-compat" / "exospherehost-0.0.3-py312"
    )
    python = root / "bin" / "python"
    marker = root / ".installed"
    if marker.exists() and python.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
    env.pop("VIRTUAL_ENV", None)
    uv = shutil.which("uv")
    if uv:
        commands = [
            [uv, "venv", "--quiet", "--python", _base_python(), str(root)],
            [uv, "pip", "install", "--quiet", "--python", str(python), PUBLISHED],
        ]
    else:  # pragma: no cover - CI has uv; plain venv + pip as a fallback
        commands = [
            [_base_python(), "-m", "venv", str(root)],
            [str(python), "-m", "pip", "install", "--quiet", PUBLISHED],
        ]
    for command in commands:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    # The published package (it is built on aiohttp), not this repository's.
    probe = "import aiohttp, exospherehost; print(exospherehost.VERSION, exospherehost.__file__)"
    check = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    version, _, location = check.stdout.strip().partition(" ")
    assert version == "0.0.3", check.stderr
    assert Path(location).resolve().is_relative_to(root.resolve()), location
    marker.write_text(PUBLISHED + "\n")
    return root


@pytest.fixture(scope="module")
def published_python() -> Path:
    return _published_venv() / "bin" / "python"


@pytest.fixture(params=["sqlite", "mongo"])
def compat_server(request: pytest.FixtureRequest) -> ServerProcess:
    """The server the published SDK talks to: on SQLite, and on MongoDB."""
    name = "sm_server" if request.param == "sqlite" else "sm_server_mongo"
    server: ServerProcess = request.getfixturevalue(name)
    return server


@pytest.fixture
def published_worker(
    published_python: Path, compat_server: ServerProcess, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    sm_server = compat_server
    namespace = unique_namespace("compat")
    with (tmp_path / "published-worker.log").open("wb") as log:
        process = subprocess.Popen(
            [str(published_python), str(SCRIPT), "worker", namespace],
            env=_clean_env(sm_server),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    yield namespace, process
    # The published runtime has no graceful shutdown; it is simply ended.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _clean_env(server: ServerProcess) -> dict[str, str]:
    """Environment for the published SDK: our workspace must not leak onto its path."""
    env = server.client_env()
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


async def test_published_sdk_runs_fan_out_fan_in_with_retries_and_secrets(
    published_python: Path,
    published_worker: tuple[str, subprocess.Popen[bytes]],
    compat_server: ServerProcess,
    tmp_path: Path,
) -> None:
    sm_server = compat_server
    namespace, worker = published_worker
    async with httpx.AsyncClient(
        base_url=sm_server.base_url, headers={"x-api-key": sm_server.key}
    ) as http:
        async with asyncio.timeout(60):
            while True:
                nodes = await http.get(f"/v0/namespace/{namespace}/nodes/")
                if nodes.status_code == 200 and nodes.json()["count"] == 4:
                    break
                assert worker.poll() is None, "the published worker exited"
                await asyncio.sleep(0.2)

    # The published StateManager upserts (polling validation) and triggers.
    driver = await asyncio.to_thread(
        subprocess.run,
        [str(published_python), str(SCRIPT), "trigger", namespace, str(RUNS)],
        env=_clean_env(sm_server),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert driver.returncode == 0, driver.stderr
    run_ids = json.loads(driver.stdout.strip().splitlines()[-1])
    assert len(run_ids) == RUNS

    total = 1 + FAN_OUT + (FAN_OUT + FLAKY_FAILURES) + 1
    async with StateManager(
        namespace, state_manager_uri=sm_server.base_url, key=sm_server.key
    ) as sm:
        for run_id in run_ids:
            async with asyncio.timeout(120):
                while (run := await sm.get_run(run_id)).status is RunStatus.PENDING:
                    assert worker.poll() is None, "the published worker exited"
                    await asyncio.sleep(0.5)
            assert run.status is RunStatus.SUCCESS
            assert (run.total_count, run.success_count, run.retried_count) == (
                total,
                total - FLAKY_FAILURES,
                FLAKY_FAILURES,
            )
            view = await sm.get_run_graph(run_id)
            assert view.count(identifier="merge", status="SUCCESS") == 1
            assert view.count(identifier="work", status="SUCCESS") == FAN_OUT
