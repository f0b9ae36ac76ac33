"""Fan-out then fan-in of 1,000 and 10,000 items: ``root → split → work → merge``.

``split`` reports all items in one ``executed`` call (one transaction creating
2·W rows); W ``work`` states are then claimed and reported by concurrent workers;
``merge`` unites ``split`` and is created by the report of the last item. Timed
phases: the fan-out report, claiming every item, reporting every item, the join
(last report → merge claimed), and the whole run from trigger to merge done.

    uv run python bench/fanout_fanin.py [--backend ...] [--widths 1000,10000] [--workers 8]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchlib import Api, bench_server, node, parse_args, template_node, timer

NS = "bench"


async def setup(api: Api) -> None:
    await api.register(
        node("Root", outputs=("r",)),
        node("Split", outputs=("item",)),
        node("Work", inputs=("item",), outputs=("done",)),
        node("Merge", inputs=("first",)),
    )
    await api.create_graph(
        "fan",
        {
            "nodes": [
                template_node("Root", "root", NS, {}, ["split"]),
                template_node("Split", "split", NS, {}, ["work"]),
                template_node("Work", "work", NS, {"item": "${{ split.outputs.item }}"}, ["merge"]),
                template_node(
                    "Merge",
                    "merge",
                    NS,
                    {"first": "${{ split.outputs.item }}"},
                    unites={"identifier": "split", "strategy": "ALL_SUCCESS"},
                ),
            ]
        },
    )


async def claim_all(api: Api, node_name: str, count: int) -> list[dict[str, Any]]:
    claimed: list[dict[str, Any]] = []
    while len(claimed) < count:
        claimed += await api.claim(node_name, batch_size=min(1000, count - len(claimed)))
    return claimed


async def one_run(api: Api, width: int, workers: int) -> dict[str, float]:
    phases: dict[str, float] = {}
    started = time.perf_counter()
    await api.trigger("fan")
    (root,) = await claim_all(api, "Root", 1)
    await api.executed(root["state_id"], {"r": "1"})
    (split,) = await claim_all(api, "Split", 1)
    with timer() as t:
        await api.executed(split["state_id"], *({"item": str(i)} for i in range(width)))
    phases["fan-out report"] = t.seconds
    with timer() as t:
        items = await claim_all(api, "Work", width)
    phases["claim all items"] = t.seconds
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            state = queue.get_nowait()
            await api.executed(state["state_id"], {"done": state["inputs"]["item"]})

    with timer() as t:
        await asyncio.gather(*(worker() for _ in range(workers)))
    phases["report all items"] = t.seconds
    last_report = time.perf_counter()
    (merge,) = await claim_all(api, "Merge", 1)
    phases["join (last report → merge claimed)"] = time.perf_counter() - last_report
    await api.executed(merge["state_id"])
    phases["total (trigger → merge done)"] = time.perf_counter() - started
    return phases


async def run(backend: str, widths: list[int], workers: int) -> dict[int, float]:
    totals: dict[int, float] = {}
    async with bench_server(backend) as (_server, client):
        api = Api(client, NS)
        await setup(api)
        await one_run(api, 100, workers)  # warm-up
        for width in widths:
            phases = await one_run(api, width, workers)
            for name, seconds in phases.items():
                print(f"[{backend}] width {width:6}: {name:36} {seconds:8.3f} s")
            rate = width / phases["report all items"]
            print(f"[{backend}] width {width:6}: items reported per second {rate:10.1f}")
            totals[width] = phases["total (trigger → merge done)"]
        if len(widths) > 1:
            small, large = widths[0], widths[-1]
            ratio = (totals[large] / large) / (totals[small] / small)
            print(
                f"[{backend}] time per item at width {large} / at width {small}: {ratio:.2f}x "
                "(1.0 = linear scaling)"
            )
    return totals


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        [
            ("--widths", {"default": "1000,10000", "help": "comma-separated fan-out widths"}),
            ("--workers", {"type": int, "default": 8, "help": "concurrent reporters"}),
        ],
    )
    widths = [int(w) for w in args.widths.split(",")]
    results = {b: asyncio.run(run(b, widths, args.workers)) for b in args.backends}
    if len(results) == 2:
        for width in widths:
            ratio = results["postgres"][width] / results["sqlite"][width]
            print(f"width {width}: total time postgres / sqlite {ratio:.2f}x")


if __name__ == "__main__":
    main()
