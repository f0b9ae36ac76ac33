"""Which report or signal a state accepts in which status, and why it refuses the others.

Pure rules, applied by the write path to each state it has locked. A refusal is the
message a client gets with a 400; ``None`` means the change may go ahead.
"""

from __future__ import annotations

from enum import StrEnum

from state_manager.domain.buckets import TERMINAL_STATUSES
from state_manager.domain.models import StateStatus


class Change(StrEnum):
    """Something a client (or the lease clock) asks of one state."""

    EXECUTED = "executed"
    ERRORED = "errored"
    PRUNE = "prune"
    REQUEUE = "re-enqueue-after"
    HEARTBEAT = "heartbeat"
    MANUAL_RETRY = "manual-retry"
    LEASE_EXPIRED = "lease-expired"


NOT_QUEUED = "State is not queued"
ALREADY_EXECUTED = "State is already executed"
NOT_QUEUED_OR_EXECUTED = "State is not queued or executed"
ALREADY_RETRIED = "State was already retried; retry its latest attempt instead"

# Statuses a report of outputs moves a state out of for good.
_EXECUTED_STATUSES = frozenset(
    {StateStatus.EXECUTED, StateStatus.SUCCESS, StateStatus.NEXT_CREATED_ERROR}
)


def refusal(change: Change, status: StateStatus) -> str | None:
    """Why a state in ``status`` refuses ``change``; ``None`` when it accepts it.

    A manual retry of a state that was already retried is refused later, after the
    duplicate check (a duplicate ``fanout_id`` is a 409 whatever the status).
    """
    if change is Change.MANUAL_RETRY:
        if status not in TERMINAL_STATUSES:
            return f"State is {status.value}; only a finished state can be retried manually"
        return None
    if status is StateStatus.QUEUED:
        return None
    if change is Change.ERRORED:
        return ALREADY_EXECUTED if status in _EXECUTED_STATUSES else NOT_QUEUED_OR_EXECUTED
    return NOT_QUEUED
