"""Test support: databases on every backend and a real server on loopback.

A test database is named by a URL: ``sqlite:///...``, ``postgresql://...``, or for
MongoDB ``mongodb://...#NAME`` (the server's URI, then the database name after ``#``;
see :func:`mongo_parts`). MongoDB tests run against SecantusDB started here, or
against the server of ``EXOSPHERE_TEST_MONGO_URI`` when it is set.
"""

from __future__ import annotations

import asyncio
import atexit
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
from state_manager.store import open_store
from state_manager.store.contract import StateRow, Store
from state_manager.store.database import Database
from state_manager.store.mongo import NAMES
from state_manager.store.tables import fanin_groups, metadata, states

POSTGRES_ADMIN_URL = os.environ.get(
    "EXOSPHERE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# A real MongoDB (replica set or Atlas) to test against instead of SecantusDB.
MONGO_TEST_URI = os.environ.get("EXOSPHERE_TEST_MONGO_URI", "").strip()
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


# -- MongoDB: SecantusDB started once per test session, or EXOSPHERE_TEST_MONGO_URI ----


@dataclass
class _Secantus:
    process: subprocess.Popen[bytes] | None = None
    uri: str = ""
    root: Path | None = None
    problem: str | None = None


_SECANTUS = _Secantus()


def stop_process(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM ``process``, then SIGKILL it if it has not exited within ``timeout`` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def _secantus_command() -> list[str]:
    found = shutil.which("secantusd-py") or str(Path(sys.executable).parent / "secantusd-py")
    return [found]


def _stop_secantus() -> None:
    if _SECANTUS.process is not None and _SECANTUS.process.poll() is None:
        stop_process(_SECANTUS.process, timeout=20)
    if _SECANTUS.root is not None:
        shutil.rmtree(_SECANTUS.root, ignore_errors=True)


def _mongo_ping(uri: str, timeout_ms: int = 2_000) -> dict[str, Any]:
    import pymongo

    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms) as client:
        hello: dict[str, Any] = client.admin.command("hello")
        return hello


def secantus_uri() -> str:
    """The URI of this test session's SecantusDB daemon (a separate process, on a
    folder of its own), started at the first call."""
    if _SECANTUS.uri or _SECANTUS.problem:
        if _SECANTUS.problem:
            raise RuntimeError(_SECANTUS.problem)
        return _SECANTUS.uri
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="exo-secantus-"))
    command = [*_secantus_command(), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--storage-path", str(root / "data"), "--log-level", "WARNING"]
    try:
        with (root / "secantus.log").open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
    except OSError as exc:
        _SECANTUS.problem = f"cannot start SecantusDB ({command[0]}): {exc}"
        raise RuntimeError(_SECANTUS.problem) from exc
    _SECANTUS.process, _SECANTUS.root = process, root
    atexit.register(_stop_secantus)
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            output = (root / "secantus.log").read_text(errors="replace")
            _SECANTUS.problem = f"SecantusDB exited at start-up:\n{output}"
            raise RuntimeError(_SECANTUS.problem)
        try:
            _mongo_ping(uri, 500)
        except Exception:
            if time.monotonic() > deadline:
                _SECANTUS.problem = "SecantusDB did not answer within 60 s"
                raise RuntimeError(_SECANTUS.problem) from None
            time.sleep(0.1)
            continue
        _SECANTUS.uri = uri
        return uri


@contextlib.contextmanager
def standalone_mongo() -> Iterator[str]:
    """A SecantusDB server that presents itself as a standalone ``mongod`` (no replica
    set, so no transactions); yields its URI."""
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="exo-standalone-"))
    command = [*_secantus_command(), "--host", "127.0.0.1", "--port", str(port), "--standalone"]
    command += ["--storage-path", str(root / "data"), "--log-level", "WARNING"]
    with (root / "secantus.log").open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _mongo_ping(uri, 500)
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "standalone SecantusDB did not start:\n"
                        + (root / "secantus.log").read_text(errors="replace")
                    ) from None
                time.sleep(0.1)
        yield uri
    finally:
        stop_process(process, timeout=20)
        shutil.rmtree(root, ignore_errors=True)


def secantus_pid() -> int | None:
    """The process id of this session's SecantusDB server, if one was started."""
    process = _SECANTUS.process
    return process.pid if process is not None and process.poll() is None else None


def mongo_server_uri() -> str:
    """The MongoDB server under test: EXOSPHERE_TEST_MONGO_URI, else SecantusDB.
    Skips locally, fails in CI, when it cannot be had."""
    try:
        if MONGO_TEST_URI:
            _mongo_ping(MONGO_TEST_URI, 10_000)
            return MONGO_TEST_URI
        return secantus_uri()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"MongoDB (SecantusDB) is required in CI but unavailable: {exc}")
        pytest.skip(f"MongoDB unavailable: {exc}")


def is_mongo(url: str) -> bool:
    return url.startswith(("mongodb://", "mongodb+srv://"))


def mongo_parts(url: str) -> tuple[str, str]:
    """A test MongoDB URL split into the server's URI and the database name."""
    uri, _, name = url.rpartition("#")
    return uri, name


def store_env(url: str) -> dict[str, str]:
    """The server's environment variables that select the test database ``url``."""
    if is_mongo(url):
        uri, name = mongo_parts(url)
        return {"MONGO_URI": uri, "MONGO_DATABASE_NAME": name}
    return {"DATABASE_URL": url}


