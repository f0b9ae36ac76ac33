"""What the fault suite concludes from what happened: pure functions, no I/O.

Inputs are facts gathered after the runs: every state row of the runs, every execution
the workers journaled, the faults injected (with the states in flight around each),
the worker processes killed, and each run's status as the API reports it. The output,
:class:`Outcome`, counts what the issue asks for and lists every problem found.

Words used here:

* a **task** is one unit of the graph's work: the ``fan`` of a run, one ``work`` item,
  or the ``join`` of a run; ``(run label, node, item)``.
* an **attempt** is one state row of a task (the first, or a retry after a failure);
  fan-out siblings are not attempts (they are created already finished).
* an **execution** is one run of a node's code in a worker, from the journal.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Task = tuple[str, str, str]  # (run label, node identifier, item)

# The only failure a fault may cause: a killed worker never reports, so its lease runs out.
LEASE_EXPIRED = "Lease expired"
# How far a worker's clock reading may precede the server's for the same moment (both
# read the same host clock; the server truncates to milliseconds).
CLOCK_SLACK_S = 0.002


@dataclass(frozen=True)
class StateFact:
    """The fields of a state row the analysis needs (times in ms, as stored)."""

    id: str
    run_id: str
    identifier: str
    status: str
    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    error: str | None
    group_id: str
    retry_count: int
    created_at: int
    updated_at: int

    @property
    def is_attempt(self) -> bool:
        """Fan-out siblings point at the state that fanned out; attempts at themselves."""
        return self.group_id == self.id


@dataclass(frozen=True)
class Execution:
    """One execution journaled by a worker (times in seconds; ``end`` None if cut)."""

    node: str
    run: str
    item: str
    pid: int
    start: float
    end: float | None

    @property
    def task(self) -> Task:
        return (self.run, self.node, self.item)


@dataclass
class Fault:
    """One fault injected: when, when its component was back, what was in flight."""

    kind: str  # server, worker, postgres
    target: str
    at: float
    back_at: float
    watched: frozenset[str] = frozenset()  # states in flight before and after it
    hit: str = ""  # what it cut: running nodes, requests in flight, requests refused


@dataclass
class FaultOutcome:
    fault: Fault
    in_flight: int
    taken_back: int  # of those, attempts that ended by lease expiry
    recovered_at: float | None  # None: something it touched never finished

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.fault.at

    @property
    def back_s(self) -> float:
        return self.fault.back_at - self.fault.at


@dataclass
class Outcome:
    runs: int
    runs_success: int
    states: int
    tasks: int
    executions: int
    lost: list[str] = field(default_factory=list)
    repeats_after_kill: int = 0  # tasks executed again because a kill cut the first run
    repeats_unexplained: list[str] = field(default_factory=list)
    same_state_twice: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    faults: list[FaultOutcome] = field(default_factory=list)

    @property
    def executed_twice(self) -> int:
        return self.repeats_after_kill + len(self.repeats_unexplained)

    def failures(self) -> list[str]:
        """Everything that breaks the promise: each a readable sentence."""
        found = list(self.problems)
        if self.runs_success != self.runs:
            found.append(f"{self.runs - self.runs_success} of {self.runs} runs did not succeed")
        found += [f"lost: {item}" for item in self.lost]
        found += [f"executed again without a kill: {item}" for item in self.repeats_unexplained]
        found += [f"one state executed twice: {item}" for item in self.same_state_twice]
        found += [
            f"fault {index} ({f.fault.kind}, {f.fault.target}) never fully recovered"
            for index, f in enumerate(self.faults, 1)
            if f.recovered_at is None
        ]
        return found


def expected_tasks(labels: Iterable[str], width: int) -> set[Task]:
    tasks: set[Task] = set()
    for label in labels:
        tasks.add((label, "fan", ""))
        tasks.add((label, "join", ""))
        tasks.update((label, "work", str(i)) for i in range(width))
    return tasks


def task_of(state: StateFact, labels: Mapping[str, str]) -> Task:
    item = str(state.inputs.get("item", "")) if state.identifier == "work" else ""
    return (labels.get(state.run_id, f"?{state.run_id}"), state.identifier, item)


def expected_outputs(task: Task, width: int) -> dict[str, str] | None:
    """The output a task's successful attempt must hold (None: not checked)."""
    run, node, item = task
    if node == "work":
        return {"result": f"{run}:{item}:done"}
    if node == "join":
        return {"summary": f"{run}: {width} items joined"}
    return None


