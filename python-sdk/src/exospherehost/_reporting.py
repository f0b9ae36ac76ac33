"""Delivery of state reports: retried until the server has them, never silently dropped.

A report (``executed``, ``errored``, ``prune``, ``re-enqueue-after``) is sent by its own
task, so a slow or failing delivery never holds a worker. Network errors, timeouts and
retryable statuses (5xx, 408, 425, 429) are retried with backoff. Any other 4xx means the
state is no longer this worker's (finished, unknown, or taken back after its lease
expired): the report is dropped *and logged*. Only shutdown stops the retries, after its
own deadline; every report given up then is logged at ERROR with its full body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ._http import ApiClient, Backoff, is_retryable_status, response_body
from .errors import StateGoneError

__all__ = ["Abandoned", "Report", "Reporter", "RuntimeStats", "describe_exc"]

logger = logging.getLogger("exospherehost.runtime")

# Answers to a report that mean "never with this body" rather than "not your state".
_UNACCEPTABLE = frozenset({413, 422})


@dataclass
class RuntimeStats:
    """What a runtime did so far; returned by :meth:`Runtime.run` and ``run_until_idle``."""

    claimed: int = 0
    """States claimed from the server."""
    executed: int = 0
    """``executed`` reports accepted."""
    errored: int = 0
    """``errored`` reports accepted."""
    pruned: int = 0
    """``prune`` reports accepted."""
    requeued: int = 0
    """``re-enqueue-after`` reports accepted."""
    rejected: int = 0
    """Reports refused with a 4xx (the state was finished, unknown or claimed again)."""
    undelivered: int = 0
    """Reports still failing when shutdown gave up on them (each one is logged in full)."""

    @property
    def reported(self) -> int:
        """Reports accepted by the server, of any kind."""
        return self.executed + self.errored + self.pruned + self.requeued

    def count_accepted(self, kind: str) -> None:
        name = {"prune": "pruned", "re-enqueue-after": "requeued"}.get(kind, kind)
        setattr(self, name, getattr(self, name) + 1)


@dataclass(frozen=True)
class Report:
    """One outcome of one state; ``kind`` is the last segment of the report's path."""

    state_id: str
    node_name: str
    kind: str  # executed, errored, prune, re-enqueue-after
    body: dict[str, Any]


class Abandoned(Exception):
    """Shutdown stopped retrying a request."""


def describe_exc(exc: BaseException) -> str:
    """``"Type: message"``, or just the type when the message is empty."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Reporter:
    """Sends reports in the background and keeps track of those still pending."""

    def __init__(
        self,
        api: ApiClient,
        backoff: Backoff,
        stats: RuntimeStats,
        on_settled: Callable[[], None],
    ) -> None:
        self._api = api
        self._backoff = backoff
        self._stats = stats
        self._on_settled = on_settled
        self._abandon = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Reports not settled yet (accepted, refused or given up)."""
        return len(self._pending)

    def submit(self, report: Report, settled: Callable[[], None] | None = None) -> None:
        """Start delivering ``report``; call ``settled`` once it is settled."""
        task = asyncio.create_task(self._deliver(report, settled))
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._on_settled()

    async def flush(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for pending reports, then give up on the rest."""
        if self._pending:
            logger.info("delivering %d pending report(s)", len(self._pending))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # A delivery may submit a follow-up report (errored after a refused result), so
        # look at the set again until it is empty.
        while self._pending and loop.time() < deadline:
            await asyncio.wait(list(self._pending), timeout=deadline - loop.time())
        if self._pending:
            self._abandon.set()
            while self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def request(self, method: str, path: str, body: Any) -> Any:
        """Send until the server answers 200 and return its body.

        A non-retryable answer raises :class:`StateGoneError`; after shutdown gave up,
        :class:`Abandoned`.
        """
        attempt = 0
        while True:
            try:
                response = await self._api.send(method, path, json=body)
            except httpx.RequestError as exc:
                problem = describe_exc(exc)
            else:
                payload = response_body(response)
                if response.status_code == 200:
                    return payload
                if not is_retryable_status(response.status_code):
                    raise StateGoneError(method, path, response.status_code, payload)
                problem = f"HTTP {response.status_code}"
            delay = self._backoff.delay(attempt)
            attempt += 1
            logger.warning(
                "%s %s failed (%s); retry %d in %.1f s", method, path, problem, attempt, delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._abandon.wait(), timeout=delay)
            if self._abandon.is_set():
                raise Abandoned

    async def _deliver(self, report: Report, settled: Callable[[], None] | None) -> None:
        path = self._api.url("state", report.state_id, report.kind)
        try:
            await self.request("POST", path, report.body)
        except StateGoneError as exc:
            if report.kind != "errored" and exc.status_code in _UNACCEPTABLE:
                # The server will never take this result (too many outputs, a body it
                # cannot parse): fail the attempt instead, so the retry policy applies.
                logger.error(
                    "%s report of state %s refused (HTTP %d: %s); reporting it as errored",
                    report.kind,
                    report.state_id,
                    exc.status_code,
                    exc.detail,
                )
                error = f"{report.kind} report refused with HTTP {exc.status_code}: {exc.detail}"
                body = {"error": error}
                self.submit(Report(report.state_id, report.node_name, "errored", body), settled)
                return
            self._stats.rejected += 1
            logger.warning(
                "%s report of state %s refused, the state is no longer ours: %s",
                report.kind,
                report.state_id,
                exc.detail,
            )
        except Abandoned:
            self._stats.undelivered += 1
            logger.error(
                "gave up delivering the %s report of state %s (%s) at shutdown; body: %r",
                report.kind,
                report.state_id,
                report.node_name,
                report.body,
            )
        except Exception:  # pragma: no cover - a bug here must not stop the runtime
            self._stats.undelivered += 1
            logger.exception(
                "unexpected failure delivering the %s report of state %s; body: %r",
                report.kind,
                report.state_id,
                report.body,
            )
        else:
            self._stats.count_accepted(report.kind)
        if settled is not None:
            settled()
