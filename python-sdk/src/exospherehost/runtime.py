"""``Runtime``: claims states of one namespace, runs their nodes and reports the results.

How a runtime works:

* **Register** the node classes once (``PUT .../nodes/``), retrying while the server is
  unreachable.
* **Claim** ready states (``POST .../states/enqueue``), never more than the idle workers can
  start at once plus ``prefetch``: ``batch_size = min(batch_size, free workers + prefetch
  not yet held)``. Prefetched states wait here for a worker, so a worker that finishes
  starts the next state without waiting for a round trip to the server. The request asks
  the server to hold it until work appears (``wait_ms``, a long poll); a server that
  answers at once is polled every ``poll_interval`` seconds instead.
* **Execute** each state in its own task: fetch secrets if the node declares any, build
  ``Inputs``/``Secrets``, run ``execute`` (plain ``def`` nodes in a thread pool), and send
  heartbeats while it runs so the server keeps the claim.
* **Report** the outcome (``executed``, ``errored``, ``prune``, ``re-enqueue-after``). A
  report is retried with backoff on network errors and 5xx answers until the server accepts
  it or says, with a 4xx, that the state is no longer ours. Reporting happens in the
  background: a failing report never stops the runtime or blocks a worker.
* **Stop** on SIGINT/SIGTERM (in :meth:`Runtime.start`) or :meth:`Runtime.stop`: stop
  claiming, let running nodes finish for ``graceful_shutdown_timeout`` seconds, report them,
  then cancel what is left (reported as errored, so the server retries it) and give pending
  reports ``shutdown_report_timeout`` seconds more. Undeliverable reports are logged in
  full, never dropped silently. A claim request still held by the server (long poll) is
  waited for, not abandoned: states it brings are ours and are run like the others.
  A second signal stops waiting for the claim and the nodes; reports still get their time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
from collections import deque
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._http import ApiClient, Backoff, is_retryable_status, response_body
from ._reporting import (
    Abandoned,
    ClaimOffer,
    Report,
    Reporter,
    RuntimeStats,
    describe_exc,
    is_run_cancelled,
)
from .errors import ApiError, StateGoneError
from .node import BaseNode, node_problems, normalize_outputs
from .signals import PruneSignal, ReQueueAfterSignal

__all__ = ["Runtime", "RuntimeStats"]

logger = logging.getLogger("exospherehost.runtime")

_SHUTDOWN_ERROR = "the worker runtime shut down before the node finished"


@dataclass(eq=False)
class _Claim:
    state_id: str
    node_name: str
    inputs: dict[str, Any]
    # Heartbeats: a timer first, and a task only for a state still unsettled when it fires.
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    heartbeat: asyncio.Task[None] | None = field(default=None, repr=False)
    executing: bool = True  # holds a worker slot until its outcome is known
    done: bool = False  # the report is settled
    run_cancelled: bool = False  # a heartbeat found its run cancelled: nothing to report
    task: asyncio.Task[None] | None = field(default=None, repr=False)  # running the node

    def settled(self) -> None:
        """The state's report is settled: the claim needs no more heartbeats."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.heartbeat is not None:
            self.heartbeat.cancel()


