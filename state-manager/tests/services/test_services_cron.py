"""Cron triggers through the service layer, with a controlled clock, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sm_support import open_test_store, test_settings
from state_manager.crypto import SecretBox
from state_manager.domain.models import GraphSpec, NodeTemplate, Trigger, TriggerStatus
from state_manager.metrics import Metrics
from state_manager.services import graphs, runs
from state_manager.services.context import Context

START = int(datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC).timestamp() * 1000)
MINUTE = 60_000


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


async def make_context(database_url: str, tmp_path: Path, clock: Clock) -> Context:
    settings = test_settings(database_url, tmp_path, trigger_retention_hours=1)
    db = open_test_store(database_url)
    await db.migrate()
    return Context(
        db=db,
        settings=settings,
        box=SecretBox(settings.secrets_encryption_key),
        metrics=Metrics(),
        clock=clock,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def ctx(database_url: str, tmp_path: Path, clock: Clock) -> AsyncIterator[Context]:
    context = await make_context(database_url, tmp_path, clock)
    try:
        yield context
    finally:
        await context.db.close()


def spec(expression: str, **store_config: Any) -> GraphSpec:
    return GraphSpec(
        nodes=[NodeTemplate(node_name="Tick", namespace="ns", identifier="tick", inputs={})],
        triggers=[Trigger.model_validate({"type": "CRON", "value": {"expression": expression}})],
        store_config=store_config or {},
    )


async def setup_graph(ctx: Context, expression: str, **store_config: Any) -> None:
    await graphs.register_nodes(
        ctx,
        "ns",
        "rt",
        [{"name": "Tick", "inputs_schema": {}, "outputs_schema": {}, "secrets": []}],
    )
    await graphs.upsert_graph(ctx, "ns", "g", spec(expression, **store_config), {})
    assert await graphs.validate_pending(ctx) == 1


async def records(ctx: Context) -> list[tuple[int, str]]:
    async with ctx.db.read() as tx:
        rows = await tx.list_triggers("ns", "g")
    return [(int(r["trigger_time"]), r["trigger_status"]) for r in rows]


async def run_count(ctx: Context) -> int:
    total, _ = await runs.list_runs(ctx, "ns", 1, 100)
    return total


async def test_each_due_time_fires_once_and_schedules_the_next(ctx: Context, clock: Clock) -> None:
    await setup_graph(ctx, "*/5 * * * *")
    first = START - 30_000 + 5 * MINUTE  # 12:05:00
    assert await records(ctx) == [(first, TriggerStatus.PENDING.value)]
    assert not await runs.fire_due_trigger(ctx)  # not due yet
    clock.now = first + 1_000
    assert await runs.fire_due_trigger(ctx)
    assert not await runs.fire_due_trigger(ctx)
    assert await run_count(ctx) == 1
    assert await records(ctx) == [
        (first, TriggerStatus.TRIGGERED.value),
        (first + 5 * MINUTE, TriggerStatus.PENDING.value),
    ]


async def test_after_downtime_a_missed_time_fires_once(ctx: Context, clock: Clock) -> None:
    await setup_graph(ctx, "* * * * *")
    clock.now = START + 3 * 3_600_000  # three hours of downtime: 180 missed minutes
    fired = 0
    while await runs.fire_due_trigger(ctx):
        fired += 1
    assert fired == 1
    assert await run_count(ctx) == 1
    pending = [t for t, status in await records(ctx) if status == TriggerStatus.PENDING.value]
    assert pending == [clock.now - 30_000 + MINUTE]


async def test_several_processes_fire_a_due_time_once(
    ctx: Context, clock: Clock, database_url: str, tmp_path: Path
) -> None:
    await setup_graph(ctx, "* * * * *")
    others = [await make_context(database_url, tmp_path, clock) for _ in range(3)]
    clock.now = START + MINUTE

    async def drain(context: Context) -> int:
        fired = 0
        while await runs.fire_due_trigger(context):
            fired += 1
        return fired

    try:
        results = await asyncio.gather(*(drain(c) for c in [ctx, *others]))
    finally:
        for other in others:
            await other.db.close()
    assert sum(results) == 1
    assert await run_count(ctx) == 1


async def test_failed_fire_is_recorded_and_the_schedule_goes_on(ctx: Context, clock: Clock) -> None:
    await setup_graph(ctx, "0 * * * *", required_keys=["tenant"])
    clock.now = START + 3_600_000
    assert await runs.fire_due_trigger(ctx)
    async with ctx.db.read() as tx:
        rows = await tx.list_triggers("ns", "g")
    assert [r["trigger_status"] for r in rows] == ["FAILED", "PENDING"]
    assert "tenant" in rows[0]["error"]
    assert await run_count(ctx) == 0


async def test_upsert_replaces_the_schedule_and_retention_purges(
    ctx: Context, clock: Clock
) -> None:
    await setup_graph(ctx, "*/5 * * * *")
    clock.now = START + 5 * MINUTE
    assert await runs.fire_due_trigger(ctx)
    await graphs.upsert_graph(ctx, "ns", "g", spec("0 0 * * *"), {})
    # The old pending time is gone at once; the finished record stays until it expires.
    assert [s for _, s in await records(ctx)] == [TriggerStatus.TRIGGERED.value]
    assert await graphs.validate_pending(ctx) == 1
    midnight = int(datetime(2026, 1, 2, tzinfo=UTC).timestamp() * 1000)
    assert (midnight, TriggerStatus.PENDING.value) in await records(ctx)
    clock.now += 3_600_000  # retention is one hour in these settings
    assert await runs.purge_expired_triggers(ctx) == 1
    assert [s for _, s in await records(ctx)] == [TriggerStatus.PENDING.value]
