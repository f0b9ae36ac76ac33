"""Server processes sharing one SQLite file take turns at its write lock, first come first served.

A SQLite writer that finds the database locked sleeps and tries again (the busy handler backs
off to 100 ms sleeps). A process that commits back to back is almost always holding the lock
when another process looks, so the other process's writers, and its workers' claims, can
wait hundreds of milliseconds while the first one does all the work. So before ``BEGIN
IMMEDIATE`` a process takes its turn on two lock files next to the database:

* ``<db>-turn``, held from before ``BEGIN`` until after ``COMMIT`` or ``ROLLBACK``;
* ``<db>-queue``, held by the process waiting for the turn. A process done with its turn
  must take the queue before its next one, so it lines up behind a waiting process
  instead of barging ahead of it.

Waits block in the kernel (``flock``) on a thread of their own, so a waiter is woken by the
release rather than at its next poll. The kernel drops the locks of a process that dies.
Turns only order the processes that take them: exclusion is still SQLite's lock, and a
writer that does not take turns (another tool) is waited for with the busy timeout as
before. A process that cannot get a turn within ``wait_s`` goes on without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class _Ticket:
    """One wait on the waiter thread; guarded by :attr:`WriteTurns._mutex`."""

    given_up: bool = False  # the writer stopped waiting (cancelled, timed out)
    taken: bool = False  # the thread took the turn for a writer still waiting


class WriteTurns:
    """This process's place in line for the write lock of the SQLite file ``database``.

    One writer of the process at a time calls :meth:`enter`, then :meth:`leave` once its
    transaction is over (the caller serialises its writers).
    """

    def __init__(self, database: Path, wait_s: float) -> None:
        self._paths = (Path(f"{database}-queue"), Path(f"{database}-turn"))
        self._wait_s = wait_s
        self._files: tuple[int, int] | None = None
        self._closed = False
        self._held = False
        # The thread of the last blocking wait. A wait given up on still runs to its end (a
        # thread cannot be interrupted) and lets go of what it took; the next wait starts
        # after it. Daemon threads: a wait blocked by a stopped process never holds up exit.
        self._waiter: threading.Thread | None = None
        self._mutex = threading.Lock()

    async def enter(self) -> None:
        """Wait for this process's turn (at most ``wait_s``; then go on without one)."""
        files = self._open()
        if files is None:
            return
        queue, turn = files
        lined_up = False
        if self._waiter is None or not self._waiter.is_alive():
            try:
                lined_up = _try_lock(queue)
                if lined_up and _try_lock(turn):
                    _unlock(queue)
                    self._held = True
                    return
            except OSError as exc:
                _unlock(queue)
                self._stop_taking_turns(exc)
                return
        ticket = _Ticket()
        try:
            async with asyncio.timeout(self._wait_s):
                self._held = await self._wait_in_thread(files, ticket, lined_up)
        except BaseException as exc:
            with self._mutex:
                ticket.given_up = True
                taken = ticket.taken
            if taken:  # taken in the same instant as given up on: hand it straight back
                _unlock(turn)
            if isinstance(exc, TimeoutError):
                logger.warning(
                    "no turn at the SQLite write lock within %.0f s: going on without one",
                    self._wait_s,
                )
            elif isinstance(exc, OSError):
                self._stop_taking_turns(exc)
            else:
                raise

    def leave(self) -> None:
        """End this process's turn, if :meth:`enter` gave it one."""
        if self._held and self._files is not None:
            self._held = False
            _unlock(self._files[1])

    def close(self) -> None:
        """Stop taking turns. The lock files stay open while a wait is still blocked on them
        (closing them could hand their numbers to other files under its feet)."""
        self.leave()
        self._closed = True
        files, self._files = self._files, None
        if files is not None and (self._waiter is None or not self._waiter.is_alive()):
            for descriptor in files:
                os.close(descriptor)

    def _wait_in_thread(
        self, files: tuple[int, int], ticket: _Ticket, lined_up: bool
    ) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()
        previous = self._waiter

        def run() -> None:
            if previous is not None:
                previous.join()
            try:
                outcome: tuple[bool, BaseException | None] = (
                    self._wait(files, ticket, lined_up),
                    None,
                )
            except OSError as exc:
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, answer, *outcome)

        self._waiter = threading.Thread(target=run, name="sqlite-write-turn", daemon=True)
        self._waiter.start()
        return answer

    def _wait(self, files: tuple[int, int], ticket: _Ticket, lined_up: bool) -> bool:
        """On a waiter thread: line up (unless already in line), then take the turn."""
        queue, turn = files
        try:
            if not lined_up:
                fcntl.flock(queue, fcntl.LOCK_EX)
            fcntl.flock(turn, fcntl.LOCK_EX)
        finally:
            _unlock(queue)
        with self._mutex:
            if ticket.given_up:
                _unlock(turn)
                return False
            ticket.taken = True
        return True

    def _open(self) -> tuple[int, int] | None:
        if self._files is None and not self._closed:
            try:
                queue = os.open(self._paths[0], os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    turn = os.open(self._paths[1], os.O_RDWR | os.O_CREAT, 0o600)
                except OSError:
                    os.close(queue)
                    raise
            except OSError as exc:
                self._stop_taking_turns(exc)
            else:
                self._files = (queue, turn)
        return None if self._closed else self._files

    def _stop_taking_turns(self, exc: OSError) -> None:
        """Lock files that cannot be used: write as if alone, relying on SQLite's lock."""
        logger.warning("SQLite writers will not take turns (%s): %s", self._paths[1], exc)
        self._closed = True


def _settle(answer: asyncio.Future[bool], held: bool, error: BaseException | None) -> None:
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(held)


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(descriptor: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(descriptor, fcntl.LOCK_UN)
