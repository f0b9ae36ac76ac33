"""How a state's status counts toward the fan-in groups it descends from.

Every state is in exactly one bucket: *pending* (may still change or make more
work), *failed* (ended in an error that nothing will retry), or *done*. A group
is finished when none of its descendants is pending; ``ALL_SUCCESS`` also needs
none failed. A pruned branch and a state replaced by a retry count as done.
"""

from __future__ import annotations

from enum import Enum

from state_manager.domain.models import StateStatus, UnitesStrategy


class Bucket(Enum):
    PENDING = "pending"
    FAILED = "failed"
    DONE = "done"


PENDING_STATUSES = frozenset({StateStatus.CREATED, StateStatus.QUEUED, StateStatus.EXECUTED})
FAILED_STATUSES = frozenset({StateStatus.ERRORED, StateStatus.NEXT_CREATED_ERROR})
TERMINAL_STATUSES = frozenset(StateStatus) - PENDING_STATUSES


def bucket(status: StateStatus | None) -> Bucket | None:
    """The bucket of ``status``; ``None`` stands for "no state" (before insert)."""
    if status is None:
        return None
    if status in PENDING_STATUSES:
        return Bucket.PENDING
    if status in FAILED_STATUSES:
        return Bucket.FAILED
    return Bucket.DONE


def delta(before: StateStatus | None, after: StateStatus) -> tuple[int, int]:
    """Change of a group's (pending, failed) counters when a member goes ``before`` → ``after``."""
    pending = failed = 0
    old, new = bucket(before), bucket(after)
    if old is Bucket.PENDING:
        pending -= 1
    elif old is Bucket.FAILED:
        failed -= 1
    if new is Bucket.PENDING:
        pending += 1
    elif new is Bucket.FAILED:
        failed += 1
    return pending, failed


def ready(strategy: UnitesStrategy, pending: int, failed: int) -> bool:
    """Whether a uniting node with ``strategy`` may run for a group with these counters."""
    if pending > 0:
        return False
    return strategy is UnitesStrategy.ALL_DONE or failed == 0
