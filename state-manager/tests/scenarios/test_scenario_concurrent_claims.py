"""Many claimers racing for the same work are never handed the same state.

Several HTTP clients claim and report concurrently, with small random batches and
long polls, while fan-out reports keep making hundreds of states claimable at once.
With two servers, half of the clients talk to each; both servers share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sm_api import Api, node, template_node
from sm_support import RunningServer, read_states, serve, test_settings

NS = "claims"
RUNS = 4
WIDTH = 150
CLAIMERS = 6


async def claimer(
    api: Api,
    rng: random.Random,
    claims: list[str],
    finished: asyncio.Event,
    work_done: Counter[str],
) -> None:
    while not finished.is_set():
        states = await api.claim(
            "Root", "Split", "Work", batch_size=rng.randint(1, 10), wait_ms=rng.choice([0, 200])
        )
        for state in states:
            claims.append(state["state_id"])
            if state["node_name"] == "Split":
                outputs: list[dict[str, Any]] = [{"item": str(i)} for i in range(WIDTH)]
            else:
                outputs = [{"item": state["inputs"].get("item", "")}]
            await api.executed(state["state_id"], *outputs)
            if state["node_name"] == "Work":
                work_done["work"] += 1
                if work_done["work"] == RUNS * WIDTH:
                    finished.set()


@pytest.mark.slow
@pytest.mark.parametrize("servers", [1, 2], ids=["one-server", "two-servers"])
async def test_concurrent_claimers_never_share_a_state(
    server: RunningServer, database_url: str, tmp_path: Path, servers: int
) -> None:
    with contextlib.ExitStack() as stack:
        urls = [server.base_url]
        if servers == 2:
            second = stack.enter_context(serve(test_settings(database_url, tmp_path / "data2")))
            urls.append(second.base_url)
        clients = [
            httpx.AsyncClient(base_url=urls[i % len(urls)], headers=server.headers, timeout=60)
            for i in range(CLAIMERS)
        ]
        try:
            await _race(clients, database_url)
        finally:
            for client in clients:
                await client.aclose()


async def _race(clients: list[httpx.AsyncClient], database_url: str) -> None:
    setup = Api(clients[0], NS)
    await setup.register(
        node("Root", outputs=("item",)),
        node("Split", outputs=("item",)),
        node("Work", inputs=("item",), outputs=("item",)),
    )
    await setup.create_graph(
        "race",
        {
            "nodes": [
                template_node("Root", "root", NS, {}, ["split"]),
                template_node("Split", "split", NS, {}, ["work"]),
                template_node("Work", "work", NS, {"item": "${{ split.outputs.item }}"}),
            ]
        },
    )
    finished = asyncio.Event()
    work_done: Counter[str] = Counter()
    claims: list[list[str]] = [[] for _ in clients]
    tasks = [
        asyncio.create_task(claimer(Api(c, NS), random.Random(i), claims[i], finished, work_done))
        for i, c in enumerate(clients)
    ]
    run_ids = [await setup.trigger("race") for _ in range(RUNS)]
    try:
        await asyncio.wait_for(finished.wait(), timeout=240)
    finally:
        finished.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors

    every_claim = [state_id for per_claimer in claims for state_id in per_claimer]
    duplicates = [s for s, n in Counter(every_claim).items() if n > 1]
    assert duplicates == [], f"{len(duplicates)} states were handed out more than once"
    assert all(claims), "some claimer never got any work: the race was not a race"

    all_states = [s for run_id in run_ids for s in await read_states(database_url, NS, run_id)]
    assert len(all_states) == RUNS * (1 + WIDTH + WIDTH)
    # Fan-out siblings are born executed; every other state must have been claimed once.
    claimable = {s.id for s in all_states if s.group_id == s.id}
    assert len(claimable) == RUNS * (1 + 1 + WIDTH)
    assert set(every_claim) == claimable
    assert {s.status for s in all_states} == {"SUCCESS"}
    assert Counter(s.identifier for s in all_states) == {
        "root": RUNS,
        "split": RUNS * WIDTH,
        "work": RUNS * WIDTH,
    }
