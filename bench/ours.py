"""Our system's side of ``compare.py``: a server process, the SDK ``Runtime`` as the worker
in a process of its own, and this process as the client (the SDK's ``StateManager``).

The workloads use the SDK as a user would, so an improvement of the SDK or the server
shows up here without a change. Only the backlog used for the claim cost and the memory
figure is built with raw API calls (nobody works on it, and nothing in the SDK makes
100,000 states wait without running them).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from benchlib import Api, fresh_server, node, template_node
from exospherehost import GraphNodeModel, StateManager, StoreConfigModel, UnitesModel
from exospherehost.errors import GraphValidationError
from measure import (
    RecordTail,
    WorkloadFailed,
    check_exactly_once,
    cpu_delta,
    cpu_snapshot,
    percentile,
    postgres_processes,
    process_tree,
    rss_bytes,
    stop_process,
    wait_for,
)
from sm_support import secantus_pid
from workloads import (
    CHAIN_STEPS,
    Measured,
    Plan,
    Progress,
    chain_figures,
    chain_keys,
    fan_figures,
    fan_keys,
    fan_width,
    idle_figures,
    new_tag,
    single_figures,
    single_keys,
    units,
)

NAMESPACE = "bench"
BACKLOG_NAMESPACE = "bench-backlog"
HERE = Path(__file__).resolve().parent
# Most outputs one report may carry: the backlog is built from reports this wide.
BACKLOG_FANOUT = 10_000


async def trigger(sm: StateManager, graph: str, store: dict[str, str]) -> None:
    """Start one run (W1, W2: runs started one by one)."""
    await sm.trigger(graph, store=store)


async def trigger_batch(sm: StateManager, graph: str, stores: list[dict[str, str]]) -> None:
    """Start several runs with one call of the SDK's bulk method (W3)."""
    await sm.trigger_many(graph, [{"store": store} for store in stores], chunk_size=len(stores))


# -- graphs -----------------------------------------------------------------------------


def chain_graph() -> list[GraphNodeModel]:
    def ident(k: int) -> str:
        return f"s{k:02}"

    nodes = []
    for k in range(1, CHAIN_STEPS + 1):
        run = "${{ store.run }}" if k == 1 else f"${{{{ {ident(k - 1)}.outputs.run }}}}"
        nodes.append(
            GraphNodeModel(
                node_name="Step",
                namespace=NAMESPACE,
                identifier=ident(k),
                inputs={"run": run, "step": str(k)},
                next_nodes=[ident(k + 1)] if k < CHAIN_STEPS else [],
            )
        )
    return nodes


def fan_graph() -> list[GraphNodeModel]:
    return [
        GraphNodeModel(
            node_name="Fan",
            namespace=NAMESPACE,
            identifier="fan",
            inputs={"run": "${{ store.run }}", "n": "${{ store.n }}"},
            next_nodes=["child"],
        ),
        GraphNodeModel(
            node_name="Child",
            namespace=NAMESPACE,
            identifier="child",
            inputs={"run": "${{ fan.outputs.run }}", "item": "${{ fan.outputs.item }}"},
            next_nodes=["join"],
        ),
        GraphNodeModel(
            node_name="Join",
            namespace=NAMESPACE,
            identifier="join",
            inputs={"run": "${{ store.run }}"},
            unites=UnitesModel(identifier="fan"),
        ),
    ]


def single_graph() -> list[GraphNodeModel]:
    return [
        GraphNodeModel(
            node_name="Single",
            namespace=NAMESPACE,
            identifier="single",
            inputs={"run": "${{ store.run }}", "i": "${{ store.i }}"},
        )
    ]


GRAPHS: dict[str, tuple[Callable[[], list[GraphNodeModel]], list[str]]] = {
    "chain": (chain_graph, ["run"]),
    "fan": (fan_graph, ["run", "n"]),
    "single": (single_graph, ["run", "i"]),
}


# -- the running system -----------------------------------------------------------------


