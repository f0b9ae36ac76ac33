"""``kill -9`` the server mid-run, restart it, finish the run: nothing lost, nothing doubled.

The server runs as a real process. Workers in the test claim and report over HTTP,
concurrently, and ride out the outage by retrying. The server is killed twice: once
while the fan-out report (66 items, 131 new rows) is in flight, once in the middle of
the branches. A claim whose answer was cut comes back through lease expiry as a retry;
a report whose answer was cut is checked on the server: it was applied fully, or not
at all and is sent again.

Graph: root → split (fans out WIDTH) → work → post → merge (unites split) → finish,
1 + 3·WIDTH + 2 = 201 states (plus a retry per claim cut by a crash).
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from sm_api import Api, node, template_node
from sm_scenario import by_identifier, status_counts
from sm_support import ServerProcess, read_fanin_groups, read_states

NS = "crash"
GRAPH = "crashy"
WIDTH = 66
WORKERS = 6
LEASE_SECONDS = 3
NODES = ("Root", "Split", "Work", "Post", "Merge", "Finish")
SUCCESSORS = {"root": "split", "work": "post", "merge": "finish"}


def outputs_for(state: dict[str, Any]) -> list[dict[str, str]]:
    if state["node_name"] == "Split":
        return [{"i": str(k)} for k in range(WIDTH)]
    return [{"i": state["inputs"].get("i", "-")}]


class Crew:
    """Workers sharing what they saw: claims, applied reports, and when to crash."""

    def __init__(self, base_url: str, headers: dict[str, str], run_id: str) -> None:
        self.base_url = base_url
        self.headers = headers
        self.run_id = run_id
        self.claims: list[str] = []
        self.applied: dict[str, dict[str, str]] = {}
        self.lost_to_lease: list[str] = []
        self.cut: Counter[str] = Counter()  # reports whose answer a crash cut, by outcome
        self.split_in_flight = asyncio.Event()
        self.halfway = asyncio.Event()  # the fan-out and about a third of the branches done
        self.finished = asyncio.Event()

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=20
        ) as client:
            api = Api(client, NS)
            while not self.finished.is_set():
                try:
                    states = await api.claim(*NODES, batch_size=rng.randint(1, 4), wait_ms=200)
                except httpx.TransportError:
                    await asyncio.sleep(0.1)  # server down; a cut claim returns by lease expiry
                    continue
                for state in states:
                    self.claims.append(state["state_id"])
                    await self.report(api, state)

    async def report(self, api: Api, state: dict[str, Any]) -> None:
        outputs = outputs_for(state)
        if state["node_name"] == "Split":
            self.split_in_flight.set()
        cut = False
        while True:
            try:
                r = await api.post_state(state["state_id"], "executed", {"outputs": outputs})
                break
            except httpx.TransportError:
                cut = True
                await asyncio.sleep(0.1)
        if r.status_code == 200:
            self.applied[state["state_id"]] = outputs[0]
            if len(self.applied) >= 2 + WIDTH:
                self.halfway.set()
            if cut:
                self.cut["not applied, sent again"] += 1
        else:
            # Only two explanations are acceptable for a refused report.
            assert r.status_code == 400, r.text
            details = await self.details(api, state["state_id"])
            if cut and details["status"] == "SUCCESS":
                assert details["outputs"] == outputs[0], details  # the cut report, applied
                self.applied[state["state_id"]] = outputs[0]
                self.cut["applied before the crash"] += 1
            else:
                assert details["status"] == "RETRY_CREATED", details
                assert "Lease expired" in (details["error"] or ""), details
                self.lost_to_lease.append(state["state_id"])
        if state["node_name"] == "Finish":
            self.finished.set()

    async def details(self, api: Api, state_id: str) -> dict[str, Any]:
        while True:
            try:
                return await api.node_details(GRAPH, self.run_id, state_id)
            except httpx.TransportError:
                await asyncio.sleep(0.1)


async def crash_twice(server: ServerProcess, crew: Crew) -> None:
    """Kill the server during the fan-out report and again mid-branches; restart each time."""
    await crew.split_in_flight.wait()
    await asyncio.sleep(random.uniform(0, 0.03))
    server.kill()
    await asyncio.to_thread(server.start)
    await crew.halfway.wait()
    server.kill()
    await asyncio.sleep(0.3)
    await asyncio.to_thread(server.start)


@pytest.mark.slow
async def test_kill_9_in_the_middle_of_a_run_loses_and_doubles_nothing(
    database_url: str, tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = LEASE_SECONDS
    if backend == "mongo":  # SecantusDB (MongoDB in CI) is slower: a smaller run, longer leases
        monkeypatch.setattr(sys.modules[__name__], "WIDTH", 30)
        lease = 5
    server = ServerProcess(database_url, tmp_path / "server", {"STATE_LEASE_SECONDS": str(lease)})
    server.start()
    try:
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=20
        ) as client:
            run_id = await _set_up(Api(client, NS))
        crew = Crew(server.base_url, server.headers, run_id)
        workers = [asyncio.create_task(crew.worker(seed)) for seed in range(WORKERS)]
        crasher = asyncio.create_task(crash_twice(server, crew))
        finished = asyncio.create_task(crew.finished.wait())
        try:
            # Stop at the first failure of a worker or of the crasher, not at the timeout.
            pending: set[asyncio.Task[Any]] = {finished, crasher, *workers}
            while not finished.done():
                done, pending = await asyncio.wait(
                    pending, timeout=120, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    await report_stall(database_url, run_id, server)
                for task in done:
                    task.result()  # raises what failed the task
        finally:
            crew.finished.set()
            for task in (crasher, finished):
                task.cancel()
            results = await asyncio.gather(*workers, crasher, return_exceptions=True)
        failures = [r for r in results if isinstance(r, Exception)]
        assert not failures, failures
        assert server.starts == 3, "the server was not killed twice"

        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=20
        ) as client:
            run = await Api(client, NS).run_summary(run_id)
    finally:
        server.stop()

    states = await read_states(database_url, NS, run_id)
    check_nothing_lost_or_doubled(states, crew)
    assert (run["status"], run["pending_count"], run["errored_count"]) == ("SUCCESS", 0, 0)
    assert run["success_count"] == 1 + 3 * WIDTH + 2
    (group,) = await read_fanin_groups(database_url, run_id)
    assert (group["pending"], group["failed"]) == (0, 0)
    print(
        f"\n[{backend}] crash run: {len(states)} states; "
        f"{len(states) - (1 + 3 * WIDTH + 2)} retries after a lease ran out "
        "(claims cut by a crash, or held through an outage longer than the lease); "
        f"cut reports: {dict(crew.cut)}; reports refused after a lease expired: "
        f"{len(crew.lost_to_lease)}"
    )


async def report_stall(database_url: str, run_id: str, server: ServerProcess) -> None:
    states = await read_states(database_url, NS, run_id)
    unfinished = [(s.identifier, s.status, s.id) for s in states if s.status != "SUCCESS"]
    log = server.log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(
        f"run stalled: {status_counts(states)}; not succeeded: {unfinished}; "
        f"server started {server.starts} times; its log ends with:\n{log}"
    )


async def _set_up(api: Api) -> str:
    await api.register(
        node("Root", outputs=("i",)),
        node("Split", outputs=("i",)),
        node("Work", inputs=("i",), outputs=("i",)),
        node("Post", inputs=("i",), outputs=("i",)),
        node("Merge", inputs=("i",), outputs=("i",)),
        node("Finish", inputs=("i",), outputs=("i",)),
    )
    await api.create_graph(
        GRAPH,
        {
            "nodes": [
                template_node("Root", "root", NS, {}, ["split"]),
                template_node("Split", "split", NS, {}, ["work"]),
                template_node("Work", "work", NS, {"i": "${{ split.outputs.i }}"}, ["post"]),
                template_node("Post", "post", NS, {"i": "${{ work.outputs.i }}"}, ["merge"]),
                template_node(
                    "Merge",
                    "merge",
                    NS,
                    {"i": "${{ split.outputs.i }}"},
                    ["finish"],
                    unites={"identifier": "split", "strategy": "ALL_SUCCESS"},
                ),
                template_node("Finish", "finish", NS, {"i": "${{ merge.outputs.i }}"}),
            ],
            # A claim cut by the crash comes back as a retry once its lease expires.
            "retry_policy": {"max_retries": 5, "strategy": "FIXED", "backoff_factor": 100},
        },
    )
    return await api.trigger(GRAPH)


def check_nothing_lost_or_doubled(states: list[Any], crew: Crew) -> None:
    by_id = {s.id: s for s in states}
    grouped = by_identifier(states)
    assert set(grouped) == {"root", "split", "work", "post", "merge", "finish"}

    # Each logical state is one chain: the original and its retries (same fanout id),
    # every attempt but the last taken back by lease expiry, the last one succeeded.
    chains: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for state in states:
        chains[state.identifier][state.fanout_id].append(state)
    expected = {"root": 1, "split": WIDTH, "work": WIDTH, "post": WIDTH, "merge": 1, "finish": 1}
    assert {k: len(v) for k, v in chains.items()} == expected
    for identifier, per_fanout in chains.items():
        for attempts in per_fanout.values():
            attempts.sort(key=lambda s: s.retry_count)
            assert [s.retry_count for s in attempts] == list(range(len(attempts))), identifier
            assert attempts[-1].status == "SUCCESS", (identifier, attempts[-1])
            for lost in attempts[:-1]:
                assert lost.status == "RETRY_CREATED", (identifier, lost)
                assert "Lease expired" in (lost.error or ""), lost

    # Every fan-out index appears once per level, carried through the inputs.
    succeeded = by_identifier(s for s in states if s.status == "SUCCESS")
    items = [str(k) for k in range(WIDTH)]
    assert sorted(s.outputs["i"] for s in succeeded["split"]) == sorted(items)
    for identifier in ("work", "post"):
        assert sorted(s.inputs["i"] for s in succeeded[identifier]) == sorted(items), identifier
        assert all(s.outputs == {"i": s.inputs["i"]} for s in succeeded[identifier])
    assert len(succeeded["merge"]) == 1

    # Reports were applied whole: every succeeded state has exactly its successors,
    # every state's direct parent succeeded, and no retried attempt has children.
    children: Counter[tuple[str, str]] = Counter()
    for state in states:
        if state.parents:
            parent_id = list(state.parents.values())[-1]
            assert by_id[parent_id].status == "SUCCESS", (state, by_id[parent_id])
            if state.retry_count == 0 and state.id == state.group_id:  # not a retry or sibling
                children[(parent_id, state.identifier)] += 1
    for state in states:
        successor = SUCCESSORS.get(state.identifier)
        if state.identifier == "split":
            successor = "work"
        wanted = 1 if successor is not None and state.status == "SUCCESS" else 0
        got = children[(state.id, successor)] if successor else 0
        assert got == wanted, (state.identifier, state.id, state.status, got)
    firsts = [s for s in states if s.retry_count == 0 and s.parents]
    assert sum(1 for s in firsts if list(s.parents)[-1] == "split") == WIDTH + 1  # work + merge

    # What the workers saw agrees with the database.
    assert len(crew.claims) == len(set(crew.claims)), "a state was handed out twice"
    claimed_and_applied = {s.id for s in states if s.status == "SUCCESS" and s.id == s.group_id}
    assert set(crew.applied) == claimed_and_applied
    for state_id, outputs in crew.applied.items():
        assert by_id[state_id].outputs == outputs
