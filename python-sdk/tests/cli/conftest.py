"""Fixtures of the CLI tests: a worker process per test module, in a namespace of its
own, on the SDK tests' real server, and runners of the CLI set up for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import (
    Exosphere,
    Result,
    Worker,
    cli_env,
    invoke_in_process,
    run_exosphere,
    start_worker,
    stop_worker,
)
from sm_support import ServerProcess, unique_namespace


@pytest.fixture(scope="module")
def worker(sm_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker per test module, in a namespace of its own."""
    log = tmp_path_factory.mktemp("cli-worker") / "worker.log"
    started = start_worker(sm_server, unique_namespace("cli"), log)
    yield started
    stop_worker(started)
    assert started.process.returncode == 0, started.log.read_text()


@pytest.fixture
def exosphere(sm_server: ServerProcess, worker: Worker) -> Exosphere:
    """``exosphere(*args, **env)``: run the CLI against the server, in the worker's
    namespace (through EXOSPHERE_NAMESPACE)."""

    def run(*args: str, stdin: str | None = None, cwd: Path | None = None, **env: str) -> Result:
        return run_exosphere(
            *args, env=cli_env(sm_server, worker.namespace, **env), stdin=stdin, cwd=cwd
        )

    return run


@pytest.fixture
def exosphere_here(sm_server: ServerProcess, worker: Worker) -> Exosphere:
    """Like ``exosphere``, in this process (see :func:`invoke_in_process`)."""

    def run(*args: str, stdin: str | None = None, **env: str) -> Result:
        settings = {
            "EXOSPHERE_STATE_MANAGER_URI": sm_server.base_url,
            "EXOSPHERE_API_KEY": sm_server.key,
            "EXOSPHERE_NAMESPACE": worker.namespace,
            **env,
        }
        return invoke_in_process(*args, env=settings, stdin=stdin)

    return run
