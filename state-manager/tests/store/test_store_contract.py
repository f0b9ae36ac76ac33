"""The storage contract, run against every backend (SQLite, PostgreSQL, MongoDB)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sm_support import is_mongo, mongo_parts, open_test_store
from state_manager.domain.ids import new_object_id
from state_manager.domain.models import NodeTemplate, StateStatus, TriggerStatus
from state_manager.errors import DatabaseNotMigrated
from state_manager.services.context import retry_transient
from state_manager.services.progress import state_row
from state_manager.store.contract import ClaimQuery, Store
from state_manager.store.database import Database
from state_manager.store.mongo import MIGRATIONS, NAMES, ORIGINAL_COLLECTIONS
from state_manager.store.rows import MUTABLE_STATE_COLUMNS
from state_manager.store.tables import metadata, schema_migrations

NODE = NodeTemplate(node_name="Work", namespace="ns", identifier="work", inputs={})


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Store]:
    database = open_test_store(database_url)
    await database.migrate()
    try:
        yield database
    finally:
        await database.close()


def new_state(**overrides: Any) -> dict[str, Any]:
    row = state_row(
        namespace="ns",
        graph_name="g",
        run_id="run-1",
        node=NODE,
        inputs={"x": "1"},
        parents={},
        groups={},
        now=1_000,
    )
    row.update(overrides)
    return row


async def test_migrations_create_the_declared_schema(database_url: str) -> None:
    if is_mongo(database_url):
        await _check_mongo_migration(database_url)
        return
    db = Database(database_url)
    try:
        await db.migrate()
        await _check_sql_schema(db)
    finally:
        await db.close()


async def _check_sql_schema(db: Database) -> None:
    tables = await db.run_sync(lambda connection: _schema(sa.inspect(connection)))
    expected = {
        table.name: (
            {c.name for c in table.columns},
            {i.name for i in table.indexes},
            {u.name for u in table.constraints if isinstance(u, sa.UniqueConstraint)},
        )
        for table in metadata.sorted_tables
    }
    assert tables == expected
    assert await db.current_version() == db.latest_version() >= 1
    assert await db.migrate() == []  # idempotent


def _schema(inspector: Any) -> dict[str, tuple[set[str], set[str], set[str]]]:
    return {
        name: (
            {c["name"] for c in inspector.get_columns(name)},
            {i["name"] for i in inspector.get_indexes(name) if not i.get("duplicates_constraint")},
            {u["name"] for u in inspector.get_unique_constraints(name)},
        )
        for name in inspector.get_table_names()
    }


async def test_a_missing_migration_below_the_newest_is_reported(
    db: Store, database_url: str
) -> None:
    """Versions may be added out of order (two branches); each must have been applied."""
    await db.check_migrated()

    def forget_first(connection: Any) -> None:
        connection.execute(schema_migrations.delete().where(schema_migrations.c.version == 1))
        connection.commit()

    if isinstance(db, Database):
        await db.run_sync(forget_first)
    else:
        import pymongo

        uri, name = mongo_parts(database_url)
        with pymongo.MongoClient(uri) as client:
            client[name][NAMES.schema].update_one(
                {"_id": "schema"}, {"$pull": {"applied": {"version": 1}}}
            )
    with pytest.raises(DatabaseNotMigrated):
        await db.check_migrated()


async def test_unmigrated_database_is_reported_with_the_command(database_url: str) -> None:
    database = open_test_store(database_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match="state-manager migrate"):
            await database.check_migrated()
    finally:
        await database.close()


async def test_claim_is_oldest_first_and_respects_enqueue_after_and_nodes(db: Store) -> None:
    rows = [
        new_state(enqueue_after=300),
        new_state(enqueue_after=100),
        new_state(enqueue_after=5_000),  # not yet due
        new_state(enqueue_after=50, node_name="Other"),
        new_state(enqueue_after=50, namespace="elsewhere"),
    ]
    async with db.write() as tx:
        await tx.insert_states(rows)
    async with db.write() as tx:
        claimed = await tx.claim("ns", ["Work"], 10, now=1_000, lease_until=9_000)
    assert [s.id for s in claimed] == [rows[1]["id"], rows[0]["id"]]
    assert [(s.node_name, s.inputs) for s in claimed] == [("Work", {"x": "1"})] * 2
    async with db.read() as tx:
        stored = await tx.get_states(s.id for s in claimed)
    assert {s.status for s in stored.values()} == {StateStatus.QUEUED.value}
    assert {(s.lease_expires_at, s.claimed_at) for s in stored.values()} == {(9_000, 1_000)}
    async with db.write() as tx:
        assert await tx.claim("ns", ["Work"], 10, now=1_000, lease_until=9_000) == []


async def test_concurrent_claims_never_share_a_state(db: Store, database_url: str) -> None:
    rows = [new_state() for _ in range(200)]
    async with db.write() as tx:
        await tx.insert_states(rows)
    others = [open_test_store(database_url) for _ in range(3)]

    @retry_transient  # MongoDB: a claimer that conflicts with another runs again
    async def claim(database: Store) -> list[Any]:
        async with database.write() as tx:
            return await tx.claim("ns", ["Work"], 7, now=2_000, lease_until=9_000)

    async def claimer(database: Store) -> list[str]:
        got: list[str] = []
        while True:
            batch = await claim(database)
            if not batch:
                return got
            got += [s.id for s in batch]

    try:
        results = await asyncio.gather(*(claimer(d) for d in [db, *others]))
    finally:
        for other in others:
            await other.close()
    claimed = [state_id for batch in results for state_id in batch]
    assert len(claimed) == len(set(claimed)) == 200


def _changed(row: dict[str, Any], **values: Any) -> dict[str, Any]:
    fixed = {"id": row["id"], "namespace": row["namespace"]}
    return {**{c: row[c] for c in MUTABLE_STATE_COLUMNS}, **values, **fixed}


async def test_locked_states_tell_which_of_their_runs_are_cancelled(db: Store) -> None:
    runs = [
        {
            "run_id": run_id,
            "namespace": "ns",
            "graph_name": "g",
            "version_id": "v" * 24,
            "created_at": 1_000,
        }
        for run_id in ("run-live", "run-cancelled")
    ]
    live = new_state(run_id="run-live", status=StateStatus.QUEUED.value)
    doomed = new_state(run_id="run-cancelled", status=StateStatus.SUCCESS.value)
    orphan = new_state(run_id="run-unknown", status=StateStatus.QUEUED.value)
    async with db.write() as tx:
        await tx.insert_runs(runs, [])
        await tx.insert_states([live, doomed, orphan])
    async with db.write() as tx:
        await tx.cancel_run("run-cancelled", 2_000)
    async with db.write() as tx:
        locked = await tx.lock_states([live["id"], doomed["id"], orphan["id"]])
    assert set(locked.states) == {live["id"], doomed["id"], orphan["id"]}
    assert locked.cancelled_runs == frozenset({"run-cancelled"})
    assert locked.states[doomed["id"]].run_id == "run-cancelled"


async def test_lock_and_claim_locks_some_states_and_claims_others(db: Store) -> None:
    """What a batch that reports and claims starts with (one statement on PostgreSQL)."""
    reported = [new_state(status=StateStatus.QUEUED.value) for _ in range(2)]
    waiting = [new_state(enqueue_after=300), new_state(enqueue_after=100), new_state()]
    async with db.write() as tx:
        await tx.insert_states([*reported, *waiting])
    query = ClaimQuery("ns", ["Work"], 2, now=1_000, lease_until=9_000)
    async with db.write() as tx:
        locked, claimed = await tx.lock_and_claim([r["id"] for r in reported], query)
    assert set(locked.states) == {r["id"] for r in reported}
    assert {s.status for s in locked.states.values()} == {StateStatus.QUEUED.value}
    assert [s.id for s in claimed] == [waiting[1]["id"], waiting[0]["id"]]
    assert claimed[0].inputs == {"x": "1"} and claimed[0].timeout_ms is None
    async with db.read() as tx:
        stored = await tx.get_states(s.id for s in claimed)
    assert {(s.status, s.claimed_at, s.lease_expires_at) for s in stored.values()} == {
        (StateStatus.QUEUED.value, 1_000, 9_000)
    }
    async with db.write() as tx:  # nothing to lock: the claim alone
        locked, claimed = await tx.lock_and_claim([], query)
    assert locked.states == {} and [s.id for s in claimed] == [waiting[2]["id"]]


async def test_locked_states_are_changed_one_locker_at_a_time(db: Store, database_url: str) -> None:
    rows = [new_state(status=StateStatus.QUEUED.value) for _ in range(3)]
    async with db.write() as tx:
        await tx.insert_states(rows)
    others = open_test_store(database_url)
    first_locked = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with db.write() as tx:
            locked = await tx.lock_states([rows[0]["id"], rows[1]["id"], "0" * 24])
            assert set(locked.states) == {rows[0]["id"], rows[1]["id"]}  # missing ids: absent
            assert locked.cancelled_runs == frozenset()
            first_locked.set()
            await release.wait()
            await tx.update_states(
                [_changed(rows[0], status=StateStatus.SUCCESS.value, outputs={"y": "1"})]
            )

    async def second() -> str:
        await first_locked.wait()
        async with others.write() as tx:
            locked = await tx.lock_states([rows[0]["id"]])
            return locked.states[rows[0]["id"]].status

    try:
        task = asyncio.create_task(first())
        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # the second locker waits for the first to commit
        release.set()
        await task
        assert await waiting == StateStatus.SUCCESS.value  # and then sees its change
    finally:
        await others.close()
    async with db.read() as tx:
        stored = await tx.get_states([r["id"] for r in rows])
    assert stored[rows[0]["id"]].outputs == {"y": "1"}
    assert stored[rows[1]["id"]].status == StateStatus.QUEUED.value


async def test_update_states_writes_every_mutable_column(db: Store) -> None:
    rows = [new_state(status=StateStatus.QUEUED.value, claimed_at=5) for _ in range(2)]
    async with db.write() as tx:
        await tx.insert_states(rows)
    changes = [
        _changed(rows[0], status="PRUNED", data={"why": "x"}, claimed_at=None, updated_at=7),
        _changed(rows[1], status="CREATED", enqueue_after=9, lease_expires_at=None, error="e"),
    ]
    async with db.write() as tx:
        await tx.update_states(changes)
        assert tx.work_namespaces == {"ns"}  # the re-created state is claimable work
    async with db.read() as tx:
        stored = await tx.get_states([r["id"] for r in rows])
    for change in changes:
        state = stored[change["id"]]
        assert {c: getattr(state, c) for c in MUTABLE_STATE_COLUMNS} == {
            c: change[c] for c in MUTABLE_STATE_COLUMNS
        }


async def test_write_states_changes_some_columns_and_inserts_in_one_call(db: Store) -> None:
    """A batch's writes: changes of two different sets of columns and new states."""
    rows = [new_state(status=StateStatus.QUEUED.value, claimed_at=5) for _ in range(3)]
    async with db.write() as tx:
        await tx.insert_states(rows)
    done = {"status": StateStatus.SUCCESS.value, "updated_at": 8}
    changes = [
        {"id": rows[0]["id"], "namespace": "ns", **done, "outputs": {"y": "1"}},
        {"id": rows[1]["id"], "namespace": "ns", **done, "outputs": {"y": "2"}},
        {"id": rows[2]["id"], "namespace": "ns", "status": "ERRORED", "error": "boom"},
    ]
    new = [new_state(inputs={"x": str(i)}) for i in range(2)]
    async with db.write() as tx:
        await tx.write_states(changes, new)
        assert tx.work_namespaces == {"ns"}  # the new states are claimable work
    async with db.read() as tx:
        stored = await tx.get_states([r["id"] for r in rows + new])
    assert [(stored[c["id"]].status, stored[c["id"]].outputs) for c in changes] == [
        ("SUCCESS", {"y": "1"}),
        ("SUCCESS", {"y": "2"}),
        ("ERRORED", rows[2]["outputs"]),  # a column the change did not name is kept
    ]
    assert (stored[rows[2]["id"]].error, stored[rows[2]["id"]].updated_at) == ("boom", 1_000)
    assert [stored[r["id"]].inputs for r in new] == [{"x": "0"}, {"x": "1"}]
    assert {stored[r["id"]].status for r in new} == {StateStatus.CREATED.value}


