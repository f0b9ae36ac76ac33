"""Run the image's command exactly as deploy/Dockerfile states it.

No Docker engine is available, so the final stage's ENTRYPOINT + CMD and ENV are
read from the Dockerfile and executed in the workspace virtual environment, with
two substitutions: EXOSPHERE_DATA_DIR points at a temporary directory (the /data
volume) and a free port replaces 8000. The secrets an operator passes with
``docker run -e`` are put in the environment.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import (
    clean_environment,
    free_port,
    load_dockerfile,
    parse_dockerfile,
    resolve_in_venv,
    settings_variables,
)

STARTUP_DEADLINE_SECONDS = 90.0
IMAGE_PORT = "8000"
# Variables of the image's ENV that describe the image's filesystem, not settings.
NOT_SETTINGS = {"PATH"}


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    command: list[str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def substitute_port(command: list[str], port: int) -> list[str]:
    """Replace the image's port (``--port 8000`` or ``--port=8000``) with ``port``."""
    out: list[str] = []
    replaced = False
    for index, word in enumerate(command):
        if word == f"--port={IMAGE_PORT}":
            out.append(f"--port={port}")
            replaced = True
        elif word == IMAGE_PORT and index > 0 and command[index - 1] == "--port":
            out.append(str(port))
            replaced = True
        else:
            out.append(word)
    if not replaced:
        raise AssertionError(f"the image command does not pass --port {IMAGE_PORT}: {command}")
    return out


def generated_secrets() -> dict[str, str]:
    return {
        "STATE_MANAGER_SECRET": secrets.token_hex(32),
        "SECRETS_ENCRYPTION_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    }


def image_environment(data_dir: Path) -> dict[str, str]:
    env = clean_environment(settings_variables())
    image_env = load_dockerfile().final.env()
    for key, value in image_env.items():
        if key not in NOT_SETTINGS:
            env[key] = value
    env["EXOSPHERE_DATA_DIR"] = str(data_dir)
    env.update(generated_secrets())
    return env


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as `docker stop` sends; SIGKILL only if it will not go."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError("the server ignored SIGTERM for 30 s") from None
    return process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    base = tmp_path_factory.mktemp("image")
    data_dir = base / "data"
    data_dir.mkdir()
    port = free_port()
    command = substitute_port(load_dockerfile().command(), port)
    log = base / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            resolve_in_venv(command),
            cwd=base,
            env=image_environment(data_dir),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = RunningServer(process, port, data_dir, log, command)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
        while http_status(running.url("/health")) != 200:
            if process.poll() is not None:
                pytest.fail(
                    f"`{' '.join(command)}` exited with {process.returncode} before "
                    f"serving /health:\n{running.output()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"/health never answered 200:\n{running.output()}")
            time.sleep(0.2)
        yield running
    finally:
        if process.poll() is None:
            stop(process)


def test_image_command_serves_health(server: RunningServer) -> None:
    with urllib.request.urlopen(server.url("/health"), timeout=5) as response:
        assert response.status == 200


def test_image_healthcheck_command_passes_against_the_running_server(
    server: RunningServer,
) -> None:
    healthcheck = load_dockerfile().final.last("HEALTHCHECK")
    assert healthcheck is not None
    probe = parse_dockerfile(
        "FROM scratch\nCMD " + healthcheck.arguments.split(None, 1)[1] + "\n"
    ).final.last("CMD")
    assert probe is not None
    argv = probe.exec_form()
    assert argv is not None and argv[0] == "python"
    script = argv[-1].replace(f"127.0.0.1:{IMAGE_PORT}", f"127.0.0.1:{server.port}")
    ok = subprocess.run([sys.executable, *argv[1:-1], script], capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr.decode()
    # ...and fails where nothing listens, so it can tell a dead server apart.
    dead = script.replace(f"127.0.0.1:{server.port}", f"127.0.0.1:{free_port()}")
    failed = subprocess.run([sys.executable, *argv[1:-1], dead], capture_output=True, check=False)
    assert failed.returncode != 0


def test_image_keeps_the_embedded_database_on_the_data_volume(server: RunningServer) -> None:
    # No DATABASE_URL: the SQLite file must live in EXOSPHERE_DATA_DIR (/data),
    # migrated on start because the image sets EXOSPHERE_AUTO_MIGRATE=true.
    assert http_status(server.url("/ready")) == 200, server.output()
    assert (server.data_dir / "exosphere.db").exists(), sorted(
        p.name for p in server.data_dir.iterdir()
    )
    # Production mode never writes development secrets.
    assert not (server.data_dir / "dev-secrets.env").exists()


def test_image_command_stops_cleanly_on_sigterm(server: RunningServer) -> None:
    code = stop(server.process)
    assert code in (0, -signal.SIGTERM), f"exit code {code}:\n{server.output()}"


def test_substitute_port() -> None:
    assert substitute_port(["x", "--port", "8000"], 1234) == ["x", "--port", "1234"]
    assert substitute_port(["x", "--port=8000"], 1234) == ["x", "--port=1234"]
    with pytest.raises(AssertionError):
        substitute_port(["x", "--host", "8000"], 1234)
