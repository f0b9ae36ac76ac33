"""Client-side validation of graph-template models mirrors the server's 422 rules."""

from __future__ import annotations

from datetime import timedelta

import pytest
from exospherehost import (
    CronTrigger,
    GraphNodeModel,
    PruneSignal,
    ReQueueAfterSignal,
    RetryPolicyModel,
    RetryStrategyEnum,
    StoreConfigModel,
    UnitesModel,
    UnitesStrategyEnum,
)
from pydantic import ValidationError


def node(**overrides: object) -> GraphNodeModel:
    fields: dict[str, object] = {"node_name": "A", "namespace": "ns", "identifier": "a"}
    fields.update(overrides)
    return GraphNodeModel.model_validate(fields)


def test_graph_node_is_trimmed_and_dumps_every_field() -> None:
    model = node(node_name=" A ", identifier=" a ", next_nodes=[" b "])
    assert model.model_dump(mode="json") == {
        "node_name": "A",
        "namespace": "ns",
        "identifier": "a",
        "inputs": {},
        "next_nodes": ["b"],
        "unites": None,
        "timeout": None,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"identifier": "store"}, "reserved word 'store'"),
        ({"identifier": "  "}, "identifier cannot be empty"),
        ({"node_name": ""}, "Node name cannot be empty"),
        ({"next_nodes": ["b", " b"]}, "b is not unique"),
        ({"next_nodes": [" "]}, "Next node identifier cannot be empty"),
        ({"unites": {"identifier": " "}}, "Unites identifier cannot be empty"),
    ],
)
def test_graph_node_rejects(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        node(**overrides)


def test_unites_defaults_to_all_success() -> None:
    assert UnitesModel(identifier="x").strategy is UnitesStrategyEnum.ALL_SUCCESS
    dumped = node(unites={"identifier": "r", "strategy": "ALL_DONE"}).model_dump(mode="json")
    assert dumped["unites"] == {"identifier": "r", "strategy": "ALL_DONE"}


def test_retry_policy_defaults_and_bounds() -> None:
    assert RetryPolicyModel().model_dump(mode="json") == {
        "max_retries": 3,
        "strategy": "EXPONENTIAL",
        "backoff_factor": 2000,
        "exponent": 2,
        "max_delay": None,
    }
    assert len(RetryStrategyEnum) == 9
    for bad in ({"max_retries": -1}, {"backoff_factor": 0}, {"exponent": 0}, {"max_delay": 0}):
        with pytest.raises(ValidationError):
            RetryPolicyModel.model_validate(bad)


def test_store_config_rules() -> None:
    config = StoreConfigModel(required_keys=[" a "], default_values={" b ": "1"})
    assert config.model_dump() == {"required_keys": ["a"], "default_values": {"b": "1"}}
    with pytest.raises(ValidationError, match=r"cannot contain '\.'"):
        StoreConfigModel(required_keys=["a.b"])
    with pytest.raises(ValidationError, match="duplicated"):
        StoreConfigModel(required_keys=["a", " a"])
    with pytest.raises(ValidationError, match="empty"):
        StoreConfigModel(default_values={" ": "x"})


def test_cron_trigger() -> None:
    assert CronTrigger(expression="*/5 * * * *").expression == "*/5 * * * *"


def test_signals_carry_their_report_bodies() -> None:
    assert PruneSignal().to_body() == {"data": {}}
    assert PruneSignal({"why": "empty"}).to_body() == {"data": {"why": "empty"}}
    # Each signal owns its data: no shared mutable default.
    first = PruneSignal()
    first.data["x"] = "1"
    assert PruneSignal().data == {}
    assert ReQueueAfterSignal(timedelta(seconds=2)).to_body() == {"enqueue_after": 2000}
    assert ReQueueAfterSignal(timedelta(microseconds=10)).delay_ms == 1
    with pytest.raises(ValueError, match="greater than 0"):
        ReQueueAfterSignal(timedelta(0))
