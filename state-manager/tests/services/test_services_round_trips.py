"""How many round trips to PostgreSQL one committed batch costs.

Every message exchange with the server (a statement, a prepare, BEGIN, COMMIT) is a
wait on the network and a wake-up of the committer; the count is what bounds batches
per second on a loaded machine. Counted at asyncpg's protocol, under the SQL layer.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sm_support import admin_execute, test_settings
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from state_manager.crypto import SecretBox
from state_manager.domain.models import GraphSpec, NodeTemplate, StoreConfig, Unites
from state_manager.metrics import Metrics
from state_manager.services import graphs, runs, states, writes
from state_manager.services.context import Context
from state_manager.services.ops import Executed
from state_manager.services.progress import state_row
from state_manager.services.states import ClaimRequest
from state_manager.store import hot
from state_manager.store.database import NOTIFY_CHANNEL, Database, _send, unavailable

pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)
NODE = NodeTemplate(node_name="A", namespace="ns", identifier="a", inputs={})

# The protocol calls that each send messages and wait for the server's answer.
ROUND_TRIPS = ("query", "prepare", "bind_execute", "bind_execute_many", "bind", "execute")


class _Counting:
    """Stands in for an asyncpg connection's protocol and logs the round trips."""

    def __init__(self, protocol: Any, log: list[str]) -> None:
        self._protocol = protocol
        self._log = log

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._protocol, name)
        if name not in ROUND_TRIPS:
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else kwargs.get("state", "")
            query = first if isinstance(first, str) else getattr(first, "query", "")
            self._log.append(f"{name} {query[:40]}".strip())
            return value(*args, **kwargs)

        return counted


@pytest.fixture
async def ctx(database_url: str, tmp_path: Path) -> AsyncIterator[Context]:
    settings = test_settings(database_url, tmp_path)
    db = Database(database_url)
    await db.migrate()
    context = Context(
        db=db, settings=settings, box=SecretBox(settings.secrets_encryption_key), metrics=Metrics()
    )
    context.committer.start(functools.partial(writes.run_batch, context))
    try:
        yield context
    finally:
        await context.committer.stop()
        await db.close()


async def _chain(ctx: Context) -> None:
    names = ["A", "B", "C"]
    await graphs.register_nodes(
        ctx,
        "ns",
        "rt",
        [{"name": n, "inputs_schema": {}, "outputs_schema": {}, "secrets": []} for n in names],
    )
    nodes = [
        NodeTemplate(
            node_name=n,
            namespace="ns",
            identifier=n.lower(),
            inputs={},
            next_nodes=[m.lower() for m in names[i + 1 : i + 2]],
        )
        for i, n in enumerate(names)
    ]
    await graphs.upsert_graph(ctx, "ns", "g", GraphSpec(nodes=nodes), {})
    assert await graphs.validate_pending(ctx) == 1


async def _count(ctx: Context, log: list[str], step: Any) -> Any:
    """Run ``step`` with the committer's kept connection counting round trips."""
    raw = await ctx.db.batch_driver_connection()
    protocol = raw._protocol
    raw._protocol = _Counting(protocol, log)
    try:
        return await step()
    finally:
        raw._protocol = protocol


async def test_a_report_with_a_claim_is_few_round_trips(ctx: Context) -> None:
    """W1's batch: one report that creates a successor, and a claim for it."""
    await _chain(ctx)
    await runs.trigger(ctx, "ns", "g", {}, {}, 0)
    wanted = ClaimRequest(nodes=["A", "B", "C"], batch_size=8)
    (first,) = await states.enqueue(ctx, "ns", wanted.nodes, 8)
    # Warm: statements prepared once per connection are not the steady state.
    _, (second,) = await states.exchange(ctx, "ns", [Executed("ns", first.id, [{}])], wanted)
    await ctx.db.batch_driver_connection()

    log: list[str] = []
    _, (third,) = await _count(
        ctx, log, lambda: states.exchange(ctx, "ns", [Executed("ns", second.id, [{}])], wanted)
    )
    assert third.node_name == "C"
    print(f"\nround trips per batch (report + claim): {len(log)}", *log, sep="\n  ")
    # lock (states and their runs) with the claim of waiting states, update and insert
    # (one statement; the successor goes in claimed), then "COMMIT; BEGIN" (BEGIN, the
    # read of the runs, the insert and the claim used to be round trips of their own)
    assert len(log) <= 3


