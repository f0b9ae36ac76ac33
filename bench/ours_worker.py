"""The worker of ``compare.py``'s runs on our system: the SDK's ``Runtime`` with no-op nodes.

Run by the harness as its own process, configured like any worker (environment
``EXOSPHERE_STATE_MANAGER_URI`` / ``EXOSPHERE_API_KEY``)::

    python bench/ours_worker.py --namespace NS --records FILE [--workers 8] [--prefetch 8]

Each node body records its key and start/end times (see ``measure.py``); a watcher writes
a ``reported`` marker whenever the runtime's count of reports accepted by the server
changes, so the harness knows when the server has every result, not only when the last
body returned.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from exospherehost import BaseNode, Runtime
from measure import RecordWriter
from pydantic import BaseModel

REPORT_WATCH_S = 0.01
_writer: RecordWriter | None = None


def record(kind: str, key: str, start: float) -> None:
    assert _writer is not None
    _writer.write(kind, key, start, time.monotonic())


class Step(BaseNode):
    """One link of a chain; passes the run tag on to the next step."""

    class Inputs(BaseModel):
        run: str
        step: str

    class Outputs(BaseModel):
        run: str

    async def execute(self) -> Outputs:
        start = time.monotonic()
        out = self.Outputs(run=self.inputs.run)
        record("step", f"{self.inputs.run}:{self.inputs.step}", start)
        return out


class Fan(BaseNode):
    """Returns ``n`` outputs: one child state per output."""

    class Inputs(BaseModel):
        run: str
        n: str

    class Outputs(BaseModel):
        run: str
        item: str

    async def execute(self) -> list[Outputs]:
        start = time.monotonic()
        run = self.inputs.run
        items = [self.Outputs(run=run, item=str(i)) for i in range(int(self.inputs.n))]
        record("fan", run, start)
        return items


class Child(BaseNode):
    class Inputs(BaseModel):
        run: str
        item: str

    async def execute(self) -> None:
        record("child", f"{self.inputs.run}:{self.inputs.item}", time.monotonic())


class Join(BaseNode):
    """Unites ``fan``: runs once, after every child finished."""

    class Inputs(BaseModel):
        run: str

    async def execute(self) -> None:
        record("join", self.inputs.run, time.monotonic())


class Single(BaseNode):
    class Inputs(BaseModel):
        run: str
        i: str

    async def execute(self) -> None:
        record("single", f"{self.inputs.run}:{self.inputs.i}", time.monotonic())


NODES: list[type[BaseNode]] = [Step, Fan, Child, Join, Single]


async def watch_reports(runtime: Runtime, writer: RecordWriter) -> None:
    seen = -1
    while True:
        reported = runtime.stats.reported
        if reported != seen:
            seen = reported
            now = time.monotonic()
            writer.write("reported", str(reported), now, now)
        await asyncio.sleep(REPORT_WATCH_S)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=8)
    # As Celery's worker prefetches (4 per process by default), so does ours: a worker
    # that finishes starts the next state without a round trip to the server.
    parser.add_argument("--prefetch", type=int, default=8)
    args = parser.parse_args()
    global _writer
    _writer = RecordWriter(args.records)
    runtime = Runtime(
        args.namespace, "bench-worker", NODES, workers=args.workers, prefetch=args.prefetch
    )
    watcher = asyncio.create_task(watch_reports(runtime, _writer))
    try:
        await runtime.run(handle_signals=True)
    finally:
        watcher.cancel()
        _writer.close()


if __name__ == "__main__":
    asyncio.run(main())
