"""Every query of the state manager on MongoDB: :class:`MongoTx`, one multi-document
transaction on one session (see :mod:`state_manager.store.mongo`).

Documents mirror the SQL rows column for column (:mod:`state_manager.store.tables`),
with the primary key as ``_id``. JSON columns are stored as JSON text, as on SQLite: the
value comes back exactly as written (key order, integers beyond 64 bits, keys starting
with ``$`` or holding dots, none of which BSON documents keep or allow). The one query
into a JSON column (which fan-in groups a state descends from) uses ``group_refs``, an
indexed array kept beside ``groups``.

Where SQL waits on a row lock, MongoDB aborts the later of two transactions writing one
document with a write conflict (labelled ``TransientTransactionError``), and the whole
transaction runs again (``services.context.retry_transient``). :meth:`MongoTx.lock_states`
is the exception: it is the first statement of a batch, so it waits in place, starting
the transaction again until it wins the documents.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo import errors as mongo_errors
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection

from state_manager.domain.models import (
    RUN_PENDING_STATE_STATUSES,
    StateStatus,
    TriggerStatus,
    ValidationStatus,
)
from state_manager.store import tables
from state_manager.store.contract import Transaction
from state_manager.store.hot import dumps_json
from state_manager.store.rows import (
    MUTABLE_STATE_COLUMNS,
    ClaimedRow,
    FaninGroup,
    GraphStateRow,
    LockedStates,
    NodeCounts,
    StateBrief,
    StateCore,
    StateRow,
    TemplateRow,
    TriggerKey,
    TriggerRow,
    VersionRow,
)

if TYPE_CHECKING:
    from state_manager.store.mongo import MongoStore

Doc = dict[str, Any]

# How long lock_states keeps starting its transaction again while another holds a state.
LOCK_WAIT_SECONDS = 30.0
_PENDING = sorted(s.value for s in RUN_PENDING_STATE_STATUSES)


def _json_columns(table: sa.Table) -> frozenset[str]:
    return frozenset(c.name for c in table.columns if isinstance(c.type, sa.JSON))


def _key(table: sa.Table) -> str | None:
    """The column stored as ``_id`` (a single-column primary key), if any."""
    keys = list(table.primary_key.columns)
    return keys[0].name if len(keys) == 1 else None


class Shape:
    """How the rows of one table are stored as documents."""

    def __init__(self, table: sa.Table) -> None:
        self.columns = tuple(c.name for c in table.columns)
        self.json = _json_columns(table)
        self.key = _key(table)

    def encode(self, row: Mapping[str, Any]) -> Doc:
        doc: Doc = {}
        for column, value in row.items():
            name = "_id" if column == self.key else column
            doc[name] = dumps_json(value) if column in self.json else value
        return doc

    def decode(self, doc: Mapping[str, Any], columns: Sequence[str] | None = None) -> Doc:
        row: Doc = {}
        for column in columns or self.columns:
            value = doc.get("_id" if column == self.key else column)
            if column in self.json and value is not None:
                value = orjson.loads(value)
            row[column] = value
        return row

    def projection(self, columns: Sequence[str]) -> Doc:
        return {("_id" if c == self.key else c): 1 for c in columns}


NODES = Shape(tables.registered_nodes)
TEMPLATES = Shape(tables.graph_templates)
VERSIONS = Shape(tables.graph_versions)
RUNS = Shape(tables.runs)
STORES = Shape(tables.store_entries)
STATES = Shape(tables.states)
GROUPS = Shape(tables.fanin_groups)
TRIGGERS = Shape(tables.cron_triggers)
KEYS = Shape(tables.trigger_keys)

_CORE = tuple(f.name for f in fields(StateCore))
_CLAIMED = tuple(f.name for f in fields(ClaimedRow))
_GRAPH = tuple(f.name for f in fields(GraphStateRow))
_BRIEF = tuple(f.name for f in fields(StateBrief))


def group_ref(identifier: str, group_id: str) -> str:
    """The ``group_refs`` entry saying a state descends from fan-out group ``group_id``
    that ``identifier`` unites (group ids are fixed-length hex, so this is unambiguous)."""
    return f"{identifier}\x1f{group_id}"


def state_doc(row: Mapping[str, Any]) -> Doc:
    doc = STATES.encode(row)
    doc["group_refs"] = [group_ref(k, v) for k, v in (row.get("groups") or {}).items()]
    if doc.get("state_fingerprint") is None:
        doc.pop("state_fingerprint", None)  # the unique index covers only strings
    doc["does_unites"] = bool(doc["does_unites"])
    return doc


def _transient(message: str, cause: BaseException) -> mongo_errors.PyMongoError:
    """A conflict seen as a duplicate key (an insert racing another transaction's, not
    visible in this one's snapshot): the transaction is simply run again."""
    return mongo_errors.PyMongoError(
        f"{message}: {cause}", error_labels=["TransientTransactionError"]
    )


class MongoTx(Transaction):
    """Typed queries in one MongoDB transaction (``session``)."""

    def __init__(self, store: MongoStore, session: AsyncClientSession, *, write: bool) -> None:
        self.store = store
        self.session = session
        self.writable = write
        # Whether anything was read or written yet (lock_states may restart before that).
        self.used = False
        self._work: dict[str, set[str]] = {}
        db = store.database
        names = store.names
        self.nodes: AsyncCollection[Doc] = db[names.registered_nodes]
        self.templates: AsyncCollection[Doc] = db[names.graph_templates]
        self.versions: AsyncCollection[Doc] = db[names.graph_versions]
        self.runs: AsyncCollection[Doc] = db[names.runs]
        self.stores: AsyncCollection[Doc] = db[names.store_entries]
        self.states: AsyncCollection[Doc] = db[names.states]
        self.groups: AsyncCollection[Doc] = db[names.fanin_groups]
        self.triggers: AsyncCollection[Doc] = db[names.cron_triggers]
        self.keys: AsyncCollection[Doc] = db[names.trigger_keys]

    # -- helpers ------------------------------------------------------------------

    async def _find(
        self,
        collection: AsyncCollection[Doc],
        query: Mapping[str, Any],
        *,
        projection: Mapping[str, Any] | None = None,
        sort: Sequence[tuple[str, int]] | None = None,
        skip: int = 0,
        limit: int = 0,
    ) -> list[Doc]:
        self.used = True
        cursor = collection.find(
            dict(query),
            projection=dict(projection) if projection else None,
            sort=list(sort) if sort else None,
            skip=skip,
            limit=limit,
            session=self.session,
        )
        return await cursor.to_list()

    async def _one(
        self,
        collection: AsyncCollection[Doc],
        query: Mapping[str, Any],
        projection: Mapping[str, Any] | None = None,
        sort: Sequence[tuple[str, int]] | None = None,
    ) -> Doc | None:
        found = await self._find(collection, query, projection=projection, sort=sort, limit=1)
        return found[0] if found else None

    async def _aggregate(self, collection: AsyncCollection[Doc], pipeline: list[Doc]) -> list[Doc]:
        self.used = True
        cursor = await collection.aggregate(pipeline, session=self.session)
        return await cursor.to_list()

    async def _count(self, collection: AsyncCollection[Doc], query: Mapping[str, Any]) -> int:
        self.used = True
        return await collection.count_documents(dict(query), session=self.session)

    async def _upsert(
        self, collection: AsyncCollection[Doc], query: Mapping[str, Any], update: Mapping[str, Any]
    ) -> bool:
        """Apply ``update`` with upsert; True if it inserted a document."""
        self.used = True
        try:
            result = await collection.update_one(
                dict(query), dict(update), upsert=True, session=self.session
            )
        except mongo_errors.DuplicateKeyError as exc:
            raise _transient("concurrent insert of the same key", exc) from exc
        return result.upserted_id is not None

    async def _insert_many(self, collection: AsyncCollection[Doc], docs: list[Doc]) -> None:
        if docs:
            self.used = True
            await collection.insert_many(docs, ordered=True, session=self.session)

    # -- registered nodes ---------------------------------------------------------

    async def upsert_registered_node(self, values: Mapping[str, Any]) -> None:
        doc = NODES.encode(values)
        fixed = ("_id", "namespace", "name", "created_at")
        await self._upsert(
            self.nodes,
            {"namespace": values["namespace"], "name": values["name"]},
            {
                "$set": {k: v for k, v in doc.items() if k not in fixed},
                "$setOnInsert": {"_id": doc["_id"], "created_at": doc["created_at"]},
            },
        )

    async def list_registered_nodes(self, namespace: str) -> list[dict[str, Any]]:
        docs = await self._find(self.nodes, {"namespace": namespace}, sort=[("name", ASCENDING)])
        return [NODES.decode(d) for d in docs]

    async def registered_nodes_for(
        self, pairs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        wanted = set(pairs)
        if not wanted:
            return {}
        namespaces = sorted({ns for _, ns in wanted})
        docs = await self._find(self.nodes, {"namespace": {"$in": namespaces}})
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for doc in docs:
            key = (doc["name"], doc["namespace"])
            if key in wanted:
                found[key] = NODES.decode(doc)
        return found

    async def list_namespaces(self) -> list[str]:
        docs = await self._aggregate(
            self.nodes,
            [{"$match": {"namespace": {"$ne": ""}}}, {"$group": {"_id": "$namespace"}}],
        )
        return sorted(d["_id"] for d in docs)

    # -- graph templates ----------------------------------------------------------

    async def get_template(self, namespace: str, name: str) -> TemplateRow | None:
        doc = await self._one(self.templates, {"namespace": namespace, "name": name})
        return TemplateRow.from_row(TEMPLATES.decode(doc)) if doc else None

    async def save_template(self, values: Mapping[str, Any]) -> TemplateRow:
        doc = TEMPLATES.encode(values)
        replaced = ("spec", "secrets", "validation_status", "validation_errors", "updated_at")
        on_insert = {
            k: v for k, v in doc.items() if k not in (*replaced, "namespace", "name", "revision")
        }
        self.used = True
        try:
            saved = await self.templates.find_one_and_update(
                {"namespace": values["namespace"], "name": values["name"]},
                {
                    "$set": {k: doc[k] for k in replaced},
                    "$inc": {"revision": 1},
                    "$setOnInsert": on_insert,
                },
                upsert=True,
                return_document=ReturnDocument.AFTER,
                session=self.session,
            )
        except mongo_errors.DuplicateKeyError as exc:
            raise _transient("concurrent insert of the same template", exc) from exc
        assert saved is not None  # an upsert returning the document after it
        return TemplateRow.from_row(TEMPLATES.decode(saved))

    async def list_templates(self, namespace: str) -> list[TemplateRow]:
        docs = await self._find(
            self.templates, {"namespace": namespace}, sort=[("name", ASCENDING)]
        )
        return [TemplateRow.from_row(TEMPLATES.decode(d)) for d in docs]

    async def pending_templates(self, limit: int) -> list[TemplateRow]:
        docs = await self._find(
            self.templates,
            {"validation_status": ValidationStatus.PENDING.value},
            sort=[("updated_at", ASCENDING)],
            limit=limit,
        )
        return [TemplateRow.from_row(TEMPLATES.decode(d)) for d in docs]

    async def finish_validation(
        self,
        template_id: str,
        revision: int,
        status: ValidationStatus,
        errors: list[str],
        version_id: str | None,
        now: int,
    ) -> bool:
        values: dict[str, Any] = {
            "validation_status": status.value,
            "validation_errors": errors,
            "updated_at": now,
        }
        if version_id is not None:
            values["version_id"] = version_id
        self.used = True
        result = await self.templates.update_one(
            {
                "_id": template_id,
                "revision": revision,
                "validation_status": ValidationStatus.PENDING.value,
            },
            {"$set": TEMPLATES.encode(values)},
            session=self.session,
        )
        return result.matched_count > 0

    async def insert_version(self, values: Mapping[str, Any]) -> None:
        doc = VERSIONS.encode(values)
        await self._upsert(
            self.versions,
            {
                "namespace": doc["namespace"],
                "graph_name": doc["graph_name"],
                "revision": doc["revision"],
            },
            {"$setOnInsert": doc},
        )

    async def get_version(self, version_id: str) -> VersionRow | None:
        doc = await self._one(self.versions, {"_id": version_id})
        return VersionRow.from_row(VERSIONS.decode(doc)) if doc else None

    async def get_version_by_revision(
        self, namespace: str, graph_name: str, revision: int
    ) -> VersionRow | None:
        doc = await self._one(
            self.versions, {"namespace": namespace, "graph_name": graph_name, "revision": revision}
        )
        return VersionRow.from_row(VERSIONS.decode(doc)) if doc else None

    # -- runs and stores ----------------------------------------------------------

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        doc = await self._one(self.runs, {"_id": run_id})
        return RUNS.decode(doc) if doc else None

    async def get_store(self, run_id: str) -> dict[str, str]:
        docs = await self._find(self.stores, {"run_id": run_id})
        return {d["key"]: d["value"] for d in docs}

    async def get_stores(self, run_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        ids = sorted(set(run_ids))
        found: dict[str, dict[str, str]] = {run_id: {} for run_id in ids}
        if not ids:
            return found
        for doc in await self._find(self.stores, {"run_id": {"$in": ids}}):
            found[doc["run_id"]][doc["key"]] = doc["value"]
        return found

    async def run_versions(self, run_ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(run_ids))
        if not ids:
            return {}
        docs = await self._find(self.runs, {"_id": {"$in": ids}}, projection={"version_id": 1})
        return {d["_id"]: d["version_id"] for d in docs}

    async def insert_runs(
        self, rows: Sequence[Mapping[str, Any]], stores: Sequence[Mapping[str, Any]]
    ) -> None:
        await self._insert_many(self.runs, [RUNS.encode(r) for r in rows])
        await self._insert_many(self.stores, [STORES.encode(s) for s in stores])

    async def count_runs(self, namespace: str) -> int:
        return await self._count(self.runs, {"namespace": namespace})

    async def list_runs(self, namespace: str, offset: int, limit: int) -> list[dict[str, Any]]:
        docs = await self._find(
            self.runs,
            {"namespace": namespace},
            sort=[("created_at", DESCENDING), ("_id", DESCENDING)],
            skip=offset,
            limit=limit,
        )
        return [RUNS.decode(d) for d in docs]

    async def status_counts(self, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
        if not run_ids:
            return counts
        docs = await self._aggregate(
            self.states,
            [
                {"$match": {"run_id": {"$in": list(run_ids)}}},
                {
                    "$group": {
                        "_id": {"run_id": "$run_id", "status": "$status"},
                        "n": {"$sum": 1},
                    }
                },
            ],
        )
        for doc in docs:
            counts[doc["_id"]["run_id"]][doc["_id"]["status"]] = int(doc["n"])
        return counts

    # -- states -------------------------------------------------------------------

    @property
    def work_namespaces(self) -> set[str]:
        return {namespace for namespace, ids in self._work.items() if ids}

    def _note_work(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            if row.get("status") == StateStatus.CREATED.value:
                self._work.setdefault(row["namespace"], set()).add(row["id"])

    async def insert_states(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            await self._insert_many(self.states, [state_doc(r) for r in rows])
            self._note_work(rows)

    async def get_state(self, state_id: str) -> StateRow | None:
        doc = await self._one(self.states, {"_id": state_id})
        return StateRow.from_row(STATES.decode(doc)) if doc else None

    async def get_states(self, state_ids: Iterable[str]) -> dict[str, StateRow]:
        ids = sorted(set(state_ids))
        if not ids:
            return {}
        docs = await self._find(self.states, {"_id": {"$in": ids}})
        return {d["_id"]: StateRow.from_row(STATES.decode(d)) for d in docs}

    async def lock_states(self, state_ids: Iterable[str]) -> LockedStates:
        """Mark the states as written by this transaction (``$inc`` of ``lock``), then read
        them: a second locker conflicts until this transaction ends. Called first in a
        transaction, a conflict starts the transaction again after a short pause (a wait,
        as on a row lock); later in one, it aborts it to be run again as a whole."""
        ids = sorted(set(state_ids))
        if not ids:
            return LockedStates({}, frozenset())
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        pause = 0.002
        while True:
            restartable = not self.used
            self.used = True
            try:
                await self.states.update_many(
                    {"_id": {"$in": ids}}, {"$inc": {"lock": 1}}, session=self.session
                )
                break
            except mongo_errors.PyMongoError as exc:
                conflict = exc.has_error_label("TransientTransactionError")
                if not (conflict and restartable) or time.monotonic() > deadline:
                    raise
            await self.store.restart(self.session)
            self.used = False
            await asyncio.sleep(random.uniform(0, pause))
            pause = min(pause * 2, 0.1)
        docs = await self._find(
            self.states, {"_id": {"$in": ids}}, projection=STATES.projection(_CORE)
        )
        found: dict[str, StateCore] = {}
        for doc in docs:
            row = STATES.decode(doc, _CORE)
            row["does_unites"] = bool(row["does_unites"])
            found[doc["_id"]] = StateCore(**row)
        return LockedStates(found, await self._cancelled_runs(s.run_id for s in found.values()))

    async def update_states(self, changes: Sequence[Mapping[str, Any]]) -> None:
        if not changes:
            return
        requests = []
        for change in changes:
            values = {c: change[c] for c in MUTABLE_STATE_COLUMNS if c in change}
            requests.append(UpdateOne({"_id": change["id"]}, {"$set": STATES.encode(values)}))
        self.used = True
        await self.states.bulk_write(requests, ordered=True, session=self.session)
        self._note_work(changes)

    async def insert_states_unless_exist(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Insert states, skipping any a unique key (retry key, fingerprint) already holds:
        an upsert matching either key, so a skipped row writes nothing and does not
        abort the transaction (as a duplicate key error would)."""
        inserted: set[str] = set()
        for row in rows:
            retry_key = {
                "run_id": row["run_id"],
                "identifier": row["identifier"],
                "retry_count": row["retry_count"],
                "fanout_id": row["fanout_id"],
            }
            fingerprint = row.get("state_fingerprint")
            query = (
                {"$or": [retry_key, {"state_fingerprint": fingerprint}]}
                if fingerprint is not None
                else retry_key
            )
            if await self._upsert(self.states, query, {"$setOnInsert": state_doc(row)}):
                inserted.add(row["id"])
        self._note_work(r for r in rows if r["id"] in inserted)
        return inserted

    async def state_exists(
        self, run_id: str, identifier: str, retry_count: int, fanout_id: str
    ) -> bool:
        doc = await self._one(
            self.states,
            {
                "run_id": run_id,
                "identifier": identifier,
                "retry_count": retry_count,
                "fanout_id": fanout_id,
            },
            projection={"_id": 1},
        )
        return doc is not None

    def _claimable(self, namespace: str, node_names: Sequence[str]) -> Doc:
        names = sorted(set(node_names))
        return {
            "namespace": namespace,
            "status": StateStatus.CREATED.value,
            # An equality for the usual single node: some servers plan ``$in`` worse.
            "node_name": names[0] if len(names) == 1 else {"$in": names},
        }

    async def claim(
        self, namespace: str, node_names: Sequence[str], limit: int, now: int, lease_until: int
    ) -> list[ClaimedRow]:
        """Pick the oldest due states and move them to QUEUED in this transaction: two
        claimers picking one state conflict, and the later one runs again."""
        query = {**self._claimable(namespace, node_names), "enqueue_after": {"$lte": now}}
        docs = await self._find(
            self.states,
            query,
            projection=STATES.projection(_CLAIMED),
            sort=[("enqueue_after", ASCENDING), ("_id", ASCENDING)],
            limit=limit,
        )
        if not docs:
            return []
        ids = [d["_id"] for d in docs]
        result = await self.states.update_many(
            {"_id": {"$in": ids}, "status": StateStatus.CREATED.value},
            {
                "$set": {
                    "status": StateStatus.QUEUED.value,
                    "claimed_at": now,
                    "lease_expires_at": lease_until,
                    "updated_at": now,
                }
            },
            session=self.session,
        )
        if result.modified_count != len(ids):  # never in a snapshot; refuse to hand them out
            raise mongo_errors.PyMongoError(
                "claimed states changed under the claim", error_labels=["TransientTransactionError"]
            )
        claimed = [ClaimedRow(**STATES.decode(d, _CLAIMED)) for d in docs]
        self._work.get(namespace, set()).difference_update(ids)
        return claimed

    async def next_claimable_at(self, namespace: str, node_names: Sequence[str]) -> int | None:
        doc = await self._one(
            self.states,
            self._claimable(namespace, node_names),
            projection={"enqueue_after": 1},
            sort=[("enqueue_after", ASCENDING)],
        )
        return int(doc["enqueue_after"]) if doc else None

    async def expired_leases(self, now: int, limit: int) -> list[str]:
        docs = await self._find(
            self.states,
            {"status": StateStatus.QUEUED.value, "lease_expires_at": {"$lt": now}},
            projection={"_id": 1},
            sort=[("lease_expires_at", ASCENDING)],
            limit=limit,
        )
        return [d["_id"] for d in docs]

    async def run_graph_states(self, run_id: str, namespace: str) -> list[GraphStateRow]:
        docs = await self._find(
            self.states,
            {"run_id": run_id, "namespace": namespace},
            projection=STATES.projection(_GRAPH),
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
        )
        return [GraphStateRow(**STATES.decode(d, _GRAPH)) for d in docs]

    async def run_states(self, run_id: str, namespace: str) -> list[StateRow]:
        docs = await self._find(
            self.states,
            {"run_id": run_id, "namespace": namespace},
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
        )
        return [StateRow.from_row(STATES.decode(d)) for d in docs]

    async def _counts_by_node(self, match: Doc) -> list[Doc]:
        return await self._aggregate(
            self.states,
            [
                {"$match": match},
                {
                    "$group": {
                        "_id": {"namespace": "$namespace", "node_name": "$node_name"},
                        "n": {"$sum": 1},
                    }
                },
            ],
        )

    async def count_active_states(self) -> dict[tuple[str, str, str], int]:
        counts: dict[tuple[str, str, str], int] = {}
        for status in (StateStatus.CREATED, StateStatus.QUEUED):
            for doc in await self._counts_by_node({"status": status.value}):
                key = doc["_id"]
                counts[(key["namespace"], key["node_name"], status.value)] = int(doc["n"])
        return counts

    async def claimable_backlog(self, now: int) -> dict[tuple[str, str], int]:
        docs = await self._counts_by_node(
            {"status": StateStatus.CREATED.value, "enqueue_after": {"$lte": now}}
        )
        return {(d["_id"]["namespace"], d["_id"]["node_name"]): int(d["n"]) for d in docs}

    # -- fan-in groups ------------------------------------------------------------

    async def create_groups(self, rows: Sequence[Mapping[str, Any]]) -> None:
        await self._insert_many(
            self.groups, [GROUPS.encode({**row, "pending": 0, "failed": 0}) for row in rows]
        )

    async def adjust_group(
        self, group_id: str, pending: int, failed: int
    ) -> tuple[int, int] | None:
        self.used = True
        doc = await self.groups.find_one_and_update(
            {"_id": group_id},
            {"$inc": {"pending": pending, "failed": failed}},
            projection={"pending": 1, "failed": 1},
            return_document=ReturnDocument.AFTER,
            session=self.session,
        )
        return (int(doc["pending"]), int(doc["failed"])) if doc else None

    # -- cron triggers ------------------------------------------------------------

    async def delete_pending_triggers(self, namespace: str, graph_name: str) -> None:
        self.used = True
        await self.triggers.delete_many(
            {
                "namespace": namespace,
                "graph_name": graph_name,
                "trigger_status": TriggerStatus.PENDING.value,
            },
            session=self.session,
        )

    async def insert_trigger(self, values: Mapping[str, Any]) -> bool:
        doc = TRIGGERS.encode(values)
        fire = {k: doc[k] for k in ("namespace", "graph_name", "expression", "trigger_time")}
        return await self._upsert(self.triggers, fire, {"$setOnInsert": doc})

    async def next_trigger_time(self) -> int | None:
        doc = await self._one(
            self.triggers,
            {"trigger_status": TriggerStatus.PENDING.value},
            projection={"trigger_time": 1},
            sort=[("trigger_time", ASCENDING)],
        )
        return int(doc["trigger_time"]) if doc else None

    async def claim_due_trigger(self, now: int) -> TriggerRow | None:
        self.used = True
        doc = await self.triggers.find_one_and_update(
            {"trigger_status": TriggerStatus.PENDING.value, "trigger_time": {"$lte": now}},
            {"$set": {"trigger_status": TriggerStatus.TRIGGERING.value}},
            sort=[("trigger_time", ASCENDING)],
            return_document=ReturnDocument.AFTER,
            session=self.session,
        )
        if doc is None:
            return None
        row = TRIGGERS.decode(doc)
        return TriggerRow(**{f.name: row[f.name] for f in fields(TriggerRow)})

    async def finish_trigger(
        self,
        trigger_id: str,
        status: TriggerStatus,
        expires_at: int,
        run_id: str | None,
        error: str | None,
    ) -> None:
        self.used = True
        await self.triggers.update_one(
            {"_id": trigger_id},
            {
                "$set": {
                    "trigger_status": status.value,
                    "expires_at": expires_at,
                    "run_id": run_id,
                    "error": error,
                }
            },
            session=self.session,
        )

    async def list_triggers(self, namespace: str, graph_name: str) -> list[dict[str, Any]]:
        docs = await self._find(
            self.triggers,
            {"namespace": namespace, "graph_name": graph_name},
            sort=[("trigger_time", ASCENDING)],
        )
        return [TRIGGERS.decode(d) for d in docs]

    async def delete_expired_triggers(self, now: int) -> int:
        self.used = True
        result = await self.triggers.delete_many(
            {
                "expires_at": {"$ne": None, "$lte": now},
                "trigger_status": {
                    "$in": [TriggerStatus.TRIGGERED.value, TriggerStatus.FAILED.value]
                },
            },
            session=self.session,
        )
        return int(result.deleted_count)

    # -- idempotency keys of triggers ---------------------------------------------

    @staticmethod
    def _pairs(keys: Iterable[tuple[str, str]]) -> Doc | None:
        pairs = sorted(set(keys))
        if not pairs:
            return None
        return {"$or": [{"namespace": ns, "idempotency_key": key} for ns, key in pairs]}

    async def claim_trigger_keys(self, rows: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
        """Keys held by another unexpired row are left alone (nothing written); the others
        are inserted, or taken over when expired, by an upsert that the unique index on
        (namespace, key) decides between concurrent callers."""
        ordered = sorted(rows, key=lambda r: (r["namespace"], r["idempotency_key"]))
        query = self._pairs((r["namespace"], r["idempotency_key"]) for r in ordered)
        if query is None:
            return set()
        held = {
            (d["namespace"], d["idempotency_key"]): int(d["expires_at"])
            for d in await self._find(self.keys, query)
        }
        claimed: set[tuple[str, str]] = set()
        for row in ordered:
            pair = (row["namespace"], row["idempotency_key"])
            if pair in held and held[pair] > row["created_at"]:
                continue
            values = {k: row[k] for k in ("request_hash", "run_id", "created_at", "expires_at")}
            await self._upsert(
                self.keys,
                {
                    "namespace": pair[0],
                    "idempotency_key": pair[1],
                    "expires_at": {"$lte": row["created_at"]},
                },
                {"$set": values},
            )
            claimed.add(pair)
        return claimed

    async def trigger_keys(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], TriggerKey]:
        query = self._pairs(keys)
        if query is None:
            return {}
        return {
            (d["namespace"], d["idempotency_key"]): TriggerKey(
                run_id=d["run_id"], request_hash=d["request_hash"]
            )
            for d in await self._find(self.keys, query)
        }

    async def delete_trigger_keys(self, keys: Iterable[tuple[str, str]]) -> None:
        query = self._pairs(keys)
        if query is not None:
            self.used = True
            await self.keys.delete_many(query, session=self.session)

    async def delete_expired_trigger_keys(self, now: int, limit: int) -> int:
        docs = await self._find(
            self.keys,
            {"expires_at": {"$lte": now}},
            projection={"_id": 1},
            sort=[("expires_at", ASCENDING)],
            limit=limit,
        )
        if not docs:
            return 0
        result = await self.keys.delete_many(
            {"_id": {"$in": [d["_id"] for d in docs]}}, session=self.session
        )
        return int(result.deleted_count)

    # -- cancellation -----------------------------------------------------------------

    async def _cancelled_runs(self, run_ids: Iterable[str]) -> frozenset[str]:
        """Which of these runs are cancelled. A cancellation writes every state of its run
        (:meth:`cancel_run`) and every change to a run's states first writes one of them
        (:meth:`lock_states`), so the two conflict: the later one runs again and sees what
        the first did."""
        ids = sorted(set(run_ids))
        if not ids:
            return frozenset()
        docs = await self._find(
            self.runs, {"_id": {"$in": ids}, "cancelled_at": {"$ne": None}}, projection={"_id": 1}
        )
        return frozenset(d["_id"] for d in docs)

    async def lock_run(self, run_id: str) -> dict[str, Any] | None:
        self.used = True
        await self.runs.update_one({"_id": run_id}, {"$inc": {"lock": 1}}, session=self.session)
        doc = await self._one(self.runs, {"_id": run_id})
        return RUNS.decode(doc) if doc else None

    async def cancel_run(self, run_id: str, now: int) -> int:
        """Unlike PostgreSQL (which skips states locked by a report in flight), this
        writes every state of the run, pending or not: a report, retry or lease expiry in
        flight on any of them conflicts, and whichever commits second runs again."""
        self.used = True
        await self.runs.update_one(
            {"_id": run_id, "cancelled_at": None},
            {"$set": {"cancelled_at": now}},
            session=self.session,
        )
        await self.states.update_many(
            {"run_id": run_id}, {"$inc": {"lock": 1}}, session=self.session
        )
        result = await self.states.update_many(
            {"run_id": run_id, "status": {"$in": _PENDING}},
            {
                "$set": {
                    "status": StateStatus.CANCELLED.value,
                    "lease_expires_at": None,
                    "updated_at": now,
                }
            },
            session=self.session,
        )
        return int(result.modified_count)

    # -- retention ------------------------------------------------------------------

    async def runs_created_before(
        self, cutoff: int, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str]]:
        query: Doc = {"created_at": {"$lt": cutoff}}
        if after is not None:
            query = {
                "$and": [
                    query,
                    {
                        "$or": [
                            {"created_at": {"$gt": after[0]}},
                            {"created_at": after[0], "_id": {"$gt": after[1]}},
                        ]
                    },
                ]
            }
        docs = await self._find(
            self.runs,
            query,
            projection={"created_at": 1},
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
            limit=limit,
        )
        return [(int(d["created_at"]), d["_id"]) for d in docs]

    async def finished_before(self, run_ids: Sequence[str], cutoff: int) -> dict[str, int]:
        ids = sorted(set(run_ids))
        if not ids:
            return {}
        created = {
            d["_id"]: int(d["created_at"])
            for d in await self._find(
                self.runs, {"_id": {"$in": ids}}, projection={"created_at": 1}
            )
        }
        pending = [s.value for s in RUN_PENDING_STATE_STATUSES]
        activity = await self._aggregate(
            self.states,
            [
                {"$match": {"run_id": {"$in": ids}}},
                {
                    "$group": {
                        "_id": "$run_id",
                        "pending": {"$sum": {"$cond": [{"$in": ["$status", pending]}, 1, 0]}},
                        "last": {"$max": "$updated_at"},
                        "states": {"$sum": 1},
                    }
                },
            ],
        )
        by_run = {d["_id"]: d for d in activity}
        found: dict[str, int] = {}
        for run_id in ids:
            if run_id not in created:
                continue
            seen = by_run.get(run_id)
            if seen is None:
                if created[run_id] < cutoff:
                    found[run_id] = 0
            elif int(seen["pending"]) == 0 and int(seen["last"]) < cutoff:
                found[run_id] = int(seen["states"])
        return found

    async def lock_runs_for_deletion(self, run_ids: Sequence[str]) -> list[str]:
        """Write to the runs (``$inc`` of ``lock``): a second deleter conflicts, and so
        does a report on one of their states once the deletion writes it; the later
        transaction runs again and sees what the first one did."""
        ids = sorted(set(run_ids))
        if not ids:
            return []
        self.used = True
        await self.runs.update_many(
            {"_id": {"$in": ids}}, {"$inc": {"lock": 1}}, session=self.session
        )
        docs = await self._find(self.runs, {"_id": {"$in": ids}}, projection={"_id": 1})
        return sorted(d["_id"] for d in docs)

    async def delete_runs(self, run_ids: Sequence[str]) -> int:
        ids = sorted(set(run_ids))
        if not ids:
            return 0
        self.used = True
        selector = {"run_id": {"$in": ids}}
        for collection in (self.groups, self.states, self.stores, self.keys):
            await collection.delete_many(selector, session=self.session)
        result = await self.runs.delete_many({"_id": {"$in": ids}}, session=self.session)
        return int(result.deleted_count)

    # == dashboard reads ==========================================================

    async def run_node_counts(self, run_id: str, namespace: str) -> dict[str, NodeCounts]:
        docs = await self._find(
            self.states,
            {"run_id": run_id, "namespace": namespace},
            projection={"identifier": 1, "status": 1, "group_id": 1},
        )
        found: dict[str, NodeCounts] = {}
        for doc in docs:
            entry = found.setdefault(doc["identifier"], NodeCounts(statuses={}, fanout_members=0))
            entry.statuses[doc["status"]] = entry.statuses.get(doc["status"], 0) + 1
            if doc["group_id"] != doc["_id"]:
                entry.fanout_members += 1
        return found

    def _run_states_filter(
        self, run_id: str, namespace: str, identifier: str, statuses: Sequence[str]
    ) -> Doc:
        query: Doc = {"run_id": run_id, "namespace": namespace, "identifier": identifier}
        if statuses:
            query["status"] = {"$in": list(statuses)}
        return query

    async def run_states_page(
        self,
        run_id: str,
        namespace: str,
        identifier: str,
        statuses: Sequence[str],
        offset: int,
        limit: int,
    ) -> list[StateBrief]:
        docs = await self._find(
            self.states,
            self._run_states_filter(run_id, namespace, identifier, statuses),
            projection=STATES.projection(_BRIEF),
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
            skip=offset,
            limit=limit,
        )
        return [StateBrief(**STATES.decode(d, _BRIEF)) for d in docs]

    async def count_run_states(
        self, run_id: str, namespace: str, identifier: str, statuses: Sequence[str]
    ) -> int:
        return await self._count(
            self.states, self._run_states_filter(run_id, namespace, identifier, statuses)
        )

    async def state_attempts(self, state: StateRow, limit: int) -> list[StateBrief]:
        docs = await self._find(
            self.states,
            {"run_id": state.run_id, "identifier": state.identifier},
            projection=STATES.projection((*_BRIEF, "parents")),
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
        )
        found: list[StateBrief] = []
        for doc in docs:
            if doc["_id"] != state.id and doc["group_id"] != doc["_id"]:
                continue  # another member of a fan-out: a task of its own
            if orjson.loads(doc["parents"]) != state.parents:
                continue
            found.append(StateBrief(**STATES.decode(doc, _BRIEF)))
            if len(found) >= limit:
                break
        return found

    async def opened_groups(self, run_id: str, identifier: str, limit: int) -> list[FaninGroup]:
        openers = await self._find(
            self.states,
            {"run_id": run_id, "identifier": identifier},
            projection={"group_id": 1},
        )
        ids = sorted(d["_id"] for d in openers if d["group_id"] == d["_id"])
        groups = await self._find(
            self.groups, {"_id": {"$in": ids}}, sort=[("_id", ASCENDING)], limit=limit
        )
        found: list[FaninGroup] = []
        for group in groups:
            total = await self._count(
                self.states,
                {"run_id": run_id, "group_refs": group_ref(identifier, group["_id"])},
            )
            found.append(
                FaninGroup(
                    group_id=group["_id"],
                    identifier=identifier,
                    pending=int(group["pending"]),
                    failed=int(group["failed"]),
                    descendants=total,
                )
            )
        return found

    async def recent_triggers(
        self, namespace: str, graph_name: str, limit: int
    ) -> list[dict[str, Any]]:
        docs = await self._find(
            self.triggers,
            {"namespace": namespace, "graph_name": graph_name},
            sort=[("trigger_time", DESCENDING), ("_id", DESCENDING)],
            limit=limit,
        )
        return [TRIGGERS.decode(d) for d in reversed(docs)]

    async def open_descendants(
        self, run_id: str, identifier: str, group_id: str, limit: int
    ) -> list[StateBrief]:
        docs = await self._find(
            self.states,
            {
                "run_id": run_id,
                "status": {"$in": _PENDING},
                "group_refs": group_ref(identifier, group_id),
            },
            projection=STATES.projection(_BRIEF),
            sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
            limit=limit,
        )
        return [StateBrief(**STATES.decode(d, _BRIEF)) for d in docs]
