"""MongoDB: work committed by one server process wakes the long polls of another, through
the change stream on ``sm_signals``; and the stream is what keeps re-checks rare."""

from __future__ import annotations

import asyncio

import pytest
from sm_support import open_test_store
from state_manager.domain.models import NodeTemplate
from state_manager.services.progress import state_row
from state_manager.store.mongo import RECHECK_POLLING_MS, RECHECK_STREAMING_MS, MongoStore

NODE = NodeTemplate(node_name="Work", namespace="ns", identifier="work", inputs={})


@pytest.mark.parametrize("backend", ["mongo"])
async def test_work_committed_elsewhere_wakes_this_process(database_url: str) -> None:
    listener = open_test_store(database_url)
    writer = open_test_store(database_url)
    assert isinstance(listener, MongoStore)
    woken: asyncio.Queue[str] = asyncio.Queue()
    try:
        await writer.migrate()
        assert listener.recheck_ms == RECHECK_POLLING_MS  # not streaming yet
        listener.on_work = woken.put_nowait
        await listener.start_listening()
        for _ in range(600):  # the change stream opens within 30 s
            if listener.recheck_ms == RECHECK_STREAMING_MS:
                break
            await asyncio.sleep(0.05)
        assert listener.recheck_ms == RECHECK_STREAMING_MS
        row = state_row(
            namespace="wake-ns",
            graph_name="g",
            run_id="run-1",
            node=NODE,
            inputs={},
            parents={},
            groups={},
            now=1_000,
        )
        async with writer.write() as tx:
            await tx.insert_states([row])
        async with asyncio.timeout(10):
            assert await woken.get() == "wake-ns"
        # Work claimed by the same transaction that made it wakes nobody.
        async with writer.write() as tx:
            await tx.insert_states([{**row, "id": "f" * 24, "fanout_id": "x"}])
            await tx.claim("wake-ns", ["Work"], 10, now=2_000, lease_until=9_000)
        await asyncio.sleep(0.5)
        assert woken.empty()
    finally:
        await listener.close()
        await writer.close()
