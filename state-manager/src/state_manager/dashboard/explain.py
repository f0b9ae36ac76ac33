"""Answers to "why is this not running?" for the run page (pure code, times in ms)."""

from __future__ import annotations

from state_manager.domain.models import StateStatus, UnitesStrategy
from state_manager.services.context import iso
from state_manager.services.views import Registration
from state_manager.store.contract import FaninGroup, StateBrief, StateRow


def duration(ms: int) -> str:
    """A short human duration: ``850 ms``, ``42 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``."""
    ms = max(0, ms)
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms // 1000
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def why_waiting(
    state: StateBrief | StateRow, namespace: str, registration: Registration | None, now: int
) -> str | None:
    """Why a pending state has not finished yet; None for a finished state."""
    status = StateStatus(state.status)
    if status is StateStatus.CREATED:
        if state.enqueue_after > now:
            reason = "its retry back-off" if state.retry_count > 0 else "its start delay"
            return (
                f"Waiting for {reason}: it can be claimed in "
                f"{duration(state.enqueue_after - now)} (at {iso(state.enqueue_after)})."
            )
        ready_for = duration(now - max(state.enqueue_after, state.created_at))
        if registration is None:
            return (
                f"Ready for {ready_for}, but no runtime has registered node "
                f"{state.node_name} in namespace {namespace}: start a worker that serves it."
            )
        return (
            f"Ready for {ready_for}, but no registered runtime has claimed it. "
            f"Node {state.node_name} was last registered by runtime "
            f"{registration.runtime_name} at {iso(registration.updated_at)}; "
            "is a worker serving it running and polling this namespace?"
        )
    if status is StateStatus.QUEUED:
        held = f"Held by a worker since {iso(state.claimed_at)}" if state.claimed_at else "Claimed"
        lease = state.lease_expires_at
        if lease is None:
            return f"{held}."
        if lease > now:
            return (
                f"{held}; its lease ends at {iso(lease)} (in {duration(lease - now)}). "
                "Without a report or heartbeat by then it is taken back and counts as a "
                "failed attempt."
            )
        return (
            f"{held}; its lease ended {duration(now - lease)} ago, so it is about to be "
            "taken back and counted as a failed attempt."
        )
    if status is StateStatus.EXECUTED:
        return "Executed; the states that follow it are being created."
    return None


def join_waiting(group: FaninGroup, strategy: UnitesStrategy) -> str:
    """Where a ``unites`` join stands for one fan-in group."""
    finished = group.descendants - group.pending
    counts = f"{finished:,} of {group.descendants:,} states below {group.identifier} have finished"
    if group.pending > 0:
        tail = f" ({group.failed:,} failed)" if group.failed else ""
        return f"Waiting for a join: {counts}, {group.pending:,} still open{tail}."
    if strategy is UnitesStrategy.ALL_SUCCESS and group.failed > 0:
        return (
            f"Will not run: {counts}, but {group.failed:,} failed and the join needs "
            "ALL_SUCCESS. Retry the failed states to let it run."
        )
    return f"Join complete: {counts}."
