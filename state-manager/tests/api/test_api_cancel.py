"""Run cancellation against a real server on both backends, with a real SDK worker.

A run of ``start → hold → next`` (plus ``idle``, which no worker serves): ``hold``
blocks in the worker until the test opens its gate file. Cancelling the run turns the
waiting ``idle`` state and the executing ``hold`` state CANCELLED at once; the worker's
report of ``hold`` (or its heartbeat) is then refused with 409 ``run_cancelled``, the
worker logs it and moves on, and ``next`` is never created.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sm_api import Api, expect_error, node, template_node
from sm_support import (
    API_KEY,
    RunningServer,
    read_states,
    serve,
    stop_process,
    test_settings,
    unique_namespace,
    wait_registered,
)

WORKER = Path(__file__).with_name("cancel_worker.py")


@dataclass
class Setup:
    api: Api
    server: RunningServer
    gates: Path
    log: Path


@pytest.fixture
def running(database_url: str, tmp_path: Path) -> Iterator[RunningServer]:
    settings = test_settings(database_url, tmp_path / "data", lease_check_ms=100)
    with serve(settings) as server:
        yield server


@contextlib.contextmanager
def _worker(server: RunningServer, namespace: str, log: Path, heartbeat_s: float) -> Iterator[None]:
    env = {
        "EXOSPHERE_STATE_MANAGER_URI": server.base_url,
        "EXOSPHERE_API_KEY": API_KEY,
        "PATH": "/usr/bin:/bin",
    }
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), namespace, str(heartbeat_s)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        finally:
            stop_process(worker)


@contextlib.asynccontextmanager
async def _setup(server: RunningServer, tmp_path: Path, heartbeat_s: float) -> AsyncIterator[Setup]:
    namespace = unique_namespace("cancel")
    gates = tmp_path / "gates"
    gates.mkdir()
    log = tmp_path / "worker.log"
    with _worker(server, namespace, log, heartbeat_s):
        await wait_registered(server.base_url, API_KEY, namespace, 3)
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=30
        ) as client:
            api = Api(client, namespace)
            r = await client.put(
                f"{api.base}/nodes/",
                json={"runtime_name": "nobody", "nodes": [node("Idle", ("gate",))]},
            )
            assert r.status_code == 200, r.text
            ns = namespace
            await api.create_graph(
                "g",
                {
                    "nodes": [
                        template_node("Start", "start", ns, {"gate": "${{ store.gate }}"},
                                      ["hold", "idle"]),
                        template_node("Hold", "hold", ns,
                                      {"gate": "${{ start.outputs.gate }}"}, ["next"]),
                        template_node("Idle", "idle", ns,
                                      {"gate": "${{ start.outputs.gate }}"}),
                        template_node("Next", "next", ns,
                                      {"gate": "${{ hold.outputs.gate }}"}),
                    ],
                    "retry_policy": {"max_retries": 0},
                    "store_config": {"required_keys": ["gate"]},
                },
            )  # fmt: skip
            yield Setup(api, server, gates, log)


async def _statuses(api: Api, run_id: str) -> dict[str, str]:
    view = await api.run_graph(run_id)
    return {n["identifier"]: n["status"] for n in view["nodes"]}


async def _until(
    check: Callable[[], Awaitable[bool] | bool], what: str, limit_s: float = 20.0
) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        done = check()
        if not isinstance(done, bool):
            done = await done
        if done:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _start_held_run(setup: Setup) -> str:
    gate = setup.gates / "hold"
    run_id = await setup.api.trigger("g", store={"gate": str(gate)})

    async def held() -> bool:
        statuses = await _statuses(setup.api, run_id)
        return statuses.get("hold") == "QUEUED" and statuses.get("idle") == "CREATED"

    await _until(held, "hold to be executing")
    await _until(lambda: _logged(setup.log, "holding"), "the worker to run hold")
    return run_id


def _logged(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


async def _cancel(api: Api, run_id: str) -> httpx.Response:
    return await api.client.post(f"{api.base}/run/{run_id}/cancel")


async def test_cancel_pending_and_executing_states_refuses_the_report(
    running: RunningServer, database_url: str, tmp_path: Path
) -> None:
    async with _setup(running, tmp_path, heartbeat_s=0) as setup:
        api = setup.api
        run_id = await _start_held_run(setup)

        r = await _cancel(api, run_id)
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["run_id"] == run_id
        assert first["status"] == "CANCELLED"
        assert first["cancelled_states"] == 2  # idle (waiting) and hold (executing)
        assert await _statuses(api, run_id) == {
            "start": "SUCCESS",
            "hold": "CANCELLED",
            "idle": "CANCELLED",
        }
        # Cancelling twice is harmless and answers the same.
        again = await _cancel(api, run_id)
        assert (again.status_code, again.json()) == (200, first)

        # The run reads CANCELLED everywhere.
        assert (await api.run_summary(run_id))["status"] == "CANCELLED"
        r = await api.client.get(f"{api.base}/run/{run_id}")
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["counts"]["CANCELLED"]) == ("CANCELLED", 2)
        assert (await api.run_graph(run_id))["status"] == "CANCELLED"

        # The worker finishes hold: its report is refused, it logs that and goes on.
        (setup.gates / "hold").touch()
        await _until(lambda: _logged(setup.log, "its run was cancelled"), "the refusal")
        await asyncio.sleep(0.5)  # had the report been retried or next created, we would see
        log = setup.log.read_text(errors="replace")
        assert log.count("its run was cancelled") == 1, log
        states = await read_states(database_url, api.ns, run_id)
        assert sorted((s.identifier, s.status) for s in states) == [
            ("hold", "CANCELLED"),
            ("idle", "CANCELLED"),
            ("start", "SUCCESS"),
        ]
        hold = next(s for s in states if s.identifier == "hold")
        start = next(s for s in states if s.identifier == "start")

        # Every other way on is refused too: a report, a heartbeat, an exchange, a retry.
        for action, body in (
            ("executed", {"outputs": []}),
            ("errored", {"error": "x"}),
            ("heartbeat", {}),
        ):
            refused = expect_error(await api.post_state(hold.id, action, body), 409)
            assert "cancelled" in refused
        r = await api.post_state(hold.id, "heartbeat", {})
        assert r.json()["code"] == "run_cancelled"
        r = await api.client.post(
            f"{api.base}/states/exchange",
            json={"reports": [{"state_id": hold.id, "kind": "executed", "outputs": []}]},
        )
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert (result["status_code"], result["code"]) == (409, "run_cancelled")
        r = await api.post_state(start.id, "manual-retry", {"fanout_id": "again"})
        assert (r.status_code, r.json()["code"]) == (409, "run_cancelled")
        assert len(await read_states(database_url, api.ns, run_id)) == 3


async def test_cancel_stops_a_node_whose_heartbeat_is_refused(
    running: RunningServer, tmp_path: Path
) -> None:
    async with _setup(running, tmp_path, heartbeat_s=0.2) as setup:
        run_id = await _start_held_run(setup)
        r = await _cancel(setup.api, run_id)
        assert r.status_code == 200, r.text
        # The gate stays closed: the worker learns of the cancellation from a heartbeat.
        await _until(
            lambda: _logged(setup.log, "its run was cancelled; stopping the node"),
            "the worker to stop the node",
        )
        # The slot is free again: the worker serves the next run.
        (setup.gates / "hold").touch()
        second = await setup.api.trigger("g", store={"gate": str(setup.gates / "hold")})

        async def next_done() -> bool:
            return (await _statuses(setup.api, second)).get("next") == "SUCCESS"

        await _until(next_done, "the next run to go on")


async def test_cancel_finished_unknown_and_foreign_runs(client: httpx.AsyncClient) -> None:
    api = Api(client, unique_namespace("cancel"))
    await api.register(node("A"))
    await api.create_graph(
        "one", {"nodes": [template_node("A", "a", api.ns)], "retry_policy": {"max_retries": 0}}
    )
    done = await api.trigger("one")
    await api.executed((await api.claim_one("A"))["state_id"])
    detail = expect_error(await _cancel(api, done), 409)
    assert "already finished (SUCCESS)" in detail
    failed = await api.trigger("one")
    await api.errored((await api.claim_one("A"))["state_id"])
    assert "already finished (FAILED)" in expect_error(await _cancel(api, failed), 409)
    assert (await api.run_summary(done))["status"] == "SUCCESS"

    expect_error(await _cancel(api, "00000000-0000-0000-0000-000000000000"), 404)
    pending = await api.trigger("one")
    expect_error(await _cancel(Api(client, "elsewhere"), pending), 404)
    # A pending run that no worker started: its root never starts.
    r = await _cancel(api, pending)
    assert (r.status_code, r.json()["cancelled_states"]) == (200, 1)
    assert await api.claim("A") == []


async def test_no_join_or_retry_starts_in_a_cancelled_run(
    client: httpx.AsyncClient, database_url: str
) -> None:
    api = Api(client, unique_namespace("cancel"))
    ns = api.ns
    await api.register(node("A", outputs=("x",)), node("B", inputs=("x",)), node("J"))
    await api.create_graph(
        "join",
        {
            "nodes": [
                template_node("A", "a", ns, {}, ["b"]),
                template_node("B", "b", ns, {"x": "${{ a.outputs.x }}"}),
                template_node("J", "j", ns, unites={"identifier": "a", "strategy": "ALL_DONE"}),
            ],
            "retry_policy": {"max_retries": 1, "strategy": "FIXED", "backoff_factor": 1},
        },
    )
    run_id = await api.trigger("join")
    await api.executed((await api.claim_one("A"))["state_id"], *({"x": str(i)} for i in range(3)))
    first, second, third = await api.claim("B")
    await api.executed(first["state_id"])
    assert (await api.errored(second["state_id"]))["retry_created"] is True
    r = await _cancel(api, run_id)
    assert (r.status_code, r.json()["cancelled_states"]) == (200, 2)  # third, and the retry
    # The last branch ends: ALL_DONE would now start the join, were the run not cancelled.
    refused = await api.post_state(third["state_id"], "errored", {"error": "late"})
    assert (refused.status_code, refused.json()["code"]) == (409, "run_cancelled")
    assert await api.claim("B", "J") == []
    states = await read_states(database_url, ns, run_id)
    assert sorted((s.identifier, s.retry_count, s.status) for s in states) == [
        ("a", 0, "SUCCESS"),
        ("a", 0, "SUCCESS"),
        ("a", 0, "SUCCESS"),
        ("b", 0, "CANCELLED"),
        ("b", 0, "RETRY_CREATED"),
        ("b", 0, "SUCCESS"),
        ("b", 1, "CANCELLED"),
    ]
