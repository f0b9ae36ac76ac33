"""The StateManager client against the fake server: bodies, polling, errors, retries."""

from __future__ import annotations

import asyncio

import pytest
from exospherehost import (
    CronTrigger,
    GraphNodeModel,
    RetryPolicyModel,
    StateManager,
    StoreConfigModel,
)
from exospherehost.errors import ApiError, GraphValidationError, GraphValidationTimeout
from exospherehost.models import RunStatus
from sdk_fakeserver import FAST_BACKOFF, FakeStateManager


@pytest.fixture
def sm(fake: FakeStateManager) -> StateManager:
    return StateManager(
        fake.namespace,
        state_manager_uri=fake.uri,
        key=fake.key,
        transport=fake.transport,
        retry_backoff=FAST_BACKOFF,
    )


NODES = [
    GraphNodeModel(node_name="A", namespace="test", identifier="a", inputs={"x": "1"}),
]


async def test_upsert_sends_the_published_body_and_polls_until_valid(
    fake: FakeStateManager, sm: StateManager
) -> None:
    fake.graph_status_sequence = ["PENDING", "PENDING", "VALID"]
    graph = await sm.upsert_graph(
        "g",
        NODES,
        {"token": "t"},
        retry_policy=RetryPolicyModel(max_retries=1),
        store_config=StoreConfigModel(required_keys=["k"]),
        triggers=[CronTrigger(expression="* * * * *")],
        polling_interval=0,
    )
    assert graph["validation_status"] == "VALID"
    [put] = fake.calls_to("PUT", r"/graph/g$")
    assert put.body == {
        "secrets": {"token": "t"},
        "nodes": [
            {
                "node_name": "A",
                "namespace": "test",
                "identifier": "a",
                "inputs": {"x": "1"},
                "next_nodes": None,
                "unites": None,
            }
        ],
        "retry_policy": {
            "max_retries": 1,
            "strategy": "EXPONENTIAL",
            "backoff_factor": 2000,
            "exponent": 2,
            "max_delay": None,
        },
        "store_config": {"required_keys": ["k"], "default_values": {}},
        "triggers": [{"type": "CRON", "value": {"expression": "* * * * *"}}],
    }
    assert len(fake.calls_to("GET", r"/graph/g$")) == 3


async def test_optional_parts_are_omitted(fake: FakeStateManager, sm: StateManager) -> None:
    fake.graph_status_sequence = ["VALID"]
    await sm.upsert_graph("g", NODES, {}, polling_interval=0)
    [put] = fake.calls_to("PUT", r"/graph/g$")
    assert set(put.body) == {"secrets", "nodes"}


async def test_invalid_graph_lists_the_validation_errors(
    fake: FakeStateManager, sm: StateManager
) -> None:
    fake.graph_status_sequence = ["INVALID"]
    fake.graph_errors = ["Node A is not registered", "Secret token is missing"]
    with pytest.raises(GraphValidationError) as invalid:
        await sm.upsert_graph("g", NODES, {}, polling_interval=0)
    assert invalid.value.errors == fake.graph_errors
    message = str(invalid.value)
    assert "INVALID" in message
    assert "Node A is not registered" in message
    assert "Secret token is missing" in message


async def test_validation_timeout(fake: FakeStateManager, sm: StateManager) -> None:
    fake.graph_status_sequence = ["PENDING"] * 1000
    with pytest.raises(GraphValidationTimeout, match="still PENDING"):
        await sm.upsert_graph("g", NODES, {}, validation_timeout=0, polling_interval=0)


async def test_trigger_body_and_no_retry_after_the_request_was_sent(
    fake: FakeStateManager, sm: StateManager
) -> None:
    fake.graphs["g"] = {"validation_status": "VALID"}
    result = await sm.trigger("g", inputs={"a": "1"}, store={"k": "v"}, start_delay=5)
    assert result == {"status": "CREATED", "run_id": "run-1"}
    [call] = fake.calls_to("POST", r"/graph/g/trigger$")
    assert call.body == {"start_delay": 5, "inputs": {"a": "1"}, "store": {"k": "v"}}

    fake.fail("POST", r"/trigger$", "status", status=500)
    with pytest.raises(ApiError) as failed:
        await sm.trigger("g")
    assert failed.value.status_code == 500
    assert len(fake.calls_to("POST", r"/trigger$")) == 2  # not sent again: no duplicate run

    fake.fail("POST", r"/trigger$", "refuse")  # never reached the server: safe to resend
    assert (await sm.trigger("g"))["status"] == "CREATED"


