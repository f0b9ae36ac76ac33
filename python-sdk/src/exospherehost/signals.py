"""Signals a node raises from ``execute`` to tell the runtime what to report.

A signal is an exception so that it can leave ``execute`` from any depth, but it does no I/O
itself: the runtime turns it into a report and delivers that report with retries. Do not
catch these inside ``execute``.

* :class:`PruneSignal` ends the branch: the state becomes ``PRUNED`` and no successor runs.
* :class:`ReQueueAfterSignal` puts the same state back in the queue, claimable again after
  ``delay``.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import httpx

__all__ = ["PruneSignal", "ReQueueAfterSignal"]

_DO_NOT_CATCH = "do not catch this exception inside execute(); the runtime reports it"


class PruneSignal(Exception):
    """Stop this branch of the run; ``data`` is stored with the pruned state."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data) if data else {}
        super().__init__(f"prune signal with data {self.data!r} ({_DO_NOT_CATCH})")

    def to_body(self) -> dict[str, Any]:
        """Body of the ``prune`` report."""
        return {"data": self.data}

    async def send(self, endpoint: str, key: str) -> None:
        """Post the prune report to ``endpoint`` once (kept for compatibility).

        The runtime does not use this: it sends reports through its own client, with
        retries. Raises :class:`RuntimeError` unless the server answers 200.
        """
        await _post_once(endpoint, key, self.to_body(), "prune")


class ReQueueAfterSignal(Exception):
    """Run this same state again after ``delay`` (which must be positive)."""

    def __init__(self, delay: timedelta) -> None:
        if delay.total_seconds() <= 0:
            raise ValueError("Delay must be greater than 0")
        self.delay = delay
        super().__init__(f"re-enqueue signal after {delay} ({_DO_NOT_CATCH})")

    @property
    def delay_ms(self) -> int:
        """The delay in whole milliseconds, at least 1."""
        return max(1, math.ceil(self.delay.total_seconds() * 1000))

    def to_body(self) -> dict[str, Any]:
        """Body of the ``re-enqueue-after`` report (a relative delay in ms)."""
        return {"enqueue_after": self.delay_ms}

    async def send(self, endpoint: str, key: str) -> None:
        """Post the re-enqueue report to ``endpoint`` once (kept for compatibility).

        The runtime does not use this: it sends reports through its own client, with
        retries. Raises :class:`RuntimeError` unless the server answers 200.
        """
        await _post_once(endpoint, key, self.to_body(), "re-enqueue-after")


async def _post_once(endpoint: str, key: str, body: dict[str, Any], what: str) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        response = await client.post(endpoint, json=body, headers={"x-api-key": key})
    if response.status_code != 200:
        raise RuntimeError(f"{what} report failed: HTTP {response.status_code} {response.text}")