def analyse(
    *,
    labels: Mapping[str, str],
    width: int,
    states: Sequence[StateFact],
    executions: Sequence[Execution],
    kills: Mapping[int, float],
    faults: Sequence[Fault],
    run_status: Mapping[str, str],
) -> Outcome:
    """Judge a finished fault run. ``labels`` maps run id → run label, ``kills`` a killed
    worker's pid → when it was killed, ``run_status`` run id → status from the API."""
    outcome = Outcome(
        runs=len(labels),
        runs_success=sum(1 for run_id in labels if run_status.get(run_id) == "SUCCESS"),
        states=len(states),
        tasks=0,
        executions=len(executions),
    )
    expected = expected_tasks(labels.values(), width)
    outcome.tasks = len(expected)

    attempts: dict[Task, list[StateFact]] = defaultdict(list)
    for state in states:
        if state.is_attempt:
            attempts[task_of(state, labels)].append(state)
    for found in attempts.values():
        found.sort(key=lambda s: (s.retry_count, s.created_at))
    _check_attempts(outcome, expected, attempts, width)
    siblings = Counter(s.run_id for s in states if s.identifier == "fan" and not s.is_attempt)
    for run_id, label in labels.items():
        if siblings[run_id] != width - 1:
            outcome.problems.append(
                f"run {label}: {siblings[run_id]} fan-out siblings, expected {width - 1}"
            )

    runs_by_task: dict[Task, list[Execution]] = defaultdict(list)
    for execution in executions:
        runs_by_task[execution.task].append(execution)
    for task, found in runs_by_task.items():
        found.sort(key=lambda e: e.start)
        if task not in expected:
            outcome.problems.append(f"an execution of a task no run has: {task}")
    for task in sorted(expected):
        _check_executions(outcome, task, runs_by_task.get(task, []), attempts.get(task, []), kills)

    by_id = {state.id: state for state in states}
    for fault in faults:
        outcome.faults.append(_fault_outcome(fault, by_id, attempts, labels))
    return outcome


def _check_attempts(
    outcome: Outcome,
    expected: set[Task],
    attempts: Mapping[Task, list[StateFact]],
    width: int,
) -> None:
    for task in sorted(set(attempts) - expected):
        outcome.problems.append(f"states of a task no run should have: {task}")
    for task in sorted(expected):
        found = attempts.get(task, [])
        succeeded = [s for s in found if s.status == "SUCCESS"]
        if not succeeded:
            statuses = ", ".join(f"{s.id} {s.status}" for s in found) or "no state at all"
            outcome.lost.append(f"{task}: {statuses}")
            continue
        if len(succeeded) > 1:
            outcome.problems.append(f"{task} succeeded {len(succeeded)} times")
        if found[-1].status != "SUCCESS":
            outcome.problems.append(f"{task}: an attempt after the successful one: {found[-1]}")
        for earlier in found[:-1]:
            if earlier.status != "RETRY_CREATED" or LEASE_EXPIRED not in (earlier.error or ""):
                outcome.problems.append(
                    f"{task}: attempt {earlier.id} ended {earlier.status} ({earlier.error!r}); "
                    "the only failure a fault may cause is an expired lease"
                )
        want = expected_outputs(task, width)
        for state in succeeded:
            if want is not None and dict(state.outputs) != want:
                outcome.problems.append(f"{task}: outputs {state.outputs!r}, expected {want!r}")


def attempt_of(execution: Execution, attempts: Sequence[StateFact]) -> StateFact | None:
    """The attempt an execution ran: the latest one created before it started."""
    ran = None
    for attempt in attempts:
        if attempt.created_at / 1000 <= execution.start + CLOCK_SLACK_S:
            ran = attempt
    return ran


