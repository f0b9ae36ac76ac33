"""Distance two: the whole Runtime against an in-memory fake server with injected faults.

Every fault test checks the same two things: no result is lost (each state ends with the
outcome its node produced) and the runtime keeps working (it processes the other states
and returns normally).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from exospherehost import BaseNode, PruneSignal, ReQueueAfterSignal, Runtime
from exospherehost.errors import ApiError
from pydantic import BaseModel
from sdk_fakeserver import FakeState, FakeStateManager

MakeRuntime = Callable[..., Runtime]


class Echo(BaseNode):
    class Inputs(BaseModel):
        text: str

    class Outputs(BaseModel):
        text: str

    async def execute(self) -> Outputs:
        return self.Outputs(text=self.inputs.text)


class Explode(BaseNode):
    class Inputs(BaseModel):
        items: str

    class Outputs(BaseModel):
        item: str

    async def execute(self) -> list[Outputs] | None:
        if not self.inputs.items:
            return None
        return [self.Outputs(item=item) for item in self.inputs.items.split(",")]


class Fail(BaseNode):
    class Inputs(BaseModel):
        why: str

    async def execute(self) -> None:
        raise ValueError(self.inputs.why)


class Signal(BaseNode):
    class Inputs(BaseModel):
        kind: str

    async def execute(self) -> None:
        if self.inputs.kind == "prune":
            raise PruneSignal({"because": "test"})
        raise ReQueueAfterSignal(timedelta(minutes=5))


class NeedsSecret(BaseNode):
    class Inputs(BaseModel):
        text: str

    class Outputs(BaseModel):
        text: str

    class Secrets(BaseModel):
        token: str

    async def execute(self) -> Outputs:
        return self.Outputs(text=f"{self.inputs.text}:{self.secrets.token}")


def executed_outputs(fake: FakeStateManager) -> dict[str, list[dict[str, Any]] | None]:
    return {state.id: state.outputs for state in fake.states.values()}


# --- the happy path ---------------------------------------------------------------------


async def test_registers_claims_executes_and_reports(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    echo = fake.add_state("Echo", {"text": "hi"})
    fan = fake.add_state("Explode", {"items": "a,b,c"})
    none = fake.add_state("Explode", {"items": ""})
    runtime = make_runtime([Echo, Explode])

    stats = await runtime.run_until_idle(idle_timeout=0.05)

    [register] = fake.calls_to("PUT", r"/nodes/$")
    assert register.body["runtime_name"] == "test-runtime"
    assert register.body["runtime_namespace"] == "test"
    assert [node["name"] for node in register.body["nodes"]] == ["Echo", "Explode"]
    assert register.body["nodes"][0]["inputs_schema"]["properties"] == {
        "text": {"title": "Text", "type": "string"}
    }
    assert register.body["nodes"][0]["secrets"] == []
    assert fake.states[echo].outputs == [{"text": "hi"}]
    assert fake.states[fan].outputs == [{"item": "a"}, {"item": "b"}, {"item": "c"}]
    assert fake.states[none].outputs == []
    assert stats.claimed == 3
    assert stats.executed == 3
    assert {call.user_agent for call in fake.calls} == {"exospherehost-python/0.0.3"}


async def test_errors_and_signals_are_reported(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    failing = fake.add_state("Fail", {"why": "bad input"})
    pruned = fake.add_state("Signal", {"kind": "prune"})
    requeued = fake.add_state("Signal", {"kind": "later"})
    invalid = fake.add_state("Fail", {})
    runtime = make_runtime([Fail, Signal])

    stats = await runtime.run_until_idle(idle_timeout=0.05)

    assert fake.states[failing].status == "ERRORED"
    assert fake.states[failing].error == "ValueError: bad input"
    assert fake.states[pruned].status == "PRUNED"
    assert fake.states[pruned].data == {"because": "test"}
    [requeue] = fake.calls_to("POST", rf"{requeued}/re-enqueue-after$")
    assert requeue.body == {"enqueue_after": 300_000}
    assert fake.states[requeued].status == "CREATED"
    assert fake.states[invalid].status == "ERRORED"
    assert "why" in (fake.states[invalid].error or "")
    assert (stats.errored, stats.pruned, stats.requeued) == (2, 1, 1)


async def test_secrets_are_fetched_only_for_nodes_that_declare_them(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    fake.secrets = {"token": "t0k"}
    with_secret = fake.add_state("NeedsSecret", {"text": "a"})
    fake.add_state("Echo", {"text": "b"})
    fake.fail("GET", r"/secrets$", "status", status=503)

    await make_runtime([NeedsSecret, Echo]).run_until_idle(idle_timeout=0.05)

    assert fake.states[with_secret].outputs == [{"text": "a:t0k"}]
    # One refused and one successful fetch, both for the node that declares a secret.
    assert len(fake.calls_to("GET", r"/secrets$")) == 2
    assert all(with_secret in call.path for call in fake.calls_to("GET", r"/secrets$"))


async def test_one_pooled_http_client_per_runtime(
    fake: FakeStateManager, make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[httpx.AsyncClient] = []
    original = httpx.AsyncClient.__init__

    def counting_init(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> None:
        created.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", counting_init)
    for index in range(10):
        fake.add_state("Echo", {"text": str(index)})
    await make_runtime([Echo]).run_until_idle(idle_timeout=0.05)
    assert len(created) == 1
    assert created[0].timeout.read is not None


# --- faults: every report survives ------------------------------------------------------


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
    ],
)
async def test_executed_reports_survive_faults(
    fake: FakeStateManager, make_runtime: MakeRuntime, kind: str, options: dict[str, Any]
) -> None:
    ids = [fake.add_state("Echo", {"text": str(index)}) for index in range(8)]
    fault = fake.fail("POST", r"/executed$", kind, times=6, **options)

    stats = await make_runtime([Echo]).run_until_idle(idle_timeout=0.05)

    assert fault.hits == 6
    assert {state_id: fake.states[state_id].outputs for state_id in ids} == {
        state_id: [{"text": str(index)}] for index, state_id in enumerate(ids)
    }
    assert stats.executed == 8
    assert stats.rejected == stats.undelivered == 0


@pytest.mark.parametrize("kind", ["status", "drop", "timeout"])
async def test_errored_and_signal_reports_survive_faults(
    fake: FakeStateManager, make_runtime: MakeRuntime, kind: str
) -> None:
    failing = fake.add_state("Fail", {"why": "nope"})
    pruned = fake.add_state("Signal", {"kind": "prune"})
    requeued = fake.add_state("Signal", {"kind": "later"})
    for route in ("errored", "prune", "re-enqueue-after"):
        fake.fail("POST", rf"/{route}$", kind, times=3)

    stats = await make_runtime([Fail, Signal]).run_until_idle(idle_timeout=0.05)

    assert fake.states[failing].status == "ERRORED"
    assert fake.states[pruned].status == "PRUNED"
    assert fake.states[requeued].status == "CREATED"
    assert fake.states[requeued].claims == 1
    assert (stats.errored, stats.pruned, stats.requeued) == (1, 1, 1)


async def test_claim_and_registration_failures_are_retried(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    fake.fail("PUT", r"/nodes/$", "refuse", times=3)
    fake.fail("POST", r"/states/enqueue$", "status", status=502, times=2)
    fake.fail("POST", r"/states/enqueue$", "drop", times=2)
    fake.fail("POST", r"/states/enqueue$", "slow", delay=0.1, times=1)
    fake.fail("POST", r"/states/enqueue$", "html", status=200, times=1)
    fake.fail("POST", r"/states/enqueue$", "html", status=502, times=1)
    state_id = fake.add_state("Echo", {"text": "still here"})

    await make_runtime([Echo]).run_until_idle(idle_timeout=0.05)

    assert len(fake.calls_to("PUT", r"/nodes/$")) == 4
    assert fake.states[state_id].outputs == [{"text": "still here"}]


async def test_answer_lost_after_the_server_applied_the_report(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    """The server stored the result but the answer never arrived: the retry is refused
    (400, not queued any more) and the runtime moves on; the result is kept."""
    state_id = fake.add_state("Echo", {"text": "once"})
    fake.fail("POST", r"/executed$", "lose_answer")
    other = fake.add_state("Echo", {"text": "other"})

    stats = await make_runtime([Echo], workers=1).run_until_idle(idle_timeout=0.05)

    assert fake.states[state_id].outputs == [{"text": "once"}]
    assert fake.states[other].outputs == [{"text": "other"}]
    assert stats.rejected == 1
    assert stats.executed == 1


async def test_state_gone_is_not_retried_and_does_not_stop_the_runtime(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    gone = fake.add_state("Echo", {"text": "x"})
    fake.fail("POST", rf"{gone}/executed$", "status", status=404)
    kept = fake.add_state("Echo", {"text": "y"})

    stats = await make_runtime([Echo]).run_until_idle(idle_timeout=0.05)

    assert len(fake.calls_to("POST", rf"{gone}/executed$")) == 1
    assert fake.states[kept].outputs == [{"text": "y"}]
    assert stats.rejected == 1


async def test_registration_refused_raises(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    runtime = make_runtime([Echo], key="wrong-key")
    with pytest.raises(ApiError) as refused:
        await runtime.run_until_idle(idle_timeout=0.05)
    assert refused.value.status_code == 401


async def test_report_failing_until_shutdown_is_logged_not_dropped(
    fake: FakeStateManager, make_runtime: MakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    state_id = fake.add_state("Echo", {"text": "precious"})
    fake.fail("POST", r"/executed$", "status", status=503, times=10**9)
    runtime = make_runtime([Echo], shutdown_report_timeout=0.1)
    caplog.set_level(logging.ERROR, logger="exospherehost.runtime")

    task = asyncio.ensure_future(runtime.run())
    await fake.wait_for(lambda: len(fake.calls_to("POST", r"/executed$")) >= 3)
    await runtime.stop()
    stats = await task

    assert stats.undelivered == 1
    [record] = [r for r in caplog.records if "gave up delivering" in r.getMessage()]
    assert state_id in record.getMessage()
    assert "precious" in record.getMessage()


# --- concurrency ------------------------------------------------------------------------


class Hold(BaseNode):
    """Runs until the test releases it."""

    release: asyncio.Event
    running = 0
    peak = 0

    class Inputs(BaseModel):
        n: str

    class Outputs(BaseModel):
        n: str

    async def execute(self) -> Outputs:
        cls = type(self)
        cls.running += 1
        cls.peak = max(cls.peak, cls.running)
        try:
            await cls.release.wait()
        finally:
            cls.running -= 1
        return self.Outputs(n=self.inputs.n)


@pytest.fixture
def hold() -> type[Hold]:
    Hold.release = asyncio.Event()
    Hold.running = 0
    Hold.peak = 0
    return Hold


async def test_claims_no_more_than_free_workers(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    ids = [fake.add_state("Hold", {"n": str(index)}) for index in range(10)]
    runtime = make_runtime([hold], workers=3, batch_size=16)
    task = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.05))

    await fake.wait_for(lambda: hold.running == 3)
    await asyncio.sleep(0.05)  # give a wrong implementation time to over-claim
    assert len(fake.by_status("QUEUED")) == 3
    hold.release.set()
    await task

    assert fake.max_queued <= 3
    batches = [call.body["batch_size"] for call in fake.calls_to("POST", r"/states/enqueue$")]
    assert max(batches) <= 3
    assert all(fake.states[state_id].status == "EXECUTED" for state_id in ids)


async def test_prefetch_claims_ahead_but_runs_no_more_than_workers(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    ids = [fake.add_state("Hold", {"n": str(index)}) for index in range(10)]
    runtime = make_runtime([hold], workers=2, prefetch=3, batch_size=16)
    task = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.05))

    await fake.wait_for(lambda: hold.running == 2 and len(fake.by_status("QUEUED")) == 5)
    await asyncio.sleep(0.05)  # give a wrong implementation time to over-claim or over-run
    assert len(fake.by_status("QUEUED")) == 5  # two running, three waiting for a worker
    assert hold.running == 2
    hold.release.set()
    await task

    assert hold.peak == 2
    assert fake.max_queued <= 5
    assert all(fake.states[state_id].status == "EXECUTED" for state_id in ids)


async def test_prefetched_states_not_started_are_handed_back_on_stop(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    ids = [fake.add_state("Hold", {"n": str(index)}) for index in range(3)]
    runtime = make_runtime([hold], workers=1, prefetch=2)
    task = asyncio.ensure_future(runtime.run())
    await fake.wait_for(lambda: hold.running == 1 and len(fake.by_status("QUEUED")) == 3)

    stopping = asyncio.ensure_future(runtime.stop())
    # The two waiting states go back at once, while the running one still runs.
    await fake.wait_for(lambda: len(fake.by_status("CREATED")) == 2)
    assert not stopping.done()
    hold.release.set()
    await stopping
    stats = await task

    assert [fake.states[i].status for i in ids].count("EXECUTED") == 1
    assert stats.executed == 1
    assert stats.requeued == 2
    assert stats.errored == 0
    assert hold.peak == 1


async def test_sync_nodes_run_in_threads_without_blocking_the_loop(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    barrier = threading.Barrier(3, timeout=5)
    threads: set[str] = set()

    class Blocking(BaseNode):
        class Inputs(BaseModel):
            n: str

        class Outputs(BaseModel):
            thread: str

        def execute(self) -> Outputs:
            # Three blocking calls meet at the barrier only if they run in parallel threads.
            barrier.wait()
            threads.add(threading.current_thread().name)
            return self.Outputs(thread=threading.current_thread().name)

    ids = [fake.add_state("Blocking", {"n": str(index)}) for index in range(3)]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.ensure_future(ticker())
    await make_runtime([Blocking], workers=3).run_until_idle(idle_timeout=0.05)
    ticking.cancel()

    assert all(fake.states[state_id].status == "EXECUTED" for state_id in ids)
    assert len(threads) == 3
    assert threading.current_thread().name not in threads
    assert ticks > 0


async def test_heartbeats_while_a_node_runs(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    state_id = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold], heartbeat_interval=0.01)
    task = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.05))
    await fake.wait_for(lambda: fake.states[state_id].heartbeats >= 3)
    hold.release.set()
    await task
    assert fake.calls_to("POST", rf"{state_id}/heartbeat$")[0].body == {}
    assert fake.states[state_id].status == "EXECUTED"


async def test_short_states_start_no_heartbeat_task(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    """Only a state still unsettled after the heartbeat interval gets a heartbeat task."""
    quick = [fake.add_state("Echo", {"text": str(i)}) for i in range(20)]
    slow = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([Echo, hold], heartbeat_interval=0.2)
    started: list[str] = []
    beat = runtime._heartbeat

    def counting(claim: Any) -> Any:
        started.append(claim.state_id)
        return beat(claim)

    runtime._heartbeat = counting  # type: ignore[method-assign]
    task = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.05))
    await fake.wait_for(lambda: all(fake.states[i].status == "EXECUTED" for i in quick))
    await fake.wait_for(lambda: fake.states[slow].heartbeats >= 2)
    hold.release.set()
    await task
    assert started == [slow]
    assert fake.states[slow].status == "EXECUTED"


async def test_servers_without_heartbeat_route_are_tolerated(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    fake.heartbeat_route = False
    first = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold], heartbeat_interval=0.01, workers=1)
    task = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.05))
    await fake.wait_for(lambda: len(fake.calls_to("POST", r"/heartbeat$")) == 1)
    await asyncio.sleep(0.05)
    hold.release.set()
    second = fake.add_state("Hold", {"n": "2"})
    await task
    # The first 404 turned heartbeats off for the whole runtime.
    assert len(fake.calls_to("POST", r"/heartbeat$")) == 1
    assert fake.states[first].status == fake.states[second].status == "EXECUTED"


async def test_long_poll_is_requested_and_new_work_is_picked_up(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    runtime = make_runtime([Echo], wait_ms=1000)
    task = asyncio.ensure_future(runtime.run())
    await fake.wait_for(lambda: bool(fake.calls_to("POST", r"/states/enqueue$")))
    state_id = fake.add_state("Echo", {"text": "late"})
    await fake.wait_for(lambda: fake.states[state_id].status == "EXECUTED")
    await runtime.stop()
    await task
    enqueues = fake.calls_to("POST", r"/states/enqueue$")
    assert enqueues[0].body["wait_ms"] == 1000
    # The held request delivered the new state: no polling every ``poll_interval``
    # (10 ms here, which would be hundreds of requests) while waiting.
    assert len(enqueues) < 10


async def test_run_until_idle_follows_work_created_by_reports(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    def successor(state: FakeState, outputs: list[dict[str, Any]]) -> None:
        depth = int(outputs[0]["text"])
        if depth < 5:
            fake.add_state("Echo", {"text": str(depth + 1)})

    fake.on_executed = successor
    fake.add_state("Echo", {"text": "0"})
    stats = await make_runtime([Echo]).run_until_idle(idle_timeout=0.05)
    assert stats.executed == 6
    assert sorted(s.outputs[0]["text"] for s in fake.states.values() if s.outputs) == [
        str(depth) for depth in range(6)
    ]


# --- shutdown ---------------------------------------------------------------------------


async def test_stop_lets_running_nodes_finish_and_reports_them(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    running = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold], workers=1)
    task = asyncio.ensure_future(runtime.run())
    await fake.wait_for(lambda: hold.running == 1)
    waiting = fake.add_state("Hold", {"n": "2"})

    stopping = asyncio.ensure_future(runtime.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # still waiting for the running node
    claims_at_stop = len(fake.calls_to("POST", r"/states/enqueue$"))
    hold.release.set()
    await stopping
    stats = await task

    assert fake.states[running].outputs == [{"n": "1"}]
    assert fake.states[waiting].status == "CREATED"  # not claimed after the stop
    assert len(fake.calls_to("POST", r"/states/enqueue$")) == claims_at_stop
    assert stats.executed == 1


async def test_states_handed_to_a_pending_long_poll_after_stop_are_run(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    """Stopping must not abandon a claim request the server still holds: whatever it
    hands out is claimed for this runtime, so it is executed and reported."""
    runtime = make_runtime([Echo], wait_ms=2000)
    task = asyncio.ensure_future(runtime.run())
    await fake.wait_for(lambda: bool(fake.calls_to("POST", r"/states/enqueue$")))
    runtime.request_stop()
    await asyncio.sleep(0.02)
    late = fake.add_state("Echo", {"text": "arrived during shutdown"})
    stats = await task
    assert fake.states[late].outputs == [{"text": "arrived during shutdown"}]
    assert stats.executed == 1
    assert len(fake.calls_to("POST", r"/states/enqueue$")) == 1


async def test_nodes_still_running_at_the_deadline_are_reported_errored(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    state_id = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold], graceful_shutdown_timeout=0.05)
    task = asyncio.ensure_future(runtime.run())
    await fake.wait_for(lambda: hold.running == 1)
    await runtime.stop()
    stats = await task
    assert fake.states[state_id].status == "ERRORED"
    assert "shut down" in (fake.states[state_id].error or "")
    assert stats.errored == 1


async def test_sigterm_triggers_a_graceful_shutdown(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    state_id = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold])
    task = asyncio.ensure_future(runtime.run(handle_signals=True))
    await fake.wait_for(lambda: hold.running == 1)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.05)
    assert not task.done()
    hold.release.set()
    stats = await task
    assert fake.states[state_id].outputs == [{"n": "1"}]
    assert stats.executed == 1
    # The handlers are removed again once the runtime has stopped.
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN)


async def test_second_signal_cancels_running_nodes(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    state_id = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold], graceful_shutdown_timeout=60)
    task = asyncio.ensure_future(runtime.run(handle_signals=True))
    await fake.wait_for(lambda: hold.running == 1)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)
    stats = await task
    assert fake.states[state_id].status == "ERRORED"
    assert stats.errored == 1


async def test_start_in_a_running_loop_returns_a_task(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    state_id = fake.add_state("Echo", {"text": "t"})
    runtime = make_runtime([Echo])
    task = runtime.start()
    assert isinstance(task, asyncio.Task)
    await fake.wait_for(lambda: fake.states[state_id].status == "EXECUTED")
    await runtime.stop()
    assert (await task).executed == 1


# --- configuration ----------------------------------------------------------------------


def test_configuration_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXOSPHERE_STATE_MANAGER_URI", raising=False)
    monkeypatch.delenv("EXOSPHERE_API_KEY", raising=False)

    class Bad(BaseNode):
        class Outputs(BaseModel):
            count: int

        async def execute(self) -> None:
            return None

    with pytest.raises(ValueError) as raised:
        Runtime("ns", "rt", [Bad, Echo, Echo], batch_size=0, workers=0, prefetch=-1)  # type: ignore[list-item]
    message = str(raised.value)
    for expected in (
        "batch_size",
        "workers",
        "prefetch",
        "EXOSPHERE_STATE_MANAGER_URI",
        "EXOSPHERE_API_KEY",
        "Bad.Outputs.count must be annotated 'str'",
        "repeated: Echo",
    ):
        assert expected in message
    with pytest.raises(ValueError, match="not a subclass of BaseNode"):
        Runtime("ns", "rt", [int], state_manager_uri="http://x", key="k")  # type: ignore[list-item]


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXOSPHERE_STATE_MANAGER_URI", "http://from-env:8000")
    monkeypatch.setenv("EXOSPHERE_API_KEY", "env-key")
    runtime = Runtime("ns", "rt", [Echo])
    assert runtime._state_manager_uri == "http://from-env:8000"
    assert runtime._key == "env-key"


async def test_result_the_server_can_never_accept_becomes_an_error(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    """A 413 (too many outputs) would leave the state claimed forever; report it errored
    instead so the graph's retry policy decides."""
    state_id = fake.add_state("Explode", {"items": "a,b"})
    fake.fail("POST", r"/executed$", "status", status=413)

    stats = await make_runtime([Explode]).run_until_idle(idle_timeout=0.05)

    assert fake.states[state_id].status == "ERRORED"
    assert "HTTP 413" in (fake.states[state_id].error or "")
    assert stats.errored == 1


