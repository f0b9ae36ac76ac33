"""Many claimers racing for the same work are never handed the same state.

Several HTTP clients claim and report concurrently, with small random batches and
long polls, while fan-out reports keep making hundreds of states claimable at once.
Claimers report through the v0 routes, or through ``states/exchange``, whose claim
commits with its reports. With two servers (in this process, or two
server processes), half of the clients talk to each; both servers share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
from sm_api import Api, node, template_node
from sm_support import (
    RunningServer,
    ServerProcess,
    read_states,
    serve,
    server_process,
    test_settings,
)

NS = "claims"
RUNS = 4
WIDTH = 150
CLAIMERS = 6

Claimer = Callable[
    [Api, random.Random, list[str], asyncio.Event, Counter[str]], Coroutine[Any, Any, None]
]


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


async def exchange_claimer(
    api: Api,
    rng: random.Random,
    claims: list[str],
    finished: asyncio.Event,
    work_done: Counter[str],
) -> None:
    """Reports what it ran in the same request as its next claim."""
    reports: list[dict[str, Any]] = []
    works = 0  # Work states among ``reports``
    while not finished.is_set():
        body = {
            "reports": reports,
            "claim": {
                "nodes": ["Root", "Split", "Work"],
                "batch_size": rng.randint(1, 10),
                "wait_ms": rng.choice([0, 200]),
            },
        }
        r = await api.client.post(f"{api.base}/states/exchange", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert [x["status_code"] for x in answer["results"]] == [200] * len(reports)
        work_done["work"] += works
        if work_done["work"] == RUNS * WIDTH:
            finished.set()
        reports, works = [], 0
        for state in answer["states"]:
            claims.append(state["state_id"])
            if state["node_name"] == "Split":
                outputs: list[dict[str, Any]] = [{"item": str(i)} for i in range(WIDTH)]
            else:
                outputs = [{"item": state["inputs"].get("item", "")}]
            reports.append({"state_id": state["state_id"], "kind": "executed", "outputs": outputs})
            works += state["node_name"] == "Work"


SHAPES = [
    ("one-server", "routes"),
    ("two-servers", "routes"),
    ("two-processes", "routes"),
    ("one-server", "exchange"),
    ("two-processes", "exchange"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "servers", "via"),
    [(backend, servers, via) for backend in ("sqlite", "postgres") for servers, via in SHAPES]
    # MongoDB (SecantusDB in CI, slower than the SQL backends) on two server processes.
    + [("mongo", "two-processes", "routes"), ("mongo", "two-processes", "exchange")],
)
async def test_concurrent_claimers_never_share_a_state(
    database_url: str, tmp_path: Path, servers: str, via: str
) -> None:
    with contextlib.ExitStack() as stack:
        if servers == "two-processes":
            running: list[RunningServer | ServerProcess] = [
                stack.enter_context(server_process(database_url, tmp_path / f"proc{i}"))
                for i in range(2)
            ]
        else:
            running = [
                stack.enter_context(serve(test_settings(database_url, tmp_path / f"data{i}")))
                for i in range(1 if servers == "one-server" else 2)
            ]
        clients = [
            httpx.AsyncClient(
                base_url=running[i % len(running)].base_url, headers=running[0].headers, timeout=60
            )
            for i in range(CLAIMERS)
        ]
        try:
            chosen = exchange_claimer if via == "exchange" else claimer
            await _race(clients, len(running), database_url, chosen)
        finally:
            for client in clients:
                await client.aclose()


async def _race(
    clients: list[httpx.AsyncClient], servers: int, database_url: str, claimer: Claimer
) -> None:
    """``clients[i]`` talks to server ``i % servers``."""
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
    all_done = asyncio.create_task(finished.wait())
    try:
        # A claimer only returns once all work is done: stop at the first one that fails.
        done, _ = await asyncio.wait(
            [all_done, *tasks], timeout=180, return_when=asyncio.FIRST_COMPLETED
        )
        assert done, f"the claimers did not finish within 180 s ({work_done['work']} done)"
        for task in done:
            task.result()
    finally:
        finished.set()
        all_done.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors

    every_claim = [state_id for per_claimer in claims for state_id in per_claimer]
    duplicates = [s for s, n in Counter(every_claim).items() if n > 1]
    assert duplicates == [], f"{len(duplicates)} states were handed out more than once"
    # A race needs several claimers with work, on every server. One claimer may starve
    # (an exchange claimer that holds work keeps getting more), which is allowed.
    busy = [i for i, per_claimer in enumerate(claims) if per_claimer]
    assert len(busy) >= 2, f"only claimers {busy} got work: the race was not a race"
    assert {i % servers for i in busy} == set(range(servers)), f"claimers with work: {busy}"

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
