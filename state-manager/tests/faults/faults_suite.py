"""Fault-injection suite: servers, workers and PostgreSQL die mid-run; nothing is lost.

Several state-manager processes share one database behind a round-robin TCP load
balancer (``faults_proxy.py``); worker processes on our SDK (``faults_worker.py``) reach
them through it, as in production. Runs of a fan-out + join are triggered in waves, and
while each wave executes the suite injects one fault (see :meth:`FaultRun.drive`):

* ``server``: ``kill -9`` a server process, then start it again;
* ``worker``: ``kill -9`` the worker running the most nodes, then start a new one;
* ``postgres``: crash PostgreSQL (``pg_ctl stop -m immediate``) and start it again.

PostgreSQL runs as a throwaway cluster of the suite's own (see ``PostgresCluster``), never
the shared server. Afterwards every state row, every journaled execution and every
fault are judged by :mod:`faults_analysis`: each run must end SUCCESS, no task may be
lost, and a task may only run twice when a kill cut its first execution.

Run it on its own (from the repository root)::

    uv run python state-manager/tests/faults/faults_suite.py --size full --backend both

or under pytest (``test_faults.py``; ``EXOSPHERE_FAULTS_SIZE=small|full``, small by default).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
for folder in (HERE, TESTS):  # when run as a script rather than under pytest
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import faults_worker  # noqa: E402
import httpx  # noqa: E402
from exospherehost import StateManager  # noqa: E402
from faults_analysis import (  # noqa: E402
    Execution,
    Fault,
    Outcome,
    StateFact,
    analyse,
    render,
)
from sm_support import (  # noqa: E402
    API_KEY,
    PostgresCluster,
    ServerProcess,
    claimed_state_ids,
    free_port,
    read_states,
    wait_registered,
)
from state_manager.store.database import LISTENER_APPLICATION_NAME  # noqa: E402

PROXY = HERE / "faults_proxy.py"
WORKER = HERE / "faults_worker.py"
NAMESPACE = "faults"
LEASE_SECONDS = 6
HEARTBEAT_SECONDS = 1.0
# A server kill waits this long at most for the server to be busy with a report (one
# route per outcome, or several with a claim in states/exchange).
AIM_SECONDS = 5.0
REPORTS = frozenset({"executed", "errored", "prune", "re-enqueue-after", "exchange"})


@dataclass(frozen=True)
class Size:
    runs: int
    width: int
    rounds: int  # how many times each kind of fault is injected
    work_ms: tuple[int, int]  # how long one Work node runs (uniform between the two)
    slots: int  # nodes one worker process runs at once
    deadline_s: float  # for all runs to finish


SIZES = {
    "small": Size(runs=4, width=40, rounds=1, work_ms=(150, 600), slots=3, deadline_s=150),
    "full": Size(runs=20, width=100, rounds=2, work_ms=(100, 700), slots=8, deadline_s=600),
}


@dataclass(frozen=True)
class Topology:
    servers: int
    workers: int
    kinds: tuple[str, ...]


TOPOLOGIES = {
    "postgres": Topology(servers=3, workers=4, kinds=("server", "worker", "postgres")),
    "sqlite": Topology(servers=2, workers=4, kinds=("server", "worker")),
}


def size_from_env() -> Size:
    name = os.environ.get("EXOSPHERE_FAULTS_SIZE", "small")
    if name not in SIZES:
        raise ValueError(f"EXOSPHERE_FAULTS_SIZE must be one of {sorted(SIZES)}, not {name!r}")
    return SIZES[name]


# -- the journals -------------------------------------------------------------------


class Journals:
    """Reads the workers' execution journals as they grow."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}
        self._open: dict[tuple[int, str, str, str], list[float]] = {}
        self.executions: list[Execution] = []
        self.work_done: Counter[str] = Counter()  # by run label
        self.unreadable = 0

    def poll(self) -> None:
        for path in sorted(self.folder.glob("worker-*.jsonl")):
            with path.open("rb") as stream:
                stream.seek(self._offsets.get(path, 0))
                data = stream.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            for raw in complete.splitlines():
                self._line(raw)

    def _line(self, raw: bytes) -> None:
        try:
            line = json.loads(raw)
            key = (int(line["pid"]), str(line["node"]), str(line["run"]), str(line["item"]))
            moment = float(line["t"])
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1
            return
        if line["e"] == "start":
            self._open.setdefault(key, []).append(moment)
            return
        starts = self._open.get(key)
        if not starts:
            self.unreadable += 1
            return
        pid, node, run, item = key
        self.executions.append(Execution(node, run, item, pid, starts.pop(0), moment))
        if node == "work":
            self.work_done[run] += 1

    def running(self, pid: int) -> int:
        """Executions started by ``pid`` and not finished."""
        return sum(len(starts) for key, starts in self._open.items() if key[0] == pid)

    def all_executions(self) -> list[Execution]:
        """Finished executions and those cut (``end`` None)."""
        cut = [
            Execution(node, run, item, pid, start, None)
            for (pid, node, run, item), starts in self._open.items()
            for start in starts
        ]
        return [*self.executions, *cut]


