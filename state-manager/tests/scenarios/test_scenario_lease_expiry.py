"""Leases running out inside nested fan-in groups while other branches keep reporting.

Workers claim states and vanish; the server takes those states back when their lease
runs out (one background transaction for up to 100 of them, each counted as a failed
attempt). Meanwhile other workers report sibling branches of the same groups. Every
report must be answered 200, and once all leases ran out the ALL_DONE joins must fire
exactly once per group.

Graph: a (fans out OUTER) → b (each fans out INNER) → c and d;
join_b unites b, join_a unites a, both ALL_DONE. All ``c`` states are abandoned.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sm_api import Api, node, template_node
from sm_scenario import by_identifier, claim_exactly, for_each
from sm_support import read_states, serve, test_settings

NS = "leases"
OUTER, INNER = 100, 4
LEASE_S = 5  # generous: states that are reported promptly must never expire, even on a slow box
# Longer than a lease plus the 5 s between two passes of the lease loop, so the abandoned
# states are taken back while the other branches are still reporting.
REPORTING_S = LEASE_S + 5 + 2


@pytest.mark.slow
# Not on MongoDB: its 5-second leases are timed for the SQL backends, and SecantusDB
# (MongoDB in CI) answers reports too slowly for them under this load.
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_leases_running_out_while_sibling_branches_report(
    database_url: str, tmp_path: Path
) -> None:
    settings = test_settings(database_url, tmp_path / "data", lease_seconds=LEASE_S)
    with serve(settings) as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=60
        ) as client:
            api = Api(client, NS)
            run_id = await _start(api)
            await claim_exactly(api, "C", count=OUTER * INNER)  # abandoned: leases run out
            statuses = await _report_d_steadily(api)
            assert statuses == Counter({200: OUTER * INNER}), statuses

            # Every lease ran out (no retries allowed): all groups are done, joins fire.
            join_b = await claim_exactly(api, "JoinB", count=OUTER, limit_s=20)
            await for_each(join_b, lambda s: api.executed(s["state_id"]))
            join_a = await claim_exactly(api, "JoinA", count=1, limit_s=20)
            await api.executed(join_a[0]["state_id"])

    states = await read_states(database_url, NS, run_id)
    counts = Counter((s.identifier, s.status) for s in states)
    assert counts == {
        ("a", "SUCCESS"): OUTER,
        ("b", "SUCCESS"): OUTER * INNER,
        ("c", "ERRORED"): OUTER * INNER,
        ("d", "SUCCESS"): OUTER * INNER,
        ("join_b", "SUCCESS"): OUTER,
        ("join_a", "SUCCESS"): 1,
    }
    assert all("Lease expired" in (s.error or "") for s in by_identifier(states)["c"])


async def _start(api: Api) -> str:
    await api.register(
        node("A", outputs=("x",)),
        node("B", inputs=("x",), outputs=("y",)),
        node("C"),
        node("D"),
        node("JoinB"),
        node("JoinA"),
    )
    await api.create_graph(
        "abandoned",
        {
            "nodes": [
                template_node("A", "a", NS, {}, ["b"]),
                template_node("B", "b", NS, {"x": "${{ a.outputs.x }}"}, ["c", "d"]),
                template_node("C", "c", NS),
                template_node("D", "d", NS),
                template_node(
                    "JoinB", "join_b", NS, unites={"identifier": "b", "strategy": "ALL_DONE"}
                ),
                template_node(
                    "JoinA", "join_a", NS, unites={"identifier": "a", "strategy": "ALL_DONE"}
                ),
            ],
            "retry_policy": {"max_retries": 0},
        },
    )
    run_id = await api.trigger("abandoned")
    a = (await claim_exactly(api, "A", count=1))[0]
    await api.executed(a["state_id"], *({"x": str(i)} for i in range(OUTER)))
    b_states = await claim_exactly(api, "B", count=OUTER)
    await for_each(
        b_states,
        lambda s: api.executed(s["state_id"], *({"y": str(j)} for j in range(INNER))),
    )
    return run_id


async def _report_d_steadily(api: Api) -> Counter[int]:
    """Claim and report every ``d`` state, spread over REPORTING_S; the answers' statuses."""
    statuses: Counter[int] = Counter()
    pace = REPORTING_S * 16 / (OUTER * INNER)  # seconds between two reports of one worker

    async def worker() -> None:
        while True:
            claimed = await api.claim("D", batch_size=1)
            if not claimed:
                return
            r = await api.post_state(claimed[0]["state_id"], "executed", {"outputs": []})
            statuses[r.status_code] += 1
            if r.status_code != 200:
                await api.post_state(claimed[0]["state_id"], "executed", {"outputs": []})
            await asyncio.sleep(pace)

    await asyncio.gather(*(worker() for _ in range(16)))
    return statuses
