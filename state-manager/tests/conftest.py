from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sm_support import RunningServer, make_database, serve, test_settings

BACKENDS = ["sqlite", "postgres", "mongo"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    database = make_database(backend, tmp_path)
    try:
        yield database.url
    finally:
        database.drop()


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[RunningServer]:
    with serve(test_settings(database_url, tmp_path / "data")) as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.base_url, headers=server.headers, timeout=30
    ) as http:
        yield http