async def test_a_batch_writes_its_states_with_one_statement_each_way(ctx: Context) -> None:
    """Three reports in one batch: their updates and their successors' inserts are one
    statement (arrays of values), not a statement per row, and the batch costs no more
    round trips than a batch of one."""
    await _chain(ctx)
    for _ in range(3):
        await runs.trigger(ctx, "ns", "g", {}, {}, 0)
    wanted = ClaimRequest(nodes=["A", "B", "C"], batch_size=8)
    firsts = await states.enqueue(ctx, "ns", wanted.nodes, 8)
    assert len(firsts) == 3
    # Warm: statements prepared once per connection are not the steady state.
    reports = [Executed("ns", state.id, [{}]) for state in firsts]
    _, seconds = await states.exchange(ctx, "ns", reports, wanted)
    await ctx.db.batch_driver_connection()

    reports = [Executed("ns", state.id, [{}]) for state in seconds]
    log: list[str] = []
    _, thirds = await _count(ctx, log, lambda: states.exchange(ctx, "ns", reports, wanted))
    assert [state.node_name for state in thirds] == ["C", "C", "C"]
    print(f"\nround trips per batch (3 reports + claim): {len(log)}", *log, sep="\n  ")
    assert not [entry for entry in log if entry.startswith("bind_execute_many")]
    assert len(log) <= 3


async def test_a_report_without_a_claim_is_few_round_trips(ctx: Context) -> None:
    """A plain report (v0 ``executed``): its successor waits, so waiters are notified."""
    await _chain(ctx)
    for _ in range(2):
        await runs.trigger(ctx, "ns", "g", {}, {}, 0)
    first, second = await states.enqueue(ctx, "ns", ["A"], 8)
    await states.executed(ctx, "ns", first.id, [{}])  # warm, as above
    await ctx.db.batch_driver_connection()

    log: list[str] = []
    await _count(ctx, log, lambda: states.executed(ctx, "ns", second.id, [{}]))
    print(f"\nround trips per batch (report): {len(log)}", *log, sep="\n  ")
    # lock (states and their runs), update and insert (one statement), then "SELECT
    # pg_notify(...); COMMIT; BEGIN" (BEGIN, the notify, the read of the runs and the
    # insert used to be round trips of their own)
    assert len(log) <= 3


async def test_a_fan_out_child_reads_no_store_for_its_uniting_successor(ctx: Context) -> None:
    """A child whose only successor unites the fan-out creates no state when it reports:
    the store that the uniting node's inputs read is read when its group completes, not
    once per report of a child."""

    def schema(*fields: str) -> dict[str, Any]:
        return {"type": "object", "properties": {f: {"type": "string"} for f in fields}}

    fields = {"A": ((), ("x",)), "B": (("x",), ()), "J": (("k",), ())}
    await graphs.register_nodes(
        ctx,
        "ns",
        "rt",
        [
            {"name": n, "inputs_schema": schema(*i), "outputs_schema": schema(*o), "secrets": []}
            for n, (i, o) in fields.items()
        ],
    )
    nodes = [
        NodeTemplate(node_name="A", namespace="ns", identifier="a", inputs={}, next_nodes=["b"]),
        NodeTemplate(
            node_name="B",
            namespace="ns",
            identifier="b",
            inputs={"x": "${{ a.outputs.x }}"},
            next_nodes=["j"],
        ),
        NodeTemplate(
            node_name="J",
            namespace="ns",
            identifier="j",
            inputs={"k": "${{ store.k }}"},
            unites=Unites(identifier="a"),
        ),
    ]
    spec = GraphSpec(nodes=nodes, store_config=StoreConfig(default_values={"k": "v"}))
    await graphs.upsert_graph(ctx, "ns", "g", spec, {})
    assert await graphs.validate_pending(ctx) == 1
    await runs.trigger(ctx, "ns", "g", {}, {}, 0)
    (root,) = await states.enqueue(ctx, "ns", ["A"], 8)
    await states.executed(ctx, "ns", root.id, [{"x": str(i)} for i in range(3)])
    first, second, third = await states.enqueue(ctx, "ns", ["B"], 8)
    await states.executed(ctx, "ns", first.id, [{}])  # warm, as above
    await ctx.db.batch_driver_connection()

    log: list[str] = []
    await _count(ctx, log, lambda: states.executed(ctx, "ns", second.id, [{}]))
    print(f"\nround trips per batch (fan-out child): {len(log)}", *log, sep="\n  ")
    assert not [entry for entry in log if "store_entries" in entry]
    await states.executed(ctx, "ns", third.id, [{}])
    (join,) = await states.enqueue(ctx, "ns", ["J"], 8)
    assert join.inputs == {"k": "v"}  # the group's completion read the store


