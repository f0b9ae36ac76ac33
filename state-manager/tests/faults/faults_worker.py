"""The fault suite's worker process: our SDK's ``Runtime`` serving the suite's graph,
journaling every execution so that a repeat can be attributed to the process that
ran the first one.

Run as its own process::

    python faults_worker.py NAMESPACE JOURNAL_DIR

with ``EXOSPHERE_STATE_MANAGER_URI`` (the load balancer) and ``EXOSPHERE_API_KEY`` set,
and optionally ``FAULTS_HEARTBEAT_S``, ``FAULTS_WORK_MS`` (``low,high``: how long a
``Work`` node runs) and ``FAULTS_SLOTS`` (nodes run at once). It serves until SIGTERM.

The graph: ``fan`` (the root) fans out to ``width`` items, ``work`` handles one item
each, and ``join`` unites on ``fan``: it runs once every item of the run is done.
Each execution appends a ``start`` and an ``end`` line (JSON) to
``JOURNAL_DIR/worker-<pid>.jsonl`` with the node, run label, item, pid and time;
``os.write`` on an ``O_APPEND`` file, so a ``kill -9`` loses no line already written.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from exospherehost import (
    BaseNode,
    GraphNodeModel,
    RetryPolicyModel,
    RetryStrategyEnum,
    Runtime,
    StoreConfigModel,
    UnitesModel,
)
from pydantic import BaseModel

GRAPH = "faults"
# A killed worker's states come back after their lease as failed attempts: the policy
# must allow a retry for every kill a state can suffer, and retry fast.
RETRY_POLICY = RetryPolicyModel(max_retries=8, strategy=RetryStrategyEnum.FIXED, backoff_factor=50)


class Journal:
    """Start/end lines of every execution in this process, one JSON object a line."""

    def __init__(self, folder: Path) -> None:
        self.fd = os.open(
            folder / f"worker-{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )

    def record(self, event: str, node: str, run: str, item: str = "") -> None:
        line = {"e": event, "node": node, "run": run, "item": item, "pid": os.getpid()}
        line["t"] = time.time()
        os.write(self.fd, (json.dumps(line) + "\n").encode())


JOURNAL: Journal | None = None


def journal() -> Journal:
    assert JOURNAL is not None, "the journal is opened by main()"
    return JOURNAL


def work_seconds() -> float:
    low, high = (int(part) for part in os.environ.get("FAULTS_WORK_MS", "50,350").split(","))
    return random.uniform(low, high) / 1000


class Fan(BaseNode):
    class Inputs(BaseModel):
        run: str
        width: str

    class Outputs(BaseModel):
        run: str
        item: str

    async def execute(self) -> list[Outputs]:
        journal().record("start", "fan", self.inputs.run)
        run, width = self.inputs.run, int(self.inputs.width)
        items = [self.Outputs(run=run, item=str(i)) for i in range(width)]
        journal().record("end", "fan", self.inputs.run)
        return items


class Work(BaseNode):
    class Inputs(BaseModel):
        run: str
        item: str

    class Outputs(BaseModel):
        result: str

    async def execute(self) -> Outputs:
        journal().record("start", "work", self.inputs.run, self.inputs.item)
        await asyncio.sleep(work_seconds())
        journal().record("end", "work", self.inputs.run, self.inputs.item)
        return self.Outputs(result=work_result(self.inputs.run, self.inputs.item))


class Join(BaseNode):
    class Inputs(BaseModel):
        run: str
        width: str

    class Outputs(BaseModel):
        summary: str

    async def execute(self) -> Outputs:
        journal().record("start", "join", self.inputs.run)
        journal().record("end", "join", self.inputs.run)
        return self.Outputs(summary=join_summary(self.inputs.run, self.inputs.width))


NODES: list[type[BaseNode]] = [Fan, Work, Join]


def work_result(run: str, item: str) -> str:
    return f"{run}:{item}:done"


def join_summary(run: str, width: str) -> str:
    return f"{run}: {width} items joined"


def graph_nodes(namespace: str) -> list[GraphNodeModel]:
    return [
        GraphNodeModel(
            node_name="Fan",
            namespace=namespace,
            identifier="fan",
            inputs={"run": "${{ store.run }}", "width": "${{ store.width }}"},
            next_nodes=["work"],
        ),
        GraphNodeModel(
            node_name="Work",
            namespace=namespace,
            identifier="work",
            inputs={"run": "${{ fan.outputs.run }}", "item": "${{ fan.outputs.item }}"},
            next_nodes=["join"],
        ),
        GraphNodeModel(
            node_name="Join",
            namespace=namespace,
            identifier="join",
            inputs={"run": "${{ store.run }}", "width": "${{ store.width }}"},
            unites=UnitesModel(identifier="fan"),
        ),
    ]


STORE_CONFIG = StoreConfigModel(required_keys=["run", "width"])


def runtime_options() -> dict[str, Any]:
    return {
        "workers": int(os.environ.get("FAULTS_SLOTS", "8")),
        "batch_size": 8,
        "poll_interval": 0.2,
        "wait_ms": 5_000,
        "heartbeat_interval": float(os.environ.get("FAULTS_HEARTBEAT_S", "1.0")),
        "graceful_shutdown_timeout": 10.0,
        "shutdown_report_timeout": 10.0,
    }


def main() -> None:
    global JOURNAL
    namespace, folder = sys.argv[1], Path(sys.argv[2])
    JOURNAL = Journal(folder)
    Runtime(namespace, f"faults-worker-{os.getpid()}", NODES, **runtime_options()).start()


if __name__ == "__main__":
    main()
