"""A fan-out/fan-in graph written against the *published* exospherehost 0.0.3.

Used by ``test_sdk_compat_published.py``: this file runs in a separate virtual environment
where the published SDK is installed, never with this repository's SDK.

    python published_graph.py worker <namespace>            # serve the nodes (blocking)
    python published_graph.py trigger <namespace> <runs>    # upsert, trigger, print run ids

Both read EXOSPHERE_STATE_MANAGER_URI and EXOSPHERE_API_KEY.
"""

from __future__ import annotations

import asyncio
import json
import sys

from exospherehost import (
    BaseNode,
    GraphNodeModel,
    RetryPolicyModel,
    RetryStrategyEnum,
    Runtime,
    StateManager,
    StoreConfigModel,
    UnitesModel,
)
from pydantic import BaseModel

SECRET = "published-secret"
FAN_OUT = 20
FLAKY_ITEM = "3"
FLAKY_FAILURES = 2


class PubStart(BaseNode):
    class Inputs(BaseModel):
        count: str

    class Outputs(BaseModel):
        count: str

    class Secrets(BaseModel):
        token: str

    async def execute(self):
        if self.secrets.token != SECRET:
            raise ValueError("wrong secret")
        return self.Outputs(count=self.inputs.count)


class PubSplit(BaseNode):
    class Inputs(BaseModel):
        count: str

    class Outputs(BaseModel):
        item: str

    async def execute(self):
        return [self.Outputs(item=str(i)) for i in range(int(self.inputs.count))]


class PubWork(BaseNode):
    failures: dict = {}

    class Inputs(BaseModel):
        item: str
        tag: str

    class Outputs(BaseModel):
        doubled: str

    class Secrets(BaseModel):
        token: str

    async def execute(self):
        if self.secrets.token != SECRET:
            raise ValueError("wrong secret")
        if self.inputs.item == FLAKY_ITEM:
            key = f"{self.inputs.tag}/{self.inputs.item}"
            seen = PubWork.failures.get(key, 0)
            if seen < FLAKY_FAILURES:
                PubWork.failures[key] = seen + 1
                raise RuntimeError("flaky")
        return self.Outputs(doubled=str(int(self.inputs.item) * 2))


class PubMerge(BaseNode):
    class Inputs(BaseModel):
        count: str

    class Outputs(BaseModel):
        done: str

    async def execute(self):
        return self.Outputs(done=self.inputs.count)


def nodes(namespace):
    return [
        GraphNodeModel(
            node_name="PubStart",
            namespace=namespace,
            identifier="start",
            inputs={"count": "${{ store.count }}"},
            next_nodes=["split"],
        ),
        GraphNodeModel(
            node_name="PubSplit",
            namespace=namespace,
            identifier="split",
            inputs={"count": "${{ start.outputs.count }}"},
            next_nodes=["work"],
        ),
        GraphNodeModel(
            node_name="PubWork",
            namespace=namespace,
            identifier="work",
            inputs={"item": "${{ split.outputs.item }}", "tag": "${{ store.tag }}"},
            next_nodes=["merge"],
        ),
        GraphNodeModel(
            node_name="PubMerge",
            namespace=namespace,
            identifier="merge",
            inputs={"count": "${{ start.outputs.count }}"},
            unites=UnitesModel(identifier="start"),
        ),
    ]


async def trigger(namespace, runs):
    sm = StateManager(namespace=namespace)
    await sm.upsert_graph(
        "published",
        nodes(namespace),
        {"token": SECRET},
        retry_policy=RetryPolicyModel(
            max_retries=3, strategy=RetryStrategyEnum.FIXED, backoff_factor=100
        ),
        store_config=StoreConfigModel(required_keys=["count", "tag"]),
        validation_timeout=60,
    )
    run_ids = []
    for index in range(runs):
        store = {"count": str(FAN_OUT), "tag": f"run{index}"}
        result = await sm.trigger("published", store=store)
        run_ids.append(result["run_id"])
    print(json.dumps(run_ids))


def main():
    command, namespace = sys.argv[1], sys.argv[2]
    if command == "worker":
        Runtime(
            namespace=namespace,
            name="published-worker",
            nodes=[PubStart, PubSplit, PubWork, PubMerge],
            batch_size=16,
            workers=8,
        ).start()
    else:
        asyncio.run(trigger(namespace, int(sys.argv[3])))


if __name__ == "__main__":
    main()
