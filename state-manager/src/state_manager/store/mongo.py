"""The MongoDB backend: ``MONGO_URI`` and ``MONGO_DATABASE_NAME`` (pymongo's asyncio API).

* Every write is one multi-document transaction (snapshot read concern, majority write
  concern, primary), so MongoDB must run as a replica set or sharded cluster (a
  single-node replica set is enough); a standalone server is refused at start-up.
  A commit whose outcome is unknown (``UnknownTransactionCommitResult``) is committed
  again, which MongoDB makes safe; a transaction aborted by a conflict is run again
  as a whole by the caller.
* Our collections are named ``sm_*``. A database that also holds the collections of
  the original Exosphere state manager (``states``, ``runs``, ...) is left as it is,
  and start-up says so in the log.
* The schema version lives in ``sm_schema``; :meth:`MongoStore.migrate` creates the
  collections and indexes (unique indexes carry every uniqueness rule) and records it.
* Long polls on other processes are woken through ``sm_signals``: after a commit that
  left work, the namespace's signal document is bumped, and every process watches that
  collection with a change stream. Where change streams are unavailable, long polls
  re-check every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient, IndexModel, ReadPreference
from pymongo import errors as mongo_errors
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from state_manager.errors import DatabaseNotMigrated, DatabaseNotSupported
from state_manager.store.contract import Store
from state_manager.store.mongo_queries import MongoTx

logger = logging.getLogger(__name__)

PREFIX = "sm_"
# The collections of the original Exosphere state manager (the v0 contract, 2.6), and
# lower-case spellings of them, which we never read, write or drop.
ORIGINAL_COLLECTIONS = frozenset(
    {
        "State",
        "GraphTemplate",
        "RegisteredNode",
        "Store",
        "runs",
        "DatabaseTriggers",
        "states",
        "graph_templates",
        "registered_nodes",
        "store",
        "database_triggers",
    }
)
SCHEMA_ID = "schema"
# How often a commit with an unknown outcome is tried again.
COMMIT_ATTEMPTS = 5
# Long polls re-check this often (ms) while change streams deliver wake-ups, and this
# often without them.
RECHECK_STREAMING_MS = 5_000
RECHECK_POLLING_MS = 1_000
WATCH_RETRY_SECONDS = 2.0

REPLICA_SET_REQUIRED = (
    "MONGO_URI points at a standalone MongoDB server, which has no multi-document "
    "transactions. The state manager needs a replica set (a single-node one is enough: "
    "start mongod with --replSet rs0 and run rs.initiate() once) or a sharded cluster; "
    "MongoDB Atlas clusters are replica sets."
)


@dataclass(frozen=True)
class Names:
    """Our collection names."""

    registered_nodes: str = PREFIX + "registered_nodes"
    graph_templates: str = PREFIX + "graph_templates"
    graph_versions: str = PREFIX + "graph_versions"
    runs: str = PREFIX + "runs"
    store_entries: str = PREFIX + "store_entries"
    states: str = PREFIX + "states"
    fanin_groups: str = PREFIX + "fanin_groups"
    cron_triggers: str = PREFIX + "cron_triggers"
    trigger_keys: str = PREFIX + "trigger_keys"
    schema: str = PREFIX + "schema"
    signals: str = PREFIX + "signals"


NAMES = Names()


def index(*keys: str, name: str, unique: bool = False, **options: Any) -> IndexModel:
    return IndexModel([(k, ASCENDING) for k in keys], name=name, unique=unique, **options)


def _indexes() -> dict[str, list[IndexModel]]:
    """Every index of schema version 1, by collection."""
    return {
        NAMES.registered_nodes: [
            index("namespace", "name", name="uq_registered_nodes_namespace_name", unique=True)
        ],
        NAMES.graph_templates: [
            index("namespace", "name", name="uq_graph_templates_namespace_name", unique=True),
            index("validation_status", "updated_at", name="ix_graph_templates_pending"),
        ],
        NAMES.graph_versions: [
            index(
                "namespace",
                "graph_name",
                "revision",
                name="uq_graph_versions_namespace_graph_revision",
                unique=True,
            )
        ],
        NAMES.runs: [index("namespace", "created_at", name="ix_runs_namespace_created_at")],
        NAMES.store_entries: [index("run_id", "key", name="uq_store_entries_run_key", unique=True)],
        NAMES.states: [
            index(
                "run_id",
                "identifier",
                "retry_count",
                "fanout_id",
                name="uq_states_retry_key",
                unique=True,
            ),
            index(
                "state_fingerprint",
                name="uq_states_fingerprint",
                unique=True,
                partialFilterExpression={"state_fingerprint": {"$type": "string"}},
            ),
            index("run_id", "created_at", name="ix_states_run_id"),
            index("namespace", "status", "node_name", "enqueue_after", name="ix_states_claimable"),
            index("status", "lease_expires_at", name="ix_states_leases"),
            index("run_id", "group_refs", name="ix_states_group_refs"),
        ],
        NAMES.fanin_groups: [index("run_id", name="ix_fanin_groups_run_id")],
        NAMES.cron_triggers: [
            index(
                "namespace",
                "graph_name",
                "expression",
                "trigger_time",
                name="uq_cron_triggers_fire",
                unique=True,
            ),
            index("trigger_status", "trigger_time", name="ix_cron_triggers_due"),
        ],
    }


def _idempotency_retention_indexes() -> dict[str, list[IndexModel]]:
    """Schema version 3 (as SQL migration 0003): trigger idempotency keys, retention."""
    return {
        NAMES.trigger_keys: [
            index(
                "namespace", "idempotency_key", name="uq_trigger_keys_namespace_key", unique=True
            ),
            index("expires_at", name="ix_trigger_keys_expires_at"),
            index("run_id", name="ix_trigger_keys_run_id"),
        ],
        NAMES.runs: [index("created_at", "_id", name="ix_runs_created_at")],
        NAMES.cron_triggers: [index("expires_at", name="ix_cron_triggers_expires_at")],
    }


async def _create(store: MongoStore, wanted: dict[str, list[IndexModel]]) -> None:
    existing = set(await store.database.list_collection_names())
    for collection, indexes in wanted.items():
        if collection not in existing:
            # Collections must exist before a transaction writes to them on older servers.
            with contextlib.suppress(mongo_errors.CollectionInvalid):
                await store.database.create_collection(collection)
        await store.database[collection].create_indexes(indexes)


async def _create_indexes(store: MongoStore) -> None:
    await _create(store, _indexes())


async def _cancel_timeouts(store: MongoStore) -> None:
    """Schema version 2 (as SQL migration 0002): runs may carry ``cancelled_at`` and states
    ``timeout_ms``; documents without them read as null, so there is nothing to create."""


async def _create_idempotency_retention(store: MongoStore) -> None:
    await _create(store, _idempotency_retention_indexes())


# (version, what it does): applied in order by `state-manager migrate`. Versions follow
# the SQL migrations of the same feature, so a number may be missing for a while.
MIGRATIONS: list[tuple[int, Callable[[MongoStore], Awaitable[None]]]] = [
    (1, _create_indexes),
    (2, _cancel_timeouts),
    (3, _create_idempotency_retention),
]


class MongoStore(Store):
    """One MongoDB database: transactions, schema version and indexes, wake-ups."""

    def __init__(self, uri: str, database_name: str, *, pool_size: int = 10) -> None:
        self.dialect = "mongodb"
        self.on_work: Callable[[str], None] | None = None
        self.uri = uri
        self.database_name = database_name
        self.names = NAMES
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            maxPoolSize=max(pool_size * 2, 10),
            serverSelectionTimeoutMS=10_000,
            connectTimeoutMS=10_000,
            appname="exosphere-state-manager",
            tz_aware=False,
        )
        self.database = self.client[database_name]
        self._batch_lock = asyncio.Lock()
        self._checked = False
        self._streaming = False
        self._watcher: asyncio.Task[None] | None = None
        self._signals: set[asyncio.Task[None]] = set()

    @property
    def recheck_ms(self) -> int:  # type: ignore[override]
        return RECHECK_STREAMING_MS if self._streaming else RECHECK_POLLING_MS

    # -- transactions -----------------------------------------------------------------

    async def _start(self, session: AsyncClientSession) -> None:
        await session.start_transaction(
            read_concern=ReadConcern("snapshot"),
            write_concern=WriteConcern("majority"),
            read_preference=ReadPreference.PRIMARY,
        )

    async def restart(self, session: AsyncClientSession) -> None:
        """Abort the session's transaction (if still open) and start a fresh one."""
        if session.in_transaction:
            with contextlib.suppress(mongo_errors.PyMongoError):
                await session.abort_transaction()
        await self._start(session)

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[MongoTx]:
        async with self.client.start_session(causal_consistency=False) as session:
            await self._start(session)
            tx = MongoTx(self, session, write=write)
            try:
                yield tx
            except BaseException:
                if session.in_transaction:
                    with contextlib.suppress(mongo_errors.PyMongoError):
                        await session.abort_transaction()
                raise
            await self._commit(session)
        if write and tx.work_namespaces:
            self._announce(tx.work_namespaces)

    async def _commit(self, session: AsyncClientSession) -> None:
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                await session.commit_transaction()
                return
            except mongo_errors.PyMongoError as exc:
                unknown = exc.has_error_label("UnknownTransactionCommitResult")
                if not unknown or attempt == COMMIT_ATTEMPTS:
                    raise
                await asyncio.sleep(0.05 * attempt)

    @contextlib.asynccontextmanager
    async def write(self, *, batch: bool = False) -> AsyncIterator[MongoTx]:
        if batch:
            async with self._batch_lock, self._transaction(write=True) as tx:
                yield tx
        else:
            async with self._transaction(write=True) as tx:
                yield tx

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[MongoTx]:
        async with self._transaction(write=False) as tx:
            yield tx

    # -- wake-ups ---------------------------------------------------------------------

    def _announce(self, namespaces: set[str]) -> None:
        """Wake long polls here at once and, through ``sm_signals``, on every process."""
        if self.on_work is not None:
            for namespace in namespaces:
                self.on_work(namespace)
        task = asyncio.create_task(self._signal(sorted(namespaces)))
        self._signals.add(task)
        task.add_done_callback(self._signals.discard)

    async def _signal(self, namespaces: list[str]) -> None:
        signals = self.database[self.names.signals]
        try:
            for namespace in namespaces:
                await signals.update_one({"_id": namespace}, {"$inc": {"n": 1}}, upsert=True)
        except mongo_errors.PyMongoError as exc:  # long polls re-check on their own
            logger.debug("could not signal work: %s", exc)

    async def start_listening(self) -> None:
        """Watch ``sm_signals`` with a change stream and forward each namespace to
        ``on_work``; the stream is opened again whenever it is lost."""
        if self.on_work is None or self._watcher is not None:
            return
        self._watcher = asyncio.create_task(self._watch(), name="mongo-watch")

    async def _watch(self) -> None:
        callback = self.on_work
        assert callback is not None
        signals = self.database[self.names.signals]
        warned = False
        while True:
            try:
                async with await signals.watch(
                    [{"$match": {"operationType": {"$in": ["insert", "update", "replace"]}}}]
                ) as stream:
                    self._streaming = True
                    if warned:
                        logger.warning("watching for work notifications again")
                        warned = False
                    async for event in stream:
                        callback(str(event["documentKey"]["_id"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._streaming = False
                if not warned:
                    logger.warning(
                        "cannot watch for work notifications (%s); long polls re-check every %d ms",
                        type(exc).__name__,
                        RECHECK_POLLING_MS,
                    )
                    warned = True
            self._streaming = False
            await asyncio.sleep(WATCH_RETRY_SECONDS)

    # -- schema -----------------------------------------------------------------------

    async def require_transactions(self) -> None:
        """Refuse a deployment without multi-document transactions (a standalone server)."""
        if self._checked:
            return
        hello = await self.client.admin.command("hello")
        if not hello.get("setName") and hello.get("msg") != "isdbgrid":
            raise DatabaseNotSupported(REPLICA_SET_REQUIRED)
        self._checked = True

    async def _report_original_collections(self) -> None:
        names = set(await self.database.list_collection_names())
        found = sorted(names & ORIGINAL_COLLECTIONS)
        if found:
            logger.warning(
                "database %r holds collections of the original Exosphere state manager (%s); "
                "they are left untouched: this server keeps its data in sm_* collections",
                self.database_name,
                ", ".join(found),
            )

    async def _applied(self) -> set[int]:
        await self.require_transactions()
        doc = await self.database[self.names.schema].find_one({"_id": SCHEMA_ID})
        return {int(entry["version"]) for entry in doc.get("applied", [])} if doc else set()

    async def current_version(self) -> int:
        return max(await self._applied(), default=0)

    def latest_version(self) -> int:
        return MIGRATIONS[-1][0]

    async def migrate(self) -> list[int]:
        """Apply every pending schema version: create collections and indexes (each step
        may run again safely, so replicas starting together need no lock)."""
        await self.require_transactions()
        await self._report_original_collections()
        done = await self._applied()
        applied: list[int] = []
        for version, step in MIGRATIONS:
            if version in done:
                continue
            await step(self)
            await self.database[self.names.schema].update_one(
                {"_id": SCHEMA_ID},
                {
                    "$max": {"version": version},
                    "$push": {"applied": {"version": version, "at": int(time.time() * 1000)}},
                },
                upsert=True,
            )
            applied.append(version)
            logger.info("applied database migration %04d", version)
        return applied

    async def check_migrated(self) -> None:
        """Raise :class:`DatabaseNotMigrated` unless every shipped version was applied."""
        done = await self._applied()
        if any(version not in done for version, _ in MIGRATIONS):
            raise DatabaseNotMigrated(current=max(done, default=0), latest=self.latest_version())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._signals:
            await asyncio.gather(*self._signals, return_exceptions=True)
        await self.client.close()


__all__ = ["NAMES", "ORIGINAL_COLLECTIONS", "REPLICA_SET_REQUIRED", "MongoStore"]
