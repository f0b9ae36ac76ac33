"""Fan-in edge cases of our group semantics.

* a uniting node that follows its target directly;
* two uniting nodes on one target, with different strategies;
* a side branch that does not lead to the uniting node still holds the join;
* an ALL_SUCCESS join blocked by a branch that failed for good is released when a
  manual retry of that branch succeeds.
"""

from __future__ import annotations

import uuid

import httpx
from sm_api import Api, node, template_node
from sm_scenario import by_identifier, claim_exactly, status_counts
from sm_support import RunningServer, read_states

NS = "edges"


async def test_a_uniting_node_right_after_its_target_runs_once_per_fan_out(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    api = Api(client, NS)
    await api.register(node("Split", outputs=("item",)), node("Merge", inputs=("first",)))
    await api.create_graph(
        "direct",
        {
            "nodes": [
                template_node("Split", "split", NS, {}, ["merge"]),
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
    run_id = await api.trigger("direct")
    split = (await claim_exactly(api, "Split", count=1))[0]
    await api.executed(split["state_id"], *({"item": str(i)} for i in range(5)))
    merge = await claim_exactly(api, "Merge", count=1)
    assert merge[0]["inputs"] == {"first": "0"}
    await api.executed(merge[0]["state_id"])
    run = await api.run_summary(run_id)
    assert (run["status"], run["total_count"]) == ("SUCCESS", 6)


async def test_two_uniting_nodes_on_one_target_each_fire_once(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    api = Api(client, NS)
    await api.register(
        node("Split", outputs=("item",)),
        node("Work", inputs=("item",)),
        node("AllOk", inputs=("first",)),
        node("AllDone", inputs=("first",)),
    )
    await api.create_graph(
        "two",
        {
            "nodes": [
                template_node("Split", "split", NS, {}, ["work"]),
                template_node(
                    "Work", "work", NS, {"item": "${{ split.outputs.item }}"}, ["ok", "done"]
                ),
                template_node(
                    "AllOk",
                    "ok",
                    NS,
                    {"first": "${{ split.outputs.item }}"},
                    unites={"identifier": "split", "strategy": "ALL_SUCCESS"},
                ),
                template_node(
                    "AllDone",
                    "done",
                    NS,
                    {"first": "${{ split.outputs.item }}"},
                    unites={"identifier": "split", "strategy": "ALL_DONE"},
                ),
            ],
            "retry_policy": {"max_retries": 0},
        },
    )
    run_id = await api.trigger("two")
    split = (await claim_exactly(api, "Split", count=1))[0]
    await api.executed(split["state_id"], *({"item": str(i)} for i in range(4)))
    work = await claim_exactly(api, "Work", count=4)
    for state in work[:3]:
        await api.executed(state["state_id"])
        assert await api.claim("AllOk", "AllDone") == []
    await api.errored(work[3]["state_id"], "gone")
    done = await claim_exactly(api, "AllDone", count=1)
    assert await api.claim("AllOk") == []
    await api.executed(done[0]["state_id"])
    counts = status_counts(await read_states(server.database_url, NS, run_id))
    assert counts[("done", "SUCCESS")] == 1
    assert not any(identifier == "ok" for identifier, _ in counts)


async def test_a_side_branch_that_does_not_lead_to_the_join_still_holds_it(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    api = Api(client, NS)
    await api.register(
        node("Split", outputs=("item",)),
        node("Work", inputs=("item",)),
        node("Side", inputs=("item",)),
        node("Merge", inputs=("first",)),
    )
    await api.create_graph(
        "side",
        {
            "nodes": [
                template_node("Split", "split", NS, {}, ["work", "side"]),
                template_node("Work", "work", NS, {"item": "${{ split.outputs.item }}"}, ["merge"]),
                template_node("Side", "side", NS, {"item": "${{ split.outputs.item }}"}),
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
    run_id = await api.trigger("side")
    split = (await claim_exactly(api, "Split", count=1))[0]
    await api.executed(split["state_id"], {"item": "a"}, {"item": "b"})
    for state in await claim_exactly(api, "Work", count=2):
        await api.executed(state["state_id"])
    side = await claim_exactly(api, "Side", count=2)
    await api.executed(side[0]["state_id"])
    assert await api.claim("Merge") == [], "merge ran while a side branch was still running"
    await api.executed(side[1]["state_id"])
    merge = await claim_exactly(api, "Merge", count=1)
    await api.executed(merge[0]["state_id"])
    run = await api.run_summary(run_id)
    assert (run["status"], run["total_count"]) == ("SUCCESS", 2 + 2 + 2 + 1)


async def test_a_manual_retry_that_succeeds_releases_a_blocked_all_success_join(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    database_url = server.database_url
    api = Api(client, NS)
    await api.register(
        node("Split", outputs=("item",)), node("Work", inputs=("item",)), node("Merge")
    )
    await api.create_graph(
        "manual",
        {
            "nodes": [
                template_node("Split", "split", NS, {}, ["work"]),
                template_node("Work", "work", NS, {"item": "${{ split.outputs.item }}"}, ["merge"]),
                template_node(
                    "Merge", "merge", NS, unites={"identifier": "split", "strategy": "ALL_SUCCESS"}
                ),
            ],
            "retry_policy": {"max_retries": 0},
        },
    )
    run_id = await api.trigger("manual")
    split = (await claim_exactly(api, "Split", count=1))[0]
    await api.executed(split["state_id"], {"item": "a"}, {"item": "b"})
    first, second = await claim_exactly(api, "Work", count=2)
    await api.executed(first["state_id"])
    await api.errored(second["state_id"], "bad input")
    assert await api.claim("Merge") == []
    assert (await api.run_summary(run_id))["status"] == "FAILED"

    r = await api.post_state(second["state_id"], "manual-retry", {"fanout_id": str(uuid.uuid4())})
    assert r.status_code == 200, r.text
    retry = (await claim_exactly(api, "Work", count=1))[0]
    assert retry["state_id"] == r.json()["id"]
    assert retry["inputs"] == second["inputs"]
    assert await api.claim("Merge") == [], "merge ran before the manual retry finished"
    await api.executed(retry["state_id"])
    merge = await claim_exactly(api, "Merge", count=1)
    await api.executed(merge[0]["state_id"])

    run = await api.run_summary(run_id)
    assert (run["status"], run["retried_count"], run["errored_count"]) == ("SUCCESS", 1, 0)
    grouped = by_identifier(await read_states(database_url, NS, run_id))
    assert len(grouped["merge"]) == 1


async def test_pruning_an_inner_join_releases_the_outer_join_with_store_inputs(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    """A uniting state is a descendant of the outer group like any other state."""
    api = Api(client, NS)
    await api.register(
        node("A", outputs=("x",)),
        node("B", inputs=("x",), outputs=("y",)),
        node("JoinB", inputs=("x", "k")),
        node("JoinA", inputs=("x", "k")),
    )
    await api.create_graph(
        "prune-join",
        {
            "nodes": [
                template_node("A", "a", NS, {}, ["b"]),
                template_node("B", "b", NS, {"x": "${{ a.outputs.x }}"}, ["join_b"]),
                template_node(
                    "JoinB",
                    "join_b",
                    NS,
                    {"x": "${{ a.outputs.x }}", "k": "${{ store.k }}"},
                    ["join_a"],
                    unites={"identifier": "b", "strategy": "ALL_SUCCESS"},
                ),
                template_node(
                    "JoinA",
                    "join_a",
                    NS,
                    {"x": "${{ a.outputs.x }}", "k": "${{ store.k }}-${{ store.d }}"},
                    unites={"identifier": "a", "strategy": "ALL_SUCCESS"},
                ),
            ],
            "store_config": {"required_keys": ["k"], "default_values": {"d": "dflt"}},
        },
    )
    run_id = await api.trigger("prune-join", store={"k": "v"})
    a = (await claim_exactly(api, "A", count=1))[0]
    await api.executed(a["state_id"], {"x": "1"}, {"x": "2"})
    for state in await claim_exactly(api, "B", count=2):
        await api.executed(state["state_id"], {"y": "p"}, {"y": "q"})
    join_b = await claim_exactly(api, "JoinB", count=2)
    assert sorted(s["inputs"]["x"] for s in join_b) == ["1", "2"]
    assert {s["inputs"]["k"] for s in join_b} == {"v"}
    await api.executed(join_b[0]["state_id"])
    assert await api.claim("JoinA") == []
    r = await api.post_state(join_b[1]["state_id"], "prune", {"data": {}})
    assert r.status_code == 200, r.text
    join_a = await claim_exactly(api, "JoinA", count=1)
    assert join_a[0]["inputs"] == {"x": "1", "k": "v-dflt"}
    await api.executed(join_a[0]["state_id"])
    run = await api.run_summary(run_id)
    assert (run["status"], run["total_count"]) == ("SUCCESS", 2 + 4 + 2 + 1)
