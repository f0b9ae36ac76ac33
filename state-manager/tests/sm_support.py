"""Test support: databases on both backends and a real server on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
from sm_api import REQUEST_ID_HEADER
from state_manager.app import create_app
from state_manager.settings import Mode, Settings, generate_encryption_key
from state_manager.store.database import Database
from state_manager.store.queries import StateRow
from state_manager.store.tables import fanin_groups, states

POSTGRES_ADMIN_URL = os.environ.get(
    "EXOSPHERE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
API_KEY = "test-api-key-" + uuid.uuid4().hex[:8]
ENCRYPTION_KEY = generate_encryption_key()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def admin_execute(statement: str) -> None:
    """Run one statement on the PostgreSQL server as the administrator.

    In a thread of its own, so that callers inside an event loop can use it too.
    """
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


def require_postgres() -> None:
    """Skip locally when PostgreSQL is down; fail in CI, where it must be up."""
    try:
        admin_execute("SELECT 1")
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {exc}")


@dataclass
class TempDatabase:
    """A test database; a PostgreSQL one (``name`` set) is dropped by :meth:`drop`,
    also when used as a context manager."""

    url: str
    name: str | None = None

    def drop(self) -> None:
        if self.name:
            admin_execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def __enter__(self) -> TempDatabase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.drop()


def make_database(backend: str, tmp_path: Path, prefix: str = "exo_test_") -> TempDatabase:
    """A fresh database: a SQLite file in ``tmp_path``, or a new PostgreSQL database
    named ``prefix`` + a random suffix (see :func:`require_postgres` when it is down)."""
    if backend == "sqlite":
        return TempDatabase(url=f"sqlite:///{tmp_path / 'state.db'}")
    require_postgres()
    name = prefix + uuid.uuid4().hex[:12]
    admin_execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return TempDatabase(url=f"{base}/{name}", name=name)


def unique_namespace(prefix: str = "sdk") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


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


async def wait_registered(base_url: str, key: str, namespace: str, count: int) -> None:
    """Wait (up to a minute) until ``count`` nodes are registered in ``namespace``."""
    async with httpx.AsyncClient(base_url=base_url, headers={"x-api-key": key}) as http:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    response = await http.get(f"/v0/namespace/{namespace}/nodes/")
                    if response.status_code == 200 and response.json()["count"] >= count:
                        return
                await asyncio.sleep(0.1)


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
            result = await tx._execute(
                sa.select(fanin_groups).where(fanin_groups.c.run_id == run_id)
            )
            return [dict(row) for row in result.mappings()]
    finally:
        await db.close()


async def claimed_state_ids(database_url: str, namespace: str) -> set[str]:
    """Ids of the claimed (QUEUED) states of ``namespace``."""
    db = Database(database_url, pool_size=1)
    try:
        async with db.read() as tx:
            result = await tx._execute(
                sa.select(states.c.id).where(
                    states.c.namespace == namespace, states.c.status == "QUEUED"
                )
            )
            return {str(row[0]) for row in result}
    finally:
        await db.close()


# -- the server as a separate process -------------------------------------------------


# Variables that configure the server: a server process gets only those the test sets.
SETTINGS_VARIABLES = frozenset(
    {
        "MODE",
        "DATABASE_URL",
        "MONGO_URI",
        "MONGO_DATABASE_NAME",
        "STATE_MANAGER_SECRET",
        "SECRETS_ENCRYPTION_KEY",
        "EXOSPHERE_DATA_DIR",
        "EXOSPHERE_AUTO_MIGRATE",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "CORS_ORIGINS",
        "DASHBOARD_SESSION_HOURS",
        "MAX_BATCH_SIZE",
        "MAX_FANOUT",
        "MAX_PAGE_SIZE",
        "MAX_REQUEST_BYTES",
        "MAX_WAIT_MS",
        "STATE_LEASE_SECONDS",
        "TRIGGER_RETENTION_HOURS",
        "TRIGGER_WORKERS",
        "EXOSPHERE_IDEMPOTENCY_TTL_SECONDS",
        "EXOSPHERE_RETENTION_DAYS",
        "EXOSPHERE_RETENTION_INTERVAL_SECONDS",
        "EXOSPHERE_RETENTION_BATCH_RUNS",
    }
)


@dataclass
class ServerProcess:
    """``python -m state_manager`` in production mode, in its own process.

    Unlike :func:`serve`, the server can be killed for real (``kill -9``) and
    started again on the same database and port. Its settings come from the
    environment: the defaults below, overridden by ``env``. Output goes to files
    in ``data_dir`` (a pipe nobody reads would stall a chatty server): stdout and
    stderr together in :attr:`log_path`, or stderr apart in :attr:`stderr_path`
    with ``separate_stderr``. Each ``/health`` probe of a start-up sends a request
    id of its own, collected in ``probe_ids``.
    """

    database_url: str
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    key: str = API_KEY
    encryption_key: str = ENCRYPTION_KEY
    separate_stderr: bool = False
    probe_ids: set[str] = field(default_factory=set)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key}

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"server-{self.starts}.log"

    @property
    def stderr_path(self) -> Path:
        return self.data_dir / f"server-{self.starts}.err"

    def output(self) -> str:
        """What the current (or last) start wrote."""
        paths = [self.log_path, self.stderr_path] if self.separate_stderr else [self.log_path]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def client_env(self) -> dict[str, str]:
        """Environment for a worker or client process (SDK) talking to this server."""
        return {
            **os.environ,
            "EXOSPHERE_STATE_MANAGER_URI": self.base_url,
            "EXOSPHERE_API_KEY": self.key,
        }

    def start(self, timeout_s: float = 60.0) -> None:
        assert self.process is None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARIABLES}
        env.update(
            {
                "STATE_MANAGER_SECRET": self.key,
                "SECRETS_ENCRYPTION_KEY": self.encryption_key,
                "DATABASE_URL": self.database_url,
                "EXOSPHERE_AUTO_MIGRATE": "1",
                "EXOSPHERE_DATA_DIR": str(self.data_dir),
                "LOG_LEVEL": "WARNING",
                **self.env,
            }
        )
        command = [sys.executable, "-m", "state_manager", "--mode=production"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        with contextlib.ExitStack() as files:
            out = files.enter_context(self.log_path.open("wb"))
            err = (
                files.enter_context(self.stderr_path.open("wb"))
                if self.separate_stderr
                else subprocess.STDOUT
            )
            self.process = subprocess.Popen(
                command,
                env=env,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"server exited with {code} at start-up:\n{self.output()}")
            probe_id = str(uuid.uuid4())
            self.probe_ids.add(probe_id)
            with contextlib.suppress(httpx.TransportError):
                probe = httpx.get(
                    f"{self.base_url}/health", headers={REQUEST_ID_HEADER: probe_id}, timeout=1
                )
                if probe.status_code == 200 and probe.json() == {"message": "OK"}:
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"server did not answer /health within {timeout_s}s:\n{self.output()}"
                )
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
    database_url: str, data_dir: Path, env: dict[str, str] | None = None, **options: Any
) -> Iterator[ServerProcess]:
    """A started :class:`ServerProcess` (``options``: its other fields), stopped when
    the block exits."""
    server = ServerProcess(database_url, data_dir, dict(env or {}), **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- a PostgreSQL cluster of a test's own -----------------------------------------------


def postgres_bindir() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/N/bin``."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if (Path(found) / "initdb").exists():
            return Path(found)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster (``initdb`` into a temporary folder, its own port),
    which a test may stop, crash and restart without disturbing the shared server.

    As root, the cluster runs as the ``postgres`` OS user (PostgreSQL refuses root).
    Use :meth:`create` (or :func:`postgres_cluster`); :meth:`destroy` stops it and
    removes every file.
    """

    root: Path
    bindir: Path
    port: int = field(default_factory=free_port)
    run_as: str | None = None

    @classmethod
    def create(cls) -> PostgresCluster:
        """Initialise a cluster (not started); skip locally, fail in CI, when it cannot be."""
        bindir = postgres_bindir()
        run_as = "postgres" if os.geteuid() == 0 else None
        problem = None
        if bindir is None:
            problem = "no PostgreSQL server binaries (initdb) found"
        elif run_as is not None and shutil.which("runuser") is None:
            problem = "running as root, but runuser is missing to drop to the postgres user"
        if problem is not None:
            if os.environ.get("CI"):
                pytest.fail(f"a PostgreSQL cluster of its own is required in CI: {problem}")
            pytest.skip(problem)
        assert bindir is not None
        # Outside pytest's tmp_path: the postgres user must be able to reach the folder.
        root = Path(tempfile.mkdtemp(prefix="exo-pg-"))
        cluster = cls(root=root, bindir=bindir, run_as=run_as)
        try:
            cluster.socket_dir.mkdir()
            if run_as is not None:
                shutil.chown(root, user=run_as)
                shutil.chown(cluster.socket_dir, user=run_as)
            cluster._run(
                "initdb", "-D", str(cluster.data_dir), "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--locale=C", "--no-sync",
            )  # fmt: skip
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(cluster.port),
                "unix_socket_directories": f"'{cluster.socket_dir}'",
                "max_connections": "300",
                "shared_buffers": "32MB",
                # Faults here are process crashes, never power cuts: the page cache survives.
                "fsync": "off",
            }
            with (cluster.data_dir / "postgresql.conf").open("a") as conf:
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=self.root, stdin=subprocess.DEVNULL
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )

    def log_tail(self, size: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-size:]

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60",
                  "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash (every backend killed, WAL replayed
        at the next start)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URL."""
        import asyncpg

        async def run() -> None:
            connection = await asyncpg.connect(self.url(), timeout=10)
            try:
                await connection.execute(f'CREATE DATABASE "{name}"')
            finally:
                await connection.close()

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, run()).result()
        return self.url(name)

    def destroy(self) -> None:
        """Stop the server (if running) and remove the cluster's files."""
        if self.running:
            with contextlib.suppress(RuntimeError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A started :class:`PostgresCluster`, destroyed when the block exits."""
    cluster = PostgresCluster.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
