"""Nodes and graph of the end-to-end scenario, plus a worker entry point.

Run as a separate worker process::

    python sdk_scenario.py <namespace>

(with ``EXOSPHERE_STATE_MANAGER_URI`` and ``EXOSPHERE_API_KEY`` set). It serves until
SIGTERM, then shuts down gracefully and exits 0.

The graph: ``start`` reads the run store, ``split`` fans out to ``count`` items, ``work``
handles one item each (item 7 prunes its branch, item 13 asks to run again later, item 42
fails twice before it succeeds), and ``merge`` unites on ``start``: it runs once every item
of that run is done.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from collections import Counter
from datetime import timedelta

from exospherehost import (
    BaseNode,
    GraphNodeModel,
    PruneSignal,
    ReQueueAfterSignal,
    RetryPolicyModel,
    RetryStrategyEnum,
    Runtime,
    StoreConfigModel,
    UnitesModel,
)
from pydantic import BaseModel

SECRET_VALUE = "s3cret-value"
PRUNED_ITEM = "7"
REQUEUED_ITEM = "13"
FLAKY_ITEM = "42"
FLAKY_FAILURES = 2


class Start(BaseNode):
    class Inputs(BaseModel):
        count: str
        label: str

    class Outputs(BaseModel):
        count: str
        label: str

    class Secrets(BaseModel):
        api_token: str

    async def execute(self) -> Outputs:
        if self.secrets.api_token != SECRET_VALUE:
            raise RuntimeError("wrong secret")
        return self.Outputs(count=self.inputs.count, label=self.inputs.label)


class Split(BaseNode):
    class Inputs(BaseModel):
        count: str

    class Outputs(BaseModel):
        item: str

    def execute(self) -> list[Outputs]:  # a plain def, run in the thread pool
        return [self.Outputs(item=str(index)) for index in range(int(self.inputs.count))]


def attempt_number(key: str) -> int:
    """How many times ``key`` was seen before, counted across worker processes when
    ``SCENARIO_STATE_DIR`` names a shared directory (atomic file creation), else in memory.
    """
    folder = os.environ.get("SCENARIO_STATE_DIR")
    if not folder:
        seen = _SEEN[key]
        _SEEN[key] += 1
        return seen
    stem = key.replace("/", "_")
    for number in itertools.count():
        try:
            os.close(os.open(os.path.join(folder, f"{stem}.{number}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        return number
    raise AssertionError("unreachable")


_SEEN: Counter[str] = Counter()


class Work(BaseNode):
    class Inputs(BaseModel):
        item: str
        label: str

    class Outputs(BaseModel):
        result: str

    class Secrets(BaseModel):
        api_token: str

    async def execute(self) -> Outputs:
        item = self.inputs.item
        if self.secrets.api_token != SECRET_VALUE:
            raise RuntimeError("wrong secret")
        if item == PRUNED_ITEM:
            raise PruneSignal({"item": item, "reason": "nothing to do"})
        if item == REQUEUED_ITEM and attempt_number(f"requeue/{self.inputs.label}") == 0:
            raise ReQueueAfterSignal(timedelta(milliseconds=200))
        if item == FLAKY_ITEM:
            failures = attempt_number(f"flaky/{self.inputs.label}")
            if failures < FLAKY_FAILURES:
                raise ConnectionError(f"flaky failure {failures + 1} of item {item}")
        return self.Outputs(result=f"{self.inputs.label}:{item}")


class Merge(BaseNode):
    class Inputs(BaseModel):
        count: str
        label: str

    class Outputs(BaseModel):
        summary: str

    async def execute(self) -> Outputs:
        return self.Outputs(summary=f"{self.inputs.label} merged {self.inputs.count} items")


class Sleepy(BaseNode):
    """Sleeps, so that a test can stop the worker while it runs."""

    class Inputs(BaseModel):
        seconds: str

    class Outputs(BaseModel):
        slept: str

    async def execute(self) -> Outputs:
        await asyncio.sleep(float(self.inputs.seconds))
        return self.Outputs(slept=self.inputs.seconds)


NODES: list[type[BaseNode]] = [Start, Split, Work, Merge, Sleepy]


def graph_nodes(namespace: str) -> list[GraphNodeModel]:
    return [
        GraphNodeModel(
            node_name="Start",
            namespace=namespace,
            identifier="start",
            inputs={"count": "${{ store.count }}", "label": "${{ store.label }}"},
            next_nodes=["split"],
        ),
        GraphNodeModel(
            node_name="Split",
            namespace=namespace,
            identifier="split",
            inputs={"count": "${{ start.outputs.count }}"},
            next_nodes=["work"],
        ),
        GraphNodeModel(
            node_name="Work",
            namespace=namespace,
            identifier="work",
            inputs={"item": "${{ split.outputs.item }}", "label": "${{ start.outputs.label }}"},
            next_nodes=["merge"],
        ),
        GraphNodeModel(
            node_name="Merge",
            namespace=namespace,
            identifier="merge",
            inputs={"count": "${{ start.outputs.count }}", "label": "${{ store.label }}"},
            unites=UnitesModel(identifier="start"),
        ),
    ]


RETRY_POLICY = RetryPolicyModel(max_retries=3, strategy=RetryStrategyEnum.FIXED, backoff_factor=100)
STORE_CONFIG = StoreConfigModel(required_keys=["count"], default_values={"label": "unlabelled"})
SECRETS = {"api_token": SECRET_VALUE}


def expected_counts(count: int) -> dict[str, int]:
    """State counts of one successful run: ``count`` split states (one per output), the
    work states plus the two retried attempts of the flaky item, start and merge."""
    work = count + FLAKY_FAILURES
    total = 1 + count + work + 1
    return {
        "total_count": total,
        "success_count": total - FLAKY_FAILURES,
        "retried_count": FLAKY_FAILURES,
        "errored_count": 0,
        "pending_count": 0,
    }


def main() -> None:
    namespace = sys.argv[1]
    logging.basicConfig(level=os.environ.get("SCENARIO_LOG_LEVEL", "WARNING"))
    Runtime(
        namespace,
        "scenario-worker",
        NODES,
        workers=8,
        batch_size=8,
        poll_interval=0.2,
        wait_ms=2000,
        heartbeat_interval=1.0,
    ).start()


if __name__ == "__main__":
    main()
