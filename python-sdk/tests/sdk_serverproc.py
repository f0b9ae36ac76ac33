"""Start the real state manager as a subprocess on a free loopback port.

Used by the SDK's real-server tests and by the tests of ``examples/`` (their conftest puts
this directory on ``sys.path``). Self-contained on purpose: it depends only on the
``state-manager`` console entry point of this workspace, run with the current interpreter.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class ServerProcess:
    uri: str
    key: str
    encryption_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def env(self) -> dict[str, str]:
        """Environment for a worker or client process talking to this server."""
        env = dict(os.environ)
        env["EXOSPHERE_STATE_MANAGER_URI"] = self.uri
        env["EXOSPHERE_API_KEY"] = self.key
        return env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_namespace(prefix: str = "sdk") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def start_server(
    workdir: Path,
    *,
    extra_env: Mapping[str, str] | None = None,
    port: int | None = None,
    key: str | None = None,
    encryption_key: str | None = None,
    database_url: str | None = None,
) -> ServerProcess:
    """Start ``state-manager`` in production mode on SQLite and wait for ``/health``.

    Pass the ``port``, ``key`` and ``encryption_key`` of a stopped server (and the same
    ``workdir``) to restart it on its database.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    key = key or "sdk-test-" + secrets.token_hex(8)
    encryption_key = encryption_key or base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = dict(os.environ)
    env.update(
        {
            "STATE_MANAGER_SECRET": key,
            "SECRETS_ENCRYPTION_KEY": encryption_key,
            "DATABASE_URL": database_url or f"sqlite:///{workdir / 'db.sqlite'}",
            "EXOSPHERE_AUTO_MIGRATE": "1",
            "EXOSPHERE_DATA_DIR": str(workdir / "data"),
            "LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra_env or {})
    log_path = workdir / f"server-{port}-{time.monotonic_ns()}.log"
    command = [
        sys.executable,
        "-m",
        "state_manager",
        "--mode=production",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", key, encryption_key, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"state manager exited with {process.returncode} at start-up:\n{server.log()}"
            )
        try:
            response = httpx.get(f"{server.uri}/health", timeout=2.0)
            if response.status_code == 200 and response.json() == {"message": "OK"}:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(
                f"state manager not healthy after {STARTUP_TIMEOUT} s:\n{server.log()}"
            )
        time.sleep(0.1)


def stop_server(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


POSTGRES_ADMIN_URL = os.environ.get(
    "EXOSPHERE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _postgres_admin(statement: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    # In a thread of its own: the caller may be running inside an event loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); yields its URL.

    Skips the test when PostgreSQL is unreachable, except in CI, where it must be up.
    """
    import pytest

    name = "exo_sdk_" + uuid.uuid4().hex[:12]
    try:
        _postgres_admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {exc}")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running_server(
    workdir: Path,
    *,
    extra_env: Mapping[str, str] | None = None,
    database_url: str | None = None,
) -> Iterator[ServerProcess]:
    server = start_server(workdir, extra_env=extra_env, database_url=database_url)
    try:
        yield server
    finally:
        stop_server(server)
