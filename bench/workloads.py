"""The workloads of ``compare.py``: their sizes, the work each must do, and its figures.

Shared by both sides (standard library only), so that our system and Celery are sized,
checked and scored by the same code. Times are ``time.monotonic()`` values (see
``measure.py``); ``t0`` is taken in the client just before the first trigger, ``end``
is when the system has the last result (ours: the worker's count of accepted reports
reached the expected number; Celery: the last task's result is stored).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from measure import Record, median, percentile

CHAIN_STEPS = 20


@dataclass(frozen=True)
class Plan:
    """How big each workload is; ``small`` and ``full`` are the two presets."""

    chain_runs: int
    fan_widths: tuple[int, ...]
    singles: int
    idle_chains: int
    backlogs: tuple[int, int]
    claim_samples: int
    repeat: int
    # W3 starts its runs in batches of this many: one call of each system's bulk API.
    trigger_batch: int = 100
    slots: int = 8

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Plan:
        values = dict(data)
        values["fan_widths"] = tuple(values["fan_widths"])  # type: ignore[arg-type]
        values["backlogs"] = tuple(values["backlogs"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


PLANS = {
    "small": Plan(
        chain_runs=20,
        fan_widths=(1_000,),
        singles=1_000,
        idle_chains=5,
        backlogs=(1_000, 10_000),
        claim_samples=50,
        repeat=1,
    ),
    "full": Plan(
        chain_runs=20,
        fan_widths=(1_000, 10_000),
        singles=2_000,
        idle_chains=20,
        backlogs=(1_000, 100_000),
        claim_samples=200,
        repeat=3,
    ),
    # For the smoke test: seconds, not minutes.
    "tiny": Plan(
        chain_runs=3,
        fan_widths=(50,),
        singles=40,
        idle_chains=2,
        backlogs=(20, 200),
        claim_samples=5,
        repeat=1,
    ),
}


def new_tag(prefix: str) -> str:
    """A run tag no other run of this invocation uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the work each workload must do: kind -> keys, each to run exactly once -------------


def chain_keys(tags: Iterable[str], steps: int = CHAIN_STEPS) -> dict[str, set[str]]:
    return {"step": {f"{tag}:{k}" for tag in tags for k in range(1, steps + 1)}}


def fan_keys(tag: str, width: int) -> dict[str, set[str]]:
    return {
        "fan": {tag},
        "child": {f"{tag}:{i}" for i in range(width)},
        "join": {tag},
    }


def single_keys(tag: str, count: int) -> dict[str, set[str]]:
    return {"single": {f"{tag}:{i}" for i in range(count)}}


def units(expected: dict[str, set[str]]) -> int:
    """Number of executions (states, tasks) a workload consists of."""
    return sum(len(keys) for keys in expected.values())


# -- figures ----------------------------------------------------------------------------


def chain_hops(records: Iterable[Record]) -> list[float]:
    """Seconds from the end of each chain step's body to the start of the next step's."""
    by_run: dict[str, dict[int, Record]] = defaultdict(dict)
    for r in records:
        if r.kind == "step":
            tag, step = r.key.rsplit(":", 1)
            by_run[tag][int(step)] = r
    hops: list[float] = []
    for steps in by_run.values():
        for k in sorted(steps):
            if k + 1 in steps:
                hops.append(steps[k + 1].start - steps[k].end)
    return hops


def chain_figures(records: Sequence[Record], t0: float, end: float) -> dict[str, float]:
    steps = sum(1 for r in records if r.kind == "step")
    hops = chain_hops(records)
    return {
        "steps_per_s": steps / (end - t0),
        "hop_p50_ms": percentile(hops, 0.5) * 1000,
        "hop_p99_ms": percentile(hops, 0.99) * 1000,
    }


def fan_figures(records: Sequence[Record], width: int, t0: float, end: float) -> dict[str, float]:
    return {"children_per_s": width / (end - t0), "total_s": end - t0}


def single_figures(
    records: Sequence[Record],
    tag: str,
    t0: float,
    end: float,
    trigger_started: dict[int, float],
    trigger_seconds: Sequence[float],
) -> dict[str, float]:
    """``trigger_started[i]``: client time just before the call that started run ``i``;
    ``trigger_seconds``: how long each of those (batch) calls took."""
    ran = {r.key: r.end for r in records if r.kind == "single"}
    latencies = [ran[f"{tag}:{i}"] - started for i, started in trigger_started.items()]
    return {
        "runs_per_s": len(trigger_started) / (end - t0),
        "done_p50_ms": percentile(latencies, 0.5) * 1000,
        "trigger_p50_ms": percentile(trigger_seconds, 0.5) * 1000,
    }


def idle_figures(records: Sequence[Record]) -> dict[str, float]:
    hops = chain_hops(records)
    return {
        "hop_p50_ms": percentile(hops, 0.5) * 1000,
        "hop_p99_ms": percentile(hops, 0.99) * 1000,
        "hops": float(len(hops)),
    }


def schedule(plan: Plan) -> list[str]:
    """The workloads of one repeat, in order: ``idle``, ``w1``, ``w2_<width>``..., ``w3``."""
    return ["idle", "w1", *(f"w2_{width}" for width in plan.fan_widths), "w3"]


def fan_width(workload: str) -> int:
    """The width of a ``w2_<width>`` workload."""
    return int(workload.split("_", 1)[1])


def medians(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """Figure-wise median over the repeats of one workload."""
    names = {name for sample in samples for name in sample}
    return {name: median(s[name] for s in samples if name in s) for name in sorted(names)}


class Progress:
    """Collects a workload's records and tells when the system has finished all of it.

    Finished means: every expected execution has a record, and the end marker arrived:
    ours, a ``reported`` count of at least ``reported_target``; Celery, ``done_target``
    ``done`` markers. ``end`` is that marker's time.
    """

    def __init__(
        self,
        expected: dict[str, set[str]],
        *,
        reported_target: int | None = None,
        done_target: int | None = None,
    ) -> None:
        self.expected = expected
        self.records: list[Record] = []
        self._missing = {kind: set(keys) for kind, keys in expected.items()}
        self._left = units(expected)
        self._reported_target = reported_target
        self._done_target = done_target
        self._done_seen = 0
        self._last_done = 0.0
        self.end: float | None = None

    def feed(self, new: Iterable[Record]) -> bool:
        for r in new:
            self.records.append(r)
            if r.kind == "reported":
                target = self._reported_target
                if self.end is None and target is not None and int(r.key) >= target:
                    self.end = r.end
            elif r.kind == "done":
                self._done_seen += 1
                self._last_done = max(self._last_done, r.end)
                if self._done_target is not None and self._done_seen >= self._done_target:
                    self.end = self._last_done
            else:
                missing = self._missing.get(r.kind)
                if missing is not None and r.key in missing:
                    missing.discard(r.key)
                    self._left -= 1
        return self._left == 0 and self.end is not None


@dataclass
class Measured:
    """One workload's records, its window (``t0`` → ``end``) and the CPU seconds each
    process group (role) used in it."""

    progress: Progress
    t0: float
    end: float
    cpu_s: dict[str, float]

    def cpu_figures(self, count: int) -> dict[str, float]:
        """CPU ms per state (task) of each role, and ``cpu_ms``: all roles but the client."""
        per_unit = {f"cpu_{role}_ms": s * 1000 / count for role, s in self.cpu_s.items()}
        total = sum(s for role, s in self.cpu_s.items() if role != "client") * 1000 / count
        return per_unit | {"cpu_ms": total}
