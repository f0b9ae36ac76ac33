"""Cancelling a run while its states are being reported, through two server processes
on one database.

60 states of ``b`` are claimed; their ``executed`` reports go to both servers at once,
and the run is cancelled through the second server while they are in flight. Each report
commits before the cancellation (200: its successor ``c`` is created, then cancelled) or
after it (409 ``run_cancelled``: the state is CANCELLED and nothing follows it). Whatever
the interleaving, no state of the run is left waiting or runnable, every ``c`` is
CANCELLED, and nothing can be claimed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
from sm_api import Api, node, template_node
from sm_support import read_states, server_process

NS = "cancel-race"
WIDTH = 60


async def test_cancel_while_reports_are_in_flight_on_two_servers(
    database_url: str, tmp_path: Path
) -> None:
    with (
        server_process(database_url, tmp_path / "one") as one,
        server_process(database_url, tmp_path / "two") as two,
    ):
        async with (
            httpx.AsyncClient(base_url=one.base_url, headers=one.headers, timeout=60) as c1,
            httpx.AsyncClient(base_url=two.base_url, headers=two.headers, timeout=60) as c2,
        ):
            first, second = Api(c1, NS), Api(c2, NS)
            await first.register(node("A", outputs=("x",)), node("B", inputs=("x",)), node("C"))
            await first.create_graph(
                "race",
                {
                    "nodes": [
                        template_node("A", "a", NS, {}, ["b"]),
                        template_node("B", "b", NS, {"x": "${{ a.outputs.x }}"}, ["c"]),
                        template_node("C", "c", NS),
                    ],
                    "retry_policy": {"max_retries": 0},
                },
            )
            run_id = await first.trigger("race")
            a = await first.claim_one("A")
            await first.executed(a["state_id"], *({"x": str(i)} for i in range(WIDTH)))
            b_states = await first.claim("B", batch_size=WIDTH)
            assert len(b_states) == WIDTH

            lanes = asyncio.Semaphore(8)  # reports in flight at any moment
            some_done = asyncio.Event()
            done = 0

            async def report(index: int, state_id: str) -> int:
                nonlocal done
                api = first if index % 2 else second
                async with lanes:
                    r = await api.post_state(state_id, "executed", {"outputs": [{}]})
                done += 1
                if done == WIDTH // 6:
                    some_done.set()
                if r.status_code == 409:
                    assert r.json()["code"] == "run_cancelled", r.text
                return r.status_code

            async def cancel() -> httpx.Response:
                await some_done.wait()  # with reports still in flight on both servers
                return await c2.post(f"{second.base}/run/{run_id}/cancel")

            reports = [report(i, s["state_id"]) for i, s in enumerate(b_states)]
            *statuses, cancelled = await asyncio.gather(*reports, cancel())
            assert cancelled.status_code == 200, cancelled.text
            answers = Counter(statuses)
            assert set(answers) <= {200, 409}, answers

            assert await first.claim("C", batch_size=WIDTH) == []
            assert await second.claim("C", batch_size=WIDTH) == []
            assert (await first.run_summary(run_id))["status"] == "CANCELLED"

    states = await read_states(database_url, NS, run_id)
    counts = Counter((s.identifier, s.status) for s in states)
    assert counts[("b", "SUCCESS")] == answers[200]
    assert counts[("b", "CANCELLED")] == answers[409]
    # Each accepted report created its ``c``; every one of them was cancelled.
    assert counts[("c", "CANCELLED")] == answers[200]
    assert counts[("a", "SUCCESS")] == WIDTH  # the fan-out: a state and its siblings
    assert sum(counts.values()) == 2 * WIDTH + answers[200], counts
    assert answers[409] > 0, answers  # the cancellation came while reports were going on
    assert not any(s.status in ("CREATED", "QUEUED", "EXECUTED") for s in states), counts
    print(f"\nreports before the cancellation: {answers[200]}, refused after it: {answers[409]}")