def open_test_store(url: str, pool_size: int = 10) -> Store:
    """The store of the test database ``url`` (not migrated by this call)."""
    return open_store(test_settings(url, Path(tempfile.gettempdir())), pool_size=pool_size)


def drop_mongo_database(url: str) -> None:
    import pymongo

    uri, name = mongo_parts(url)
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000) as client:
        client.drop_database(name)


@dataclass
class TempDatabase:
    """A test database; a PostgreSQL or MongoDB one (``name`` set) is dropped by
    :meth:`drop`, also when used as a context manager."""

    url: str
    name: str | None = None

    def drop(self) -> None:
        if self.name and is_mongo(self.url):
            drop_mongo_database(self.url)
        elif self.name:
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
    if backend == "mongo":
        name = prefix + uuid.uuid4().hex[:12]
        return TempDatabase(url=f"{mongo_server_uri()}#{name}", name=name)
    require_postgres()
    name = prefix + uuid.uuid4().hex[:12]
    admin_execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return TempDatabase(url=f"{base}/{name}", name=name)


def unique_namespace(prefix: str = "sdk") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_settings(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    """Production settings on the test database ``database_url`` (any backend)."""
    mongo_uri, mongo_name = mongo_parts(database_url) if is_mongo(database_url) else ("", "")
    settings = Settings(
        mode=Mode.PRODUCTION,
        database_url="" if mongo_uri else database_url,
        mongo_uri=mongo_uri,
        mongo_database_name=mongo_name or "exosphere",
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
    def database_url(self) -> str:
        """The test database's URL (as given to :func:`test_settings`)."""
        if self.settings.mongo_uri:
            return f"{self.settings.mongo_uri}#{self.settings.mongo_database_name}"
        return self.settings.database_url

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
    db = open_test_store(database_url, pool_size=1)
    try:
        async with db.read() as tx:
            return await tx.run_states(run_id, namespace)
    finally:
        await db.close()


async def _mongo_find(database_url: str, collection: str, query: dict[str, Any]) -> list[Any]:
    from pymongo import AsyncMongoClient

    uri, name = mongo_parts(database_url)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        return await client[name][collection].find(query).to_list()
    finally:
        await client.close()


async def read_fanin_groups(database_url: str, run_id: str) -> list[dict[str, Any]]:
    """The fan-in group counters of a run."""
    if is_mongo(database_url):
        docs = await _mongo_find(database_url, NAMES.fanin_groups, {"run_id": run_id})
        columns = ("run_id", "identifier", "pending", "failed")
        return [{"group_id": d["_id"], **{k: d[k] for k in columns}} for d in docs]
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
    if is_mongo(database_url):
        query = {"namespace": namespace, "status": "QUEUED"}
        return {str(d["_id"]) for d in await _mongo_find(database_url, NAMES.states, query)}
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


async def count_rows(database_url: str, table: str, **where: Any) -> int:
    """How many rows of ``table`` (documents of its MongoDB collection) match ``where``
    (column = value, or column in a list)."""
    if is_mongo(database_url):
        return len(await _mongo_find(database_url, *_mongo_query(table, where)))
    sql_table = metadata.tables[table]
    query = sa.select(sa.func.count()).select_from(sql_table).where(*_sql_where(table, where))
    db = Database(database_url, pool_size=1)
    try:
        return int(await db.run_sync(lambda connection: connection.scalar(query)))
    finally:
        await db.close()


async def update_rows(
    database_url: str,
    table: str,
    where: dict[str, Any],
    *,
    set_: dict[str, Any] | None = None,
    add: dict[str, int] | None = None,
) -> None:
    """Change rows of ``table`` behind the server's back: set columns to values
    (``set_``) or add to them (``add``)."""
    if is_mongo(database_url):
        from pymongo import AsyncMongoClient

        uri, name = mongo_parts(database_url)
        collection, query = _mongo_query(table, where)
        update: dict[str, Any] = {}
        if set_:
            update["$set"] = set_
        if add:
            update["$inc"] = add
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
        try:
            await client[name][collection].update_many(query, update)
        finally:
            await client.close()
        return
    sql_table = metadata.tables[table]
    values: dict[str, Any] = dict(set_ or {})
    for column, delta in (add or {}).items():
        values[column] = sql_table.c[column] + delta
    statement = sql_table.update().where(*_sql_where(table, where)).values(**values)

    def run(connection: Any) -> None:
        connection.execute(statement)
        connection.commit()

    db = Database(database_url, pool_size=1)
    try:
        await db.run_sync(run)
    finally:
        await db.close()


def _sql_where(table: str, where: dict[str, Any]) -> list[Any]:
    columns = metadata.tables[table].c
    return [
        columns[k].in_(v) if isinstance(v, list | tuple | set) else columns[k] == v
        for k, v in where.items()
    ]


def _mongo_query(table: str, where: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    keys = list(metadata.tables[table].primary_key.columns)
    key = keys[0].name if len(keys) == 1 else None
    query = {
        ("_id" if k == key else k): {"$in": list(v)} if isinstance(v, list | tuple | set) else v
        for k, v in where.items()
    }
    return getattr(NAMES, table), query


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
                **store_env(self.database_url),
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
            stop_process(self.process)
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