async def test_work_claimed_by_its_own_transaction_wakes_nobody(db: Store) -> None:
    rows = [new_state(), new_state(node_name="Other")]
    async with db.write() as tx:
        await tx.insert_states(rows)
        assert tx.work_namespaces == {"ns"}
        await tx.claim("ns", ["Work"], 10, now=1_000, lease_until=2_000)
        assert tx.work_namespaces == {"ns"}  # the Other state is still waiting
        await tx.claim("ns", ["Other"], 10, now=1_000, lease_until=2_000)
        assert tx.work_namespaces == set()


async def test_unique_keys_deduplicate_retries_and_uniting_states(db: Store) -> None:
    retry = new_state(retry_count=1, fanout_id="f-1")
    same_retry = new_state(retry_count=1, fanout_id="f-1")
    uniting = new_state(does_unites=True, state_fingerprint="a" * 64)
    same_uniting = new_state(does_unites=True, state_fingerprint="a" * 64)
    other = new_state(retry_count=2, fanout_id="f-1")
    async with db.write() as tx:
        assert await tx.insert_states_unless_exist([retry, uniting]) == {retry["id"], uniting["id"]}
        inserted = await tx.insert_states_unless_exist([same_retry, same_uniting, other])
        assert inserted == {other["id"]}
        assert await tx.state_exists("run-1", "work", 1, "f-1")
        assert not await tx.state_exists("run-1", "work", 3, "f-1")
        # the skipped inserts did not poison the transaction
        assert await tx.get_state(retry["id"]) is not None
    async with db.read() as tx:
        found = await tx.get_states([retry["id"], same_retry["id"], uniting["id"], other["id"]])
    assert set(found) == {retry["id"], uniting["id"], other["id"]}


