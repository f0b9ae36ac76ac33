"""Test support: databases on both backends and a real server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from state_manager.app import create_app
from state_manager.settings import Mode, Settings, generate_encryption_key
from state_manager.store.database import Database
from state_manager.store.queries import StateRow
from state_manager.store.tables import fanin_groups

POSTGRES_ADMIN_URL = os.environ.get(
    "EXOSPHERE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
API_KEY = "test-api-key-" + uuid.uuid4().hex[:8]
ENCRYPTION_KEY = generate_encryption_key()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _admin_execute(statement: str) -> None:
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def require_postgres() -> None:
    """Skip locally when PostgreSQL is down; fail in CI, where it must be up."""
    import asyncpg

    async def probe() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {exc}")


@dataclass
class TempDatabase:
    url: str
    name: str | None = None

    def drop(self) -> None:
        if self.name:
            _admin_execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def make_database(backend: str, tmp_path: Path) -> TempDatabase:
    if backend == "sqlite":
        return TempDatabase(url=f"sqlite:///{tmp_path / 'state.db'}")
    require_postgres()
    name = "exo_test_" + uuid.uuid4().hex[:12]
    _admin_execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return TempDatabase(url=f"{base}/{name}", name=name)


def test_settings(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    settings = Settings(
        mode=Mode.PRODUCTION,
        database_url=database_url,
        state_manager_secret=API_KEY,
        secrets_encryption_key=ENCRYPTION_KEY,
        data_dir=data_dir,
        auto_migrate=True,
        log_level="WARNING",
    )
    return replace(settings, **overrides)  # type: ignore[arg-type]


test_settings.__test__ = False  # type: ignore[attr-defined]  # a builder, not a test


class ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test runner owns signals
        pass


@dataclass
class RunningServer:
    base_url: str
    settings: Settings
    server: ThreadServer

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": API_KEY}


@contextlib.contextmanager
def serve(settings: Settings, *, run_background: bool = True) -> Iterator[RunningServer]:
    """Run the real app with uvicorn on a free loopback port, in a background thread."""
    port = free_port()
    app = create_app(settings, run_background=run_background)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = ThreadServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", settings, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# -- direct database reads ----------------------------------------------------------


async def read_states(database_url: str, namespace: str, run_id: str) -> list[StateRow]:
    """Every state of a run, straight from the database (with fields the API hides)."""
    db = Database(database_url, pool_size=1)
    try:
        async with db.read() as tx:
            return await tx.run_states(run_id, namespace)
    finally:
        await db.close()


async def read_fanin_groups(database_url: str, run_id: str) -> list[dict[str, Any]]:
    """The fan-in group counters of a run."""
    db = Database(database_url, pool_size=1)
    try:
        async with db.read() as tx:
            result = await tx.connection.execute(
                sa.select(fanin_groups).where(fanin_groups.c.run_id == run_id)
            )
            return [dict(row) for row in result.mappings()]
    finally:
        await db.close()


# -- the server as a separate process -------------------------------------------------


@dataclass
class ServerProcess:
    """``python -m state_manager`` in production mode, in its own process.

    Unlike :func:`serve`, the server can be killed for real (``kill -9``) and
    started again on the same database and port.
    """

    database_url: str
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": API_KEY}

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"server-{self.starts}.log"

    def start(self, timeout_s: float = 60.0) -> None:
        assert self.process is None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = {
            **os.environ,
            "STATE_MANAGER_SECRET": API_KEY,
            "SECRETS_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "DATABASE_URL": self.database_url,
            "EXOSPHERE_AUTO_MIGRATE": "1",
            "EXOSPHERE_DATA_DIR": str(self.data_dir),
            "LOG_LEVEL": "WARNING",
            **self.env,
        }
        command = [sys.executable, "-m", "state_manager", "--mode=production"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                output = self.log_path.read_text(errors="replace")
                self.process = None
                raise RuntimeError(f"server exited at start-up:\n{output}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not answer /health within {timeout_s}s")
            time.sleep(0.05)

    def kill(self) -> None:
        """``kill -9``: no shutdown hook runs, in-flight requests are cut."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(timeout=30)
            self.process = None


@contextlib.contextmanager
def server_process(
    database_url: str, data_dir: Path, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A started :class:`ServerProcess`, stopped when the block exits."""
    server = ServerProcess(database_url, data_dir, dict(env or {}))
    server.start()
    try:
        yield server
    finally:
        server.stop()
