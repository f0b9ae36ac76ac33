"""The changes to states and runs, as values.

Services build operations and hand them to the committer
(:mod:`state_manager.services.committer`), which applies every operation queued at
that moment in one transaction (:mod:`state_manager.services.writes`) and gives each
caller its own outcome. ``Op[T]`` is an operation whose outcome is a ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from state_manager.domain.models import StateStatus
from state_manager.domain.transitions import Change
from state_manager.store.queries import ClaimedRow


class Op[T]:
    """Base of every operation; ``T`` is the type of its outcome."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StateOp[T](Op[T]):
    """An operation on one existing state of ``namespace`` (``None``: any namespace)."""

    change: ClassVar[Change]
    namespace: str | None
    state_id: str


@dataclass(frozen=True, slots=True)
class Executed(StateOp[None]):
    outputs: list[dict[str, Any]]

    change: ClassVar[Change] = Change.EXECUTED


@dataclass(frozen=True, slots=True)
class ErroredResult:
    status: StateStatus
    retry_created: bool


@dataclass(frozen=True, slots=True)
class Errored(StateOp[ErroredResult]):
    error: str

    change: ClassVar[Change] = Change.ERRORED


@dataclass(frozen=True, slots=True)
class Pruned(StateOp[int]):
    """Outcome: the state's ``enqueue_after``."""

    data: dict[str, Any]

    change: ClassVar[Change] = Change.PRUNE


@dataclass(frozen=True, slots=True)
class Requeued(StateOp[int]):
    """Outcome: when the state becomes claimable again (ms)."""

    delay_ms: int

    change: ClassVar[Change] = Change.REQUEUE


@dataclass(frozen=True, slots=True)
class Heartbeat(StateOp[int]):
    """Outcome: the new lease expiry (ms)."""

    change: ClassVar[Change] = Change.HEARTBEAT


@dataclass(frozen=True, slots=True)
class ManualRetry(StateOp[str]):
    """Outcome: the id of the new state."""

    fanout_id: str

    change: ClassVar[Change] = Change.MANUAL_RETRY


@dataclass(frozen=True, slots=True)
class LeaseExpired(StateOp[bool]):
    """Take back a claimed state whose lease ran out. Outcome: whether it was taken back
    (``False`` when a report or heartbeat won the race)."""

    change: ClassVar[Change] = Change.LEASE_EXPIRED


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What one run starts with: its store, literal root inputs, and a delay (ms).

    With an ``idempotency_key``, a run already started under that key in the namespace
    (and not expired) is answered instead of a new one, if its ``request_hash`` is the
    same (:func:`state_manager.services.runs.request_hash`); otherwise the trigger is a
    conflict.
    """

    store: dict[str, str]
    inputs: dict[str, str]
    start_delay: int = 0
    idempotency_key: str | None = None
    request_hash: str = ""


@dataclass(frozen=True, slots=True)
class Trigger(Op[list[str]]):
    """Start runs of one graph, all or none. Outcome: their run ids, in order."""

    namespace: str
    graph_name: str
    runs: tuple[RunRequest, ...]
    source: str = "api"


@dataclass(frozen=True, slots=True)
class Claim(Op[list[ClaimedRow]]):
    """Move up to ``limit`` claimable states of these nodes to QUEUED, oldest first."""

    namespace: str
    node_names: tuple[str, ...]
    limit: int


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A cancelled run: when it was cancelled and how many of its states were."""

    run_id: str
    cancelled_at: int
    cancelled_states: int


@dataclass(frozen=True, slots=True)
class CancelRun(Op[Cancelled]):
    """Cancel a run of ``namespace``: its pending states become CANCELLED and never
    start, and its states being executed are refused on their next report. Cancelling
    a cancelled run answers as the first time did; a finished run is a 409."""

    namespace: str
    run_id: str