def _check_executions(
    outcome: Outcome,
    task: Task,
    found: list[Execution],
    attempts: Sequence[StateFact],
    kills: Mapping[int, float],
) -> None:
    ran = [attempt_of(execution, attempts) for execution in found]
    counts = Counter(a.id for a in ran if a is not None)
    for state_id, times in counts.items():
        if times > 1:
            outcome.same_state_twice.append(f"{task}: state {state_id} executed {times} times")
    if any(a is None for a in ran):
        outcome.problems.append(f"{task}: an execution started before any state of it existed")
    executed_ids = set(counts)
    for attempt in attempts:
        if attempt.status == "SUCCESS" and attempt.id not in executed_ids:
            outcome.problems.append(f"{task}: state {attempt.id} succeeded without an execution")
    for execution, attempt in zip(found[:-1], ran[:-1], strict=True):
        killed_at = kills.get(execution.pid)
        cut = killed_at is not None and killed_at >= execution.start
        if cut and attempt is not None and attempt.status != "SUCCESS":
            outcome.repeats_after_kill += 1
        else:
            when = "" if killed_at is None else f", killed {killed_at - execution.start:+.3f} s"
            outcome.repeats_unexplained.append(
                f"{task}: first run by pid {execution.pid} at {execution.start:.3f}{when}; "
                f"{len(found)} executions in all"
            )


def _fault_outcome(
    fault: Fault,
    by_id: Mapping[str, StateFact],
    attempts: Mapping[Task, list[StateFact]],
    labels: Mapping[str, str],
) -> FaultOutcome:
    """Full recovery: the component is back and every task in flight around the fault
    has its successful attempt committed."""
    recovered: float | None = fault.back_at
    taken_back = 0
    for state_id in fault.watched:
        state = by_id.get(state_id)
        if state is None:
            recovered = None
            continue
        if state.status == "RETRY_CREATED":
            taken_back += 1
        done = [s for s in attempts.get(task_of(state, labels), []) if s.status == "SUCCESS"]
        if not done:
            recovered = None
        elif recovered is not None:
            recovered = max(recovered, done[0].updated_at / 1000)
    return FaultOutcome(fault, len(fault.watched), taken_back, recovered)


# -- the printed report -------------------------------------------------------------


def render(
    title: str, outcome: Outcome, started_at: float, extra: Sequence[tuple[str, str]] = ()
) -> str:
    """The summary table and the per-fault table, as Markdown; fault times are counted
    from ``started_at``; ``extra`` rows join the summary."""
    kinds = Counter(f.fault.kind for f in outcome.faults)
    injected = ", ".join(f"{KIND_LABELS[k]} x{n}" for k, n in kinds.items()) or "none"
    twice = f"{outcome.executed_twice} ({outcome.repeats_after_kill} after a worker kill, "
    twice += f"{len(outcome.repeats_unexplained)} otherwise)"
    summary = [
        ("faults injected", injected),
        ("runs", str(outcome.runs)),
        ("states", f"{outcome.states} ({outcome.tasks} tasks, {outcome.executions} executions)"),
        ("runs finished SUCCESS", str(outcome.runs_success)),
        ("states lost", str(len(outcome.lost))),
        ("states executed twice", twice),
        ("one state executed twice", str(len(outcome.same_state_twice))),
        ("other problems", str(len(outcome.problems))),
        *extra,
    ]
    lines = [f"### {title}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary]
    lines += [
        "",
        "| # | fault | at (s) | what it hit | states in flight | taken back by lease "
        "| component back (s) | full recovery (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, f in enumerate(outcome.faults, 1):
        recovery = "never" if f.recovery_s is None else f"{f.recovery_s:.1f}"
        lines.append(
            f"| {index} | {KIND_LABELS[f.fault.kind]}: {f.fault.target} "
            f"| {f.fault.at - started_at:.1f} | {f.fault.hit} | {f.in_flight} | {f.taken_back} "
            f"| {f.back_s:.1f} | {recovery} |"
        )
    return "\n".join(lines)


KIND_LABELS = {
    "server": "kill -9 server + restart",
    "worker": "kill -9 worker + restart",
    "postgres": "PostgreSQL crash-restart",
}
