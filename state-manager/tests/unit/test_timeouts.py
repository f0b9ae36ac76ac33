"""The lease of a claimed state under a node timeout, and how timeouts are validated."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from state_manager.domain import timeouts
from state_manager.domain.models import GraphSpec, NodeTemplate
from state_manager.domain.timeouts import MAX_TIMEOUT_SECONDS, lease_until

LEASE = 60_000


def test_without_a_timeout_the_lease_runs_from_now() -> None:
    assert lease_until(1_000, LEASE, claimed_at=1_000, timeout=None) == 61_000
    # A heartbeat at 50 s renews it from then on, however long the state has run.
    assert lease_until(50_000, LEASE, claimed_at=1_000, timeout=None) == 110_000


def test_a_timeout_caps_the_lease_and_heartbeats_never_pass_it() -> None:
    assert lease_until(1_000, LEASE, claimed_at=1_000, timeout=5_000) == 6_000
    assert lease_until(4_000, LEASE, claimed_at=1_000, timeout=5_000) == 6_000
    # A timeout longer than the lease: heartbeats extend it up to the timeout only.
    assert lease_until(1_000, LEASE, claimed_at=1_000, timeout=90_000) == 61_000
    assert lease_until(60_000, LEASE, claimed_at=1_000, timeout=90_000) == 91_000
    # Past the timeout a heartbeat gives nothing more: the deadline stays where it was.
    assert lease_until(95_000, LEASE, claimed_at=1_000, timeout=90_000) == 91_000


def test_node_timeout_wins_over_the_graph_default() -> None:
    assert timeouts.timeout_ms(None, None) is None
    assert timeouts.timeout_ms(None, 30) == 30_000
    assert timeouts.timeout_ms(2, 30) == 2_000


def test_timed_out_and_its_error() -> None:
    assert not timeouts.timed_out(5_999, claimed_at=1_000, timeout=5_000)
    assert timeouts.timed_out(6_000, claimed_at=1_000, timeout=5_000)
    assert not timeouts.timed_out(10**12, claimed_at=1_000, timeout=None)
    assert not timeouts.timed_out(10**12, claimed_at=None, timeout=5_000)
    assert timeouts.timeout_error(1_000) == "timed out after 1 s"
    assert timeouts.timeout_error(1_500) == "timed out after 1.5 s"


def _node(**extra: Any) -> dict[str, Any]:
    return {"node_name": "A", "namespace": "n", "identifier": "a", "inputs": {}, **extra}


@pytest.mark.parametrize("value", [0, -1, MAX_TIMEOUT_SECONDS + 1, "5", True, 1.5, None])
def test_invalid_timeouts_are_refused(value: Any) -> None:
    if value is None:
        assert NodeTemplate.model_validate(_node(timeout=None)).timeout is None
        return
    with pytest.raises(ValidationError):
        NodeTemplate.model_validate(_node(timeout=value))
    with pytest.raises(ValidationError):
        GraphSpec.model_validate({"nodes": [_node()], "timeout": value})


def test_valid_timeouts_are_kept() -> None:
    spec = GraphSpec.model_validate(
        {"nodes": [_node(timeout=1), _node(identifier="b")], "timeout": MAX_TIMEOUT_SECONDS}
    )
    assert [n.timeout for n in spec.nodes] == [1, None]
    assert spec.timeout == MAX_TIMEOUT_SECONDS
    assert GraphSpec.model_validate({"nodes": [_node()]}).timeout is None  # optional
