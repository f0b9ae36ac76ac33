"""Fixtures for the examples' tests: a real state manager and a runner for an example.

The server helper is the test suites' shared one (``state-manager/tests/sm_support.py``,
on the path through the pytest configuration).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sm_support import ServerProcess, make_database, server_process

EXAMPLES = Path(__file__).resolve().parent

RunExample = Callable[..., str]


@pytest.fixture(scope="session")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("examples-server")
    with server_process(make_database("sqlite", workdir).url, workdir / "data") as server:
        yield server


def _wait_registered(
    server: ServerProcess, namespace: str, worker: subprocess.Popen[bytes]
) -> None:
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": server.key}) as http:
        for _ in range(600):
            response = http.get(f"/v0/namespace/{namespace}/nodes/")
            if response.status_code == 200 and response.json()["count"] > 0:
                return
            if worker.poll() is not None:
                raise RuntimeError(f"the example worker exited with {worker.returncode}")
            time.sleep(0.1)
    raise TimeoutError(f"no node registered in {namespace!r}")


@pytest.fixture
def start_example_worker(
    example_server: ServerProcess, tmp_path: Path
) -> Iterator[Callable[[str, str], None]]:
    """``start_example_worker("hello_world", namespace)``: start the example's worker.py
    and wait until it registered. Workers are stopped with SIGTERM afterwards and must
    exit cleanly."""
    workers: list[subprocess.Popen[bytes]] = []

    def start(example: str, namespace: str) -> None:
        with (tmp_path / f"{example}-worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [sys.executable, str(EXAMPLES / example / "worker.py")],
                env=example_server.client_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        workers.append(worker)
        _wait_registered(example_server, namespace, worker)

    yield start
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


@pytest.fixture
def run_example(
    example_server: ServerProcess, start_example_worker: Callable[[str, str], None]
) -> RunExample:
    """``run_example("hello_world", namespace, *args)``: start the example's worker.py as
    documented, run its run.py with ``args``, return what run.py printed."""

    def run(example: str, namespace: str, *args: str) -> str:
        folder = EXAMPLES / example
        start_example_worker(example, namespace)
        result = subprocess.run(
            [sys.executable, str(folder / "run.py"), *args],
            env=example_server.client_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    return run
