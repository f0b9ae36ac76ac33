"""Measuring plumbing shared by both sides of ``compare.py``: records, CPU, percentiles.

Imported by the harness (the workspace environment) and by the Celery side (its own
environment under ``celery_env/``), so it depends on the standard library and psutil
only.

Every execution of a node body (ours) or task body (Celery) appends one line to a
record file of its process::

    kind <TAB> key <TAB> start <TAB> end

``start``/``end`` are ``time.monotonic()`` values taken in the worker; on Linux that is
``CLOCK_MONOTONIC``, one clock for every process of the machine, so they compare with
times taken in the harness. ``key`` names the unit of work (run tag + step, item, ...),
which lets the harness check that every unit ran exactly once. Two kinds are markers,
not executions: ``reported`` (ours: the worker's count of reports the server accepted,
``key`` = the count) and ``done`` (Celery: a task's result is stored).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MARKERS = frozenset({"reported", "done"})


@dataclass(frozen=True)
class Record:
    kind: str
    key: str
    start: float
    end: float


class RecordWriter:
    """Appends records to one file, a line at a time (so a reader sees them at once)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1, encoding="utf-8")

    def write(self, kind: str, key: str, start: float, end: float) -> None:
        self._file.write(f"{kind}\t{key}\t{start:.6f}\t{end:.6f}\n")

    def close(self) -> None:
        self._file.close()


class RecordTail:
    """Reads the records appended to the ``*.tsv`` files of a directory since last time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}

    def read_new(self) -> list[Record]:
        records: list[Record] = []
        for path in sorted(self.directory.glob("*.tsv")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk.rfind(b"\n") + 1  # a line still being written waits
            self._offsets[path] = offset + complete
            for line in chunk[:complete].decode("utf-8").splitlines():
                kind, key, start, end = line.split("\t")
                records.append(Record(kind, key, float(start), float(end)))
        return records


class WorkloadFailed(RuntimeError):
    """A workload did not do exactly the expected work (or stopped making progress)."""


def check_exactly_once(records: Iterable[Record], expected: Mapping[str, set[str]]) -> None:
    """Raise :class:`WorkloadFailed` unless each expected ``kind``/``key`` ran exactly once.

    ``expected`` maps each kind to its set of keys; executions of any other kind (marker
    lines aside) are unexpected too.
    """
    counts = collections.Counter((r.kind, r.key) for r in records if r.kind not in MARKERS)
    problems: list[str] = []
    for kind, keys in expected.items():
        seen = {key for (k, key) in counts if k == kind}
        missing = keys - seen
        if missing:
            problems.append(f"{len(missing)} {kind} never ran (e.g. {sorted(missing)[:3]})")
        extra = seen - keys
        if extra:
            problems.append(f"{len(extra)} unexpected {kind} ran (e.g. {sorted(extra)[:3]})")
    twice = sorted(f"{k}/{key} ({n} times)" for (k, key), n in counts.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} ran more than once (e.g. {twice[:3]})")
    unknown = sorted({k for (k, _key) in counts if k not in expected})
    if unknown:
        problems.append(f"executions of unexpected kinds: {unknown}")
    if problems:
        raise WorkloadFailed("; ".join(problems))


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN when there is no value."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    present = [v for v in values if v == v]  # NaN-free
    return statistics.median(present) if present else float("nan")


# -- processes and CPU ----------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (gone processes are skipped)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def processes_named(
    name: str, cmdline_filter: Callable[[str], bool] | None = None
) -> list[psutil.Process]:
    """Every process called ``name`` whose command line passes ``cmdline_filter``."""
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] != name:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline_filter is None or cmdline_filter(cmdline):
            found.append(proc)
    return found


def postgres_processes(database: str) -> list[psutil.Process]:
    """The PostgreSQL backends connected to ``database`` plus the cluster's own writers
    (WAL writer, checkpointer, background writer, autovacuum), which work for every
    database of the cluster."""
    shared = ("walwriter", "checkpointer", "background writer", "autovacuum")

    def ours(cmdline: str) -> bool:
        return f" {database} " in f"{cmdline} " or any(word in cmdline for word in shared)

    return processes_named("postgres", ours)


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        times = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(times.user + times.system)


Roles = Mapping[str, Callable[[], list[psutil.Process]]]


@dataclass
class CpuSnapshot:
    """CPU seconds used so far by every process of each role, by pid."""

    at: float
    by_role: dict[str, dict[int, float]] = field(default_factory=dict)


def cpu_snapshot(roles: Roles) -> CpuSnapshot:
    snapshot = CpuSnapshot(at=time.monotonic())
    for role, find in roles.items():
        used: dict[int, float] = {}
        for proc in find():
            seconds = _cpu_seconds(proc)
            if seconds is not None:
                used[proc.pid] = seconds
        snapshot.by_role[role] = used
    return snapshot


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each role used between two snapshots. A process that appeared in
    between counts in full; one that ended in between is lost (the harness keeps its
    processes alive across a measurement)."""
    delta: dict[str, float] = {}
    for role, now in after.by_role.items():
        then = before.by_role.get(role, {})
        delta[role] = sum(max(0.0, seconds - then.get(pid, 0.0)) for pid, seconds in now.items())
    return delta


def rss_bytes(processes: Iterable[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def wait_for(
    tail: RecordTail,
    feed: Callable[[list[Record]], bool],
    *,
    stall_s: float = 120.0,
    poll_s: float = 0.01,
    check: Callable[[], None] | None = None,
) -> None:
    """Hand every new record to ``feed`` until it returns True (the work is complete).

    Fails when no new record arrives for ``stall_s`` seconds: that is a hang, not a slow
    run (a benchmark never fails on a time). ``check`` is called while waiting, to raise
    when a process the work depends on has died.
    """
    last_progress = time.monotonic()
    while True:
        new = tail.read_new()
        if new:
            last_progress = time.monotonic()
            if feed(new):
                return
            continue
        if check is not None:
            check()
        if time.monotonic() - last_progress > stall_s:
            raise WorkloadFailed(f"no progress for {stall_s:.0f} s")
        time.sleep(poll_s)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM a process started in its own session, SIGKILL it if it does not end in
    time, then SIGKILL whatever is left of its process group (pool children)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def machine_facts() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg": os.getloadavg(),
    }