class Runtime:
    """A worker process for the nodes of one namespace.

    Args:
        namespace: Namespace whose states this runtime claims.
        name: Name of this runtime (recorded with the registered nodes).
        nodes: Node classes (subclasses of :class:`BaseNode`) this runtime can execute.
        state_manager_uri: Base URL of the state manager; default from
            ``EXOSPHERE_STATE_MANAGER_URI``.
        key: API key; default from ``EXOSPHERE_API_KEY``.
        batch_size: Most states claimed in one request.
        workers: Nodes executed concurrently.
        prefetch: States claimed beyond the free workers, held until a worker is free
            (default 0: claim only what can start at once). They count against their
            lease from the claim and get heartbeats like running ones; other runtimes
            cannot take them meanwhile. On shutdown, those not started yet are handed
            back at once (``re-enqueue-after`` of 1 ms, which consumes no retry).
        state_manage_version: API version path segment (the spelling of the published SDK).
        poll_interval: Seconds between polls when the server answers at once with no work.
        wait_ms: How long the server may hold a claim request until work appears (long
            poll); 0 disables it. Servers without long polling ignore it.
        heartbeat_interval: Seconds between heartbeats of a running state; 0 disables them.
        graceful_shutdown_timeout: Seconds running nodes get to finish on shutdown.
        shutdown_report_timeout: Seconds pending reports get after the nodes, on shutdown.
        request_timeout: Timeout of one HTTP request (the long poll adds ``wait_ms``).
        retry_backoff: Backoff of retried requests (reports, claims, registration).
        transport: Custom httpx transport (tests use ``httpx.MockTransport``).
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        nodes: list[type[BaseNode]],
        state_manager_uri: str | None = None,
        key: str | None = None,
        batch_size: int = 16,
        workers: int = 4,
        state_manage_version: str = "v0",
        poll_interval: float = 1,
        *,
        wait_ms: int = 5_000,
        prefetch: int = 0,
        heartbeat_interval: float = 30.0,
        graceful_shutdown_timeout: float = 30.0,
        shutdown_report_timeout: float = 30.0,
        request_timeout: float = 30.0,
        retry_backoff: Backoff | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        _configure_default_logging()
        self._namespace = namespace
        self._name = name
        self._state_manager_uri = state_manager_uri or os.environ.get("EXOSPHERE_STATE_MANAGER_URI")
        self._key = key or os.environ.get("EXOSPHERE_API_KEY")
        self._batch_size = batch_size
        self._workers = workers
        self._version = state_manage_version
        self._poll_interval = poll_interval
        self._wait_ms = wait_ms
        self._prefetch = prefetch
        self._heartbeat_interval = heartbeat_interval
        self._graceful_shutdown_timeout = graceful_shutdown_timeout
        self._shutdown_report_timeout = shutdown_report_timeout
        self._request_timeout = request_timeout
        self._backoff = retry_backoff or Backoff()
        self._transport = transport
        self._node_list = list(nodes)
        self._validate()
        self._nodes: dict[str, type[BaseNode]] = {node.__name__: node for node in self._node_list}

        self.stats = RuntimeStats()
        self._stop_requested = False
        self._force_requested = False
        self._heartbeat_supported = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._force_event: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self._finished: asyncio.Event | None = None
        self._api: ApiClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: dict[asyncio.Task[None], _Claim] = {}  # one task per busy worker
        self._waiting: deque[_Claim] = deque()  # prefetched, waiting for a worker
        self._reserved = 0  # slots held by claim requests in flight
        self._executing = 0  # slots held by claimed states whose outcome is not known yet
        self._inflight_claim: asyncio.Future[list[Any]] | None = None
        self._reporter: Reporter | None = None

    # --- configuration -------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """Namespace this runtime serves."""
        return self._namespace

    @property
    def name(self) -> str:
        """Name of this runtime."""
        return self._name

    def _validate(self) -> None:
        problems: list[str] = []
        if self._batch_size < 1:
            problems.append("batch_size must be at least 1")
        if self._workers < 1:
            problems.append("workers must be at least 1")
        if self._prefetch < 0:
            problems.append("prefetch must not be negative")
        if self._poll_interval <= 0:
            problems.append("poll_interval must be positive")
        if not 0 <= self._wait_ms <= 30_000:
            problems.append("wait_ms must be between 0 and 30000")
        if not self._state_manager_uri:
            problems.append(
                "state_manager_uri is not set (pass it or set EXOSPHERE_STATE_MANAGER_URI)"
            )
        if not self._key:
            problems.append("key is not set (pass it or set EXOSPHERE_API_KEY)")
        if not self._node_list:
            problems.append("nodes must list at least one node class")
        for node in self._node_list:
            problems.extend(node_problems(node))
        names = [node.__name__ for node in self._node_list if isinstance(node, type)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"node class names must be unique, repeated: {', '.join(duplicates)}")
        if problems:
            raise ValueError("invalid Runtime configuration:\n  - " + "\n  - ".join(problems))

    # --- public lifecycle ----------------------------------------------------------------

    def start(self) -> asyncio.Task[RuntimeStats] | None:
        """Run the runtime.

        Inside a running event loop, schedule it as a task and return the task (stop it with
        :meth:`stop`). Otherwise block until SIGINT/SIGTERM, then shut down gracefully.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.run(handle_signals=True))
            return None
        return asyncio.ensure_future(self.run())

    async def _start(self) -> RuntimeStats:
        """Same as :meth:`run` (the name used by the published SDK's notebook examples)."""
        return await self.run()

    async def run(self, *, handle_signals: bool = False) -> RuntimeStats:
        """Register, then claim and execute states until :meth:`stop` (or a signal).

        With ``handle_signals``, SIGINT and SIGTERM start a graceful shutdown (a second one
        skips the wait for running nodes). Raises if registration is refused.
        """
        return await self._serve(until_idle=False, idle_timeout=0.0, handle_signals=handle_signals)

    async def run_until_idle(self, *, idle_timeout: float = 1.0) -> RuntimeStats:
        """Register, then execute states until there is nothing left to do, and return.

        "Nothing left" means no node running, no report pending, and no claimable state for
        ``idle_timeout`` seconds. States delayed further than that (retry backoff,
        re-enqueue) are left for a later run, as in a batch job.
        """
        return await self._serve(until_idle=True, idle_timeout=idle_timeout, handle_signals=False)

    def request_stop(self, *, force: bool = False) -> None:
        """Ask a running runtime to shut down; returns at once, callable from any thread.

        With ``force``, running nodes are cancelled without waiting for them.
        """
        self._stop_requested = True
        self._force_requested = self._force_requested or force
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._set_stop_events()
        else:
            loop.call_soon_threadsafe(self._set_stop_events)

    async def stop(self, *, force: bool = False) -> None:
        """Shut down gracefully and wait until the runtime has finished."""
        finished = self._finished
        self.request_stop(force=force)
        if finished is not None and self._loop is asyncio.get_running_loop():
            await finished.wait()

    # --- main loop -----------------------------------------------------------------------

    def _set_stop_events(self) -> None:
        if self._stop_event is not None and self._stop_requested:
            self._stop_event.set()
        if self._force_event is not None and self._force_requested:
            self._force_event.set()

    async def _serve(
        self, *, until_idle: bool, idle_timeout: float, handle_signals: bool
    ) -> RuntimeStats:
        if self._loop is not None:
            raise RuntimeError("this Runtime is already running")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        self._force_event = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._finished = asyncio.Event()
        self._set_stop_events()
        installed = self._install_signal_handlers(loop) if handle_signals else []
        self._executor = ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix=f"exosphere-{self._name}"
        )
        assert self._state_manager_uri is not None and self._key is not None
        self._api = ApiClient(
            self._state_manager_uri,
            self._key,
            self._namespace,
            self._version,
            timeout=self._request_timeout,
            # Claims, reports and heartbeats of every worker may be in flight at once.
            max_connections=self._workers * 2 + 4,
            transport=self._transport,
        )
        self._reporter = Reporter(
            self._api, self._backoff, self.stats, self._slot_freed.set, claims=self._offer_claim
        )
        try:
            registered = await self._register()
            if registered:
                await self._claim_loop(until_idle=until_idle, idle_timeout=idle_timeout)
        finally:
            try:
                await self._drain()
            finally:
                for signum in installed:
                    loop.remove_signal_handler(signum)
                self._executor.shutdown(wait=False, cancel_futures=True)
                await self._api.aclose()
                self._api = None
                self._reporter = None
                self._executor = None
                self._loop = None
                self._finished.set()
                self._finished = None
                self._stop_requested = False
                self._force_requested = False
        return self.stats

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        installed: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                continue
            installed.append(signum)
        return installed

    def _on_signal(self, signum: int) -> None:
        if self._stop_requested:
            logger.warning("second %s: cancelling running nodes", signal.Signals(signum).name)
            self.request_stop(force=True)
        else:
            logger.info(
                "%s received: finishing running nodes (send it again to cancel them)",
                signal.Signals(signum).name,
            )
            self.request_stop()

    async def _register(self) -> bool:
        api = self._require_api()
        body = {
            "runtime_name": self._name,
            "runtime_namespace": self._namespace,
            "nodes": [
                {
                    "name": node.__name__,
                    "namespace": self._namespace,
                    "inputs_schema": node.Inputs.model_json_schema(),
                    "outputs_schema": node.Outputs.model_json_schema(),
                    "secrets": list(node.Secrets.model_fields),
                }
                for node in self._node_list
            ],
        }
        attempt = 0
        while True:
            try:
                response = await self._until_stopped(
                    api.send("PUT", api.url("nodes", trailing_slash=True), json=body)
                )
            except httpx.RequestError as exc:
                logger.warning("cannot register nodes yet (%s); retrying", describe_exc(exc))
            else:
                if response is None:
                    return False
                if response.status_code == 200:
                    logger.info(
                        "runtime %r registered %d node(s) in namespace %r",
                        self._name,
                        len(self._node_list),
                        self._namespace,
                    )
                    return True
                if not is_retryable_status(response.status_code):
                    raise ApiError(
                        "PUT",
                        str(response.request.url),
                        response.status_code,
                        response_body(response),
                    )
                logger.warning("registration got HTTP %d; retrying", response.status_code)
            if not await self._sleep_unless_stopped(self._backoff.delay(attempt)):
                return False
            attempt += 1

    def _free_slots(self) -> int:
        """How many more states this runtime may claim: its workers and prefetch, less
        the states it holds (running or waiting) and the claim requests in flight."""
        return self._workers + self._prefetch - self._executing - self._reserved

    def _offer_claim(self) -> ClaimOffer | None:
        """A claim for the free slots, sent along with reports (see :class:`Reporter`)."""
        free = self._free_slots()
        if self._stop_requested or free <= 0:
            return None
        size = min(self._batch_size, free)
        self._reserved += size
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._reserved -= size
                if self._slot_freed is not None:
                    self._slot_freed.set()

        def deliver(states: list[Any]) -> None:
            release()
            for raw in states:
                self._launch(raw)

        return ClaimOffer(list(self._nodes), size, deliver, release)

    async def _claim_loop(self, *, until_idle: bool, idle_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        assert self._stop_event is not None and self._slot_freed is not None
        names = list(self._nodes)
        failures = 0
        idle_since: float | None = None
        while not self._stop_event.is_set():
            self._slot_freed.clear()
            free = self._free_slots()
            if free <= 0 or self._require_reporter().will_claim:
                # No room, or reports about to be sent will claim for the free slots.
                await self._first_of(self._slot_freed.wait())
                continue
            wait_ms = self._wait_ms
            if until_idle:
                wait_ms = min(wait_ms, max(0, int(idle_timeout * 1000)))
            size = min(self._batch_size, free)
            body: dict[str, Any] = {"nodes": names, "batch_size": size}
            if wait_ms > 0:
                body["wait_ms"] = wait_ms
            started = loop.time()
            self._reserved += size
            poll = asyncio.ensure_future(self._claim(body, wait_ms))
            poll.add_done_callback(functools.partial(self._release, size))
            # asyncio.wait() does not cancel ``poll`` when the stop wins the race.
            await self._first_of(asyncio.wait({poll}))
            if not poll.done():
                # Stopping. The server may still hand states to this request, and then
                # they are ours: the drain waits for it instead of dropping them.
                self._inflight_claim = poll
                break
            try:
                states = poll.result()
            except (httpx.RequestError, ApiError, ValueError) as exc:
                logger.warning("claiming states failed: %s", describe_exc(exc))
                await self._sleep_unless_stopped(
                    max(self._backoff.delay(failures), self._poll_interval)
                )
                failures += 1
                continue
            except Exception:  # a bug must not stop claiming for good
                logger.exception("claiming states failed unexpectedly")
                await self._sleep_unless_stopped(
                    max(self._backoff.delay(failures), self._poll_interval)
                )
                failures += 1
                continue
            failures = 0
            for raw in states:
                self._launch(raw)
            if states:
                idle_since = None
                continue
            now = loop.time()
            if until_idle:
                if self._running or self._require_reporter().pending:
                    idle_since = None
                elif idle_since is None:
                    idle_since = started
                if idle_since is not None and now - idle_since >= idle_timeout:
                    return
            if now - started < wait_ms / 2000:
                # The server answered an empty claim at once: it does not long-poll.
                pause = self._poll_interval
                if until_idle:
                    pause = min(pause, max(idle_timeout / 4, 0.01))
                if self._running or self._require_reporter().pending:
                    # Wake up as soon as a worker finishes: its report may create work.
                    assert self._slot_freed is not None
                    self._slot_freed.clear()
                    await self._first_of(self._slot_freed.wait(), asyncio.sleep(pause))
                else:
                    await self._sleep_unless_stopped(pause)

    def _release(self, size: int, _poll: object = None) -> None:
        self._reserved -= size
        if self._slot_freed is not None:
            self._slot_freed.set()

    async def _claim(self, body: dict[str, Any], wait_ms: int) -> list[Any]:
        api = self._require_api()
        response = await api.send(
            "POST",
            api.url("states", "enqueue"),
            json=body,
            request_timeout=self._request_timeout + wait_ms / 1000,
        )
        payload = response_body(response)
        if response.status_code != 200:
            raise ApiError("POST", "states/enqueue", response.status_code, payload)
        states = payload.get("states") if isinstance(payload, dict) else None
        if not isinstance(states, list):
            raise ValueError(f"enqueue answer has no 'states' list: {payload!r}")
        return states

    # --- executing one state -------------------------------------------------------------

    def _launch(self, raw: Any) -> None:
        try:
            claim = _Claim(
                state_id=str(raw["state_id"]),
                node_name=str(raw["node_name"]),
                inputs=dict(raw.get("inputs") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            logger.error("ignoring a malformed claimed state: %r", raw)
            return
        self.stats.claimed += 1
        if self._heartbeat_interval > 0 and self._heartbeat_supported:
            # A timer costs far less than a task; most states finish before it fires.
            claim.timer = asyncio.get_running_loop().call_later(
                self._heartbeat_interval, self._start_heartbeat, claim
            )
        self._executing += 1
        self._waiting.append(claim)
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Give waiting states to the free workers, in the order they were claimed."""
        while self._waiting and len(self._running) < self._workers:
            claim = self._waiting.popleft()
            task = asyncio.create_task(self._handle(claim), name=f"exosphere-{claim.state_id}")
            claim.task = task
            self._running[task] = claim
            task.add_done_callback(self._on_node_done)

    def _hand_back_waiting(self) -> None:
        """Return the states no worker has started to the server (shutdown): a
        ``re-enqueue-after`` of 1 ms makes them claimable again and consumes no retry."""
        if self._waiting:
            logger.info("handing back %d prefetched state(s) not started", len(self._waiting))
        while self._waiting:
            self._report(self._waiting.popleft(), "re-enqueue-after", {"enqueue_after": 1})

    def _on_node_done(self, task: asyncio.Task[None]) -> None:
        claim = self._running.pop(task, None)
        if claim is not None:
            self._free_slot(claim)
        self._start_waiting()
        if self._slot_freed is not None:
            self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover
            logger.error("node task failed unexpectedly", exc_info=task.exception())

    async def _handle(self, claim: _Claim) -> None:
        try:
            report = await self._execute(claim)
        except asyncio.CancelledError:
            if claim.run_cancelled:
                claim.settled()  # the run was cancelled: no report; the slot frees
                return
            logger.warning(
                "state %s (%s) cancelled at shutdown; reporting it as errored",
                claim.state_id,
                claim.node_name,
            )
            self._report(claim, "errored", {"error": _SHUTDOWN_ERROR})
            raise
        self._report(claim, *report)

    def _report(self, claim: _Claim, kind: str, body: dict[str, Any]) -> None:
        report = Report(claim.state_id, claim.node_name, kind, body)
        self._require_reporter().submit(report, settled=claim.settled)
        # The slot is free once the outcome is known: the report travels on its own.
        self._free_slot(claim)

    def _free_slot(self, claim: _Claim) -> None:
        if claim.executing:
            claim.executing = False
            self._executing -= 1
            if self._slot_freed is not None:
                self._slot_freed.set()

    async def _execute(self, claim: _Claim) -> tuple[str, dict[str, Any]]:
        """Run the state's node; return the report to send as (kind, body)."""
        node_cls = self._nodes.get(claim.node_name)
        if node_cls is None:
            error = f"node {claim.node_name!r} is not served by runtime {self._name!r}"
            return "errored", {"error": error}
        try:
            secrets: dict[str, Any] = {}
            if node_cls.Secrets.model_fields:
                secrets = await self._fetch_secrets(claim.state_id)
            inputs_model = node_cls.Inputs(**claim.inputs)
            secrets_model = node_cls.Secrets(**secrets)
            node = node_cls()
            result = await node._run(inputs_model, secrets_model, self._executor)
            outputs = normalize_outputs(claim.node_name, result)
        except PruneSignal as prune:
            return "prune", prune.to_body()
        except ReQueueAfterSignal as requeue:
            return "re-enqueue-after", requeue.to_body()
        except Abandoned:
            return "errored", {"error": _SHUTDOWN_ERROR}
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Includes SystemExit/KeyboardInterrupt raised by node code: they end this
            # attempt, not the worker.
            logger.warning(
                "state %s (%s) failed: %s",
                claim.state_id,
                claim.node_name,
                describe_exc(exc),
                exc_info=exc,
            )
            return "errored", {"error": describe_exc(exc)}
        return "executed", {"outputs": outputs}

    async def _fetch_secrets(self, state_id: str) -> dict[str, Any]:
        api = self._require_api()
        try:
            body = await self._require_reporter().request(
                "GET", api.url("state", state_id, "secrets"), None
            )
        except StateGoneError as exc:
            logger.warning("no secrets for state %s: %s", state_id, exc)
            return {}
        secrets = body.get("secrets") if isinstance(body, dict) else None
        return dict(secrets) if isinstance(secrets, dict) else {}

    def _start_heartbeat(self, claim: _Claim) -> None:
        """The first heartbeat interval of ``claim`` passed: heartbeat from now on while
        its report is unsettled (it may still be running, or its report in flight)."""
        claim.timer = None
        if claim.done or not self._heartbeat_supported:
            return
        claim.heartbeat = asyncio.create_task(self._heartbeat(claim))

    async def _heartbeat(self, claim: _Claim) -> None:
        """Send a heartbeat now, then one every interval, until cancelled or refused. A
        refusal because the run was cancelled stops the node (nothing will be reported)."""
        api = self._require_api()
        state_id = claim.state_id
        path = api.url("state", state_id, "heartbeat")
        while True:
            try:
                response = await api.send("POST", path, json={})
            except httpx.RequestError as exc:
                logger.debug("heartbeat of %s failed: %s", state_id, describe_exc(exc))
                await asyncio.sleep(self._heartbeat_interval)
                continue
            status = response.status_code
            if status == 200 or is_retryable_status(status):
                await asyncio.sleep(self._heartbeat_interval)
                continue
            body = response_body(response)
            if is_run_cancelled(status, body):
                task = claim.task
                if claim in self._waiting:  # prefetched, not started: drop it
                    logger.warning(
                        "state %s (%s): its run was cancelled before it started",
                        state_id,
                        claim.node_name,
                    )
                    self._waiting.remove(claim)
                    self.stats.cancelled += 1
                    claim.run_cancelled = True
                    claim.settled()
                    self._free_slot(claim)
                elif task is not None and not task.done() and claim.executing:
                    logger.warning(
                        "state %s (%s): its run was cancelled; stopping the node",
                        state_id,
                        claim.node_name,
                    )
                    self.stats.cancelled += 1
                    claim.run_cancelled = True
                    task.cancel()
                # (else the node has finished: its report is refused and counted then)
            elif status == 405 or (status == 404 and body == {"detail": "Not Found"}):
                logger.info("the state manager has no heartbeat route; heartbeats disabled")
                self._heartbeat_supported = False
            else:
                logger.warning(
                    "heartbeat of state %s refused (HTTP %d): the claim may have been lost",
                    state_id,
                    status,
                )
            return

    # --- shutdown ------------------------------------------------------------------------

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._force_event is not None
        deadline = loop.time() + self._graceful_shutdown_timeout
        poll, self._inflight_claim = self._inflight_claim, None
        if poll is not None:
            logger.info("waiting for the pending claim request (a second signal skips it)")
            await self._first_of(
                asyncio.wait({poll}),
                self._force_event.wait(),
                within=max(0.0, deadline - loop.time()),
                or_stop=False,
            )
            if poll.done() and not poll.cancelled() and poll.exception() is None:
                for raw in poll.result():
                    self._launch(raw)
            else:
                poll.cancel()
                await asyncio.gather(poll, return_exceptions=True)
        self._hand_back_waiting()
        if self._running:
            logger.info(
                "waiting up to %.0f s for %d running node(s)",
                max(0.0, deadline - loop.time()),
                len(self._running),
            )
            while self._running and not self._force_event.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._first_of(
                    asyncio.wait(list(self._running), return_when=asyncio.FIRST_COMPLETED),
                    self._force_event.wait(),
                    within=remaining,
                    or_stop=False,
                )
            leftover = list(self._running)
            # States an answer brought meanwhile must not start as the others stop.
            self._hand_back_waiting()
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)
        await self._require_reporter().flush(self._shutdown_report_timeout)
        for claim in list(self._running.values()):  # pragma: no cover - defensive
            claim.settled()

    # --- helpers -------------------------------------------------------------------------

    def _require_api(self) -> ApiClient:
        if self._api is None:
            raise RuntimeError("the runtime is not running")
        return self._api

    def _require_reporter(self) -> Reporter:
        if self._reporter is None:
            raise RuntimeError("the runtime is not running")
        return self._reporter

    async def _until_stopped[T](self, coro: Coroutine[Any, Any, T]) -> T | None:
        """Await ``coro`` unless a stop is requested first (then cancel it, return None)."""
        assert self._stop_event is not None
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep; False if a stop was requested meanwhile."""
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)
        return not self._stop_event.is_set()

    async def _first_of(
        self,
        *aws: Coroutine[Any, Any, Any],
        within: float | None = None,
        or_stop: bool = True,
    ) -> None:
        """Wait until one of ``aws`` (or a stop request) completes; cancel the rest."""
        assert self._stop_event is not None
        tasks = [asyncio.ensure_future(aw) for aw in aws]
        if or_stop:
            tasks.append(asyncio.ensure_future(self._stop_event.wait()))
        try:
            await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _configure_default_logging() -> None:
    """Log at ``EXOSPHERE_LOG_LEVEL`` (INFO) unless the application configured logging."""
    if os.environ.get("EXOSPHERE_DISABLE_DEFAULT_LOGGING"):
        return
    root = logging.getLogger()
    if root.handlers:
        return
    level = os.environ.get("EXOSPHERE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; a worker polls continuously.
    logging.getLogger("httpx").setLevel(logging.WARNING)
