"""The Runtime against a fake server that offers ``states/exchange``: reports travel
together with a claim, and still no result is lost or doubled whatever the network does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from exospherehost import Runtime
from exospherehost._http import ApiClient
from exospherehost._reporting import ClaimOffer, Report, Reporter, RuntimeStats
from sdk_fakeserver import FAST_BACKOFF, FakeStateManager
from test_sdk_runtime_fake import Echo, Explode, Fail, Signal

MakeRuntime = Callable[..., Runtime]


@pytest.fixture
def fake() -> FakeStateManager:
    return FakeStateManager(exchange=True)


async def test_reports_travel_together_and_bring_the_next_states(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    ids = [fake.add_state("Echo", {"text": str(index)}) for index in range(60)]

    stats = await make_runtime([Echo], workers=4, batch_size=4).run_until_idle(idle_timeout=0.05)

    assert [fake.states[i].outputs for i in ids] == [[{"text": str(n)}] for n in range(60)]
    assert stats.executed == stats.claimed == 60
    exchanges = fake.calls_to("POST", r"/states/exchange$")
    assert not fake.calls_to("POST", r"/state/.+/executed$")  # nothing sent one by one
    reported = [r["state_id"] for call in exchanges for r in call.body["reports"]]
    assert sorted(reported) == sorted(ids)  # each report sent once
    assert len(exchanges) < 60 / 2  # several reports per request
    claimed_along = sum(1 for call in exchanges if call.body.get("claim"))
    assert claimed_along > 0  # claims rode along with reports
    assert len(fake.calls_to("POST", r"/states/enqueue$")) < len(exchanges)
    assert fake.max_queued <= 4  # never more claimed than free workers


async def test_states_an_answer_brings_report_in_the_next_request(
    fake: FakeStateManager,
) -> None:
    """Quick nodes of the states an exchange brought finish before the next exchange is
    sent, so their reports ride in it together with those that arrived meanwhile."""
    warm_up, first, during = (fake.add_state("Echo") for _ in range(3))
    for state_id in (warm_up, first, during):  # claimed already, by this worker
        fake.states[state_id].status = "QUEUED"
        fake.states[state_id].lease_until = float("inf")
    api = ApiClient(fake.uri, fake.key, fake.namespace, transport=fake.transport)
    offers: list[ClaimOffer] = []

    def run_at_once(states: list[Any]) -> None:
        async def node(state_id: str) -> None:
            reporter.submit(Report(state_id, "Echo", "executed", {"outputs": [{}]}))

        for state in states:
            asyncio.get_running_loop().create_task(node(state["state_id"]))

    def claims() -> ClaimOffer | None:
        if offers:
            return None
        offers.append(ClaimOffer(["Echo"], 3, run_at_once, lambda: None))
        return offers[0]

    reporter = Reporter(api, FAST_BACKOFF, RuntimeStats(), lambda: None, claims)
    try:
        # The first exchange finds out that the server offers the route (no claim rides on it).
        reporter.submit(Report(warm_up, "Echo", "executed", {"outputs": [{}]}))
        await reporter.flush(grace=5.0)
        brought = [fake.add_state("Echo") for _ in range(3)]
        fake.fail("POST", r"/states/exchange$", "slow", delay=0.5)  # the next one only
        reporter.submit(Report(first, "Echo", "executed", {"outputs": [{}]}))
        await asyncio.sleep(0.02)  # the first exchange is in flight
        reporter.submit(Report(during, "Echo", "executed", {"outputs": [{}]}))
        await reporter.flush(grace=5.0)
    finally:
        await api.aclose()

    sent = [
        sorted(r["state_id"] for r in call.body["reports"])
        for call in fake.calls_to("POST", r"/states/exchange$")
    ]
    assert sent == [[warm_up], [first], sorted([during, *brought])]
    assert all(fake.states[i].status == "EXECUTED" for i in [first, during, *brought])


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("status", {"status": 500}),
        ("status", {"status": 503}),
        ("status", {"status": 429}),
        ("drop", {}),
        ("refuse", {}),
        ("timeout", {"delay": 0.01}),
        ("slow", {"delay": 0.2}),
        ("html", {"status": 502}),
        ("lose_answer", {}),
    ],
)
async def test_exchanges_survive_faults(
    fake: FakeStateManager, make_runtime: MakeRuntime, kind: str, options: dict[str, Any]
) -> None:
    echo = [fake.add_state("Echo", {"text": str(index)}) for index in range(12)]
    fail = fake.add_state("Fail", {"why": "no"})
    prune = fake.add_state("Signal", {"kind": "prune"})
    fault = fake.fail("POST", r"/states/exchange$", kind, times=4, **options)

    stats = await make_runtime([Echo, Fail, Signal]).run_until_idle(idle_timeout=0.1)

    assert fault.hits == 4
    assert [fake.states[i].outputs for i in echo] == [[{"text": str(n)}] for n in range(12)]
    assert (fake.states[fail].status, fake.states[fail].error) == ("ERRORED", "ValueError: no")
    assert fake.states[prune].status == "PRUNED"
    assert stats.undelivered == 0
    if kind == "lose_answer":
        # The applied reports were sent again and refused as already done.
        assert stats.rejected > 0
        assert stats.reported + stats.rejected == 14
    else:
        assert (stats.executed, stats.errored, stats.pruned, stats.rejected) == (12, 1, 1, 0)


async def test_each_report_is_answered_on_its_own(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    """Inside one exchange: a result the server can never take becomes an errored report,
    a report retryable on its own is sent again, a refused one is dropped and counted."""
    too_big = fake.add_state("Explode", {"items": "a,b"})
    flaky = fake.add_state("Echo", {"text": "flaky"})
    gone = fake.add_state("Echo", {"text": "gone"})
    fake.fail("POST", rf"{too_big}/executed$", "status", status=413)
    retried = fake.fail("POST", rf"{flaky}/executed$", "status", status=503, times=2)
    fake.fail("POST", rf"{gone}/executed$", "status", status=400)

    stats = await make_runtime([Echo, Explode]).run_until_idle(idle_timeout=0.1)

    assert fake.states[too_big].status == "ERRORED"
    assert "HTTP 413" in (fake.states[too_big].error or "")
    assert retried.hits == 2 and fake.states[flaky].outputs == [{"text": "flaky"}]
    assert fake.states[gone].status == "QUEUED"  # the server refused it: left alone
    assert (stats.executed, stats.errored, stats.rejected, stats.undelivered) == (1, 1, 1, 0)


async def test_servers_without_exchange_get_one_request_per_report(
    make_runtime: MakeRuntime,
) -> None:
    fake = FakeStateManager(exchange=False)
    ids = [fake.add_state("Echo", {"text": str(index)}) for index in range(10)]
    runtime = make_runtime([Echo], transport=fake.transport, key=fake.key)

    stats = await runtime.run_until_idle(idle_timeout=0.05)

    assert stats.executed == 10
    assert len(fake.calls_to("POST", r"/states/exchange$")) == 1  # asked once, then never
    assert len(fake.calls_to("POST", r"/state/.+/executed$")) == 10
    assert all(fake.states[i].outputs for i in ids)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_chaos_every_state_ends_with_its_own_outcome(
    fake: FakeStateManager, make_runtime: MakeRuntime, seed: int
) -> None:
    fake.chaos = 0.25
    fake.rng.seed(seed)
    fake.lease_seconds = 0.3
    echo = [fake.add_state("Echo", {"text": f"e{index}"}) for index in range(120)]
    fail = [fake.add_state("Fail", {"why": f"f{index}"}) for index in range(20)]
    prune = [fake.add_state("Signal", {"kind": "prune"}) for _ in range(20)]

    stats = await make_runtime(
        [Echo, Fail, Signal], workers=8, heartbeat_interval=0.05
    ).run_until_idle(idle_timeout=0.6)

    for index, state_id in enumerate(echo):
        assert fake.states[state_id].outputs == [{"text": f"e{index}"}]
    for index, state_id in enumerate(fail):
        assert fake.states[state_id].status == "ERRORED"
        assert fake.states[state_id].error == f"ValueError: f{index}"
    assert all(fake.states[state_id].status == "PRUNED" for state_id in prune)
    assert stats.undelivered == 0
    assert any(call.status is None for call in fake.calls)  # some requests did fail
    assert fake.calls_to("POST", r"/states/exchange$")
