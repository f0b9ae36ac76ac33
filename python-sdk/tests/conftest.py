"""Fixtures shared by the SDK tests: a fake state manager, a runtime factory, the real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from exospherehost import BaseNode, Runtime
from sdk_fakeserver import FAST_BACKOFF, FakeStateManager
from sm_support import ServerProcess, make_database, server_process


@pytest.fixture
def fake() -> FakeStateManager:
    return FakeStateManager()


@pytest.fixture
def make_runtime(fake: FakeStateManager) -> Callable[..., Runtime]:
    def build(nodes: list[type[BaseNode]], **options: Any) -> Runtime:
        settings: dict[str, Any] = {
            "state_manager_uri": fake.uri,
            "key": fake.key,
            "workers": 4,
            "poll_interval": 0.01,
            "wait_ms": 200,
            "retry_backoff": FAST_BACKOFF,
            "transport": fake.transport,
            "graceful_shutdown_timeout": 5.0,
            "shutdown_report_timeout": 5.0,
        }
        settings.update(options)
        return Runtime(fake.namespace, "test-runtime", nodes, **settings)

    return build


@pytest.fixture(scope="session")
def sm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real state manager, one per test session; tests isolate by namespace."""
    workdir = tmp_path_factory.mktemp("state-manager")
    with server_process(make_database("sqlite", workdir).url, workdir / "data") as server:
        yield server


@pytest.fixture(scope="session")
def sm_server_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real state manager on a fresh PostgreSQL database."""
    workdir = tmp_path_factory.mktemp("state-manager-pg")
    with (
        make_database("postgres", workdir, prefix="exo_sdk_") as database,
        server_process(database.url, workdir / "data") as server,
    ):
        yield server


@pytest.fixture(scope="session")
def sm_server_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real state manager on a fresh MongoDB database (SecantusDB, or the server of
    EXOSPHERE_TEST_MONGO_URI)."""
    workdir = tmp_path_factory.mktemp("state-manager-mongo")
    with (
        make_database("mongo", workdir, prefix="exo_sdk_") as database,
        server_process(database.url, workdir / "data") as server,
    ):
        yield server