@dataclass
class Ours:
    """A server + worker + client on one fresh database, ready for workloads."""

    backend: str
    plan: Plan
    server_pid: int
    worker: subprocess.Popen[bytes]
    db_processes: Callable[[], list[psutil.Process]] | None
    sm: StateManager
    tail: RecordTail
    reported: int = 0

    def roles(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        roles: dict[str, Callable[[], list[psutil.Process]]] = {
            "server": lambda: process_tree(self.server_pid),
            "worker": lambda: process_tree(self.worker.pid),
        }
        if self.db_processes is not None:
            roles["db"] = self.db_processes
        roles["client"] = lambda: [psutil.Process()]
        return roles

    def _drain(self) -> None:
        for r in self.tail.read_new():
            if r.kind == "reported":
                self.reported = max(self.reported, int(r.key))

    async def measure(
        self, expected: dict[str, set[str]], start: Callable[[], Awaitable[None]]
    ) -> Measured:
        """Start the work, wait until the server has every result, check it ran once."""
        self._drain()
        progress = Progress(expected, reported_target=self.reported + units(expected))
        roles = self.roles()
        before = cpu_snapshot(roles)
        t0 = time.monotonic()
        await start()
        abandoned = threading.Event()

        def check() -> None:
            if abandoned.is_set():
                raise WorkloadFailed("abandoned")
            if self.worker.poll() is not None:
                raise WorkloadFailed(f"the worker exited ({self.worker.returncode})")

        try:
            await asyncio.to_thread(wait_for, self.tail, progress.feed, check=check)
        finally:
            abandoned.set()  # on Ctrl-C, the waiting thread stops too
        after = cpu_snapshot(roles)
        assert progress.end is not None
        self.reported = max(int(r.key) for r in progress.records if r.kind == "reported")
        check_exactly_once(progress.records, expected)
        return Measured(progress, t0, progress.end, cpu_delta(before, after))

    async def run(self, workload: str) -> dict[str, float]:
        """Run one workload of :func:`workloads.schedule`; its figures."""
        if workload == "idle":
            return await self.idle()
        if workload == "w1":
            return await self.w1()
        if workload.startswith("w2_"):
            return await self.w2(fan_width(workload))
        if workload == "w3":
            return await self.w3()
        raise ValueError(f"unknown workload {workload!r}")

    async def chains(self, count: int) -> Measured:
        tags = [new_tag("chain") for _ in range(count)]

        async def start() -> None:
            for tag in tags:
                await trigger(self.sm, "chain", {"run": tag})

        return await self.measure(chain_keys(tags), start)

    async def w1(self) -> dict[str, float]:
        m = await self.chains(self.plan.chain_runs)
        count = self.plan.chain_runs * CHAIN_STEPS
        return chain_figures(m.progress.records, m.t0, m.end) | m.cpu_figures(count)

    async def idle(self) -> dict[str, float]:
        records = []
        for _ in range(self.plan.idle_chains):
            m = await self.chains(1)
            records += m.progress.records
        return idle_figures(records)

    async def w2(self, width: int) -> dict[str, float]:
        tag = new_tag("fan")

        async def start() -> None:
            await trigger(self.sm, "fan", {"run": tag, "n": str(width)})

        m = await self.measure(fan_keys(tag, width), start)
        return fan_figures(m.progress.records, width, m.t0, m.end) | m.cpu_figures(width + 2)

    async def w3(self) -> dict[str, float]:
        tag = new_tag("single")
        count = self.plan.singles
        size = self.plan.trigger_batch
        started: dict[int, float] = {}
        durations: list[float] = []

        async def start() -> None:
            for first in range(0, count, size):
                numbers = range(first, min(first + size, count))
                now = time.monotonic()
                started.update(dict.fromkeys(numbers, now))
                stores = [{"run": tag, "i": str(i)} for i in numbers]
                await trigger_batch(self.sm, "single", stores)
                durations.append(time.monotonic() - now)

        m = await self.measure(single_keys(tag, count), start)
        figures = single_figures(m.progress.records, tag, m.t0, m.end, started, durations)
        return figures | m.cpu_figures(count)


@contextlib.contextmanager
def worker_process(server_env: dict[str, str], records: Path, log: Path) -> Any:
    """``ours_worker.py`` in its own process (own session: Ctrl-C reaches the harness
    only, which stops the worker itself)."""
    env = server_env | {"EXOSPHERE_LOG_LEVEL": "WARNING"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "ours_worker.py"),
                "--namespace",
                NAMESPACE,
                "--records",
                str(records),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


async def upsert_graphs(sm: StateManager, deadline_s: float = 60.0) -> None:
    """Create the graphs, retrying while the worker has not registered its nodes yet."""
    deadline = time.monotonic() + deadline_s
    for name, (build, keys) in GRAPHS.items():
        while True:
            try:
                await sm.upsert_graph(
                    name,
                    build(),
                    secrets={},
                    store_config=StoreConfigModel(required_keys=keys),
                    polling_interval=1,
                )
                break
            except GraphValidationError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running_system(backend: str, plan: Plan, env: dict[str, str]) -> AsyncIterator[Ours]:
    async with fresh_server(backend, env) as (server, database):
        assert server.process is not None
        with tempfile.TemporaryDirectory(prefix="exo-bench-records-") as tmp:
            records = Path(tmp) / "records"
            records.mkdir()
            client_env = server.client_env()
            with worker_process(client_env, records / "worker.tsv", Path(tmp) / "worker.log") as (
                worker
            ):
                sm = StateManager(NAMESPACE, server.base_url, server.key)
                try:
                    await upsert_graphs(sm)
                    yield Ours(
                        backend=backend,
                        plan=plan,
                        server_pid=server.process.pid,
                        worker=worker,
                        db_processes=database_processes(backend, database.name),
                        sm=sm,
                        tail=RecordTail(records),
                    )
                finally:
                    await sm.aclose()
                if worker.poll() is not None:
                    log = (Path(tmp) / "worker.log").read_text(errors="replace")
                    raise RuntimeError(f"the worker exited early ({worker.returncode}):\n{log}")


def database_processes(backend: str, name: str | None) -> Callable[[], list[psutil.Process]] | None:
    """The processes serving the benchmark's database, whose CPU counts as the database's:
    PostgreSQL's backends of that database, or the SecantusDB server of this session."""
    if backend == "postgres" and name is not None:
        return lambda: postgres_processes(name)
    if backend == "mongo":
        pid = secantus_pid()
        if pid is not None:
            return lambda: process_tree(pid)
    return None


# -- backlog: claim cost and memory with many claimable states ---------------------------


async def grow_backlog(api: Api, count: int) -> None:
    """Make ``count`` more ``Item`` states claimable: fan-out reports of up to
    ``BACKLOG_FANOUT`` outputs, each by a root state claimed and reported here."""
    while count > 0:
        width = min(count, BACKLOG_FANOUT)
        await api.trigger("backlog", store={})
        (root,) = await api.claim("Root", batch_size=1)
        await api.executed(root["state_id"], *({"v": str(i)} for i in range(width)))
        count -= width


async def claim_cost(api: Api, samples: int) -> float:
    """Median seconds of one claim request (batch size 1) against the current backlog,
    asking for both nodes of the graph, as a worker that runs them does (a claim for
    several nodes must not read the backlog of all of them)."""
    durations = []
    for _ in range(samples):
        started = time.perf_counter()
        states = await api.claim("Item", "Root", batch_size=1)
        durations.append(time.perf_counter() - started)
        if len(states) != 1:
            raise RuntimeError(f"a claim from the backlog returned {len(states)} states")
    return percentile(durations, 0.5)


async def backlog(backend: str, plan: Plan) -> dict[str, float]:
    """Claim cost at the two backlog sizes and the server's memory at the larger one.

    A server of its own (nothing else ran on it); ``samples`` extra states per size, so
    the backlog never drops below the nominal size while claims take states from it.
    """
    small, large = plan.backlogs
    samples = plan.claim_samples
    env = {"MAX_FANOUT": str(BACKLOG_FANOUT)}
    async with fresh_server(backend, env) as (server, _database):
        assert server.process is not None
        pid = server.process.pid
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=server.headers, timeout=300
        ) as client:
            api = Api(client, BACKLOG_NAMESPACE)
            await api.register(node("Root", outputs=("v",)), node("Item", inputs=("v",)))
            await api.create_graph(
                "backlog",
                {
                    "nodes": [
                        template_node("Root", "root", BACKLOG_NAMESPACE, {}, ["item"]),
                        template_node(
                            "Item", "item", BACKLOG_NAMESPACE, {"v": "${{ root.outputs.v }}"}
                        ),
                    ]
                },
            )
            rss_start = rss_bytes(process_tree(pid))
            await grow_backlog(api, small + samples)
            cost_small = await claim_cost(api, samples)
            await grow_backlog(api, large - small)
            cost_large = await claim_cost(api, samples)
            # Memory with the large backlog, after the server had a moment to settle.
            await asyncio.sleep(1.0)
            rss = rss_bytes(process_tree(pid))
    return {
        f"claim_{small}_ms": cost_small * 1000,
        f"claim_{large}_ms": cost_large * 1000,
        "claim_ratio": cost_large / cost_small,
        "memory_mb": rss / 2**20,
        "memory_growth_mb": (rss - rss_start) / 2**20,
    }
