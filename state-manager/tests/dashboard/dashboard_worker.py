"""A worker for the dashboard tests, run as its own process with our SDK's Runtime.

    python dashboard_worker.py NAMESPACE

Nodes: ``Fan`` returns ``count`` outputs (a fan-out), ``Hold`` waits until the file
named by its ``gate`` input exists, ``Flaky`` fails while that file is missing, and
``Gather`` unites a fan-out. Files as gates let a test decide when work finishes.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from exospherehost import BaseNode, Runtime
from pydantic import BaseModel


class Fan(BaseNode):
    class Inputs(BaseModel):
        count: str
        gate: str

    class Outputs(BaseModel):
        item: str
        gate: str

    async def execute(self) -> list[Outputs]:
        return [
            self.Outputs(item=str(i), gate=self.inputs.gate) for i in range(int(self.inputs.count))
        ]


class Hold(BaseNode):
    class Inputs(BaseModel):
        item: str
        gate: str

    class Outputs(BaseModel):
        item: str

    async def execute(self) -> Outputs:
        while not await asyncio.to_thread(Path(self.inputs.gate).exists):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # a file written by another process: polled
        return self.Outputs(item=self.inputs.item)


class Flaky(BaseNode):
    class Inputs(BaseModel):
        gate: str

    class Outputs(BaseModel):
        done: str

    async def execute(self) -> Outputs:
        if not await asyncio.to_thread(Path(self.inputs.gate).exists):
            raise RuntimeError(f"gate {self.inputs.gate} is closed")
        return self.Outputs(done="yes")


class Gather(BaseNode):
    class Inputs(BaseModel):
        count: str

    class Outputs(BaseModel):
        gathered: str

    async def execute(self) -> Outputs:
        return self.Outputs(gathered=self.inputs.count)


if __name__ == "__main__":
    Runtime(
        namespace=sys.argv[1],
        name="dashboard-test-worker",
        nodes=[Fan, Hold, Flaky, Gather],
        workers=8,
        poll_interval=0.2,
        heartbeat_interval=0,
    ).start()