# -- the cluster under test -----------------------------------------------------------


@dataclass
class Cluster:
    """Database, servers, load balancer and workers of one fault run."""

    backend: str
    size: Size
    topology: Topology
    workdir: Path
    database_url: str = ""
    postgres: PostgresCluster | None = None
    servers: list[ServerProcess] = field(default_factory=list)
    proxy: subprocess.Popen[bytes] | None = None
    proxy_port: int = 0  # both picked by start_proxy
    control_port: int = 0
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    kills: dict[int, float] = field(default_factory=dict)
    spawned: int = 0

    @property
    def url(self) -> str:
        """Where clients go: the load balancer."""
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def journal_dir(self) -> Path:
        return self.workdir / "journals"

    def start(self) -> None:
        self.journal_dir.mkdir(parents=True)
        if self.backend == "postgres":
            self.postgres = PostgresCluster.create()
            self.postgres.start()
            self.database_url = self.postgres.create_database("exo_faults")
        else:
            self.database_url = f"sqlite:///{self.workdir / 'state.db'}"
        env = {"STATE_LEASE_SECONDS": str(LEASE_SECONDS), "LOG_LEVEL": "INFO"}
        for index in range(self.topology.servers):
            server = ServerProcess(self.database_url, self.workdir / f"server-{index + 1}", env)
            self.servers.append(server)
        self.servers[0].start()  # migrates the database; then the others, all at once
        with concurrent.futures.ThreadPoolExecutor() as pool:
            list(pool.map(ServerProcess.start, self.servers[1:]))
        self.start_proxy()
        for _ in range(self.topology.workers):
            self.spawn_worker()

    def start_proxy(self) -> None:
        """Start the load balancer. Its ports are picked just before it starts, and picked
        again when another process took one first (the balancer then exits at once)."""
        backends = [str(server.port) for server in self.servers]
        for _ in range(5):
            self.proxy_port, self.control_port = free_port(), free_port()
            ports = [str(self.proxy_port), str(self.control_port)]
            with (self.workdir / "proxy.log").open("wb") as log:
                proxy = subprocess.Popen(
                    [sys.executable, str(PROXY), *ports, *backends],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.proxy = proxy
            wait_until(self.proxy_settled, 30, "the load balancer to answer")
            if proxy.poll() is None:
                return
        raise AssertionError("the load balancer exited at start 5 times (see proxy.log)")

    def proxy_settled(self) -> bool:
        """Whether the load balancer answers, or has exited."""
        assert self.proxy is not None
        return self.proxy.poll() is not None or httpx_ok(f"{self.url}/health")

    def spawn_worker(self) -> int:
        self.spawned += 1
        env = {
            **os.environ,
            "EXOSPHERE_STATE_MANAGER_URI": self.url,
            "EXOSPHERE_API_KEY": API_KEY,
            "EXOSPHERE_LOG_LEVEL": "WARNING",
            "FAULTS_HEARTBEAT_S": str(HEARTBEAT_SECONDS),
            "FAULTS_WORK_MS": ",".join(str(ms) for ms in self.size.work_ms),
            "FAULTS_SLOTS": str(self.size.slots),
        }
        with (self.workdir / f"worker-{self.spawned}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, str(WORKER), NAMESPACE, str(self.journal_dir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.workers[process.pid] = process
        return process.pid

    async def waiting_requests(self) -> dict[int, list[str]]:
        """The requests waiting for an answer on each server, from the load balancer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.control_port)
        try:
            answer = json.loads(await reader.read())
        finally:
            writer.close()
        return {int(port): requests for port, requests in answer.items()}

    def kill_worker(self, pid: int) -> None:
        process = self.workers.pop(pid)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        self.kills[pid] = time.time()

    def stop_workers(self) -> list[int | None]:
        """SIGTERM every worker (a graceful stop); their exit codes."""
        for process in self.workers.values():
            process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for process in self.workers.values():
            try:
                codes.append(process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes.append(None)
        self.workers.clear()
        return codes

    def close(self) -> None:
        """Stop everything that is still running; safe to call more than once."""
        for process in self.workers.values():
            process.kill()
            process.wait()
        self.workers.clear()
        if self.proxy is not None:
            self.proxy.kill()
            self.proxy.wait()
            self.proxy = None
        for server in self.servers:
            server.stop()
        if self.postgres is not None:
            self.postgres.destroy()
            self.postgres = None

    def server_answers(self) -> Counter[int]:
        """5xx answers in the servers' access logs, by status (every start of each)."""
        found: Counter[int] = Counter()
        for server in self.servers:
            for log in server.data_dir.glob("server-*.log"):
                for line in read_json_lines(log):
                    status = line.get("status")
                    access = line.get("logger") == "state_manager.access"
                    if access and isinstance(status, int) and status >= 500:
                        found[int(status)] += 1
        return found


def read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log, one a line; other lines are skipped."""
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    yield line


def httpx_ok(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def wait_until(check: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s:.0f} s waiting for {what}")
        time.sleep(0.1)


# -- database reads -------------------------------------------------------------------


async def in_flight(database_url: str) -> set[str]:
    """Ids of the claimed states (QUEUED) of the suite's namespace, straight from the database."""
    return await claimed_state_ids(database_url, NAMESPACE)


async def listeners(database_url: str) -> int:
    """PostgreSQL sessions that listen for work notifications on the suite's database."""
    import asyncpg

    connection = await asyncpg.connect(database_url, timeout=5)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1",
            LISTENER_APPLICATION_NAME,
        )
        return int(count)
    finally:
        await connection.close()


async def all_facts(database_url: str, run_ids: list[str]) -> list[StateFact]:
    facts: list[StateFact] = []
    for run_id in run_ids:
        for row in await read_states(database_url, NAMESPACE, run_id):
            facts.append(
                StateFact(
                    id=row.id,
                    run_id=row.run_id,
                    identifier=row.identifier,
                    status=row.status,
                    inputs=row.inputs,
                    outputs=row.outputs,
                    error=row.error,
                    group_id=row.group_id,
                    retry_count=row.retry_count,
                    created_at=row.created_at,
                    updated_at=row.updated_at,
                )
            )
    return facts


# -- the suite ------------------------------------------------------------------------


@dataclass
class Report:
    backend: str
    title: str
    outcome: Outcome
    table: str
    answers: Counter[int]
    workdir: Path

    def failures(self) -> list[str]:
        found = self.outcome.failures()
        if self.answers[500]:
            found.append(f"the servers answered 500 {self.answers[500]} times (see their logs)")
        return found


class FaultRun:
    """One backend's run of the suite."""

    def __init__(self, backend: str, size: Size, workdir: Path) -> None:
        self.cluster = Cluster(backend, size, TOPOLOGIES[backend], workdir)
        self.size = size
        self.journals = Journals(self.cluster.journal_dir)
        self.faults: list[Fault] = []
        self.labels: dict[str, str] = {}
        self.started_at = 0.0
        self.victims = 0
        self.problems: list[str] = []
        self.killed_ports: dict[int, int] = {}  # fault index -> port of the server killed

    @property
    def plan(self) -> list[str]:
        return list(self.cluster.topology.kinds) * self.size.rounds

    async def execute(self) -> Report:
        cluster = self.cluster
        try:
            await asyncio.to_thread(cluster.start)
            async with StateManager(NAMESPACE, state_manager_uri=cluster.url, key=API_KEY) as sm:
                await self.set_up(sm)
                await self.drive(sm)
                status = await self.wait_for_runs(sm)
            codes = await asyncio.to_thread(cluster.stop_workers)
            answers = cluster.server_answers()
            for server in cluster.servers:
                await asyncio.to_thread(server.stop)
            facts = await all_facts(cluster.database_url, list(self.labels))
            self.journals.poll()
            self.describe_hits()
        finally:
            await asyncio.to_thread(cluster.close)
        outcome = analyse(
            labels=self.labels,
            width=self.size.width,
            states=facts,
            executions=self.journals.all_executions(),
            kills=cluster.kills,
            faults=self.faults,
            run_status=status,
        )
        outcome.problems += self.problems
        if any(code != 0 for code in codes):
            outcome.problems.append(f"workers did not stop cleanly on SIGTERM: exit codes {codes}")
        if self.journals.unreadable:
            outcome.problems.append(f"{self.journals.unreadable} unreadable journal lines")
        topology = cluster.topology
        title = (
            f"{cluster.backend}: {topology.servers} servers behind a load balancer, "
            f"{topology.workers} workers, {self.size.runs} runs of fan-out "
            f"{self.size.width} + join"
        )
        answered = ", ".join(f"{code} x{n}" for code, n in sorted(answers.items())) or "none"
        table = render(title, outcome, self.started_at, [("5xx answers", answered)])
        return Report(cluster.backend, title, outcome, table, answers, cluster.workdir)

    async def set_up(self, sm: StateManager) -> None:
        await wait_registered(self.cluster.url, API_KEY, NAMESPACE, len(faults_worker.NODES))
        await sm.upsert_graph(
            faults_worker.GRAPH,
            faults_worker.graph_nodes(NAMESPACE),
            {},
            retry_policy=faults_worker.RETRY_POLICY,
            store_config=faults_worker.STORE_CONFIG,
            validation_timeout=60,
        )

    async def drive(self, sm: StateManager) -> None:
        """Trigger the runs in waves, one more wave than faults, and inject each fault
        while its wave's work is under way, once the previous fault's component is
        back and what it had in flight is settled. However slow the machine, every
        fault lands on running work, and its recovery is measured apart from the others."""
        plan = self.plan
        waves = len(plan) + 1
        if self.size.runs < waves:
            raise ValueError(f"{len(plan)} faults need at least {waves} runs")
        self.started_at = time.time()
        for wave in range(waves):
            if self.faults:
                await self.wait_settled(self.faults[-1])
            count = self.size.runs // waves + (1 if wave < self.size.runs % waves else 0)
            labels = [await self.trigger(sm) for _ in range(count)]
            if wave < len(plan):
                await self.wait_under_way(labels)
                self.faults.append(await self.inject(plan[wave]))

    async def trigger(self, sm: StateManager) -> str:
        """Start one run (only while no fault is under way: a trigger is not retried)."""
        label = f"r{len(self.labels):02d}-{uuid.uuid4().hex[:6]}"
        store = {"run": label, "width": str(self.size.width)}
        created = await sm.trigger(faults_worker.GRAPH, store=store)
        self.labels[str(created["run_id"])] = label
        return label

    async def wait_settled(self, fault: Fault) -> None:
        """Until no state in flight around ``fault`` is still claimed (a killed worker's
        come back when their lease runs out); a problem after a minute."""
        deadline = time.monotonic() + 60
        while fault.watched & await in_flight(self.cluster.database_url):
            if time.monotonic() > deadline:
                self.problems.append(f"states in flight at the {fault.kind} fault never settled")
                return
            await asyncio.sleep(0.2)

    async def wait_under_way(self, labels: list[str]) -> None:
        """Until a third of the work of ``labels`` is done (a problem after two minutes)."""
        goal = len(labels) * self.size.width // 3
        deadline = time.monotonic() + 120
        while sum(self.journals.work_done[label] for label in labels) < goal:
            if time.monotonic() > deadline:
                self.problems.append(f"runs {labels} did not get under way within two minutes")
                return
            await asyncio.sleep(0.05)
            self.journals.poll()

    async def inject(self, kind: str) -> Fault:
        """Inject one fault and wait until its component is back. The states it watches
        are those claimed just before it, just after it (claims a kill cut after their
        commit) and once the component is back."""
        cluster = self.cluster
        watched = await in_flight(cluster.database_url)
        hit = ""
        if kind == "server":
            server = cluster.servers[self.victims % len(cluster.servers)]
            self.victims += 1
            target = f"server {cluster.servers.index(server) + 1} of {len(cluster.servers)}"
            self.killed_ports[len(self.faults)] = server.port
            await self.aim_at(server.port)
            at = time.time()
            server.kill()
            watched |= await in_flight(cluster.database_url)
            await asyncio.to_thread(server.start)
        elif kind == "worker":
            self.journals.poll()
            pid = max(cluster.workers, key=self.journals.running)
            target = f"pid {pid}"
            hit = f"{self.journals.running(pid)} nodes running"
            at = time.time()
            cluster.kill_worker(pid)
            cluster.spawn_worker()
        elif kind == "postgres":
            assert cluster.postgres is not None
            target = "immediate stop, start"
            at = time.time()
            await asyncio.to_thread(cluster.postgres.stop, "immediate")
            await asyncio.to_thread(cluster.postgres.start)
            await self.wait_servers_recovered()
        else:
            raise ValueError(f"unknown fault {kind!r}")
        back_at = time.time()
        watched |= await in_flight(cluster.database_url)
        return Fault(kind, target, at, back_at, frozenset(watched), hit)

    async def aim_at(self, port: int) -> None:
        """Wait (up to a few seconds) until the server on ``port`` is busy with a report,
        so that the kill cuts one: the moment a commit and its answer can part ways."""
        deadline = time.monotonic() + AIM_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if REPORTS & set((await self.cluster.waiting_requests()).get(port, [])):
                    return
            await asyncio.sleep(0.002)

    def describe_hits(self) -> None:
        """After the run: the requests each server kill cut (the load balancer's log) and
        the requests refused with 503 while PostgreSQL was down (the access logs)."""
        cuts = [
            line for line in read_json_lines(self.cluster.workdir / "proxy.log") if "cut" in line
        ]
        refusals = [
            datetime.fromisoformat(line["time"]).timestamp()
            for server in self.cluster.servers
            for log in server.data_dir.glob("server-*.log")
            for line in read_json_lines(log)
            if line.get("logger") == "state_manager.access" and line.get("status") == 503
        ]
        for index, fault in enumerate(self.faults):
            if fault.kind == "server":
                port = self.killed_ports[index]
                kinds = Counter(
                    str(cut.get("request"))
                    for cut in cuts
                    if cut["cut"] == port and fault.at - 1 <= cut["t"] <= fault.back_at
                )
                listed = ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
                fault.hit = f"requests cut: {listed or 'none'}"
            elif fault.kind == "postgres":
                count = sum(1 for t in refusals if fault.at <= t <= fault.back_at + 5)
                fault.hit = f"{count} requests answered 503"

    async def wait_servers_recovered(self) -> None:
        """Wait until every server is ready and listening for notifications again (a
        problem after a minute)."""
        cluster = self.cluster
        deadline = time.monotonic() + 60
        while True:
            ready = [
                await asyncio.to_thread(httpx_ok, f"{server.base_url}/ready")
                for server in cluster.servers
            ]
            listening = -1
            with contextlib.suppress(OSError, Exception):
                listening = await listeners(cluster.database_url)
            if all(ready) and listening >= len(cluster.servers):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"after the PostgreSQL restart, servers ready: {ready}, listener "
                    f"connections: {listening} of {len(cluster.servers)}"
                )
            await asyncio.sleep(0.1)

    async def wait_for_runs(self, sm: StateManager) -> dict[str, str]:
        """Each run's status from the runs listing, once none is PENDING (or at the deadline)."""
        deadline = time.monotonic() + self.size.deadline_s
        status: dict[str, str] = {}
        while True:
            self.journals.poll()
            with contextlib.suppress(Exception):  # retried: the API may be mid-fault
                page = await sm.list_runs(1, max(len(self.labels), 1))
                status = {
                    run.run_id: run.status.value for run in page.runs if run.run_id in self.labels
                }
            finished = len(status) == len(self.labels) and "PENDING" not in status.values()
            if finished or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.5)


async def run_suite(backend: str, size: Size, workdir: Path) -> Report:
    """Run the suite on one backend; the report judges it (``failures()``)."""
    return await FaultRun(backend, size, workdir).execute()


async def main_async(args: argparse.Namespace) -> int:
    overrides = {"runs": args.runs, "width": args.width, "rounds": args.rounds}
    size = replace(SIZES[args.size], **{k: v for k, v in overrides.items() if v})
    failed = False
    for backend in args.backends:
        workdir = Path(tempfile.mkdtemp(prefix=f"exo-faults-{backend}-"))
        try:
            report = await run_suite(backend, size, workdir)
        except BaseException:
            print(f"logs and journals kept in {workdir}", file=sys.stderr)
            raise
        print(report.table + "\n", flush=True)
        problems = report.failures()
        for problem in problems:
            print(f"FAILED: {problem}")
        if problems:
            failed = True
            print(f"logs and journals kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--runs", type=int, help="override the size's number of runs")
    parser.add_argument("--width", type=int, help="override the size's fan-out width")
    parser.add_argument("--rounds", type=int, help="override how often each fault is injected")
    args = parser.parse_args(argv)
    args.backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    return args


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
