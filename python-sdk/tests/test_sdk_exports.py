"""The public surface matches the published exospherehost 0.0.3."""

from __future__ import annotations

import inspect
from pathlib import Path

import exospherehost
from exospherehost import Runtime, StateManager

PUBLISHED_NAMES = {
    "Runtime",
    "BaseNode",
    "StateManager",
    "VERSION",
    "PruneSignal",
    "ReQueueAfterSignal",
    "UnitesStrategyEnum",
    "UnitesModel",
    "GraphNodeModel",
    "RetryStrategyEnum",
    "RetryPolicyModel",
    "StoreConfigModel",
    "CronTrigger",
}


def test_exported_names_are_pinned() -> None:
    assert set(exospherehost.__all__) == PUBLISHED_NAMES
    assert len(exospherehost.__all__) == len(PUBLISHED_NAMES)
    for name in exospherehost.__all__:
        assert hasattr(exospherehost, name)


def test_version() -> None:
    assert exospherehost.VERSION == "0.0.3"
    assert exospherehost.__version__ == exospherehost.VERSION


def _leading_parameters(func: object, count: int) -> list[tuple[str, object]]:
    signature = inspect.signature(func)  # type: ignore[arg-type]
    params = [p for p in signature.parameters.values() if p.name != "self"]
    return [(p.name, p.default) for p in params[:count]]


def test_runtime_constructor_matches_published_order_and_defaults() -> None:
    empty = inspect.Parameter.empty
    assert _leading_parameters(Runtime.__init__, 9) == [
        ("namespace", empty),
        ("name", empty),
        ("nodes", empty),
        ("state_manager_uri", None),
        ("key", None),
        ("batch_size", 16),
        ("workers", 4),
        ("state_manage_version", "v0"),
        ("poll_interval", 1),
    ]
    extra = list(inspect.signature(Runtime.__init__).parameters.values())[10:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def test_state_manager_signatures_match_published() -> None:
    empty = inspect.Parameter.empty
    assert _leading_parameters(StateManager.__init__, 4) == [
        ("namespace", empty),
        ("state_manager_uri", None),
        ("key", None),
        ("state_manager_version", "v0"),
    ]
    assert _leading_parameters(StateManager.trigger, 4) == [
        ("graph_name", empty),
        ("inputs", None),
        ("store", None),
        ("start_delay", 0),
    ]
    assert _leading_parameters(StateManager.upsert_graph, 8) == [
        ("graph_name", empty),
        ("graph_nodes", empty),
        ("secrets", empty),
        ("retry_policy", None),
        ("store_config", None),
        ("triggers", None),
        ("validation_timeout", 60),
        ("polling_interval", 1),
    ]
    assert _leading_parameters(StateManager.get_graph, 1) == [("graph_name", empty)]


def test_published_import_paths_still_work() -> None:
    from exospherehost.models import GraphNodeModel  # noqa: F401
    from exospherehost.node import BaseNode  # noqa: F401
    from exospherehost.runtime import Runtime  # noqa: F401
    from exospherehost.signals import PruneSignal, ReQueueAfterSignal  # noqa: F401
    from exospherehost.statemanager import StateManager  # noqa: F401


def test_package_is_typed() -> None:
    assert (Path(exospherehost.__file__).parent / "py.typed").is_file()