async def test_wake_ups_carry_any_namespace_through_the_commit(ctx: Context) -> None:
    """The namespace is sent as a literal in the COMMIT message: quotes and backslashes
    must arrive as they were."""
    raw = await asyncpg.connect(ctx.settings.database_url.replace("+asyncpg", ""))
    heard: list[str] = []
    await raw.add_listener(NOTIFY_CHANNEL, lambda *args: heard.append(args[3]))
    odd = "it's \\ a \\' name"
    try:
        async with ctx.db.write(batch=True) as tx:
            tx._work[odd] = {"some-state"}
        for _ in range(50):
            if heard:
                break
            await asyncio.sleep(0.05)
    finally:
        await raw.close()
    assert heard == [odd]


async def test_errors_of_the_commit_message_are_mapped_like_any_statement(ctx: Context) -> None:
    """A failed COMMIT message is a ``DBAPIError`` with the server's code (transient
    retries read it); a lost connection is "unavailable" (503)."""
    engine = ctx.db.engine
    assert isinstance(engine, AsyncEngine)
    async with engine.connect() as connection:
        with pytest.raises(DBAPIError) as failed:
            await _send(connection, "SELECT 1/0; COMMIT")
        assert failed.value.orig is not None
        assert getattr(failed.value.orig, "sqlstate", None) == "22012"
        assert unavailable(failed.value) is None
        raw = await connection.get_raw_connection()
        pid = raw.driver_connection.get_server_pid()  # type: ignore[union-attr]
        admin_execute(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(Exception) as lost:
            await _send(connection, "COMMIT; BEGIN")
        assert unavailable(lost.value) is not None
        await connection.invalidate()


async def test_a_plan_cached_on_a_new_database_still_uses_the_index_later(
    ctx: Context,
) -> None:
    """The committer's lock by id, prepared and run while the states table is nearly
    empty (a new database), must not keep a plan that scans the table as it grows."""
    await _chain(ctx)
    await runs.trigger(ctx, "ns", "g", {}, {}, 0)
    kept = await ctx.db.batch_driver_connection()
    execute = "EXECUTE probe('{" + ",".join(f"{i:024x}" for i in range(8)) + "}')"
    await kept.execute(f"PREPARE probe (text[]) AS {hot.lock_states('postgresql', 8)}")
    try:
        for _ in range(10):  # past the executions after which a generic plan may stick
            await kept.fetch(execute)
        rows = [
            state_row(
                namespace="ns",
                graph_name="g",
                run_id=f"run-{i}",
                node=NODE,
                inputs={},
                parents={},
                groups={},
                now=0,
            )
            for i in range(5_000)
        ]
        async with ctx.db.write() as tx:  # no ANALYZE: autovacuum has not seen it yet
            await tx.insert_states(rows)
        plan = "\n".join(r[0] for r in await kept.fetch(f"EXPLAIN {execute}"))
    finally:
        await kept.execute("DEALLOCATE probe")
    assert "on states" in plan and "Seq Scan on states" not in plan, plan


async def test_the_kept_connection_waits_holding_no_snapshot_and_no_xid(ctx: Context) -> None:
    """Between batches the committer's connection is inside a just-begun transaction; it
    must hold back nothing (vacuum, CREATE INDEX CONCURRENTLY wait on xmin and xids)."""
    await _chain(ctx)
    await runs.trigger(ctx, "ns", "g", {}, {}, 0)
    kept = await ctx.db.batch_driver_connection()
    pid = kept.get_server_pid()
    engine = ctx.db.engine
    assert isinstance(engine, AsyncEngine)
    async with engine.connect() as other:
        row = (
            await other.exec_driver_sql(
                "SELECT state, backend_xid, backend_xmin FROM pg_stat_activity WHERE pid = $1",
                (pid,),
            )
        ).one()
    assert tuple(row) == ("idle in transaction", None, None)
