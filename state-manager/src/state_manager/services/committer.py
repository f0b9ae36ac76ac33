"""Group commit: one writer per process applies every queued operation in one transaction.

Callers submit operations and wait; the writer takes everything queued so far, applies
it in a single transaction and answers every caller once that transaction has
committed. While one batch commits the next one gathers, so under load a commit (and on
SQLite its fsync) is shared by many reports, claims and triggers, and when the server is
idle an operation is applied at once.

Operations are independent: each gets its own outcome. Two operations on the same state
never share a batch (the later one waits for the next batch), and operations submitted
together (:meth:`Committer.submit_all`) always share one. If a batch fails as a whole
for a reason that a single operation may have caused, its operations are applied again
one by one, so only the culprit fails; a database that cannot serve (down, unreachable,
disk full) fails them all alike, so such a batch is not split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from state_manager.services.ops import Op, StateOp
from state_manager.store.failures import unavailable

logger = logging.getLogger(__name__)

Apply = Callable[[Sequence[Op[Any]]], Awaitable[list[Any]]]
"""Applies operations in one transaction; returns, per operation, a value or an exception."""


@dataclass(eq=False)
class _Entry:
    ops: list[Op[Any]]
    future: asyncio.Future[list[Any]]
    state_ids: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        ids = (op.state_id.lower() for op in self.ops if isinstance(op, StateOp))
        self.state_ids = frozenset(ids)


class Committer:
    """The writer of one process. :meth:`start` it with the function that applies a batch."""

    def __init__(self, *, max_ops: int = 1000) -> None:
        self._max_ops = max_ops
        self._queue: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._apply: Apply | None = None
        self._observe: Callable[[int], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()  # nothing queued, nothing being applied
        self._drained.set()

    def start(self, apply: Apply, observe: Callable[[int], None] | None = None) -> None:
        """Start applying batches with ``apply``; ``observe`` gets each batch's size."""
        self._apply = apply
        self._observe = observe
        self._task = asyncio.create_task(self._run(), name="committer")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Apply what is queued (for up to ``grace_s`` seconds), then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), grace_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for entry in self._queue:
            if not entry.future.done():
                entry.future.set_exception(RuntimeError("the state manager is shutting down"))
        self._queue.clear()

    async def submit[T](self, op: Op[T]) -> T:
        """Apply ``op`` and return its outcome; a refused operation raises its error."""
        (outcome,) = await self.submit_all([op])
        if isinstance(outcome, BaseException):
            raise outcome
        return cast(T, outcome)

    async def submit_all(self, ops: Sequence[Op[Any]]) -> list[Any]:
        """Apply ``ops`` in one transaction, in order. Returns each one's outcome: a value,
        or the exception that refused it. At most one operation per state."""
        if self._task is None:
            raise RuntimeError("the committer is not running")
        entry = _Entry(list(ops), asyncio.get_running_loop().create_future())
        if len(entry.state_ids) != sum(isinstance(op, StateOp) for op in entry.ops):
            raise ValueError("operations submitted together must concern different states")
        self._queue.append(entry)
        self._drained.clear()
        self._wakeup.set()
        return await entry.future

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._drained.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            entries = self._take()
            if not entries:
                continue
            ops = [op for entry in entries for op in entry.ops]
            if self._observe is not None:
                self._observe(len(ops))
            try:
                outcomes = await self._apply_entries(ops)
            except BaseException as exc:  # cancelled mid-batch: nobody may wait forever
                for entry in entries:
                    if not entry.future.done():
                        entry.future.set_exception(RuntimeError(f"batch abandoned: {exc!r}"))
                raise
            position = 0
            for entry in entries:
                mine = outcomes[position : position + len(entry.ops)]
                position += len(entry.ops)
                if not entry.future.done():
                    entry.future.set_result(mine)

    def _take(self) -> list[_Entry]:
        """The next batch: queued entries in order, skipping those whose caller gave up,
        deferring those that concern a state already in the batch, up to ``max_ops``."""
        taken: list[_Entry] = []
        deferred: list[_Entry] = []
        seen: set[str] = set()
        count = 0
        while self._queue:
            entry = self._queue.popleft()
            if entry.future.done():  # cancelled: the caller is gone, apply nothing for it
                continue
            if taken and count + len(entry.ops) > self._max_ops:
                self._queue.appendleft(entry)
                break
            if entry.state_ids & seen:
                deferred.append(entry)
                continue
            taken.append(entry)
            seen |= entry.state_ids
            count += len(entry.ops)
        self._queue.extendleft(reversed(deferred))
        return taken

    async def _apply_entries(self, ops: list[Op[Any]]) -> list[Any]:
        apply = self._apply
        assert apply is not None
        try:
            return await apply(ops)
        except Exception as exc:
            if unavailable(exc) is not None:
                logger.warning("the database cannot serve %d operation(s): %s", len(ops), exc)
                return [exc] * len(ops)
            if len(ops) == 1:
                logger.exception("an operation failed")
                return [exc]
            logger.warning(
                "a batch of %d operations failed (%r); applying them one by one", len(ops), exc
            )
        outcomes: list[Any] = []
        for op in ops:
            try:
                outcomes += await apply([op])
            except Exception as exc:
                logger.exception("a %s operation failed", type(op).__name__)
                outcomes.append(exc)
        return outcomes
