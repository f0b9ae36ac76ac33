"""Delivery of state reports: retried until the server has them, never silently dropped.

Reports (``executed``, ``errored``, ``prune``, ``re-enqueue-after``) are delivered in the
background, so a slow or failing delivery never holds a worker. With a server that offers
``states/exchange`` they travel together, as many as arrived while the previous request
was in flight, with a claim for the runtime's free slots; otherwise each report is one
request to its v0 route. Network errors, timeouts and
retryable statuses (5xx, 408, 425, 429) are retried with backoff. Any other 4xx means the
state is no longer this worker's (finished, unknown, or taken back after its lease
expired): the report is dropped *and logged*. A 409 with code ``run_cancelled`` means
the state's run was cancelled: the report is dropped and logged once as such. Only
shutdown stops the retries, after its own deadline; every report given up then is
logged at ERROR with its full body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ._http import ApiClient, Backoff, is_retryable_status, response_body
from .errors import StateGoneError

__all__ = [
    "Abandoned",
    "ClaimOffer",
    "ClaimSource",
    "Report",
    "Reporter",
    "RuntimeStats",
    "describe_exc",
]

logger = logging.getLogger("exospherehost.runtime")

# Answers to a report that mean "never with this body" rather than "not your state".
_UNACCEPTABLE = frozenset({413, 422})
# The code of the server's answer (409) to a report or heartbeat of a cancelled run.
RUN_CANCELLED = "run_cancelled"


def is_run_cancelled(status: int, payload: Any) -> bool:
    """Whether an answer refuses a state because its run was cancelled."""
    return status == 409 and isinstance(payload, dict) and payload.get("code") == RUN_CANCELLED


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
    cancelled: int = 0
    """States not continued because their run was cancelled (also counted in ``rejected``
    when their report was refused)."""
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


@dataclass(frozen=True)
class ClaimOffer:
    """A claim to send along with reports: slots reserved by the runtime until the answer.

    ``deliver`` takes the claimed states (and frees the reservation); ``release`` frees
    it when the request failed.
    """

    nodes: list[str]
    batch_size: int
    deliver: Callable[[list[Any]], None]
    release: Callable[[], None]


ClaimSource = Callable[[], ClaimOffer | None]
"""Asked right before each exchange: the claim to send with the reports, if any."""

# Most reports sent in one exchange request (the server's default limit is 1000).
MAX_REPORTS_PER_EXCHANGE = 500


@dataclass
class _Queued:
    report: Report
    settled: Callable[[], None] | None


def _route_missing(status_code: int, payload: Any) -> bool:
    """Whether the server has no such route (an older server or the original)."""
    return status_code == 405 or (status_code == 404 and payload == {"detail": "Not Found"})


class Reporter:
    """Delivers reports in the background and keeps track of those still pending.

    With a server that offers ``states/exchange``, reports are buffered and sent together:
    one request carries every report that arrived while the previous one was in flight,
    plus a claim for the runtime's free slots (``claims``), so under load a round trip
    reports a batch of states and brings the next batch. A server without that route gets
    one request per report, as the v0 API defines.
    """

    def __init__(
        self,
        api: ApiClient,
        backoff: Backoff,
        stats: RuntimeStats,
        on_settled: Callable[[], None],
        claims: ClaimSource | None = None,
    ) -> None:
        self._api = api
        self._backoff = backoff
        self._stats = stats
        self._on_settled = on_settled
        self._claims = claims
        self._abandon = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()
        # None: not known yet whether the server offers states/exchange.
        self._exchange: bool | None = None
        self._buffer: deque[_Queued] = deque()
        self._in_flight: list[_Queued] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Reports not settled yet (accepted, refused or given up)."""
        return len(self._pending) + len(self._buffer) + len(self._in_flight)

    @property
    def will_claim(self) -> bool:
        """Whether reports are about to be sent with a claim (the runtime need not claim)."""
        return self._exchange is not False and bool(self._buffer or self._in_flight)

    def submit(self, report: Report, settled: Callable[[], None] | None = None) -> None:
        """Start delivering ``report``; call ``settled`` once it is settled."""
        if self._exchange is False:
            self._submit_alone(report, settled)
            return
        self._buffer.append(_Queued(report, settled))
        self._idle.clear()
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_loop(), name="exosphere-reports")

    def _submit_alone(self, report: Report, settled: Callable[[], None] | None) -> None:
        task = asyncio.create_task(self._deliver(report, settled))
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._on_settled()

    async def flush(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for pending reports, then give up on the rest."""
        if self.pending:
            logger.info("delivering %d pending report(s)", self.pending)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # A delivery may submit a follow-up report (errored after a refused result), so
        # look again until nothing is pending.
        while self.pending and loop.time() < deadline:
            waits = [asyncio.ensure_future(self._idle.wait()), *self._pending]
            try:
                await asyncio.wait(
                    waits, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waits[0].cancel()
            await asyncio.sleep(0)
        if self.pending:
            self._abandon.set()
            self._wake.set()
            while self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._sender is not None:
            self._abandon.set()
            self._wake.set()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None

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
            await self._back_off(f"{method} {path}", problem, attempt)
            attempt += 1

    async def _back_off(self, what: str, problem: str, attempt: int) -> None:
        """Wait before retry number ``attempt``; raise :class:`Abandoned` at shutdown."""
        delay = self._backoff.delay(attempt)
        logger.warning("%s failed (%s); retry %d in %.1f s", what, problem, attempt + 1, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._abandon.wait(), timeout=delay)
        if self._abandon.is_set():
            raise Abandoned

    async def _deliver(self, report: Report, settled: Callable[[], None] | None) -> None:
        path = self._api.url("state", report.state_id, report.kind)
        try:
            await self.request("POST", path, report.body)
        except StateGoneError as exc:
            cancelled = is_run_cancelled(exc.status_code, exc.body)
            self._refused(report, settled, exc.status_code, exc.detail, cancelled=cancelled)
            return
        except Abandoned:
            self._undelivered(report)
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

    def _refused(
        self,
        report: Report,
        settled: Callable[[], None] | None,
        status: int,
        detail: str,
        *,
        cancelled: bool = False,
    ) -> None:
        """A report answered with a non-retryable status: settle it, or turn a result the
        server can never accept into an errored report."""
        if cancelled:
            self._stats.rejected += 1
            self._stats.cancelled += 1
            logger.warning(
                "%s report of state %s (%s) refused: its run was cancelled (%s)",
                report.kind,
                report.state_id,
                report.node_name,
                detail,
            )
            if settled is not None:
                settled()
            return
        if report.kind != "errored" and status in _UNACCEPTABLE:
            # The server will never take this result (too many outputs, a body it cannot
            # parse): fail the attempt instead, so the retry policy applies.
            logger.error(
                "%s report of state %s refused (HTTP %d: %s); reporting it as errored",
                report.kind,
                report.state_id,
                status,
                detail,
            )
            body = {"error": f"{report.kind} report refused with HTTP {status}: {detail}"}
            self.submit(Report(report.state_id, report.node_name, "errored", body), settled)
            return
        self._stats.rejected += 1
        logger.warning(
            "%s report of state %s refused, the state is no longer ours: %s",
            report.kind,
            report.state_id,
            detail,
        )
        if settled is not None:
            settled()

    def _undelivered(self, report: Report) -> None:
        self._stats.undelivered += 1
        logger.error(
            "gave up delivering the %s report of state %s (%s) at shutdown; body: %r",
            report.kind,
            report.state_id,
            report.node_name,
            report.body,
        )

    # --- batched delivery -----------------------------------------------------------------

    async def _send_loop(self) -> None:
        attempt = 0
        while True:
            if not self._buffer:
                self._idle.set()
                if self._abandon.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            count = min(len(self._buffer), MAX_REPORTS_PER_EXCHANGE)
            self._in_flight = [self._buffer.popleft() for _ in range(count)]
            try:
                problem = await self._exchange_once(self._in_flight)
            except Exception as exc:  # pragma: no cover - a bug here must not lose reports
                logger.exception("sending reports failed unexpectedly")
                self._buffer.extendleft(reversed(self._in_flight))
                problem = describe_exc(exc)
            self._in_flight = []
            self._on_settled()
            # Let the states this answer brought start (a quick node finishes in this one
            # turn of the loop), so their reports go in the next request, not the one after.
            await asyncio.sleep(0)
            if self._exchange is False:
                for queued in self._buffer:
                    self._submit_alone(queued.report, queued.settled)
                self._buffer.clear()
                self._idle.set()
                return
            if problem is None:
                attempt = 0
                continue
            try:
                await self._back_off("sending reports", problem, attempt)
            except Abandoned:
                for queued in self._buffer:
                    self._undelivered(queued.report)
                    if queued.settled is not None:
                        queued.settled()
                self._buffer.clear()
                self._idle.set()
                return
            attempt += 1

    async def _exchange_once(self, batch: list[_Queued]) -> str | None:
        """Send one exchange and settle what it settled. Reports to send again go back to
        the front of the buffer; the answer says what went wrong (then back off), if anything.
        """
        offer = self._claims() if self._claims is not None and self._exchange else None
        body: dict[str, Any] = {
            "reports": [
                {"state_id": q.report.state_id, "kind": q.report.kind, **q.report.body}
                for q in batch
            ]
        }
        if offer is not None:
            body["claim"] = {"nodes": offer.nodes, "batch_size": offer.batch_size}
        delivered = False
        try:
            response = await self._api.send("POST", self._api.url("states", "exchange"), json=body)
            payload = response_body(response)
            if response.status_code != 200:
                if self._exchange is None and _route_missing(response.status_code, payload):
                    logger.info(
                        "the state manager has no states/exchange route; reporting one by one"
                    )
                    self._exchange = False
                    self._buffer.extendleft(reversed(batch))
                    return None
                if is_retryable_status(response.status_code):
                    self._buffer.extendleft(reversed(batch))
                    return f"HTTP {response.status_code}"
                # The request as a whole is refused (too large, say): send each alone.
                logger.warning(
                    "reports refused as a batch (HTTP %d); sending them one by one",
                    response.status_code,
                )
                for queued in batch:
                    self._submit_alone(queued.report, queued.settled)
                return None
            results, states = _parse_exchange(payload, len(batch))
            self._exchange = True
            if offer is not None:
                offer.deliver(states)
                delivered = True
        except httpx.RequestError as exc:
            self._buffer.extendleft(reversed(batch))
            return describe_exc(exc)
        except ValueError as exc:
            self._buffer.extendleft(reversed(batch))
            return f"malformed answer: {exc}"
        finally:
            if offer is not None and not delivered:
                offer.release()
        retry: list[_Queued] = []
        for queued, (status, detail, code) in zip(batch, results, strict=True):
            if status == 200:
                self._stats.count_accepted(queued.report.kind)
                if queued.settled is not None:
                    queued.settled()
            elif is_retryable_status(status):
                retry.append(queued)
            else:
                cancelled = is_run_cancelled(status, {"code": code})
                self._refused(queued.report, queued.settled, status, detail, cancelled=cancelled)
        if retry:
            self._buffer.extendleft(reversed(retry))
            return f"retryable answers for {len(retry)} report(s)"
        return None


def _parse_exchange(
    payload: Any, expected: int
) -> tuple[list[tuple[int, str, str | None]], list[Any]]:
    """(status, detail, code) per report and the claimed states, from an exchange answer."""
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    results = payload.get("results")
    states = payload.get("states")
    if not isinstance(results, list) or len(results) != expected or not isinstance(states, list):
        raise ValueError("results or states missing")
    parsed: list[tuple[int, str, str | None]] = []
    for item in results:
        if not isinstance(item, dict) or not isinstance(item.get("status_code"), int):
            raise ValueError(f"malformed result {item!r}")
        code = item.get("code")
        parsed.append(
            (
                item["status_code"],
                str(item.get("detail") or item.get("body")),
                code if isinstance(code, str) else None,
            )
        )
    return parsed, states
