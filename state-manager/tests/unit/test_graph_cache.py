"""The graph cache: looking up known runs costs nothing per remembered run."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from state_manager.services.context import GraphCache


class _NoScan(OrderedDict[str, str]):
    """Remembered runs that fail the test if anything walks over all of them."""

    def keys(self) -> Any:
        raise AssertionError("the cache walked every remembered run")

    def __iter__(self) -> Any:
        raise AssertionError("the cache walked every remembered run")


class _Graphs(GraphCache):
    async def for_version(self, tx: Any, version_id: str) -> Any:
        return f"graph of {version_id}"


async def test_known_runs_are_found_without_walking_the_cache() -> None:
    cache = _Graphs()
    cache.remember_runs({f"run-{i}": f"v{i % 3}" for i in range(1000)})
    remembered = _NoScan(cache._run_versions)
    cache._run_versions = remembered
    found = await cache.for_runs(None, ["run-1", "run-5", "run-1"])  # type: ignore[arg-type]
    assert found == {"run-1": "graph of v1", "run-5": "graph of v2"}


async def test_unknown_runs_are_looked_up_once() -> None:
    class Tx:
        calls: list[set[str]] = []

        async def run_versions(self, run_ids: set[str]) -> dict[str, str]:
            self.calls.append(set(run_ids))
            return {run_id: "v" for run_id in run_ids if run_id != "gone"}

    cache = _Graphs()
    cache.remember_runs({"known": "v0"})
    tx = Tx()
    found = await cache.for_runs(tx, ["known", "new"])  # type: ignore[arg-type]
    assert found == {"known": "graph of v0", "new": "graph of v"}
    assert tx.calls == [{"new"}]
    with pytest.raises(Exception, match="Run gone not found"):
        await cache.for_runs(tx, ["gone"])  # type: ignore[arg-type]
