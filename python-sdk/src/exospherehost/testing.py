"""Run a node's ``execute`` in a test, without a state manager.

::

    from exospherehost.testing import run_node

    async def test_greet():
        [out] = await run_node(Greet, inputs={"name": "Ada"})
        assert out.message == "hello Ada"

``run_node`` checks the node class by the rules the runtime applies at start-up, builds
``Inputs`` and ``Secrets`` from plain dicts (or takes model instances), runs ``execute``
(plain ``def`` nodes in a thread, as the runtime does) and returns the outputs as the
runtime would report them: always a list, empty when ``execute`` returned ``None``.
Signals are raised unchanged, so ``pytest.raises(PruneSignal)`` works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from .node import BaseNode, node_problems, normalize_outputs

__all__ = ["run_node", "run_node_sync"]


async def run_node(
    node: type[BaseNode] | BaseNode,
    inputs: Mapping[str, Any] | BaseModel | None = None,
    secrets: Mapping[str, Any] | BaseModel | None = None,
) -> list[Any]:
    """Execute ``node`` once with ``inputs`` and ``secrets``; return its outputs as a list."""
    instance = node if isinstance(node, BaseNode) else node()
    node_cls = type(instance)
    problems = node_problems(node_cls)
    if problems:
        raise ValueError(f"{node_cls.__name__} cannot be registered: " + "; ".join(problems))
    inputs_model = _build(node_cls.Inputs, inputs)
    secrets_model = _build(node_cls.Secrets, secrets)
    result = await instance._run(inputs_model, secrets_model, executor=None)
    # Same normalization and str-only serialization as the runtime's executed report.
    normalize_outputs(node_cls.__name__, result)
    if result is None:
        return []
    if isinstance(result, list | tuple):
        return list(result)
    return [result]


def run_node_sync(
    node: type[BaseNode] | BaseNode,
    inputs: Mapping[str, Any] | BaseModel | None = None,
    secrets: Mapping[str, Any] | BaseModel | None = None,
) -> list[Any]:
    """:func:`run_node` for code that has no event loop running."""
    return asyncio.run(run_node(node, inputs, secrets))


def _build(model: type[BaseModel], value: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    if value is None:
        return model()
    if isinstance(value, BaseModel):
        return model.model_validate(value.model_dump())
    return model(**dict(value))
