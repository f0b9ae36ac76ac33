"""Sustained claims + reports per second with N concurrent workers.

One run fans out ``--states`` work items at once (a single report); then N worker
coroutines, each with its own HTTP connection, claim ``--batch`` states at a time
and report each one ``executed`` until all are done. One "operation" is one state
claimed and reported (two state transitions, at least two requests).

    uv run python bench/throughput.py [--backend ...] [--states 3000] [--workers 1,4,16]
"""

from __future__ import annotations

import asyncio

import httpx
from benchlib import Api, bench_server, node, parse_args, template_node, timer

NS = "bench"


async def setup(api: Api) -> None:
    await api.register(node("Split", outputs=("item",)), node("Work", inputs=("item",)))
    await api.create_graph(
        "through",
        {
            "nodes": [
                template_node("Split", "split", NS, {}, ["work"]),
                template_node("Work", "work", NS, {"item": "${{ split.outputs.item }}"}),
            ]
        },
    )


async def fill(api: Api, states: int) -> None:
    """One run whose split report makes ``states`` work items claimable."""
    await api.trigger("through")
    (split,) = await api.claim("Split", batch_size=1, wait_ms=5_000)
    await api.executed(split["state_id"], *({"item": str(i)} for i in range(states)))


async def worker(api: Api, batch: int, done: list[int]) -> None:
    while True:
        states = await api.claim("Work", batch_size=batch)
        if not states:
            return
        for state in states:
            await api.executed(state["state_id"])
        done.append(len(states))


async def measure(base_url: str, headers: dict[str, str], workers: int, batch: int) -> int:
    clients = [
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) for _ in range(workers)
    ]
    done: list[int] = []
    try:
        await asyncio.gather(*(worker(Api(c, NS), batch, done) for c in clients))
    finally:
        for client in clients:
            await client.aclose()
    return sum(done)


async def run(backend: str, states: int, workers_list: list[int], batches: list[int]) -> None:
    async with bench_server(backend) as (server, client):
        api = Api(client, NS)
        await setup(api)
        await fill(api, 200)  # warm-up round
        await measure(server.base_url, server.headers, 4, 10)
        baseline: float | None = None
        for batch in batches:
            for workers in workers_list:
                await fill(api, states)
                with timer() as t:
                    processed = await measure(server.base_url, server.headers, workers, batch)
                assert processed == states, (processed, states)
                rate = processed / t.seconds
                baseline = baseline or rate
                print(
                    f"[{backend}] batch {batch:3} workers {workers:3}: {processed} states in "
                    f"{t.seconds:6.2f} s = {rate:7.1f} claims+reports/s "
                    f"({rate / baseline:.2f}x the first row)"
                )


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        [
            ("--states", {"type": int, "default": 3000, "help": "states per measurement"}),
            ("--workers", {"default": "1,4,16", "help": "comma-separated worker counts"}),
            ("--batch", {"default": "1,10", "help": "comma-separated claim batch sizes"}),
        ],
    )
    workers = [int(w) for w in args.workers.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    for backend in args.backends:
        asyncio.run(run(backend, args.states, workers, batches))


if __name__ == "__main__":
    main()
