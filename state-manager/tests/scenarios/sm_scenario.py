"""Helpers shared by the scenario tests: claiming exact amounts, reporting concurrently."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sm_api import Api
from state_manager.store.queries import StateRow


async def claim_exactly(
    api: Api, *nodes: str, count: int, limit_s: float = 30.0
) -> list[dict[str, Any]]:
    """Claim until exactly ``count`` states of ``nodes`` were handed out, then check none is left.

    Long-polls, so states made claimable by a report just before the call are found.
    """
    claimed: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + limit_s
    while len(claimed) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {len(claimed)} of {count} {nodes} states became claimable")
        claimed += await api.claim(*nodes, batch_size=count - len(claimed), wait_ms=1000)
    assert await api.claim(*nodes) == [], f"more than {count} {nodes} states were claimable"
    ids = [s["state_id"] for s in claimed]
    assert len(set(ids)) == len(ids), "a state was handed out twice"
    return claimed


async def for_each(
    items: Iterable[Any], action: Callable[[Any], Awaitable[None]], concurrency: int = 8
) -> None:
    """Run ``action`` on every item, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Any) -> None:
        async with gate:
            await action(item)

    await asyncio.gather(*(one(item) for item in items))


def by_identifier(states: Iterable[StateRow]) -> dict[str, list[StateRow]]:
    grouped: dict[str, list[StateRow]] = {}
    for state in states:
        grouped.setdefault(state.identifier, []).append(state)
    return grouped


def status_counts(states: Iterable[StateRow]) -> Counter[tuple[str, str]]:
    """How many states each (identifier, status) pair has."""
    return Counter((s.identifier, s.status) for s in states)
