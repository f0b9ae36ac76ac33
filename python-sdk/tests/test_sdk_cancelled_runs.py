"""The Runtime when a state's run was cancelled: the server answers its report or
heartbeat with 409 ``run_cancelled``; the runtime drops the report without retrying it,
logs it once, and frees the worker slot (stopping the node when a heartbeat learns it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from exospherehost import Runtime
from sdk_fakeserver import FakeStateManager
from test_sdk_runtime_fake import Echo, Hold

MakeRuntime = Callable[..., Runtime]


@pytest.fixture
def held() -> type[Hold]:
    Hold.release = asyncio.Event()
    Hold.running = 0
    Hold.peak = 0
    return Hold


@pytest.mark.parametrize("exchange", [False, True])
async def test_a_report_of_a_cancelled_run_is_dropped_and_logged_once(
    make_runtime: MakeRuntime,
    fake: FakeStateManager,
    exchange: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.exchange = exchange
    kept = fake.add_state("Echo", {"text": "kept"})
    cancelled = fake.add_state("Echo", {"text": "cancelled"})
    fake.states[cancelled].run_cancelled = True

    with caplog.at_level(logging.WARNING, logger="exospherehost.runtime"):
        stats = await make_runtime([Echo]).run_until_idle(idle_timeout=0.1)

    assert fake.states[kept].outputs == [{"text": "kept"}]
    assert fake.states[cancelled].status == "CANCELLED"
    assert (stats.executed, stats.cancelled, stats.rejected, stats.undelivered) == (1, 1, 1, 0)
    if exchange:
        sent = [
            report
            for call in fake.calls_to("POST", r"/states/exchange$")
            for report in call.body["reports"]
            if report["state_id"] == cancelled
        ]
    else:  # (the first exchange, refused as an unknown route, delivered nothing)
        sent = fake.calls_to("POST", rf"{cancelled}/executed$")
    assert len(sent) == 1  # not retried
    messages = [r.getMessage() for r in caplog.records if "was cancelled" in r.getMessage()]
    assert len(messages) == 1, messages
    assert cancelled in messages[0]


async def test_a_refused_heartbeat_stops_the_node_and_frees_its_slot(
    make_runtime: MakeRuntime, fake: FakeStateManager, held: type[Hold]
) -> None:
    hold = held
    first = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold], heartbeat_interval=0.01, workers=1)
    task = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.2))
    await fake.wait_for(lambda: fake.states[first].heartbeats >= 1)
    fake.states[first].run_cancelled = True
    await fake.wait_for(lambda: hold.running == 0)  # the node was stopped
    second = fake.add_state("Hold", {"n": "2"})  # the only slot is free again
    await fake.wait_for(lambda: fake.states[second].status == "QUEUED")
    hold.release.set()
    stats = await task

    assert fake.states[second].status == "EXECUTED"
    assert fake.states[first].status == "CANCELLED"
    assert not fake.calls_to("POST", rf"{first}/(executed|errored)$")  # nothing reported
    assert (stats.executed, stats.cancelled, stats.rejected) == (1, 1, 0)


async def test_a_prefetched_state_of_a_cancelled_run_is_dropped_before_it_starts(
    make_runtime: MakeRuntime, fake: FakeStateManager, held: type[Hold]
) -> None:
    hold = held
    running = fake.add_state("Hold", {"n": "1"})
    waiting = fake.add_state("Hold", {"n": "2"})
    runtime = make_runtime([hold], heartbeat_interval=0.01, workers=1, prefetch=1)
    task = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.2))
    await fake.wait_for(lambda: fake.states[waiting].heartbeats >= 1)  # held, not started
    assert hold.running == 1
    fake.states[waiting].run_cancelled = True
    await fake.wait_for(lambda: runtime.stats.cancelled == 1)
    hold.release.set()
    stats = await task

    assert fake.states[running].status == "EXECUTED"
    assert hold.peak == 1  # the dropped state never ran
    assert not fake.calls_to("POST", rf"{waiting}/(executed|errored|re-enqueue-after)$")
    assert (stats.executed, stats.cancelled, stats.rejected) == (1, 1, 0)