async def test_a_trigger_with_an_idempotency_key_is_retried_with_that_key(
    fake: FakeStateManager, sm: StateManager
) -> None:
    fake.graphs["g"] = {"validation_status": "VALID"}
    fake.fail("POST", r"/trigger$", "lose_answer")  # reached the server, answer lost
    fake.fail("POST", r"/trigger$", "status", status=503)
    result = await sm.trigger("g", store={"k": "v"}, idempotency_key="order-7")
    assert result["status"] == "CREATED"
    calls = fake.calls_to("POST", r"/graph/g/trigger$")
    assert len(calls) == 3
    assert {call.idempotency_key for call in calls} == {"order-7"}
    assert {str(call.body) for call in calls} == {str(calls[0].body)}

    # trigger_many: per-run keys in the bulk body, and in the header of the fallback.
    run_ids = await sm.trigger_many("g", [{"idempotency_key": "a"}, {"store": {"k": "v"}}])
    assert len(run_ids) == 2
    [bulk] = fake.calls_to("POST", r"/graph/g/runs$")
    assert [run.get("idempotency_key") for run in bulk.body["runs"]] == ["a", None]
    fallback = fake.calls_to("POST", r"/graph/g/trigger$")[3:]
    assert [call.idempotency_key for call in fallback] == ["a", None]


async def test_reads_are_retried_on_server_errors(fake: FakeStateManager, sm: StateManager) -> None:
    fake.graphs["g"] = {"validation_status": "VALID", "validation_errors": []}
    fake.fail("GET", r"/graph/g$", "status", status=503, times=2)
    fake.fail("GET", r"/graph/g$", "drop")
    assert (await sm.get_graph("g"))["validation_status"] == "VALID"
    with pytest.raises(ApiError) as missing:
        await sm.get_graph("nope")
    assert missing.value.status_code == 404
    assert len(fake.calls_to("GET", r"/graph/nope$")) == 1  # a 404 is an answer


async def test_typed_run_views(fake: FakeStateManager, sm: StateManager) -> None:
    fake.graphs["g"] = {"validation_status": "VALID"}
    run_ids = [(await sm.trigger("g"))["run_id"] for _ in range(3)]
    page = await sm.list_runs(1, 2)
    assert page.total == 3
    assert [run.run_id for run in page.runs] == [run_ids[2], run_ids[1]]
    assert page.runs[0].status is RunStatus.PENDING
    assert (await sm.get_run(run_ids[0], page_size=2)).run_id == run_ids[0]
    with pytest.raises(LookupError):
        await sm.get_run("missing", page_size=2)

    fake.add_state("A", {})
    done = fake.add_state("A", {})
    fake.states[done].status = "SUCCESS"
    graph = await sm.get_run_graph("run-1")
    assert graph.node_count == 2
    assert graph.pending == 1
    assert graph.status is RunStatus.PENDING
    assert graph.count(status="SUCCESS") == 1
    with pytest.raises(TimeoutError):
        await sm.wait_for_run("run-1", timeout=0, poll_interval=0)


def test_configuration_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXOSPHERE_STATE_MANAGER_URI", raising=False)
    monkeypatch.delenv("EXOSPHERE_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"EXOSPHERE_STATE_MANAGER_URI.*EXOSPHERE_API_KEY"):
        StateManager("ns")
    monkeypatch.setenv("EXOSPHERE_STATE_MANAGER_URI", "http://env")
    monkeypatch.setenv("EXOSPHERE_API_KEY", "k")
    assert StateManager("ns").namespace == "ns"


def test_usable_across_event_loops(fake: FakeStateManager, sm: StateManager) -> None:
    """Built once, used from successive asyncio.run calls (each gets its own pool)."""
    fake.graphs["g"] = {"validation_status": "VALID", "validation_errors": []}
    for _ in range(2):
        assert asyncio.run(sm.get_graph("g"))["validation_status"] == "VALID"


async def test_trigger_many_falls_back_to_one_trigger_per_run(
    fake: FakeStateManager, sm: StateManager
) -> None:
    """The original state manager has no batch route: each run is one trigger, in order."""
    fake.graphs["g"] = {"validation_status": "VALID"}
    run_ids = await sm.trigger_many("g", [{"store": {"k": str(i)}} for i in range(3)])
    assert len(fake.calls_to("POST", r"/graph/g/runs$")) == 1  # asked once
    triggers = fake.calls_to("POST", r"/graph/g/trigger$")
    assert [call.body["store"] for call in triggers] == [{"k": "0"}, {"k": "1"}, {"k": "2"}]
    assert len(run_ids) == 3
    await sm.trigger_many("g", [{}])
    assert len(fake.calls_to("POST", r"/graph/g/runs$")) == 1  # not asked again
