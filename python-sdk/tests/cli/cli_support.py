"""Support of the CLI tests: the ``exosphere`` console script as a real process (or the
same command in-process), and real worker processes (our ``Runtime``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner
from exospherehost.cli import cli
from sm_support import ServerProcess

HERE = Path(__file__).resolve().parent
WORKER = HERE / "cli_worker.py"
# The console script `uv sync` installs next to the interpreter.
EXOSPHERE = Path(sys.executable).parent / "exosphere"
# Settings the CLI reads from the environment; tests set them explicitly.
CLI_VARIABLES = ("EXOSPHERE_STATE_MANAGER_URI", "EXOSPHERE_API_KEY", "EXOSPHERE_NAMESPACE")


@dataclass
class Result:
    """What one ``exosphere`` process did."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"exosphere {' '.join(self.args)} -> {self.code}\n{self.stdout}\n{self.stderr}"


def cli_env(server: ServerProcess | None, namespace: str | None, **extra: str) -> dict[str, str]:
    """The environment of a CLI process: settings of ``server`` and ``namespace`` only."""
    env = {k: v for k, v in os.environ.items() if k not in CLI_VARIABLES}
    env["NO_COLOR"] = "1"
    if server is not None:
        env["EXOSPHERE_STATE_MANAGER_URI"] = server.base_url
        env["EXOSPHERE_API_KEY"] = server.key
    if namespace is not None:
        env["EXOSPHERE_NAMESPACE"] = namespace
    env.update(extra)
    return env


def run_exosphere(
    *args: str, env: dict[str, str], stdin: str | None = None, cwd: Path | None = None
) -> Result:
    assert EXOSPHERE.is_file(), f"{EXOSPHERE} is missing: run `uv sync`"
    done = subprocess.run(
        [str(EXOSPHERE), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    return Result(args, done.returncode, done.stdout, done.stderr)


def invoke_in_process(*args: str, env: dict[str, str], stdin: str | None = None) -> Result:
    """The same command run inside this process (no interpreter start-up): for checks
    of options, formats and messages; the end-to-end tests use :func:`run_exosphere`."""
    unset: dict[str, str | None] = dict.fromkeys(CLI_VARIABLES)
    runner = CliRunner(env={**unset, **env})
    done = runner.invoke(cli, list(args), input=stdin, prog_name="exosphere")
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        raise done.exception
    return Result(args, done.exit_code, done.stdout, done.stderr)


Exosphere = Callable[..., Result]


@dataclass
class Worker:
    """A worker process serving the test nodes in ``namespace``."""

    namespace: str
    process: subprocess.Popen[bytes]
    log: Path


def start_worker(
    server: ServerProcess,
    namespace: str,
    log: Path,
    command: list[str] | None = None,
    nodes: int = 3,
) -> Worker:
    """Start a worker process (default: ``cli_worker.py`` for ``namespace``) and wait
    until ``nodes`` node types are registered in ``namespace``."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            command or [sys.executable, str(WORKER), namespace],
            env=server.client_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    worker = Worker(namespace, process, log)
    with httpx.Client(base_url=server.base_url, headers=server.headers) as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            registered = http.get(f"/v0/namespace/{namespace}/nodes/")
            if registered.status_code == 200 and registered.json()["count"] >= nodes:
                return worker
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
    stop_worker(worker)
    raise TimeoutError(f"the CLI test worker did not register:\n{log.read_text()}")


def stop_worker(worker: Worker) -> None:
    if worker.process.poll() is None:
        worker.process.send_signal(signal.SIGTERM)
        try:
            worker.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
