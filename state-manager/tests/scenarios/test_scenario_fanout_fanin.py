"""Fan-out of 1,000 items joined by one uniting node, and a fan-out nested in a fan-out."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sm_api import Api, node, template_node
from sm_scenario import by_identifier, claim_exactly, for_each, status_counts
from sm_support import RunningServer, read_fanin_groups, read_states

NS = "scenario"
WIDTH = 1_000


@pytest.mark.slow
async def test_fan_out_of_1000_joins_exactly_once_after_the_last_item(
    client: httpx.AsyncClient, server: RunningServer, backend: str
) -> None:
    api = Api(client, NS)
    await api.register(
        node("Root", inputs=("seed",), outputs=("seed",)),
        node("Split", inputs=("seed",), outputs=("item",)),
        node("Work", inputs=("item",), outputs=("done",)),
        node("Merge", inputs=("first", "seed"), outputs=()),
    )
    await api.create_graph(
        "wide",
        {
            "nodes": [
                template_node("Root", "root", NS, {"seed": "s"}, ["split"]),
                template_node("Split", "split", NS, {"seed": "${{ root.outputs.seed }}"}, ["work"]),
                template_node("Work", "work", NS, {"item": "${{ split.outputs.item }}"}, ["merge"]),
                template_node(
                    "Merge",
                    "merge",
                    NS,
                    {"first": "${{ split.outputs.item }}", "seed": "${{ root.outputs.seed }}"},
                    unites={"identifier": "split", "strategy": "ALL_SUCCESS"},
                ),
            ]
        },
    )
    started = time.perf_counter()
    run_id = await api.trigger("wide")
    root = (await claim_exactly(api, "Root", count=1))[0]
    await api.executed(root["state_id"], {"seed": "s"})
    split = (await claim_exactly(api, "Split", count=1))[0]
    assert split["inputs"] == {"seed": "s"}
    await api.executed(split["state_id"], *({"item": str(i)} for i in range(WIDTH)))

    work = await claim_exactly(api, "Work", count=WIDTH)
    assert sorted(int(s["inputs"]["item"]) for s in work) == list(range(WIDTH))

    async def finish(state: dict[str, Any]) -> None:
        await api.executed(state["state_id"], {"done": state["inputs"]["item"]})

    *first, last = work
    for start in range(0, len(first), 100):
        await for_each(first[start : start + 100], finish)
        assert await api.claim("Merge") == [], f"merge ran after {start + 100} items"
    states = await read_states(server.database_url, NS, run_id)
    assert "merge" not in by_identifier(states), "merge created before the last item finished"
    assert status_counts(states)[("work", "QUEUED")] == 1

    await finish(last)
    merge = (await claim_exactly(api, "Merge", count=1))[0]
    assert merge["inputs"] == {"first": "0", "seed": "s"}
    await api.executed(merge["state_id"])
    elapsed = time.perf_counter() - started

    run = await api.run_summary(run_id)
    total = 1 + WIDTH + WIDTH + 1
    assert run["status"] == "SUCCESS"
    assert (run["success_count"], run["total_count"]) == (total, total)
    assert (run["pending_count"], run["errored_count"], run["retried_count"]) == (0, 0, 0)

    states = await read_states(server.database_url, NS, run_id)
    grouped = by_identifier(states)
    assert {k: len(v) for k, v in grouped.items()} == {
        "root": 1,
        "split": WIDTH,
        "work": WIDTH,
        "merge": 1,
    }
    (merge_row,) = grouped["merge"]
    last_work = max(s.updated_at for s in grouped["work"])
    assert merge_row.created_at >= last_work
    assert merge_row.parents == {"root": root["state_id"], "split": split["state_id"]}
    groups = await read_fanin_groups(server.database_url, run_id)
    assert [(g["group_id"], g["pending"], g["failed"]) for g in groups] == [
        (split["state_id"], 0, 0)
    ]
    print(f"\n[{backend}] fan-out/fan-in of {WIDTH}: {elapsed:.2f} s from trigger to join done")


async def test_nested_fan_outs_join_once_per_group_at_each_level(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    api = Api(client, NS)
    await api.register(
        node("Root", outputs=("r",)),
        node("A", outputs=("x",)),
        node("B", inputs=("x",), outputs=("y",)),
        node("C", inputs=("x", "y"), outputs=()),
        node("JoinB", inputs=("x", "y"), outputs=()),
        node("JoinA", inputs=("x",), outputs=()),
    )
    await api.create_graph(
        "nested",
        {
            "nodes": [
                template_node("Root", "root", NS, {}, ["a"]),
                template_node("A", "a", NS, {}, ["b"]),
                template_node("B", "b", NS, {"x": "${{ a.outputs.x }}"}, ["c"]),
                template_node(
                    "C", "c", NS, {"x": "${{ a.outputs.x }}", "y": "${{ b.outputs.y }}"}, ["join_b"]
                ),
                template_node(
                    "JoinB",
                    "join_b",
                    NS,
                    {"x": "${{ a.outputs.x }}", "y": "${{ b.outputs.y }}"},
                    ["join_a"],
                    unites={"identifier": "b", "strategy": "ALL_SUCCESS"},
                ),
                template_node(
                    "JoinA",
                    "join_a",
                    NS,
                    {"x": "${{ a.outputs.x }}"},
                    unites={"identifier": "a", "strategy": "ALL_SUCCESS"},
                ),
            ]
        },
    )
    run_id = await api.trigger("nested")
    await api.executed((await claim_exactly(api, "Root", count=1))[0]["state_id"], {"r": "1"})
    a = (await claim_exactly(api, "A", count=1))[0]
    await api.executed(a["state_id"], *({"x": f"a{i}"} for i in range(3)))

    b_states = await claim_exactly(api, "B", count=3)
    assert sorted(s["inputs"]["x"] for s in b_states) == ["a0", "a1", "a2"]
    b_by_x = {s["inputs"]["x"]: s["state_id"] for s in b_states}
    for state in b_states:
        x = state["inputs"]["x"]
        await api.executed(state["state_id"], *({"y": f"{x}-{j}"} for j in range(4)))

    c_states = await claim_exactly(api, "C", count=12)
    by_group: dict[str, list[dict[str, Any]]] = {}
    for state in c_states:
        by_group.setdefault(state["inputs"]["x"], []).append(state)
    assert {x: len(v) for x, v in by_group.items()} == {"a0": 4, "a1": 4, "a2": 4}

    # Finish three items of every group first: no join may appear.
    for group in by_group.values():
        for state in group[:3]:
            await api.executed(state["state_id"])
    assert await api.claim("JoinB", "JoinA") == []
    # The last item of each group releases that group's join, and only that one.
    join_b: list[dict[str, Any]] = []
    for x in ["a1", "a0", "a2"]:
        await api.executed(by_group[x][3]["state_id"])
        claimed = await claim_exactly(api, "JoinB", count=1)
        assert claimed[0]["inputs"] == {"x": x, "y": f"{x}-0"}
        join_b += claimed
    assert await api.claim("JoinA") == []

    # join_a waits for every join_b: they are descendants of the a group too.
    for state in join_b[:2]:
        await api.executed(state["state_id"])
        assert await api.claim("JoinA") == []
    await api.executed(join_b[2]["state_id"])
    join_a = await claim_exactly(api, "JoinA", count=1)
    assert join_a[0]["inputs"] == {"x": "a0"}
    await api.executed(join_a[0]["state_id"])

    run = await api.run_summary(run_id)
    assert (run["status"], run["success_count"], run["total_count"]) == ("SUCCESS", 32, 32)
    grouped = by_identifier(await read_states(server.database_url, NS, run_id))
    assert {k: len(v) for k, v in grouped.items()} == {
        "root": 1,
        "a": 3,
        "b": 12,
        "c": 12,
        "join_b": 3,
        "join_a": 1,
    }
    assert sorted(s.parents["b"] for s in grouped["join_b"]) == sorted(b_by_x.values())
    (join_a_row,) = grouped["join_a"]
    assert join_a_row.parents["a"] == a["state_id"]
    assert join_a_row.created_at >= max(s.updated_at for s in grouped["join_b"])


async def test_nested_joins_hold_under_concurrent_reports(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    """Branches of different groups finishing at the same moment, at both levels."""
    api = Api(client, NS)
    outer, inner = 6, 8
    await api.register(
        node("A", outputs=("x",)),
        node("B", inputs=("x",), outputs=("y",)),
        node("C", inputs=("y",)),
        node("JoinB", inputs=("x",)),
        node("JoinA", inputs=("x",)),
    )
    await api.create_graph(
        "nested-race",
        {
            "nodes": [
                template_node("A", "a", NS, {}, ["b"]),
                template_node("B", "b", NS, {"x": "${{ a.outputs.x }}"}, ["c"]),
                template_node("C", "c", NS, {"y": "${{ b.outputs.y }}"}, ["join_b"]),
                template_node(
                    "JoinB",
                    "join_b",
                    NS,
                    {"x": "${{ a.outputs.x }}"},
                    ["join_a"],
                    unites={"identifier": "b", "strategy": "ALL_SUCCESS"},
                ),
                template_node(
                    "JoinA",
                    "join_a",
                    NS,
                    {"x": "${{ a.outputs.x }}"},
                    unites={"identifier": "a", "strategy": "ALL_SUCCESS"},
                ),
            ]
        },
    )
    run_id = await api.trigger("nested-race")
    a = (await claim_exactly(api, "A", count=1))[0]
    await api.executed(a["state_id"], *({"x": str(i)} for i in range(outer)))
    b_states = await claim_exactly(api, "B", count=outer)

    async def fan(state: dict[str, Any]) -> None:
        x = state["inputs"]["x"]
        await api.executed(state["state_id"], *({"y": f"{x}.{j}"} for j in range(inner)))

    await for_each(b_states, fan, concurrency=outer)
    c_states = await claim_exactly(api, "C", count=outer * inner)

    async def done(state: dict[str, Any]) -> None:
        await api.executed(state["state_id"])

    await for_each(c_states, done, concurrency=16)
    join_b = await claim_exactly(api, "JoinB", count=outer)
    assert sorted(s["inputs"]["x"] for s in join_b) == [str(i) for i in range(outer)]
    assert await api.claim("JoinA") == []
    await for_each(join_b, done, concurrency=outer)
    join_a = await claim_exactly(api, "JoinA", count=1)
    await api.executed(join_a[0]["state_id"])

    total = outer + outer * inner * 2 + outer + 1
    run = await api.run_summary(run_id)
    assert (run["status"], run["success_count"], run["total_count"]) == ("SUCCESS", total, total)
    groups = await read_fanin_groups(server.database_url, run_id)
    assert len(groups) == 1 + outer
    assert all((g["pending"], g["failed"]) == (0, 0) for g in groups)
