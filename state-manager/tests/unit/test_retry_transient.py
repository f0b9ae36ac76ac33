"""Transactions aborted by the database for a transient reason are run again (fault injected)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError
from state_manager.services.context import TRANSIENT_ATTEMPTS, retry_transient


class DriverError(Exception):
    def __init__(self, message: str, pgcode: str | None = None) -> None:
        super().__init__(message)
        self.pgcode = pgcode


def failure(message: str, pgcode: str | None = None) -> DBAPIError:
    return DBAPIError("UPDATE states ...", {}, DriverError(message, pgcode))


@pytest.mark.parametrize(
    "error",
    [
        failure("deadlock detected", "40P01"),
        failure("could not serialize access", "40001"),
        failure("database is locked"),
    ],
)
async def test_transient_aborts_are_retried(error: DBAPIError) -> None:
    calls = 0

    @retry_transient
    async def report(value: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise error
        return value * 2

    assert await report(21) == 42
    assert calls == 3


async def test_other_errors_and_exhausted_retries_propagate() -> None:
    calls = 0

    @retry_transient
    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise failure("duplicate key value", "23505")

    with pytest.raises(DBAPIError, match="duplicate key"):
        await broken()
    assert calls == 1

    calls = 0

    @retry_transient
    async def always_deadlocked() -> None:
        nonlocal calls
        calls += 1
        raise failure("deadlock detected", "40P01")

    with pytest.raises(DBAPIError, match="deadlock"):
        await always_deadlocked()
    assert calls == TRANSIENT_ATTEMPTS
