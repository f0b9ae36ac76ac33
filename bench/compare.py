"""Our system against Celery + Redis: the same workloads, one table, ratios ours / Celery.

    uv run python bench/compare.py [--size small|full] [--backend sqlite|postgres|both|mongo|all]
                                   [--systems ours,celery] [--repeat N] [--json FILE]

Ours: the state manager as its own process (a fresh SQLite file or PostgreSQL database),
the SDK's ``Runtime`` (8 slots) as the worker in its own process, this process as the
client (the SDK's ``StateManager``). Celery: ``celery worker --pool=prefork
--concurrency=8`` with Redis as broker and result backend, installed in the benchmark's
own environment (``bench/celery_env``, synced here on demand), driven by a client process
of that environment. Both run no-op bodies that record what ran; every unit of work must
have run exactly once, or the command fails (it never fails on a time). See
``bench/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from measure import machine_facts
from ours import backlog, running_system
from workloads import PLANS, Plan, medians, schedule

HERE = Path(__file__).resolve().parent
CELERY_ENV = HERE / "celery_env"
BACKENDS = ("sqlite", "postgres")
# Optional (``--backend mongo`` or ``all``): MongoDB, which is SecantusDB (a stand-in
# written in Python) unless EXOSPHERE_TEST_MONGO_URI names a real server, so its
# figures are SecantusDB's, not MongoDB's.
MONGO_LABEL = "MongoDB" if os.environ.get("EXOSPHERE_TEST_MONGO_URI") else "SecantusDB"
SYSTEMS = ("ours", "celery")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
COLUMNS = {
    "sqlite": "ours, SQLite",
    "postgres": "ours, PostgreSQL",
    "mongo": f"ours, {MONGO_LABEL}",
    "celery": "Celery + Redis",
}
SHORT = {"sqlite": "SQLite", "postgres": "PostgreSQL", "mongo": MONGO_LABEL}


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# -- Celery side: its own environment and process --------------------------------------


def celery_python() -> Path:
    """Sync ``bench/celery_env`` (its own lock, the local interpreter) and return its
    Python."""
    uv = os.environ.get("UV") or shutil.which("uv")
    command = [uv] if uv else [sys.executable, "-m", "uv"]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    log("syncing bench/celery_env")
    subprocess.run(
        [*command, "sync", "--frozen", "--quiet", "--project", str(CELERY_ENV)],
        env=env,
        check=True,
    )
    return CELERY_ENV / ".venv" / "bin" / "python"


class CeleryRemote:
    """``celery_side.py`` in the Celery environment, driven one workload at a time.

    It stays in this process group: Ctrl-C reaches it too, and it cleans up after itself
    (its worker, its Redis database) before exiting.
    """

    def __init__(self, plan: Plan, redis_url: str) -> None:
        command = [str(celery_python()), str(HERE / "celery_side.py")]
        command += ["--plan", json.dumps(plan.to_json()), "--redis-url", redis_url]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"the Celery side failed (exit {code}); see its output above")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def started(self) -> dict[str, Any]:
        """Wait until its worker is up; the versions of Celery and Redis."""
        versions: dict[str, Any] = self._answer()["versions"]
        return versions

    def call(self, command: str) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"run": command}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"run": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=60)


# -- the session ------------------------------------------------------------------------

Results = dict[str, dict[str, list[dict[str, float]]]]


async def session(
    plan: Plan,
    backends: Sequence[str],
    redis_url: str | None,
    log: Callable[[str], None] = log,
) -> tuple[Results, dict[str, Any]]:
    """Every workload on every system; ``redis_url`` None leaves Celery out.

    All systems are up at once and each workload runs on one after the other (the order
    rotates with each repeat), so the figures of a row are measured minutes apart, not
    a whole system's run apart: on a shared machine the load changes in between.
    """
    results: Results = {}
    versions: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        systems: dict[str, Callable[[str], Awaitable[dict[str, float]]]] = {}
        for backend in backends:
            log(f"starting {COLUMNS[backend]}")
            ours = await stack.enter_async_context(running_system(backend, plan, {}))
            await ours.chains(2)  # warm-up: every process has run every path once
            systems[backend] = ours.run
        if redis_url is not None:
            log(f"starting {COLUMNS['celery']}")
            remote = CeleryRemote(plan, redis_url)
            stack.callback(remote.close)
            versions = await asyncio.to_thread(remote.started)

            async def on_celery(workload: str, remote: CeleryRemote = remote) -> dict[str, float]:
                return await asyncio.to_thread(remote.call, workload)

            systems["celery"] = on_celery
        names = list(systems)
        for repeat in range(plan.repeat):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for workload in schedule(plan):
                for name in order:
                    log(f"#{repeat + 1} {workload}: {COLUMNS[name]}")
                    figures = await systems[name](workload)
                    results.setdefault(name, {}).setdefault(workload, []).append(figures)
        if redis_url is not None:
            log(f"backlog: {COLUMNS['celery']} (Redis memory)")
            memory = await asyncio.to_thread(remote.call, "backlog")
            results["celery"]["backlog"] = [memory]
    for backend in backends:
        log(f"backlog: {COLUMNS[backend]} (claim cost, memory)")
        results[backend]["backlog"] = [await backlog(backend, plan)]
    return results, versions


# -- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    workload: str
    figure: str
    better: str  # "higher" or "lower": which way is better, for the reader
    digits: int = 1
    ratio: bool = True  # False where ours / Celery compares unlike things


def rows(plan: Plan) -> list[Row]:
    small, large = plan.backlogs
    table = [
        Row(f"W1 {plan.chain_runs} chains of 20 steps: steps/s", "w1", "steps_per_s", "higher"),
        Row("W1 step→step p50, ms", "w1", "hop_p50_ms", "lower"),
    ]
    for width in plan.fan_widths:
        table += [
            Row(
                f"W2 fan-out {width:,} + join: children/s",
                f"w2_{width}",
                "children_per_s",
                "higher",
            ),
            Row(f"W2 fan-out {width:,} + join: total, s", f"w2_{width}", "total_s", "lower", 2),
        ]
    table += [
        Row(f"W3 {plan.singles:,} single-node runs: runs/s", "w3", "runs_per_s", "higher"),
        Row("W3 trigger→done p50, ms", "w3", "done_p50_ms", "lower"),
        Row("W3 one batch trigger call p50, ms", "w3", "trigger_p50_ms", "lower", 2),
        Row("idle hop p50, ms", "idle", "hop_p50_ms", "lower", 2),
        Row("idle hop p99, ms", "idle", "hop_p99_ms", "lower", 2),
        Row(f"claim, backlog {small:,}: ms", "backlog", f"claim_{small}_ms", "lower", 2),
        Row(f"claim, backlog {large:,}: ms", "backlog", f"claim_{large}_ms", "lower", 2),
        Row(f"claim cost {large:,} / {small:,}", "backlog", "claim_ratio", "lower", 2),
        Row(
            f"server RSS (Celery: Redis memory), {large:,} pending, MB",
            "backlog",
            "memory_mb",
            "lower",
            ratio=False,
        ),
        Row(f"memory growth for {large:,} pending, MB", "backlog", "memory_growth_mb", "lower"),
        Row("CPU ms/state, W1", "w1", "cpu_ms", "lower", 2),
    ]
    table += [
        Row(f"CPU ms/state, W2 {width:,}", f"w2_{width}", "cpu_ms", "lower", 2)
        for width in plan.fan_widths
    ]
    table += [Row("CPU ms/state, W3", "w3", "cpu_ms", "lower", 2)]
    return table


def value(results: dict[str, dict[str, Any]], system: str, row: Row) -> float | None:
    samples = results.get(system, {}).get(row.workload)
    if not samples:
        return None
    figure = medians(samples).get(row.figure)
    return None if figure is None or math.isnan(figure) else figure


def cell(number: float | None, digits: int) -> str:
    if number is None:
        return "n/a"
    return f"{number:,.{digits}f}"


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines)


def main_table(plan: Plan, results: dict[str, dict[str, Any]], backends: Sequence[str]) -> str:
    systems = [b for b in backends if b in results] + (["celery"] if "celery" in results else [])
    ratios = [b for b in backends if b in results] if "celery" in results else []
    header = ["figure", "better", *(COLUMNS[s] for s in systems)]
    header += [f"{SHORT[b]} / Celery" for b in ratios]
    body = []
    for row in rows(plan):
        line = [row.label, row.better]
        line += [cell(value(results, s, row), row.digits) for s in systems]
        celery = value(results, "celery", row)
        for backend in ratios:
            ours = value(results, backend, row)
            if not row.ratio:
                line.append("-")
                continue
            ratio = None if ours is None or not celery else ours / celery
            line.append(cell(ratio, 2) + ("x" if ratio is not None else ""))
        body.append(line)
    return markdown(header, body)


def cpu_table(plan: Plan, results: dict[str, dict[str, Any]]) -> str:
    """CPU ms per state of each process group, and of the load-generating client."""
    workloads = ["w1", *(f"w2_{w}" for w in plan.fan_widths), "w3"]
    header = ["workload", "system", "server", "worker", "database / Redis", "total", "client"]
    body = []
    for workload in workloads:
        for system, figures in results.items():
            samples = figures.get(workload)
            if not samples:
                continue
            m = medians(samples)

            def ms(name: str, m: dict[str, float] = m) -> str:
                return cell(m.get(name), 2) if name in m else "-"

            db = "cpu_db_ms" if system in ("postgres", "mongo") else "cpu_redis_ms"
            db_cell = "(in server)" if system == "sqlite" else ms(db)
            body.append(
                [
                    workload.upper().replace("_", " "),
                    COLUMNS[system],
                    ms("cpu_server_ms"),
                    ms("cpu_worker_ms"),
                    db_cell,
                    ms("cpu_ms"),
                    ms("cpu_client_ms"),
                ]
            )
    return markdown(header, body)


# -- main -------------------------------------------------------------------------------


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return rev + (" (with uncommitted changes)" if dirty else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(PLANS), default="small")
    parser.add_argument(
        "--backend",
        choices=[*BACKENDS, "both", "mongo", "all"],
        default="both",
        help="both: SQLite and PostgreSQL; all: and MongoDB (SecantusDB unless "
        "EXOSPHERE_TEST_MONGO_URI is set)",
    )
    parser.add_argument("--systems", default="ours,celery", help="comma-separated: ours,celery")
    parser.add_argument("--repeat", type=int, help="runs per workload (default: by size)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="a database to flush")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.system_list) - set(SYSTEMS)
    if unknown or not args.system_list:
        parser.error(f"--systems takes ours and/or celery, not {args.systems!r}")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _terminate(_signum: int, _frame: object) -> NoReturn:
    # Clean up as on Ctrl-C, once: a second SIGTERM (``uv run`` forwards the one it got)
    # must not cut the clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args()
    plan = PLANS[args.size]
    if args.repeat is not None:
        plan = Plan.from_json(plan.to_json() | {"repeat": args.repeat})
    choices = {"both": list(BACKENDS), "all": [*BACKENDS, "mongo"]}
    backends = choices.get(args.backend, [args.backend])
    facts_start = machine_facts()
    started = time.monotonic()
    include_ours = "ours" in args.system_list
    redis_url = args.redis_url if "celery" in args.system_list else None
    results, versions = asyncio.run(session(plan, backends if include_ours else [], redis_url))
    elapsed = time.monotonic() - started
    facts_end = machine_facts()

    print()
    print(
        f"size {args.size}, {plan.repeat} run(s) per workload (medians), "
        f"{elapsed / 60:.1f} min; revision {git_revision()}"
    )
    load_start = ", ".join(f"{x:.2f}" for x in facts_start["loadavg"])  # type: ignore[attr-defined]
    load_end = ", ".join(f"{x:.2f}" for x in facts_end["loadavg"])  # type: ignore[attr-defined]
    print(
        f"machine: {facts_start['cores']} cores ({facts_start['cpu']}), "
        f"{facts_start['memory_gb']} GB; load average at start {load_start}, at end {load_end}"
    )
    software = [f"Python {platform.python_version()}"]
    software += [f"{name} {version}" for name, version in versions.items()]
    print("software: " + ", ".join(software))
    print()
    print(main_table(plan, results, backends))
    print()
    print("CPU ms per state, by process group (total = all but the client):")
    print()
    print(cpu_table(plan, results))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "plan": plan.to_json(),
                    "elapsed_s": elapsed,
                    "machine": {"start": facts_start, "end": facts_end},
                    "versions": versions,
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; processes stopped and temporary databases removed", file=sys.stderr)
        sys.exit(130)
