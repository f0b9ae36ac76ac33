"""A worker for the cancellation tests, run as its own process with our SDK's Runtime.

    python cancel_worker.py NAMESPACE HEARTBEAT_INTERVAL

``Start`` passes its gate on at once; ``Hold`` waits until the file named by its
``gate`` input exists; ``Next`` follows ``Hold`` (it must never run for a cancelled run).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from exospherehost import BaseNode, Runtime
from pydantic import BaseModel


class Start(BaseNode):
    class Inputs(BaseModel):
        gate: str

    class Outputs(BaseModel):
        gate: str

    async def execute(self) -> Outputs:
        return self.Outputs(gate=self.inputs.gate)


class Hold(BaseNode):
    class Inputs(BaseModel):
        gate: str

    class Outputs(BaseModel):
        gate: str

    async def execute(self) -> Outputs:
        print(f"holding {self.inputs.gate}", flush=True)
        while not await asyncio.to_thread(Path(self.inputs.gate).exists):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # a file written by the test process: polled
        return self.Outputs(gate=self.inputs.gate)


class Next(BaseNode):
    class Inputs(BaseModel):
        gate: str

    class Outputs(BaseModel):
        done: str

    async def execute(self) -> Outputs:
        return self.Outputs(done="yes")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    Runtime(
        namespace=sys.argv[1],
        name="cancel-test-worker",
        nodes=[Start, Hold, Next],
        workers=4,
        poll_interval=0.1,
        heartbeat_interval=float(sys.argv[2]),
    ).start()
