"""Server processes sharing one SQLite file take turns at its write lock.

Without turns, a process that commits back to back keeps SQLite's write lock while
another process's writer sleeps in SQLite's busy handler (up to 100 ms per try): that
writer can wait for dozens of the other's commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from state_manager.store.database import Database
from state_manager.store.queries import Tx
from state_manager.store.turns import WriteTurns

# A process that commits back to back, each transaction holding the write lock ~2 ms.
HOG = textwrap.dedent(
    """
    import asyncio, sys, time
    import sqlalchemy as sa
    from state_manager.store.database import Database

    async def main() -> None:
        db = Database(sys.argv[1], pool_size=1)
        print("ready", flush=True)
        while True:
            async with db.write() as tx:
                tx.connection.execute(sa.text("UPDATE commits SET n = n + 1"))
                time.sleep(0.002)

    asyncio.run(main())
    """
)


@contextlib.contextmanager
def hog(url: str) -> Iterator[None]:
    process = subprocess.Popen([sys.executable, "-c", HOG, url], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _sync(tx: Tx) -> Connection:
    assert isinstance(tx.connection, Connection)
    return tx.connection


async def test_a_writer_waits_for_at_most_a_few_commits_of_a_busy_process(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    db = Database(url, pool_size=2)
    try:
        async with db.write() as tx:
            _sync(tx).execute(sa.text("CREATE TABLE commits (n INTEGER NOT NULL)"))
            _sync(tx).execute(sa.text("INSERT INTO commits VALUES (0)"))
        with hog(url):
            waited_for: list[int] = []
            for _ in range(20):
                async with db.read() as tx:
                    before = _sync(tx).execute(sa.text("SELECT n FROM commits")).scalar_one()
                async with db.write() as tx:
                    inside = _sync(tx).execute(sa.text("SELECT n FROM commits")).scalar_one()
                waited_for.append(inside - before)
                await asyncio.sleep(0.01)
        assert sum(waited_for) > 0, "the other process never held the lock: no contention"
        # The commit under way when it looked, one finished before it lined up, and one
        # that slipped in while both reached for the line at the same instant.
        assert max(waited_for) <= 3, f"commits of the other process waited for: {waited_for}"
    finally:
        await db.close()


# -- WriteTurns on its own: two instances in one process line up like two processes ----


@contextlib.asynccontextmanager
async def turns(path: Path, wait_s: float = 10) -> AsyncIterator[WriteTurns]:
    line = WriteTurns(path, wait_s)
    try:
        yield line
    finally:
        line.close()


def held(path: Path) -> bool:
    """Whether anyone holds the lock file ``path`` (tried from a descriptor of our own)."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 10 s) for ``condition`` to hold."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def test_a_process_done_with_its_turn_lines_up_behind_one_waiting(
    tmp_path: Path,
) -> None:
    db = tmp_path / "x.db"
    async with turns(db) as first, turns(db) as second:
        await first.enter()
        waiting = asyncio.create_task(second.enter())
        await until(lambda: held(Path(f"{db}-queue")))  # ``second`` is in line
        first.leave()
        again = asyncio.create_task(first.enter())
        await asyncio.wait_for(waiting, 10)
        await asyncio.sleep(0.05)
        assert not again.done(), "the process that just had its turn went ahead again"
        second.leave()
        await asyncio.wait_for(again, 10)
        assert held(Path(f"{db}-turn"))
        first.leave()
        assert not held(Path(f"{db}-turn"))


async def takes_a_turn(line: WriteTurns, db: Path) -> None:
    """``line`` gets the turn (within 10 s) and lets go of it."""
    await asyncio.wait_for(line.enter(), 10)
    assert held(Path(f"{db}-turn"))
    line.leave()
    assert not held(Path(f"{db}-turn"))


async def test_a_wait_given_up_on_lets_go_of_the_turn_it_takes_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "x.db"
    async with turns(db) as holder, turns(db, wait_s=0.2) as impatient, turns(db) as third:
        await holder.enter()
        with caplog.at_level(logging.WARNING, logger="state_manager.store.turns"):
            await impatient.enter()  # goes on without a turn after 0.2 s
        assert "going on without one" in caplog.text
        impatient.leave()  # holds nothing: the holder keeps its turn
        assert held(Path(f"{db}-turn"))
        holder.leave()
        # The wait given up on takes the turn once free, and hands it straight back.
        await takes_a_turn(third, db)


async def test_a_cancelled_wait_lets_go_of_the_turn_it_takes_later(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    async with turns(db) as holder, turns(db) as cancelled:
        await holder.enter()
        waiting = asyncio.create_task(cancelled.enter())
        await until(lambda: held(Path(f"{db}-queue")))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        holder.leave()
        await until(lambda: not held(Path(f"{db}-turn")) and not held(Path(f"{db}-queue")))
        # The process whose wait was cancelled takes turns as before.
        await takes_a_turn(cancelled, db)


async def test_lock_files_that_cannot_be_made_leave_sqlite_to_order_writers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="state_manager.store.turns"):
        async with turns(tmp_path / "missing" / "x.db") as line:
            await line.enter()
            line.leave()
            await line.enter()
    assert caplog.text.count("will not take turns") == 1
