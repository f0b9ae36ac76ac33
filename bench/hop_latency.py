"""Hop latency: how long from a report until the next state can be claimed.

For each sample: trigger a run of ``root → next``, claim and report ``root``, and
time from sending the report until a worker holds ``next``. Measured two ways:

* polling: the worker asks ``states/enqueue`` with ``wait_ms=0`` right after the
  report returns, and again immediately until it gets the state (the best case for
  a polling worker; real ones sleep between polls);
* long-poll: the worker is already parked in ``states/enqueue`` with a ``wait_ms``
  when the report is sent, and is woken by the commit.

Also timed: trigger → root claimable (long-poll parked before the trigger).

    uv run python bench/hop_latency.py [--backend sqlite|postgres|both] [--samples 200]
"""

from __future__ import annotations

import asyncio
import time

import httpx
from benchlib import Api, bench_server, node, parse_args, percentiles, template_node

NS = "bench"


async def setup(api: Api) -> None:
    await api.register(node("Root", outputs=("v",)), node("Next", inputs=("v",)))
    await api.create_graph(
        "hop",
        {
            "nodes": [
                template_node("Root", "root", NS, {}, ["next"]),
                template_node("Next", "next", NS, {"v": "${{ root.outputs.v }}"}),
            ]
        },
    )


async def claim_polling(api: Api, node_name: str) -> tuple[dict[str, object], int]:
    polls = 0
    while True:
        polls += 1
        states = await api.claim(node_name, batch_size=1, wait_ms=0)
        if states:
            return states[0], polls


async def one_sample(api: Api, waiter: Api, long_poll: bool) -> tuple[float, float, int]:
    """Returns (trigger → root claimed, root report → next claimed, polls needed)."""
    parked = asyncio.create_task(waiter.claim("Root", batch_size=1, wait_ms=10_000))
    await asyncio.sleep(0.005)  # let the long-poll reach the server and park
    started = time.perf_counter()
    await api.trigger("hop")
    (root,) = await parked
    root_hop = time.perf_counter() - started

    if long_poll:
        parked = asyncio.create_task(waiter.claim("Next", batch_size=1, wait_ms=10_000))
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    await api.executed(root["state_id"], {"v": "1"})
    if long_poll:
        (successor,) = await parked
        polls = 1
    else:
        successor, polls = await claim_polling(api, "Next")
    hop = time.perf_counter() - started
    await api.executed(str(successor["state_id"]))
    return root_hop, hop, polls


async def run(backend: str, samples: int) -> dict[str, float]:
    async with (
        bench_server(backend) as (server, client),
        httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=60) as other,
    ):
        api, waiter = Api(client, NS), Api(other, NS)
        await setup(api)
        for _ in range(20):  # warm up connections, caches and the template
            await one_sample(api, waiter, long_poll=True)
        medians: dict[str, float] = {}
        for long_poll in (False, True):
            root_hops, hops, polls = [], [], []
            for _ in range(samples):
                root_hop, hop, n = await one_sample(api, waiter, long_poll)
                root_hops.append(root_hop)
                hops.append(hop)
                polls.append(n)
            mode = "long-poll" if long_poll else "polling"
            print(f"[{backend}] report → successor claimed, {mode:9}: {percentiles(hops)}")
            if not long_poll:
                print(f"[{backend}]   polls needed per hop: mean {sum(polls) / len(polls):.2f}")
            print(f"[{backend}] trigger → root claimed (long-poll):   {percentiles(root_hops)}")
            medians[mode] = sorted(hops)[len(hops) // 2]
        ratio = medians["polling"] / medians["long-poll"]
        print(f"[{backend}] median hop, polling / long-poll: {ratio:.2f}x")
        return medians


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        [("--samples", {"type": int, "default": 200, "help": "hops per mode (default 200)"})],
    )
    results = {backend: asyncio.run(run(backend, args.samples)) for backend in args.backends}
    if len(results) == 2:
        for mode in ("polling", "long-poll"):
            ratio = results["postgres"][mode] / results["sqlite"][mode]
            print(f"median hop {mode}, postgres / sqlite: {ratio:.2f}x")


if __name__ == "__main__":
    main()
