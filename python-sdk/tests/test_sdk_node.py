"""Distance one: a node alone, through ``exospherehost.testing``."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from exospherehost import BaseNode, PruneSignal, ReQueueAfterSignal
from exospherehost.testing import run_node, run_node_sync
from pydantic import BaseModel


class Split(BaseNode):
    class Inputs(BaseModel):
        words: str

    class Outputs(BaseModel):
        word: str

    class Secrets(BaseModel):
        token: str

    async def execute(self) -> list[Outputs]:
        assert self.secrets.token == "s3cret"
        return [self.Outputs(word=word) for word in self.inputs.words.split()]


class Shout(BaseNode):
    class Inputs(BaseModel):
        text: str

    class Outputs(BaseModel):
        text: str

    def execute(self) -> Outputs:  # a plain def: the runtime runs it in a thread
        self.thread = threading.current_thread()
        return self.Outputs(text=self.inputs.text.upper())


class Gate(BaseNode):
    class Inputs(BaseModel):
        action: str

    async def execute(self) -> None:
        if self.inputs.action == "prune":
            raise PruneSignal({"reason": "nothing to do"})
        if self.inputs.action == "later":
            raise ReQueueAfterSignal(timedelta(seconds=5))
        if self.inputs.action == "fail":
            raise RuntimeError("boom")


class NotStr(BaseNode):
    class Inputs(BaseModel):
        count: int

    async def execute(self) -> None:
        return None


async def test_fan_out_node_with_secrets() -> None:
    outputs = await run_node(Split, inputs={"words": "a b c"}, secrets={"token": "s3cret"})
    assert [out.word for out in outputs] == ["a", "b", "c"]


async def test_missing_secret_is_a_validation_error() -> None:
    with pytest.raises(ValueError, match="token"):
        await run_node(Split, inputs={"words": "a"})


async def test_sync_node_runs_off_the_event_loop_thread() -> None:
    node = Shout()
    [out] = await run_node(node, inputs=Shout.Inputs(text="hi"))
    assert out.text == "HI"
    assert node.thread is not threading.main_thread()


def test_run_node_sync() -> None:
    assert run_node_sync(Shout, {"text": "x"})[0].text == "X"


async def test_signals_and_errors_propagate() -> None:
    assert await run_node(Gate, {"action": "none"}) == []
    with pytest.raises(PruneSignal) as pruned:
        await run_node(Gate, {"action": "prune"})
    assert pruned.value.data == {"reason": "nothing to do"}
    with pytest.raises(ReQueueAfterSignal):
        await run_node(Gate, {"action": "later"})
    with pytest.raises(RuntimeError, match="boom"):
        await run_node(Gate, {"action": "fail"})


async def test_str_only_rule_is_checked() -> None:
    with pytest.raises(ValueError, match=r"NotStr\.Inputs\.count must be annotated 'str'"):
        await run_node(NotStr, {"count": "1"})


async def test_returning_something_else_than_outputs_fails() -> None:
    class Bad(BaseNode):
        async def execute(self) -> object:
            return {"not": "a model"}

    with pytest.raises(TypeError, match="must return Outputs"):
        await run_node(Bad)
