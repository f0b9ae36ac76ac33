"""Engine set-up, transactions and migrations for the SQL backends.

Only what differs between SQLite and PostgreSQL lives here (drivers, connection set-up,
write serialisation, change notification); every query is written once in
:mod:`state_manager.store.queries`.

* SQLite runs in the server process, so its statements are executed directly on the
  event loop with the standard library's driver (a statement on cached pages takes
  microseconds; handing each one to a thread would cost more than running it). Only
  what may wait goes to a thread: the ``COMMIT`` (its fsync) and taking the write lock
  while another process holds it. WAL journal, ``synchronous=FULL`` (a committed report
  survives power loss), and every write transaction opened with ``BEGIN IMMEDIATE`` on
  one connection reserved for writing, so writers never deadlock on a lock upgrade.
  Writers inside one process queue on an asyncio lock; server processes sharing the
  file take turns at its write lock (:mod:`state_manager.store.turns`).
* PostgreSQL: asyncpg, READ COMMITTED; claims use ``FOR UPDATE SKIP LOCKED``; writers
  that make work claimable send ``NOTIFY`` so long-polling workers on every replica wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from state_manager.errors import DatabaseNotMigrated
from state_manager.store.contract import Store
from state_manager.store.failures import DISK_FULL, UNREACHABLE, is_transient, unavailable
from state_manager.store.hot import dumps_json
from state_manager.store.queries import Tx
from state_manager.store.tables import schema_migrations
from state_manager.store.turns import WriteTurns

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "exosphere_work"
# The LISTEN connection's name in pg_stat_activity; checked this often, reopened if lost.
LISTENER_APPLICATION_NAME = "exosphere-listener"
LISTEN_CHECK_SECONDS = 1.0
# How long a SQLite writer waits for another process to release the write lock.
SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATION_LOCK = 734501
# A kept batch connection idle for longer than this is probed before its next batch.
BATCH_PROBE_AFTER_IDLE_S = 1.0


async def _alive(connection: Any) -> bool:
    """Whether an asyncpg connection still answers (within five seconds)."""
    if connection.is_closed():
        return False
    try:
        await connection.fetchval("SELECT 1", timeout=5)
    except Exception:
        return False
    return True


def driver_url(url: str) -> str:
    """Turn a user-facing ``sqlite:///`` or ``postgresql://`` URL into the URL of our driver."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            return "sqlite:///" + url[len(prefix) :]
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


def migration_files(dialect: str) -> list[tuple[int, str]]:
    """The (version, SQL text) migrations shipped for ``dialect``, in order."""
    folder = resources.files("state_manager.store").joinpath("migrations", dialect)
    found: list[tuple[int, str]] = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


def _is_busy(error: OperationalError) -> bool:
    text = str(error.orig)
    return "database is locked" in text or "database is busy" in text