async def test_json_columns_keep_key_order(db: Store) -> None:
    parents = {"zeta": new_object_id(), "alpha": new_object_id(), "mid": new_object_id()}
    row = new_state(parents=parents, outputs={"ü": "ñ", "b": "x"})
    async with db.write() as tx:
        await tx.insert_states([row])
    async with db.read() as tx:
        stored = await tx.get_state(row["id"])
    assert stored is not None
    assert list(stored.parents) == ["zeta", "alpha", "mid"]
    assert stored.outputs == {"ü": "ñ", "b": "x"}


async def test_rolled_back_transaction_leaves_nothing(db: Store) -> None:
    row = new_state()
    with pytest.raises(RuntimeError):
        async with db.write() as tx:
            await tx.insert_states([row])
            raise RuntimeError("crash between two writes")
    async with db.read() as tx:
        assert await tx.get_state(row["id"]) is None


async def test_group_counters_are_atomic(db: Store) -> None:
    async with db.write() as tx:
        await tx.create_groups([{"group_id": "g" * 24, "run_id": "run-1", "identifier": "s"}])

    @retry_transient
    async def bump() -> None:
        async with db.write() as tx:
            await tx.adjust_group("g" * 24, 1, 0)

    await asyncio.gather(*(bump() for _ in range(20)))
    async with db.write() as tx:
        assert await tx.adjust_group("g" * 24, -20, 2) == (0, 2)
        assert await tx.adjust_group("missing" + "0" * 17, 1, 0) is None


