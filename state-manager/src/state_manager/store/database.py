"""Engine set-up, transactions and migrations for the SQL backends.

Only what differs between SQLite and PostgreSQL lives here (connection set-up,
write serialisation, change notification); every query is written once in
:mod:`state_manager.store.queries`.

* SQLite: WAL journal, ``synchronous=FULL`` (a committed report survives power
  loss), ``busy_timeout`` for other processes on the same file, and every write
  transaction opened with ``BEGIN IMMEDIATE`` so writers never deadlock on a
  lock upgrade. Writers inside one process are serialised by an asyncio lock so
  they queue in Python instead of in SQLite's sleep-and-retry busy handler.
* PostgreSQL: READ COMMITTED; claims use ``FOR UPDATE SKIP LOCKED``; writers that
  make work claimable send ``NOTIFY`` so long-polling workers on every replica
  wake up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from state_manager.errors import DatabaseNotMigrated
from state_manager.store.queries import Tx
from state_manager.store.tables import schema_migrations

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "exosphere_work"
# PostgreSQL aborts one of two transactions that deadlock (40P01) or cannot be
# serialised (40001); running it again is the documented remedy.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})


def is_transient(error: DBAPIError) -> bool:
    """Whether the database aborted a transaction that may simply be run again."""
    original = error.orig
    code = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    return code in TRANSIENT_SQLSTATES or "database is locked" in str(original)


def async_url(url: str) -> str:
    """Turn a user-facing ``sqlite:///`` or ``postgresql://`` URL into an async driver URL."""
    if url.startswith("sqlite:///") or url.startswith("sqlite+aiosqlite:///"):
        return "sqlite+aiosqlite:///" + url.split(":///", 1)[1]
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


class Database:
    """One SQL database: engine, transactions, migrations, notifications."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = async_url(url)
        self.dialect = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self.on_work: Callable[[str], None] | None = None
        self._listener: Any = None
        if self.dialect == "sqlite":
            path = make_url(self.url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                self.url, pool_size=pool_size, max_overflow=0
            )
            self._configure_sqlite()
        else:
            self.engine = create_async_engine(
                self.url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )

    def _configure_sqlite(self) -> None:
        sync_engine = self.engine.sync_engine

        @event.listens_for(sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control away from the driver so BEGIN is ours.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            mode = connection.info.get("begin_mode", "")
            connection.exec_driver_sql(f"BEGIN {mode}".strip())

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[Tx]:
        async with self.engine.connect() as connection:
            if self.dialect == "sqlite":
                connection.info["begin_mode"] = "IMMEDIATE" if write else "DEFERRED"
            async with connection.begin():
                tx = Tx(connection, self.dialect)
                yield tx
                if write and tx.work_namespaces and self.dialect == "postgresql":
                    for namespace in sorted(tx.work_namespaces):
                        await connection.execute(
                            sa.text("SELECT pg_notify(:channel, :payload)"),
                            {"channel": NOTIFY_CHANNEL, "payload": namespace},
                        )
        if write and tx.work_namespaces and self.on_work is not None:
            for namespace in tx.work_namespaces:
                self.on_work(namespace)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        """A read-write transaction; committed when the block exits without error."""
        if self._write_lock is None:
            async with self._transaction(write=True) as tx:
                yield tx
        else:
            async with self._write_lock, self._transaction(write=True) as tx:
                yield tx

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        """A read-only transaction (a consistent snapshot on both backends)."""
        async with self._transaction(write=False) as tx:
            yield tx

    # -- migrations ---------------------------------------------------------------

    async def current_version(self) -> int:
        async with self.engine.connect() as connection:
            has_table = await connection.run_sync(
                lambda sync: sa.inspect(sync).has_table("schema_migrations")
            )
            if not has_table:
                return 0
            value = await connection.scalar(sa.select(sa.func.max(schema_migrations.c.version)))
            return int(value or 0)

    def latest_version(self) -> int:
        files = migration_files(self.dialect)
        return files[-1][0] if files else 0

    async def migrate(self) -> list[int]:
        """Apply every pending migration, each in its own transaction. Returns versions applied."""
        applied: list[int] = []
        async with self.engine.connect() as lock:
            if self.dialect == "postgresql":
                # Serialise concurrent migrators (several replicas starting at once).
                await lock.execute(sa.text("SELECT pg_advisory_lock(734501)"))
                await lock.commit()
            try:
                async with self.engine.begin() as connection:
                    await connection.run_sync(
                        lambda sync: schema_migrations.create(sync, checkfirst=True)
                    )
                async with self.engine.connect() as connection:
                    done = set(await connection.scalars(sa.select(schema_migrations.c.version)))
                for version, sql in migration_files(self.dialect):
                    if version in done:
                        continue
                    async with self.engine.begin() as connection:
                        for statement in _statements(sql):
                            await connection.exec_driver_sql(statement)
                        await connection.execute(
                            schema_migrations.insert().values(
                                version=version, applied_at=int(time.time() * 1000)
                            )
                        )
                    applied.append(version)
                    logger.info("applied database migration %04d", version)
            finally:
                if self.dialect == "postgresql":
                    await lock.execute(sa.text("SELECT pg_advisory_unlock(734501)"))
                    await lock.commit()
        return applied

    async def check_migrated(self) -> None:
        """Raise :class:`DatabaseNotMigrated` unless the schema is at the latest version."""
        current = await self.current_version()
        latest = self.latest_version()
        if current < latest:
            raise DatabaseNotMigrated(current=current, latest=latest)

    # -- notifications ------------------------------------------------------------

    async def start_listening(self) -> None:
        """On PostgreSQL, forward NOTIFYs from any replica to ``on_work``."""
        if self.dialect != "postgresql" or self.on_work is None:
            return
        import asyncpg  # type: ignore[import-untyped]  # only needed for PostgreSQL

        dsn = self.url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._listener = await asyncpg.connect(dsn)
        callback = self.on_work

        def _forward(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        await self._listener.add_listener(NOTIFY_CHANNEL, _forward)

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        await self.engine.dispose()


__all__ = ["AsyncConnection", "Database", "async_url", "migration_files"]
