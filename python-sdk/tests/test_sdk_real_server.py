"""Distance three: the real state manager on loopback, the runtime in its own process."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sdk_scenario
from exospherehost import GraphNodeModel, Runtime, StateManager
from exospherehost._http import Backoff
from exospherehost.errors import GraphValidationError
from exospherehost.models import RunStatus, RunSummary
from sm_support import ServerProcess, make_database, unique_namespace, wait_registered

SCENARIO = Path(sdk_scenario.__file__)
RUN_TIMEOUT = 120.0

WorkerFactory = Callable[[str], subprocess.Popen[bytes]]


def spawn_worker(
    server: ServerProcess, namespace: str, log_path: Path, state_dir: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``sdk_scenario.py`` as a worker process of ``namespace``; workers given the
    same ``state_dir`` share the scenario's attempt counters."""
    env = server.client_env()
    if state_dir is not None:
        env["SCENARIO_STATE_DIR"] = str(state_dir)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, str(SCENARIO), namespace],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def start_worker(sm_server: ServerProcess, tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start ``sdk_scenario.py`` worker processes; stop them (SIGTERM) at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(namespace: str) -> subprocess.Popen[bytes]:
        process = spawn_worker(sm_server, namespace, tmp_path / f"worker-{len(processes)}.log")
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
async def manager(sm_server: ServerProcess) -> AsyncIterator[StateManager]:
    async with StateManager(
        unique_namespace(), state_manager_uri=sm_server.base_url, key=sm_server.key
    ) as sm:
        yield sm


async def wait_run(sm: StateManager, run_id: str) -> RunSummary:
    async with asyncio.timeout(RUN_TIMEOUT):
        while True:
            run = await sm.get_run(run_id)
            if run.status is not RunStatus.PENDING:
                return run
            await asyncio.sleep(0.2)


async def upsert_scenario(sm: StateManager, graph_name: str = "scenario") -> None:
    await sm.upsert_graph(
        graph_name,
        sdk_scenario.graph_nodes(sm.namespace),
        sdk_scenario.SECRETS,
        retry_policy=sdk_scenario.RETRY_POLICY,
        store_config=sdk_scenario.STORE_CONFIG,
        validation_timeout=30,
        polling_interval=1,
    )


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_end_to_end_scenario(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Store inputs, a fan-out of 100, fan-in, retries, secrets, prune and re-enqueue,
    served by two worker processes; every run ends SUCCESS with exact counts."""
    server: ServerProcess = request.getfixturevalue(
        "sm_server" if backend == "sqlite" else "sm_server_postgres"
    )
    namespace = unique_namespace("e2e")
    workers = [
        spawn_worker(server, namespace, tmp_path / f"worker-{index}.log", tmp_path)
        for index in range(2)
    ]
    try:
        await wait_registered(server.base_url, server.key, namespace, len(sdk_scenario.NODES))
        async with StateManager(namespace, state_manager_uri=server.base_url, key=server.key) as sm:
            await run_scenario(sm)
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            assert await asyncio.to_thread(worker.wait, 30) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


async def run_scenario(sm: StateManager) -> None:
    await upsert_scenario(sm)
    graph = await sm.get_graph("scenario")
    assert graph["validation_status"] == "VALID"
    assert graph["secrets"] == {"api_token": True}

    runs = [
        await sm.trigger("scenario", store={"count": "100", "label": f"run{index}"})
        for index in range(2)
    ]
    results = [await wait_run(sm, run["run_id"]) for run in runs]

    expected = sdk_scenario.expected_counts(100)
    for result in results:
        assert result.status is RunStatus.SUCCESS
        assert result.graph_name == "scenario"
        assert result.model_dump(include=set(expected)) == expected

    listing = await sm.list_runs(1, 10)
    assert listing.total == 2
    assert {run.run_id for run in listing.runs} == {run["run_id"] for run in runs}

    view = await sm.get_run_graph(runs[0]["run_id"])
    assert view.graph_name == "scenario"
    assert view.status is RunStatus.SUCCESS
    assert view.count(identifier="merge") == 1
    assert view.count(identifier="work", status="PRUNED") == 1
    assert view.count(identifier="work", status="RETRY_CREATED") == 2
    assert view.count(identifier="split") == 100
    assert view.node_count == expected["total_count"]
    [merge] = [node for node in view.nodes if node.identifier == "merge"]
    details = await sm.get_run_node("scenario", runs[0]["run_id"], merge.id)
    assert details.outputs == {"summary": "run0 merged 100 items"}


async def test_sigterm_lets_the_running_node_finish(
    sm_server: ServerProcess, manager: StateManager, start_worker: WorkerFactory
) -> None:
    worker = start_worker(manager.namespace)
    await wait_registered(
        sm_server.base_url, sm_server.key, manager.namespace, len(sdk_scenario.NODES)
    )
    await manager.upsert_graph(
        "sleepy",
        [
            GraphNodeModel(
                node_name="Sleepy",
                namespace=manager.namespace,
                identifier="sleepy",
                inputs={"seconds": "1.5"},
            )
        ],
        {},
        validation_timeout=30,
    )
    run = await manager.trigger("sleepy")
    async with asyncio.timeout(30):
        while (await manager.get_run_graph(run["run_id"])).count(status="QUEUED") == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0

    view = await manager.get_run_graph(run["run_id"])
    assert view.status is RunStatus.SUCCESS
    assert view.count(identifier="sleepy", status="SUCCESS") == 1


async def test_upsert_graph_reports_validation_errors(manager: StateManager) -> None:
    with pytest.raises(GraphValidationError) as invalid:
        await manager.upsert_graph(
            "broken",
            [
                GraphNodeModel(
                    node_name="NeverRegistered",
                    namespace=manager.namespace,
                    identifier="only",
                    inputs={},
                )
            ],
            {},
            validation_timeout=30,
        )
    assert invalid.value.status == "INVALID"
    assert invalid.value.errors
    assert "NeverRegistered" in str(invalid.value)


async def test_run_until_idle_in_process(sm_server: ServerProcess, manager: StateManager) -> None:
    """The drain mode against the real server: a whole scenario run, then return."""
    runtime = Runtime(
        manager.namespace,
        "in-process",
        sdk_scenario.NODES,
        state_manager_uri=sm_server.base_url,
        key=sm_server.key,
        workers=8,
        wait_ms=2000,
    )
    registration = asyncio.ensure_future(runtime.run_until_idle(idle_timeout=0.5))
    await wait_registered(
        sm_server.base_url, sm_server.key, manager.namespace, len(sdk_scenario.NODES)
    )
    await registration  # nothing to do yet: returns once idle
    await upsert_scenario(manager)
    run = await manager.trigger("scenario", store={"count": "50"})

    stats = await runtime.run_until_idle(idle_timeout=1.0)

    summary = await manager.get_run(run["run_id"])
    assert summary.status is RunStatus.SUCCESS
    assert summary.model_dump(include={"total_count", "retried_count"}) == {
        "total_count": sdk_scenario.expected_counts(50)["total_count"],
        "retried_count": 2,
    }
    assert stats.pruned == 1
    assert stats.requeued == 1
    assert stats.errored == 2


class RecordingTransport(httpx.AsyncHTTPTransport):
    """The real network transport, remembering each request's path and answer status."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.seen.append((request.url.path, response.status_code))
        return response


async def test_heartbeats_are_accepted_by_the_server(
    sm_server: ServerProcess, manager: StateManager
) -> None:
    transport = RecordingTransport()
    runtime = Runtime(
        manager.namespace,
        "heartbeats",
        [sdk_scenario.Sleepy],
        state_manager_uri=sm_server.base_url,
        key=sm_server.key,
        heartbeat_interval=0.2,
        wait_ms=1000,
        transport=transport,
    )
    await runtime.run_until_idle(idle_timeout=0.2)
    await manager.upsert_graph(
        "beats",
        [
            GraphNodeModel(
                node_name="Sleepy",
                namespace=manager.namespace,
                identifier="sleepy",
                inputs={"seconds": "1"},
            )
        ],
        {},
        validation_timeout=30,
    )
    run = await manager.trigger("beats")
    stats = await runtime.run_until_idle(idle_timeout=0.5)

    beats = [status for path, status in transport.seen if path.endswith("/heartbeat")]
    assert len(beats) >= 2
    assert set(beats) == {200}
    assert stats.executed == 1
    assert (await manager.get_run(run["run_id"])).status is RunStatus.SUCCESS


async def test_result_survives_a_server_crash(tmp_path: Path) -> None:
    """The server is killed (SIGKILL) while a node runs and comes back on the same
    database: the worker process keeps retrying its report, and the run succeeds."""
    workdir = tmp_path / "crashing-server"
    server = ServerProcess(make_database("sqlite", workdir).url, workdir / "data")
    await asyncio.to_thread(server.start)
    namespace = unique_namespace("crash")
    worker = spawn_worker(server, namespace, tmp_path / "worker.log")
    try:
        await wait_registered(server.base_url, server.key, namespace, len(sdk_scenario.NODES))
        async with StateManager(namespace, state_manager_uri=server.base_url, key=server.key) as sm:
            await sm.upsert_graph(
                "sleepy",
                [
                    GraphNodeModel(
                        node_name="Sleepy",
                        namespace=namespace,
                        identifier="sleepy",
                        inputs={"seconds": "2"},
                    )
                ],
                {},
                validation_timeout=30,
            )
            run = await sm.trigger("sleepy")
            async with asyncio.timeout(30):
                while (await sm.get_run_graph(run["run_id"])).count(status="QUEUED") == 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

        await asyncio.to_thread(server.kill)
        await asyncio.sleep(2.5)  # the node finishes while nobody is listening
        assert worker.poll() is None, "the worker died with the server"
        await asyncio.to_thread(server.start)  # same port, key and database

        async with StateManager(namespace, state_manager_uri=server.base_url, key=server.key) as sm:
            async with asyncio.timeout(60):
                while (summary := await sm.get_run(run["run_id"])).status is RunStatus.PENDING:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            assert summary.status is RunStatus.SUCCESS
            details = await sm.get_run_node(
                "sleepy", run["run_id"], (await sm.get_run_graph(run["run_id"])).nodes[0].id
            )
            assert details.outputs == {"slept": "2"}
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        server.stop()


class LosingTransport(httpx.AsyncHTTPTransport):
    """The network, made unreliable: the first answer to every report is lost after the
    server applied it, and every third claim request fails before it is sent.

    Reports sent together (``states/exchange``) lose their answer the first time any of
    them is sent. A claim riding on such a request is taken out before it reaches the
    server: states claimed by a lost answer would wait for their lease to run out, which
    is not what this test is about."""

    REPORTS = frozenset({"executed", "errored", "prune", "re-enqueue-after"})

    def __init__(self) -> None:
        super().__init__()
        self.lost: Counter[str] = Counter()
        self.claims = 0
        self._answered: set[tuple[str, str]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        kind = path.rsplit("/", 1)[-1]
        if kind == "enqueue":
            self.claims += 1
            if self.claims % 3 == 0:
                raise httpx.ConnectError("connection refused (injected)", request=request)
        reports = self._reports(request, kind)
        new = [report for report in reports if report not in self._answered]
        if kind == "exchange" and new:
            body = json.loads(request.content)
            body.pop("claim", None)
            request = httpx.Request(
                request.method, request.url, headers=_without_length(request.headers), json=body
            )
        response = await super().handle_async_request(request)
        if new:
            self._answered.update(new)
            await response.aread()
            await response.aclose()
            self.lost.update(report_kind for _, report_kind in new)
            raise httpx.RemoteProtocolError("connection lost after the request", request=request)
        return response

    def _reports(self, request: httpx.Request, kind: str) -> list[tuple[str, str]]:
        if kind in self.REPORTS:
            return [(request.url.path.rsplit("/", 2)[-2], kind)]
        if kind == "exchange":
            body = json.loads(request.content)
            return [(r["state_id"], r["kind"]) for r in body["reports"]]
        return []


def _without_length(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() != "content-length"}


async def test_lost_answers_neither_lose_nor_repeat_work(
    sm_server: ServerProcess, manager: StateManager
) -> None:
    """Every report's first answer is lost after the server applied it: the runtime
    retries, the server refuses the duplicate, and the run's counts are exactly those of
    a clean run."""
    transport = LosingTransport()
    runtime = Runtime(
        manager.namespace,
        "unreliable-network",
        sdk_scenario.NODES,
        state_manager_uri=sm_server.base_url,
        key=sm_server.key,
        workers=8,
        wait_ms=1000,
        retry_backoff=Backoff(base=0.01, cap=0.1),
        transport=transport,
    )
    await runtime.run_until_idle(idle_timeout=0.2)
    await upsert_scenario(manager)
    run = await manager.trigger("scenario", store={"count": "50", "label": "lossy"})

    stats = await runtime.run_until_idle(idle_timeout=1.0)

    summary = await manager.get_run(run["run_id"])
    assert summary.status is RunStatus.SUCCESS
    expected = sdk_scenario.expected_counts(50)
    assert summary.model_dump(include=set(expected)) == expected
    assert transport.lost["executed"] > 50
    assert transport.lost["errored"] == 2
    assert transport.lost["prune"] == 1
    assert transport.lost["re-enqueue-after"] == 1
    assert stats.undelivered == 0
    assert stats.rejected >= transport.lost["executed"]
