"""Celery's side of ``compare.py``: a prefork worker and this process as the client.

Runs in the benchmark's Celery environment (``celery_env/``), started by ``compare.py``::

    celery_env/.venv/bin/python bench/celery_side.py --plan JSON --redis-url URL

and driven over stdin/stdout (see :func:`serve`), so that the harness can run each
workload on every system in turn. The same workloads, sizes, checks and figures as our
side (``workloads.py``). The worker is ``celery worker --pool=prefork --concurrency=8``
in its own process; Redis (broker and result backend) is the one at ``--redis-url``,
whose database is flushed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

import psutil
from measure import (
    RecordTail,
    WorkloadFailed,
    check_exactly_once,
    cpu_delta,
    cpu_snapshot,
    process_tree,
    processes_named,
    stop_process,
    wait_for,
)
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

HERE = Path(__file__).resolve().parent
RESULT_TIMEOUT_S = 600
BACKLOG_QUEUE = "bench-backlog"
# Flags of the worker: prefork with 8 processes, and none of the cluster chatter
# (gossip, mingle, event heartbeats) that a single worker does not need.
WORKER_FLAGS = [
    "--pool=prefork",
    "--without-gossip",
    "--without-mingle",
    "--without-heartbeat",
    "--loglevel=WARNING",
]


class CelerySide:
    def __init__(self, plan: Plan, worker: subprocess.Popen[bytes], tail: RecordTail) -> None:
        import celery_tasks

        self.tasks = celery_tasks
        self.plan = plan
        self.worker = worker
        self.tail = tail

    def roles(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        return {
            "worker": lambda: process_tree(self.worker.pid),
            "redis": lambda: processes_named("redis-server"),
            "client": lambda: [psutil.Process()],
        }

    def check_worker(self) -> None:
        if self.worker.poll() is not None:
            raise WorkloadFailed(f"the Celery worker exited ({self.worker.returncode})")

    def measure(self, expected: dict[str, set[str]], start: Callable[[], Any]) -> Measured:
        self.tail.read_new()  # nothing of an earlier workload counts
        progress = Progress(expected, done_target=units(expected))
        roles = self.roles()
        before = cpu_snapshot(roles)
        t0 = time.monotonic()
        start()
        wait_for(self.tail, progress.feed, check=self.check_worker)
        after = cpu_snapshot(roles)
        assert progress.end is not None
        check_exactly_once(progress.records, expected)
        return Measured(progress, t0, progress.end, cpu_delta(before, after))

    def run(self, workload: str) -> dict[str, float]:
        """Run one workload of :func:`workloads.schedule`; its figures."""
        if workload == "idle":
            return self.idle()
        if workload == "w1":
            return self.w1()
        if workload.startswith("w2_"):
            return self.w2(fan_width(workload))
        if workload == "w3":
            return self.w3()
        raise ValueError(f"unknown workload {workload!r}")

    # -- workloads ---------------------------------------------------------------------

    def chains(self, count: int) -> Measured:
        from celery import chain

        step = self.tasks.step
        tags = [new_tag("chain") for _ in range(count)]
        results: list[Any] = []

        def start() -> None:
            for tag in tags:
                links = [step.s([tag, 0]), *(step.s() for _ in range(CHAIN_STEPS - 1))]
                results.append(chain(*links).apply_async())

        measured = self.measure(chain_keys(tags), start)
        for tag, result in zip(tags, results, strict=True):
            expect(result.get(timeout=RESULT_TIMEOUT_S), [tag, CHAIN_STEPS], "chain result")
            result.forget()  # and its parents: the chain's other links
        return measured

    def w1(self) -> dict[str, float]:
        m = self.chains(self.plan.chain_runs)
        count = self.plan.chain_runs * CHAIN_STEPS
        return chain_figures(m.progress.records, m.t0, m.end) | m.cpu_figures(count)

    def idle(self) -> dict[str, float]:
        records = []
        for _ in range(self.plan.idle_chains):
            records += self.chains(1).progress.records
        return idle_figures(records)

    def w2(self, width: int) -> dict[str, float]:
        from celery.result import AsyncResult

        tag = new_tag("fan")
        results: list[Any] = []

        def start() -> None:
            results.append(self.tasks.fan.apply_async((tag, width)))

        m = self.measure(fan_keys(tag, width), start)
        join_id = results[0].get(timeout=RESULT_TIMEOUT_S)
        callback = AsyncResult(join_id, app=self.tasks.app)
        expect(callback.get(timeout=RESULT_TIMEOUT_S), width, "chord callback result")
        callback.forget()
        for header in results[0].children or []:  # the chord's children
            header.forget()
        results[0].forget()
        return fan_figures(m.progress.records, width, m.t0, m.end) | m.cpu_figures(width + 2)

    def w3(self) -> dict[str, float]:
        from celery.result import ResultSet

        tag = new_tag("single")
        count = self.plan.singles
        started: dict[int, float] = {}
        durations: list[float] = []
        results: list[Any] = []

        size = self.plan.trigger_batch

        def start() -> None:
            from celery import group

            for first in range(0, count, size):
                numbers = range(first, min(first + size, count))
                now = time.monotonic()
                started.update(dict.fromkeys(numbers, now))
                batch = group(self.tasks.single.s(tag, str(i)) for i in numbers).apply_async()
                results.extend(batch.results)
                durations.append(time.monotonic() - now)

        m = self.measure(single_keys(tag, count), start)
        result_set = ResultSet(results, app=self.tasks.app)
        expect(result_set.get(timeout=RESULT_TIMEOUT_S), [None] * count, "single results")
        result_set.forget()
        figures = single_figures(m.progress.records, tag, m.t0, m.end, started, durations)
        return figures | m.cpu_figures(count)

    def memory(self, redis: Any, redis_url: str, pending: int) -> dict[str, float]:
        """Redis memory with ``pending`` task messages queued that nobody consumes (the
        worker is stopped first: this is the last thing a session does).

        Published by an app without a result backend: the messages are the same, but
        the client does not subscribe to 100,000 results it will never read.
        """
        from celery import Celery

        stop_process(self.worker)
        before = int(redis.info("memory")["used_memory"])
        tag = new_tag("backlog")
        publisher = Celery("bench-backlog", broker=redis_url)
        name = self.tasks.single.name
        with publisher.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for i in range(pending):
                publisher.send_task(name, (tag, str(i)), queue=BACKLOG_QUEUE, producer=producer)
        publisher.close()
        queued = int(redis.llen(BACKLOG_QUEUE))
        if queued != pending:
            raise WorkloadFailed(f"{queued} backlog messages queued, expected {pending}")
        after = int(redis.info("memory")["used_memory"])
        return {"memory_mb": after / 2**20, "memory_growth_mb": (after - before) / 2**20}


def expect(got: Any, wanted: Any, what: str) -> None:
    if got != wanted:
        shown = repr(got)[:200]
        raise WorkloadFailed(f"wrong {what}: {shown}, expected {repr(wanted)[:200]}")


def start_worker(plan: Plan, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    celery = Path(sys.executable).parent / "celery"
    command = [str(celery), "-A", "celery_tasks", "worker", f"--concurrency={plan.slots}"]
    command += [*WORKER_FLAGS, "--hostname", f"bench-{os.getpid()}@%h"]
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def serve(plan: Plan, redis_url: str, commands: TextIO, answers: TextIO) -> None:
    """Start the worker, then answer commands until ``quit``; always clean up.

    One JSON object per line each way. First answer: ``{"versions": {...}}`` once the
    worker ran a warm-up. Commands: ``{"run": "<workload>"}`` (answer: its figures),
    ``{"run": "backlog"}`` (Redis memory; stops the worker), ``{"run": "quit"}``.
    """
    import celery
    import redis as redis_client

    def answer(payload: object) -> None:
        answers.write(json.dumps(payload) + "\n")
        answers.flush()

    redis = redis_client.Redis.from_url(redis_url)
    redis.flushdb()
    with tempfile.TemporaryDirectory(prefix="exo-bench-celery-") as tmp:
        records = Path(tmp) / "records"
        records.mkdir()
        os.environ["BENCH_REDIS_URL"] = redis_url
        os.environ["BENCH_RECORD_DIR"] = str(records)
        env = dict(os.environ) | {"PYTHONPATH": str(HERE)}
        worker_log = Path(tmp) / "worker.log"
        worker = start_worker(plan, env, worker_log)
        try:
            side = CelerySide(plan, worker, RecordTail(records))
            side.chains(2)  # warm-up: the worker is up and has run every path once
            server = redis.info("server")
            answer({"versions": {"celery": celery.__version__, "redis": server["redis_version"]}})
            for line in commands:
                command = json.loads(line)["run"]
                if command == "quit":
                    break
                if command == "backlog":
                    answer(side.memory(redis, redis_url, plan.backlogs[1]))
                else:
                    answer(side.run(command))
        except BaseException:
            sys.stderr.write(worker_log.read_text(errors="replace")[-5000:])
            raise
        finally:
            # The clean-up runs to its end, whatever signal comes next.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stop_process(worker)
            redis.flushdb()


def _terminate(_signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt  # run the clean-up of ``run``


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="the Plan, as JSON")
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    serve(Plan.from_json(json.loads(args.plan)), args.redis_url, sys.stdin, sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
