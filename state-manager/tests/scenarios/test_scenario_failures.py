"""Fan-in under failure: errored branches, retries running out, retries that recover, prunes.

Every graph here is ``root → split (fans out) → work → post → merge``, where ``merge``
unites ``split``. A branch is one ``work`` state and the ``post`` state it creates.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sm_api import Api, node, template_node
from sm_scenario import by_identifier, claim_exactly, status_counts
from sm_support import RunningServer, read_fanin_groups, read_states

NS = "failures"
NO_RETRIES = {"max_retries": 0}


async def fan_graph(
    api: Api, strategy: str, retry_policy: dict[str, Any], name: str = "fan"
) -> None:
    await api.register(
        node("Root", outputs=("r",)),
        node("Split", outputs=("item",)),
        node("Work", inputs=("item",), outputs=("done",)),
        node("Post", inputs=("done",), outputs=()),
        node("Merge", inputs=("first",), outputs=()),
    )
    await api.create_graph(
        name,
        {
            "nodes": [
                template_node("Root", "root", NS, {}, ["split"]),
                template_node("Split", "split", NS, {}, ["work"]),
                template_node("Work", "work", NS, {"item": "${{ split.outputs.item }}"}, ["post"]),
                template_node("Post", "post", NS, {"done": "${{ work.outputs.done }}"}, ["merge"]),
                template_node(
                    "Merge",
                    "merge",
                    NS,
                    {"first": "${{ split.outputs.item }}"},
                    unites={"identifier": "split", "strategy": strategy},
                ),
            ],
            "retry_policy": retry_policy,
        },
    )


async def open_fan(api: Api, width: int, name: str = "fan") -> tuple[str, str, dict[str, str]]:
    """Trigger, run root and split; returns (run id, split id, work state id by item)."""
    run_id = await api.trigger(name)
    await api.executed((await claim_exactly(api, "Root", count=1))[0]["state_id"], {"r": "1"})
    split = (await claim_exactly(api, "Split", count=1))[0]
    await api.executed(split["state_id"], *({"item": str(i)} for i in range(width)))
    work = await claim_exactly(api, "Work", count=width)
    return run_id, split["state_id"], {s["inputs"]["item"]: s["state_id"] for s in work}


async def finish_branch(api: Api, work_id: str, item: str) -> None:
    """Work succeeds, then its post succeeds."""
    await api.executed(work_id, {"done": item})
    post = await claim_exactly(api, "Post", count=1)
    assert post[0]["inputs"] == {"done": item}
    await api.executed(post[0]["state_id"])


async def assert_no_merge(api: Api, database_url: str, run_id: str) -> None:
    assert await api.claim("Merge") == []
    states = await read_states(database_url, NS, run_id)
    assert "merge" not in by_identifier(states)


# -- a branch that fails for good ---------------------------------------------------


@pytest.mark.parametrize("failure", ["errored", "next_created_error"])
@pytest.mark.parametrize("failing", ["first", "last"])
@pytest.mark.parametrize("strategy", ["ALL_DONE", "ALL_SUCCESS"])
async def test_a_branch_failing_for_good_releases_all_done_but_never_all_success(
    client: httpx.AsyncClient, server: RunningServer, strategy: str, failing: str, failure: str
) -> None:
    database_url = server.database_url
    api = Api(client, NS)
    await fan_graph(api, strategy, NO_RETRIES)
    run_id, split_id, work = await open_fan(api, 5)
    bad = "0" if failing == "first" else "4"

    async def fail_bad_branch() -> None:
        if failure == "errored":
            assert await api.errored(work[bad], "no luck") == {
                "status": "ERRORED",
                "retry_created": False,
            }
        else:
            # No "done" output: post's input cannot be rendered.
            await api.executed(work[bad], {"other": "x"})

    if failing == "first":
        await fail_bad_branch()
    for item in ["1", "2", "3", "0", "4"]:
        if item != bad:
            await finish_branch(api, work[item], item)
            if item != "4" or failing == "last":
                await assert_no_merge(api, database_url, run_id)
    if failing == "last":
        await fail_bad_branch()

    states = await read_states(database_url, NS, run_id)
    failed_status = "ERRORED" if failure == "errored" else "NEXT_CREATED_ERROR"
    counts = status_counts(states)
    assert counts[("work", failed_status)] == 1
    assert counts[("post", "SUCCESS")] == 4
    (group,) = await read_fanin_groups(database_url, run_id)
    assert (group["group_id"], group["pending"], group["failed"]) == (split_id, 0, 1)

    if strategy == "ALL_DONE":
        merge = await claim_exactly(api, "Merge", count=1)
        assert merge[0]["inputs"] == {"first": "0"}
        await api.executed(merge[0]["state_id"])
        assert await api.claim("Merge") == []
        expected_total = 1 + 5 + 5 + 4 + 1
    else:
        await assert_no_merge(api, database_url, run_id)
        expected_total = 1 + 5 + 5 + 4
    run = await api.run_summary(run_id)
    assert run["status"] == "FAILED"
    assert (run["pending_count"], run["errored_count"]) == (0, 1)
    assert run["total_count"] == expected_total
    merges = by_identifier(await read_states(database_url, NS, run_id)).get("merge", [])
    assert len(merges) == (1 if strategy == "ALL_DONE" else 0)


# -- retries ------------------------------------------------------------------------


async def test_retries_run_out_after_max_retries_with_fixed_delays(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    database_url = server.database_url
    api = Api(client, NS)
    await api.register(
        node("Root", outputs=("r",)),
        node("Flaky", inputs=("r",), outputs=("v",)),
        node("After", inputs=("v",)),
    )
    backoff = 1_000
    await api.create_graph(
        "retries",
        {
            "nodes": [
                template_node("Root", "root", NS, {}, ["flaky"]),
                template_node("Flaky", "flaky", NS, {"r": "${{ root.outputs.r }}"}, ["after"]),
                template_node("After", "after", NS, {"v": "${{ flaky.outputs.v }}"}),
            ],
            "retry_policy": {"max_retries": 3, "strategy": "FIXED", "backoff_factor": backoff},
        },
    )
    run_id = await api.trigger("retries")
    await api.executed((await claim_exactly(api, "Root", count=1))[0]["state_id"], {"r": "7"})
    attempts: list[str] = []
    early: list[dict[str, Any]] = []
    for attempt in range(4):
        flaky = (early or await claim_exactly(api, "Flaky", count=1, limit_s=10))[0]
        assert flaky["inputs"] == {"r": "7"}
        attempts.append(flaky["state_id"])
        reported_at = time.monotonic()
        result = await api.errored(flaky["state_id"], f"failure {attempt}")
        if attempt < 3:
            assert result == {"status": "RETRY_CREATED", "retry_created": True}
            # The retry is due one backoff after the report; a claim answered before
            # that must come back empty (checked only if this machine was that quick).
            early = await api.claim("Flaky")
            if time.monotonic() - reported_at < backoff / 1000:
                assert early == [], "a retry was handed out before its delay"
        else:
            assert result == {"status": "ERRORED", "retry_created": False}
    assert len(set(attempts)) == 4
    await assert_no_retry_left(api)

    states = await read_states(database_url, NS, run_id)
    flaky_rows = sorted(by_identifier(states)["flaky"], key=lambda s: s.retry_count)
    assert [s.id for s in flaky_rows] == attempts
    assert [s.retry_count for s in flaky_rows] == [0, 1, 2, 3]
    assert [s.status for s in flaky_rows] == ["RETRY_CREATED"] * 3 + ["ERRORED"]
    assert [s.error for s in flaky_rows] == [f"failure {i}" for i in range(4)]
    assert len({s.fanout_id for s in flaky_rows}) == 1
    assert all(s.inputs == {"r": "7"} for s in flaky_rows)
    assert [s.enqueue_after - s.created_at for s in flaky_rows[1:]] == [backoff] * 3
    assert "after" not in by_identifier(states)
    run = await api.run_summary(run_id)
    assert (run["status"], run["retried_count"], run["errored_count"]) == ("FAILED", 3, 1)
    assert (run["pending_count"], run["total_count"]) == (0, 5)


async def assert_no_retry_left(api: Api) -> None:
    assert await api.claim("Flaky", wait_ms=1_500) == []


async def test_a_retry_that_succeeds_continues_the_graph_and_releases_the_join(
    client: httpx.AsyncClient, server: RunningServer
) -> None:
    database_url = server.database_url
    api = Api(client, NS)
    policy = {"max_retries": 2, "strategy": "FIXED", "backoff_factor": 50}
    await fan_graph(api, "ALL_SUCCESS", policy)
    run_id, _split_id, work = await open_fan(api, 3)
    await finish_branch(api, work["0"], "0")
    await finish_branch(api, work["2"], "2")

    flaky_id = work["1"]
    for attempt in range(2):
        assert await api.errored(flaky_id, f"try {attempt}") == {
            "status": "RETRY_CREATED",
            "retry_created": True,
        }
        await assert_no_merge(api, database_url, run_id)
        retry = (await claim_exactly(api, "Work", count=1))[0]
        assert retry["inputs"] == {"item": "1"}
        assert retry["state_id"] != flaky_id
        flaky_id = retry["state_id"]
    await api.executed(flaky_id, {"done": "1"})
    await assert_no_merge(api, database_url, run_id)  # its post is still to run
    post = (await claim_exactly(api, "Post", count=1))[0]
    assert post["inputs"] == {"done": "1"}
    await api.executed(post["state_id"])
    merge = await claim_exactly(api, "Merge", count=1)
    await api.executed(merge[0]["state_id"])

    run = await api.run_summary(run_id)
    assert (run["status"], run["retried_count"], run["errored_count"]) == ("SUCCESS", 2, 0)
    states = await read_states(database_url, NS, run_id)
    grouped = by_identifier(states)
    assert {k: len(v) for k, v in grouped.items()} == {
        "root": 1,
        "split": 3,
        "work": 5,
        "post": 3,
        "merge": 1,
    }
    (recovered_post,) = [s for s in grouped["post"] if s.inputs == {"done": "1"}]
    assert recovered_post.parents["work"] == flaky_id
    assert sorted(s.retry_count for s in grouped["work"] if s.inputs == {"item": "1"}) == [0, 1, 2]


# -- prune --------------------------------------------------------------------------


@pytest.mark.parametrize("pruned_last", [False, True], ids=["pruned-first", "pruned-last"])
async def test_pruned_branches_still_release_an_all_success_join_once(
    client: httpx.AsyncClient, server: RunningServer, pruned_last: bool
) -> None:
    database_url = server.database_url
    api = Api(client, NS)
    await fan_graph(api, "ALL_SUCCESS", NO_RETRIES)
    run_id, _split_id, work = await open_fan(api, 10)
    pruned = ["2", "5", "9"]

    async def prune_all() -> None:
        for item in pruned:
            r = await api.post_state(work[item], "prune", {"data": {"reason": f"skip {item}"}})
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "PRUNED"
            if not pruned_last or item != pruned[-1]:
                await assert_no_merge(api, database_url, run_id)

    if not pruned_last:
        await prune_all()
    kept = [item for item in work if item not in pruned]
    for item in kept:
        await finish_branch(api, work[item], item)
        if pruned_last or item != kept[-1]:
            await assert_no_merge(api, database_url, run_id)
    if pruned_last:
        await prune_all()

    merge = await claim_exactly(api, "Merge", count=1)
    await api.executed(merge[0]["state_id"])
    assert await api.claim("Merge") == []
    run = await api.run_summary(run_id)
    total = 1 + 10 + 10 + 7 + 1
    assert (run["status"], run["success_count"], run["total_count"]) == ("SUCCESS", total, total)
    states = await read_states(database_url, NS, run_id)
    counts = status_counts(states)
    assert counts[("work", "PRUNED")] == 3
    assert counts[("merge", "SUCCESS")] == 1
    assert {s.data["reason"] for s in states if s.status == "PRUNED"} == {
        f"skip {i}" for i in pruned
    }
