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
    states = await read_states(server.settings.database_url, NS, run_id)
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

    states = await read_states(server.settings.database_url, NS, run_id)
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
    groups = await read_fanin_groups(server.settings.database_url, run_id)
    assert [(g["group_id"], g["pending"], g["failed"]) for g in groups] == [
        (split["state_id"], 0, 0)
    ]
    print(f"\n[{backend}] fan-out/fan-in of {WIDTH}: {elapsed:.2f} s from trigger to join done")
