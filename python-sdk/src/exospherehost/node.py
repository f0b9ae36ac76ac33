"""``BaseNode``: the unit of work a runtime executes.

A node is a class with three nested pydantic models and one method::

    class Greet(BaseNode):
        class Inputs(BaseModel):
            name: str

        class Outputs(BaseModel):
            message: str

        class Secrets(BaseModel):
            pass

        async def execute(self) -> Outputs:
            return self.Outputs(message=f"hello {self.inputs.name}")

Every field of ``Inputs``, ``Outputs`` and ``Secrets`` must be annotated ``str``: data
travels between nodes as text (serialize anything richer, e.g. as JSON). ``execute`` takes
no argument; it reads ``self.inputs`` and ``self.secrets`` and returns one ``Outputs``, a
list of them (fan-out: one successor per item), or ``None`` (no output). It may be a plain
``def``: the runtime then runs it in a worker thread so it does not block the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from typing import Any

from pydantic import BaseModel

__all__ = ["BaseNode", "node_problems"]


class BaseNode(ABC):
    """Base class of every node; subclass it and implement :meth:`execute`."""

    class Inputs(BaseModel):
        """Inputs of the node (``str`` fields only)."""

    class Outputs(BaseModel):
        """Outputs of the node (``str`` fields only)."""

    class Secrets(BaseModel):
        """Secrets the node needs, fetched from the graph's secrets (``str`` fields only)."""

    inputs: Any
    secrets: Any

    def __init__(self) -> None:
        self.inputs = None
        self.secrets = None

    @abstractmethod
    def execute(self) -> Any:
        """Do the work; return an ``Outputs``, a list of ``Outputs`` or ``None``.

        May be ``async def`` or plain ``def``. Raise ``PruneSignal`` or
        ``ReQueueAfterSignal`` to signal; any other exception fails this attempt.
        """

    async def _execute(self, inputs: BaseModel, secrets: BaseModel) -> Any:
        """Set ``inputs``/``secrets`` and run :meth:`execute` (sync nodes in a thread)."""
        return await self._run(inputs, secrets, executor=None)

    async def _run(self, inputs: BaseModel, secrets: BaseModel, executor: Executor | None) -> Any:
        self.inputs = inputs
        self.secrets = secrets
        if inspect.iscoroutinefunction(self.execute):
            return await self.execute()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(executor, self.execute)
        if inspect.isawaitable(result):
            # A plain ``def`` that returns an awaitable (e.g. a decorated coroutine).
            return await result
        return result


def node_problems(node: Any) -> list[str]:
    """Everything that prevents ``node`` from being registered, as readable sentences."""
    if not isinstance(node, type) or not issubclass(node, BaseNode):
        return [f"{node!r} is not a subclass of BaseNode"]
    name = node.__name__
    problems: list[str] = []
    if inspect.isabstract(node):
        problems.append(f"{name} does not implement execute()")
    for model_name in ("Inputs", "Outputs", "Secrets"):
        model = getattr(node, model_name, None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            problems.append(f"{name}.{model_name} must be a pydantic BaseModel subclass")
            continue
        for field_name, field in model.model_fields.items():
            if field.annotation is not str:
                problems.append(
                    f"{name}.{model_name}.{field_name} must be annotated 'str' "
                    f"(found {_describe(field.annotation)}); serialize richer data as text"
                )
    return problems


def _describe(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation)


def normalize_outputs(node_name: str, result: Any) -> list[dict[str, Any]]:
    """Turn what ``execute`` returned into the ``outputs`` list of the executed report."""
    if result is None:
        items: list[Any] = []
    elif isinstance(result, list | tuple):
        items = list(result)
    else:
        items = [result]
    outputs: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, BaseModel):
            raise TypeError(
                f"{node_name}.execute() must return Outputs, a list of Outputs or None, "
                f"not {type(item).__name__}"
            )
        outputs.append(item.model_dump(mode="json"))
    return outputs
