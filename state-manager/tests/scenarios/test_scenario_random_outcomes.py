"""Many workers, random outcomes, nested joins: the fan-in books always balance.

24 workers claim everything of three concurrent runs and answer at random: executed,
errored (retried up to twice) or pruned. When no work is left, every run is checked
against invariants computed from its states alone:

* nothing is left pending, and every group's counters are back to zero pending;
* a group's failed counter equals its descendants that failed for good;
* each uniting node was created once per group (ALL_DONE always, ALL_SUCCESS exactly
  when no descendant of the group failed for good).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
from sm_api import Api, node, template_node
from sm_support import RunningServer, read_fanin_groups, read_states

NS = "random"
RUNS, A_WIDTH, B_WIDTH, WORKERS = 3, 5, 6, 24
FAILED = {"ERRORED", "NEXT_CREATED_ERROR"}
PENDING = {"CREATED", "QUEUED", "EXECUTED"}
NODES = ("A", "B", "C", "D", "JoinB", "JoinA", "JoinAll")


async def _graph(api: Api) -> None:
    await api.register(
        node("A", outputs=("x",)),
        node("B", inputs=("x",), outputs=("y",)),
        node("C", inputs=("y",), outputs=("y",)),
        node("D", inputs=("y",)),
        node("JoinB", inputs=("x",)),
        node("JoinA", inputs=("x",)),
        node("JoinAll"),
    )
    await api.create_graph(
        "random",
        {
            "nodes": [
                template_node("A", "a", NS, {}, ["b"]),
                template_node("B", "b", NS, {"x": "${{ a.outputs.x }}"}, ["c"]),
                template_node("C", "c", NS, {"y": "${{ b.outputs.y }}"}, ["d", "join_b"]),
                template_node("D", "d", NS, {"y": "${{ c.outputs.y }}"}),
                template_node(
                    "JoinB",
                    "join_b",
                    NS,
                    {"x": "${{ a.outputs.x }}"},
                    ["join_a"],
                    unites={"identifier": "b", "strategy": "ALL_DONE"},
                ),
                template_node(
                    "JoinA",
                    "join_a",
                    NS,
                    {"x": "${{ a.outputs.x }}"},
                    unites={"identifier": "a", "strategy": "ALL_DONE"},
                ),
                template_node(
                    "JoinAll", "join_all", NS, unites={"identifier": "a", "strategy": "ALL_SUCCESS"}
                ),
            ],
            "retry_policy": {"max_retries": 2, "strategy": "FIXED", "backoff_factor": 10},
        },
    )


async def _worker(api: Api, rng: random.Random, refused: Counter[str]) -> None:
    idle = 0
    while idle < 15:  # 15 empty long-polls in a row: no work is left
        claimed = await api.claim(*NODES, batch_size=rng.randint(1, 8), wait_ms=100)
        idle = 0 if claimed else idle + 1
        for state in claimed:
            roll = rng.random()
            if state["node_name"] == "A":
                action, body = "executed", {"outputs": [{"x": str(i)} for i in range(A_WIDTH)]}
            elif state["node_name"] == "B":
                action, body = "executed", {"outputs": [{"y": str(i)} for i in range(B_WIDTH)]}
            elif roll < 0.15:
                action, body = "errored", {"error": "random failure"}
            elif roll < 0.25:
                action, body = "prune", {"data": {}}
            else:
                action, body = "executed", {"outputs": [{"y": "z"}]}
            r = await api.post_state(state["state_id"], action, body)
            if r.status_code != 200:
                refused[f"{action} {r.status_code} {r.text[:80]}"] += 1


async def test_random_outcomes_keep_every_join_exact(
    client: httpx.AsyncClient, server: RunningServer, backend: str
) -> None:
    api = Api(client, NS)
    await _graph(api)
    run_ids = [await api.trigger("random") for _ in range(RUNS)]
    refused: Counter[str] = Counter()
    seed = random.randrange(1_000_000)
    await asyncio.gather(*(_worker(api, random.Random(seed + i), refused) for i in range(WORKERS)))
    assert not refused, (seed, refused)
    for run_id in run_ids:
        await _check_run(server.database_url, run_id, seed)


async def _check_run(database_url: str, run_id: str, seed: int) -> None:
    states = await read_states(database_url, NS, run_id)
    groups = {g["group_id"]: g for g in await read_fanin_groups(database_url, run_id)}
    context = (seed, run_id)
    assert not [s for s in states if s.status in PENDING], context

    members: dict[str, list[str]] = {group_id: [] for group_id in groups}
    for state in states:
        for group_id in state.groups.values():
            members[group_id].append(state.status)
    for group_id, group in groups.items():
        failed = sum(1 for status in members[group_id] if status in FAILED)
        assert (group["pending"], group["failed"]) == (0, failed), (context, group)

    def originals(identifier: str) -> list[str]:
        """Parents of the first attempts of a uniting node (retries share their parents)."""
        return [
            s.parents[list(s.parents)[-1]]
            for s in states
            if s.identifier == identifier and s.retry_count == 0 and not s.manual_retry_fanout_id
        ]

    by_identifier = Counter(g["identifier"] for g in groups.values())
    assert by_identifier == {"a": 1, "b": A_WIDTH}, context
    b_groups = sorted(g for g, row in groups.items() if row["identifier"] == "b")
    (a_group,) = [g for g, row in groups.items() if row["identifier"] == "a"]
    assert sorted(originals("join_b")) == b_groups, context
    assert originals("join_a") == [a_group], context
    expected_all = [a_group] if groups[a_group]["failed"] == 0 else []
    assert originals("join_all") == expected_all, context