async def test_due_cron_record_is_claimed_once(db: Store) -> None:
    values = {
        "namespace": "ns",
        "graph_name": "g",
        "expression": "* * * * *",
        "trigger_status": TriggerStatus.PENDING.value,
        "expires_at": None,
        "run_id": None,
        "error": None,
    }
    async with db.write() as tx:
        assert await tx.insert_trigger({**values, "id": new_object_id(), "trigger_time": 60_000})
        assert not await tx.insert_trigger(
            {**values, "id": new_object_id(), "trigger_time": 60_000}
        )
        assert await tx.insert_trigger({**values, "id": new_object_id(), "trigger_time": 999_999})
    async with db.write() as tx:
        record = await tx.claim_due_trigger(now=120_000)
        assert record is not None and record.trigger_time == 60_000
        assert await tx.claim_due_trigger(now=120_000) is None
        await tx.finish_trigger(record.id, TriggerStatus.TRIGGERED, 130_000, None, None)
    async with db.write() as tx:
        assert await tx.delete_expired_triggers(now=129_999) == 0
        assert await tx.delete_expired_triggers(now=130_000) == 1


async def _check_mongo_migration(database_url: str) -> None:
    """MongoDB: ``migrate`` creates our collections with their unique indexes, records
    the schema version, and leaves the original Exosphere collections untouched."""
    import pymongo

    uri, name = mongo_parts(database_url)
    with pymongo.MongoClient(uri) as client:
        original = sorted(ORIGINAL_COLLECTIONS)[0]
        client[name][original].insert_one({"_id": "theirs", "status": "CREATED"})
    database = open_test_store(database_url)
    try:
        assert await database.migrate() == [version for version, _ in MIGRATIONS]
        assert await database.migrate() == []
        await database.check_migrated()
        assert await database.current_version() == database.latest_version()
    finally:
        await database.close()
    with pymongo.MongoClient(uri) as client:
        indexes = {
            spec["name"]: spec.get("unique", False)
            for spec in client[name][NAMES.states].list_indexes()
        }
        assert indexes["uq_states_retry_key"] and indexes["uq_states_fingerprint"]
        fires = {spec["name"] for spec in client[name][NAMES.cron_triggers].list_indexes()}
        assert "uq_cron_triggers_fire" in fires
        assert list(client[name][original].find()) == [{"_id": "theirs", "status": "CREATED"}]
        assert client[name][original].count_documents({}) == 1