async def test_servers_that_answer_at_once_are_polled(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    """A server without long polling (like the published one) answers an empty claim at
    once; the runtime keeps polling every ``poll_interval`` and picks up new work."""
    fake.long_poll = False
    runtime = make_runtime([Echo], wait_ms=5000, poll_interval=0.05)
    task = asyncio.ensure_future(runtime.run())
    await fake.wait_for(lambda: len(fake.calls_to("POST", r"/states/enqueue$")) >= 3)
    state_id = fake.add_state("Echo", {"text": "polled"})
    await fake.wait_for(lambda: fake.states[state_id].status == "EXECUTED")
    await runtime.stop()
    await task
    polls = len(fake.calls_to("POST", r"/states/enqueue$"))
    await asyncio.sleep(0.1)
    assert len(fake.calls_to("POST", r"/states/enqueue$")) == polls  # stopped polling


async def test_a_node_calling_sys_exit_fails_only_its_attempt(
    fake: FakeStateManager, make_runtime: MakeRuntime
) -> None:
    class Quitter(BaseNode):
        class Inputs(BaseModel):
            how: str

        def execute(self) -> None:
            if self.inputs.how == "exit":
                raise SystemExit(3)
            raise KeyboardInterrupt

    exiting = fake.add_state("Quitter", {"how": "exit"})
    interrupting = fake.add_state("Quitter", {"how": "interrupt"})
    fake.add_state("Echo", {"text": "after"})

    stats = await make_runtime([Quitter, Echo]).run_until_idle(idle_timeout=0.05)

    assert fake.states[exiting].error == "SystemExit: 3"
    assert fake.states[interrupting].error == "KeyboardInterrupt"
    assert (stats.errored, stats.executed) == (2, 1)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_chaos_every_state_ends_with_its_own_outcome(
    fake: FakeStateManager, make_runtime: MakeRuntime, seed: int
) -> None:
    """One request in four meets a random fault (5xx, refused or dropped connection,
    timeout, slow answer, answer lost after the server applied the request), on every
    route. Claims whose answer was lost come back when their lease runs out. Still,
    every state ends exactly as its node decided, and the runtime finishes normally."""
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
    assert sum(fault.hits for fault in fake.faults) == 0  # only the random faults were used
    assert any(call.status is None for call in fake.calls)  # some requests did fail


async def test_cancelling_the_runtime_task_still_drains(
    fake: FakeStateManager, make_runtime: MakeRuntime, hold: type[Hold]
) -> None:
    """Cancelling the task of ``start()`` (as asyncio.run does on Ctrl-C) is a graceful
    stop: the running node finishes and is reported before the task ends."""
    state_id = fake.add_state("Hold", {"n": "1"})
    runtime = make_runtime([hold])
    task = runtime.start()
    assert task is not None
    await fake.wait_for(lambda: hold.running == 1)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()
    hold.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.states[state_id].outputs == [{"n": "1"}]
