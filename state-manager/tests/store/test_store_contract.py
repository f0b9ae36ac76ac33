"""The storage contract, run against every SQL backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from state_manager.domain.ids import new_object_id
from state_manager.domain.models import NodeTemplate, StateStatus, TriggerStatus
from state_manager.errors import DatabaseNotMigrated
from state_manager.services.progress import state_row
from state_manager.store.database import Database
from state_manager.store.tables import metadata

NODE = NodeTemplate(node_name="Work", namespace="ns", identifier="work", inputs={})


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
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


async def test_migrations_create_the_declared_schema(db: Database) -> None:
    async with db.engine.connect() as connection:
        tables = await connection.run_sync(lambda sync: _schema(sa.inspect(sync)))
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


async def test_unmigrated_database_is_reported_with_the_command(database_url: str) -> None:
    database = Database(database_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match="state-manager migrate"):
            await database.check_migrated()
    finally:
        await database.close()


async def test_claim_is_oldest_first_and_respects_enqueue_after_and_nodes(db: Database) -> None:
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
    assert {s.status for s in claimed} == {StateStatus.QUEUED.value}
    assert {s.lease_expires_at for s in claimed} == {9_000}
    async with db.write() as tx:
        assert await tx.claim("ns", ["Work"], 10, now=1_000, lease_until=9_000) == []


async def test_concurrent_claims_never_share_a_state(db: Database, backend: str) -> None:
    rows = [new_state() for _ in range(200)]
    async with db.write() as tx:
        await tx.insert_states(rows)
    others = [Database(db.url.replace("+aiosqlite", "").replace("+asyncpg", "")) for _ in range(3)]

    async def claimer(database: Database) -> list[str]:
        got: list[str] = []
        while True:
            async with database.write() as tx:
                batch = await tx.claim("ns", ["Work"], 7, now=2_000, lease_until=9_000)
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


async def test_transition_is_compare_and_set(db: Database) -> None:
    row = new_state(status=StateStatus.QUEUED.value)
    async with db.write() as tx:
        await tx.insert_states([row])
    async with db.write() as tx:
        first = await tx.transition(
            row["id"], [StateStatus.QUEUED], {"status": StateStatus.SUCCESS.value}
        )
        second = await tx.transition(
            row["id"], [StateStatus.QUEUED], {"status": StateStatus.ERRORED.value}
        )
    assert first is not None and first.status == StateStatus.SUCCESS.value
    assert second is None
    async with db.read() as tx:
        stored = await tx.get_state(row["id"])
    assert stored is not None and stored.status == StateStatus.SUCCESS.value


async def test_unique_keys_deduplicate_retries_and_uniting_states(db: Database) -> None:
    retry = new_state(retry_count=1, fanout_id="f-1")
    same_retry = new_state(retry_count=1, fanout_id="f-1")
    uniting = new_state(does_unites=True, state_fingerprint="a" * 64)
    same_uniting = new_state(does_unites=True, state_fingerprint="a" * 64)
    async with db.write() as tx:
        assert await tx.insert_state_unless_exists(retry)
        assert not await tx.insert_state_unless_exists(same_retry)
        assert await tx.insert_state_unless_exists(uniting)
        assert not await tx.insert_state_unless_exists(same_uniting)
        # the failed inserts did not poison the transaction
        assert await tx.get_state(retry["id"]) is not None
    async with db.read() as tx:
        found = await tx.get_states([retry["id"], same_retry["id"], uniting["id"]])
    assert set(found) == {retry["id"], uniting["id"]}


async def test_json_columns_keep_key_order(db: Database) -> None:
    parents = {"zeta": new_object_id(), "alpha": new_object_id(), "mid": new_object_id()}
    row = new_state(parents=parents, outputs={"ü": "ñ", "b": "x"})
    async with db.write() as tx:
        await tx.insert_states([row])
    async with db.read() as tx:
        stored = await tx.get_state(row["id"])
    assert stored is not None
    assert list(stored.parents) == ["zeta", "alpha", "mid"]
    assert stored.outputs == {"ü": "ñ", "b": "x"}


async def test_rolled_back_transaction_leaves_nothing(db: Database) -> None:
    row = new_state()
    with pytest.raises(RuntimeError):
        async with db.write() as tx:
            await tx.insert_states([row])
            raise RuntimeError("crash between two writes")
    async with db.read() as tx:
        assert await tx.get_state(row["id"]) is None


async def test_group_counters_are_atomic(db: Database) -> None:
    async with db.write() as tx:
        await tx.create_group("g" * 24, "run-1", "split", pending=0)

    async def bump() -> None:
        async with db.write() as tx:
            await tx.adjust_group("g" * 24, 1, 0)

    await asyncio.gather(*(bump() for _ in range(20)))
    async with db.write() as tx:
        assert await tx.adjust_group("g" * 24, -20, 2) == (0, 2)
        assert await tx.adjust_group("missing" + "0" * 17, 1, 0) is None


async def test_due_cron_record_is_claimed_once(db: Database) -> None:
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
