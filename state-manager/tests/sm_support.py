"""Test support: databases on both backends and a real server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import uvicorn
from state_manager.app import create_app
from state_manager.settings import Mode, Settings, generate_encryption_key

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