class Database(Store):
    """One SQL database: engine, transactions, migrations, notifications."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = driver_url(url)
        self.dialect = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        # PostgreSQL wakes other replicas with NOTIFY; SQLite shared by several server
        # processes has no such channel, so long polls look again soon.
        self.recheck_ms = 5_000 if self.dialect == "postgresql" else 500
        self.short_transactions = self.dialect == "sqlite"
        self.on_work: Callable[[str], None] | None = None
        self._listener: Any = None
        self._keeper: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._writer: Connection | None = None
        self._batch_lock = asyncio.Lock()
        self._batch_connection: AsyncConnection | None = None
        self._batch_idle_since = 0.0
        # Whether the kept connection is inside a transaction no statement has used yet.
        self._batch_begun = False
        self.engine: Engine | AsyncEngine
        self._turns: WriteTurns | None = None
        if self.dialect == "sqlite":
            path = make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._turns = WriteTurns(Path(path), SQLITE_BUSY_TIMEOUT_MS / 1000)
            # Connections are used from the loop's thread and, for COMMIT, a worker thread;
            # never by two threads at once.
            engine = sa.create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=0,
                connect_args={"check_same_thread": False},
                json_serializer=dumps_json,
                json_deserializer=orjson.loads,
            )
            _configure_sqlite(engine)
            self.engine = engine
        else:
            self.engine = create_async_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
                json_serializer=dumps_json,
                json_deserializer=orjson.loads,
            )

    # -- transactions -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def write(self, *, batch: bool = False) -> AsyncIterator[Tx]:
        """A read-write transaction; committed when the block exits without error.

        ``batch``: the committer's transaction. It runs on a connection kept for it (on
        SQLite every write does), so a batch pays no pool checkout or liveness probe; one
        batch runs at a time per process.
        """
        if self.dialect == "sqlite":
            async with self._write_lock, self._sqlite_write() as tx:
                yield tx
        elif batch:
            async with self._batch_lock, self._postgres_batch() as tx:
                yield tx
        else:
            async with self._postgres_transaction(write=True) as tx:
                yield tx
        if tx.work_namespaces and self.on_work is not None:
            for namespace in tx.work_namespaces:
                self.on_work(namespace)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        """A read-only transaction (a consistent snapshot on both backends)."""
        if self.dialect == "postgresql":
            async with self._postgres_transaction(write=False) as tx:
                yield tx
            return
        engine = self.engine
        assert isinstance(engine, Engine)
        with engine.connect() as connection:
            connection.info["begin_mode"] = "DEFERRED"
            with connection.begin():
                yield Tx(connection, self.dialect)

    @contextlib.asynccontextmanager
    async def _postgres_transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        engine = self.engine
        assert isinstance(engine, AsyncEngine)
        async with engine.connect() as connection, connection.begin():
            tx = Tx(connection, self.dialect)
            yield tx
            if write:
                await self._notify(connection, tx)

    @contextlib.asynccontextmanager
    async def _postgres_batch(self) -> AsyncIterator[Tx]:
        """The committer's transaction, in as few round trips as the statements need.

        The kept connection is in SQLAlchemy's AUTOCOMMIT mode, so its driver adapter
        never sends a BEGIN or COMMIT of its own; this method sends them, with the
        wake-ups: ``pg_notify(...); COMMIT; BEGIN`` is one message, so a batch costs its
        statements plus one round trip, and the next batch finds its transaction open.
        A transaction opened by BEGIN alone holds no snapshot, lock or transaction id
        (READ COMMITTED), so an idle kept connection holds nothing back. After any error
        the connection is discarded (never returned to the pool with a transaction open).
        """
        connection = await self._kept_batch_connection()
        try:
            driver = await AsyncpgDriver.under(connection)
            if not self._batch_begun:
                await driver.execute("BEGIN")
                self._batch_begun = True
            # AUTOCOMMIT: SQLAlchemy's own begin and commit send nothing.
            async with connection.begin():
                tx = Tx(connection, self.dialect, driver)
                yield tx
            await driver.execute(_notify_sql(tx.work_namespaces) + "COMMIT; BEGIN")
            self._batch_begun = True
        except BaseException:
            # Whatever went wrong (a restart, a lost connection, a failed statement), start
            # the next batch on a fresh connection rather than on one in an unknown state.
            await self._discard_batch_connection()
            raise
        finally:
            self._batch_idle_since = time.monotonic()

    async def _kept_batch_connection(self) -> AsyncConnection:
        connection = self._batch_connection
        if connection is not None and not await self._fit_for_batch(connection):
            await self._discard_batch_connection()
            connection = None
        if connection is None:
            engine = self.engine
            assert isinstance(engine, AsyncEngine)
            connection = await engine.connect()
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            # Every statement of a batch reaches its rows through an index. A plan cached
            # while the states table was nearly empty (a new database) would scan it
            # whole instead, and go on doing so as it grows until autovacuum next
            # analyzes it: seq scans are ruled out here (a table with no usable index is
            # still scanned). Planning every execution instead (force_custom_plan) cost
            # PostgreSQL 0.2-0.4 ms per statement.
            await _send(connection, "SET enable_seqscan = off")
            self._batch_connection = connection
            self._batch_begun = False
        return connection

    async def _discard_batch_connection(self) -> None:
        """Close the kept connection for good: its open transaction dies with it."""
        connection, self._batch_connection = self._batch_connection, None
        self._batch_begun = False
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()

    async def batch_driver_connection(self) -> Any:
        """The asyncpg connection the committer's batches run on (for tests to observe)."""
        connection = await self._kept_batch_connection()
        raw = await connection.get_raw_connection()
        return raw.driver_connection

    async def _fit_for_batch(self, connection: AsyncConnection) -> bool:
        """Whether the kept connection can take the next batch. Back-to-back batches trust
        it (no round trip); after an idle spell, in which the server may have restarted, it is
        probed, so the first write after a restart runs on a fresh connection instead of
        failing with 503."""
        if time.monotonic() - self._batch_idle_since < BATCH_PROBE_AFTER_IDLE_S:
            return True
        raw = await connection.get_raw_connection()
        return await _alive(raw.driver_connection)

    async def _notify(self, connection: AsyncConnection, tx: Tx) -> None:
        """Wake long polls on every replica for the work this transaction leaves."""
        for namespace in sorted(tx.work_namespaces):
            await connection.execute(
                sa.text("SELECT pg_notify(:channel, :payload)"),
                {"channel": NOTIFY_CHANNEL, "payload": namespace},
            )

    @contextlib.asynccontextmanager
    async def _sqlite_write(self) -> AsyncIterator[Tx]:
        connection = self._writer_connection()
        if self._turns is not None:
            await self._turns.enter()
        try:
            await self._begin_immediate(connection)
            try:
                yield Tx(connection, self.dialect)
            except BaseException:
                self._abandon(connection)
                raise
            try:
                await asyncio.to_thread(connection.commit)
            except BaseException:
                self._abandon(connection)
                raise
        finally:
            if self._turns is not None:
                self._turns.leave()

    def _writer_connection(self) -> Connection:
        if self._writer is None:
            engine = self.engine
            assert isinstance(engine, Engine)
            self._writer = engine.connect()
            self._writer.info["begin_mode"] = "IMMEDIATE"
        return self._writer

    async def _begin_immediate(self, connection: Connection) -> None:
        """Take SQLite's write lock without blocking the loop when another process has it."""
        _busy_timeout(connection, 0)
        try:
            connection.begin()
        except OperationalError as exc:
            connection.rollback()
            if not _is_busy(exc):
                raise
        else:
            return

        def wait_for_lock() -> None:
            _busy_timeout(connection, SQLITE_BUSY_TIMEOUT_MS)
            try:
                connection.begin()
            except BaseException:
                connection.rollback()
                raise

        await asyncio.to_thread(wait_for_lock)

    def _abandon(self, connection: Connection) -> None:
        """Roll back; a connection that cannot even do that is closed and replaced."""
        try:
            connection.rollback()
        except Exception:
            logger.warning("discarding a SQLite connection that could not roll back")
            with contextlib.suppress(Exception):
                connection.invalidate()
                connection.close()
            self._writer = None

    async def run_sync[T](self, function: Callable[[Connection], T]) -> T:
        """Run ``function`` with a plain SQLAlchemy connection (schema inspection, tests)."""
        engine = self.engine
        if isinstance(engine, AsyncEngine):
            async with engine.connect() as connection:
                return await connection.run_sync(function)
        with engine.connect() as connection:
            return function(connection)

    # -- migrations -------------------------------------------------------------------

    async def current_version(self) -> int:
        return await self.run_sync(_current_version)

    def latest_version(self) -> int:
        files = migration_files(self.dialect)
        return files[-1][0] if files else 0

    async def migrate(self) -> list[int]:
        """Apply every pending migration, each in its own transaction. Returns versions applied."""
        dialect = self.dialect
        if isinstance(self.engine, AsyncEngine):
            async with self.engine.connect() as connection:
                return await connection.run_sync(lambda sync: _migrate(sync, dialect))
        async with self._write_lock:
            with self.engine.connect() as connection:
                return await asyncio.to_thread(_migrate, connection, dialect)

    async def check_migrated(self) -> None:
        """Raise :class:`DatabaseNotMigrated` unless every shipped migration was applied
        (versions need not be contiguous: one added below the newest applied still counts)."""
        applied = await self.run_sync(_applied_versions)
        if any(version not in applied for version, _ in migration_files(self.dialect)):
            raise DatabaseNotMigrated(current=max(applied, default=0), latest=self.latest_version())

    # -- notifications ----------------------------------------------------------------

    async def start_listening(self) -> None:
        """On PostgreSQL, forward NOTIFYs from any replica to ``on_work``.

        The LISTEN connection is checked every :data:`LISTEN_CHECK_SECONDS` and opened
        again when it is lost (PostgreSQL restarted or failed over), so wake-ups across
        replicas resume on their own. Notifications sent while it is down are missed;
        long polls re-check the database every few seconds regardless.
        """
        if self.dialect != "postgresql" or self.on_work is None:
            return
        await self._listen()
        self._keeper = asyncio.create_task(self._keep_listening())

    async def _listen(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # only needed for PostgreSQL

        callback = self.on_work
        assert callback is not None

        def _forward(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        dsn = self.url.replace("postgresql+asyncpg://", "postgresql://", 1)
        connection = await asyncpg.connect(
            dsn, timeout=10, server_settings={"application_name": LISTENER_APPLICATION_NAME}
        )
        try:
            await connection.add_listener(NOTIFY_CHANNEL, _forward)
        except BaseException:
            connection.terminate()
            raise
        self._listener = connection

    async def _keep_listening(self) -> None:
        while True:
            await asyncio.sleep(LISTEN_CHECK_SECONDS)
            listener = self._listener
            if listener is not None and await _alive(listener):
                continue
            if listener is not None:
                logger.warning("lost the connection listening for work notifications")
                listener.terminate()
                self._listener = None
            try:
                await self._listen()
            except Exception as exc:
                logger.warning("cannot listen for work notifications yet: %s", type(exc).__name__)
            else:
                logger.warning("listening for work notifications again")

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        if self._turns is not None:
            self._turns.close()
        await self._discard_batch_connection()
        if isinstance(self.engine, AsyncEngine):
            await self.engine.dispose()
        else:
            self.engine.dispose()


async def _send(connection: AsyncConnection, sql: str) -> None:
    """Send parameterless SQL (several statements allowed) as one message on the asyncpg
    connection under ``connection``."""
    await (await AsyncpgDriver.under(connection)).execute(sql)


class AsyncpgDriver:
    """The asyncpg connection under a SQLAlchemy one, for the hot statements of the
    committer's batches (:mod:`state_manager.store.hot`): SQLAlchemy's execution layer
    costs more than such a statement does. Errors are raised as SQLAlchemy would raise
    them (a ``DBAPIError``), so transient retries and 503s see one kind of error.

    Only for a connection whose transaction is begun by hand (the kept batch
    connection): SQLAlchemy's driver adapter begins its transaction lazily, on its own
    first statement, so a statement sent here first would run outside it.
    """

    def __init__(self, connection: AsyncConnection, adapter: Any) -> None:
        self._connection = connection
        self._adapter = adapter
        self._driver: Any = adapter.driver_connection

    @classmethod
    async def under(cls, connection: AsyncConnection) -> AsyncpgDriver:
        raw = await connection.get_raw_connection()
        return cls(connection, raw.dbapi_connection)

    async def execute(self, sql: str) -> None:
        try:
            await self._driver.execute(sql)
        except Exception as error:
            raise self._translated(sql, None, error) from error

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        try:
            rows: list[Sequence[Any]] = await self._driver.fetch(sql, *params)
        except Exception as error:
            raise self._translated(sql, params, error) from error
        return rows

    def _translated(self, sql: str, params: Any, error: Exception) -> Exception:
        dialect = self._connection.dialect
        try:
            # The driver adapter's own translation of asyncpg's exceptions.
            self._adapter._handle_exception(error)
        except dialect.loaded_dbapi.Error as translated:
            lost = dialect.is_disconnect(translated, self._adapter, None)
            return DBAPIError.instance(
                sql, params, translated, dialect.loaded_dbapi.Error, connection_invalidated=lost
            )
        except Exception:  # not one of asyncpg's errors: raised as it is
            return error
        return error


def _notify_sql(namespaces: set[str]) -> str:
    """``SELECT pg_notify(...);`` for each namespace, values as escaped literals."""
    return "".join(
        f"SELECT pg_notify('{NOTIFY_CHANNEL}', {_literal(namespace)}); "
        for namespace in sorted(namespaces)
    )


def _literal(text: str) -> str:
    """``text`` as a PostgreSQL escape-string literal, whatever the server's settings."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _busy_timeout(connection: Connection, milliseconds: int) -> None:
    """Set SQLite's lock wait on the driver's connection (outside any transaction)."""
    driver: Any = connection.connection.driver_connection
    driver.execute(f"PRAGMA busy_timeout={int(milliseconds)}")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Statement journals (kept while a statement that changes several rows runs inside
        # a transaction) in memory: on disk each one is a file created, written and
        # deleted, several times per report. Committed data still goes to the WAL.
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.info.get("begin_mode", "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())


def _current_version(connection: Connection) -> int:
    if not sa.inspect(connection).has_table("schema_migrations"):
        return 0
    value = connection.scalar(sa.select(sa.func.max(schema_migrations.c.version)))
    connection.rollback()
    return int(value or 0)


def _applied_versions(connection: Connection) -> set[int]:
    if not sa.inspect(connection).has_table("schema_migrations"):
        return set()
    versions = set(connection.scalars(sa.select(schema_migrations.c.version)))
    connection.rollback()
    return versions


def _migrate(connection: Connection, dialect: str) -> list[int]:
    """Apply pending migrations on ``connection`` (serialised across processes)."""
    applied: list[int] = []
    if dialect == "postgresql":
        # Serialise concurrent migrators (several replicas starting at once).
        connection.execute(sa.text(f"SELECT pg_advisory_lock({_MIGRATION_LOCK})"))
        connection.commit()
    try:
        with connection.begin():
            schema_migrations.create(connection, checkfirst=True)
        with connection.begin():
            done = set(connection.scalars(sa.select(schema_migrations.c.version)))
        for version, sql in migration_files(dialect):
            if version in done:
                continue
            with connection.begin():
                for statement in _statements(sql):
                    connection.exec_driver_sql(statement)
                connection.execute(
                    schema_migrations.insert().values(
                        version=version, applied_at=int(time.time() * 1000)
                    )
                )
            applied.append(version)
            logger.info("applied database migration %04d", version)
    finally:
        if dialect == "postgresql":
            connection.execute(sa.text(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK})"))
            connection.commit()
    return applied


__all__ = [
    "DISK_FULL",
    "UNREACHABLE",
    "Database",
    "driver_url",
    "is_transient",
    "migration_files",
    "unavailable",
]
