"""Retention: finished runs older than EXOSPHERE_RETENTION_DAYS are deleted with every row
that belongs to them, by two server processes sharing the database; running runs and
recent ones stay."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sm_api import Api, expect_error, node, template_node
from sm_support import server_process, unique_namespace
from state_manager.store.database import Database
from state_manager.store.tables import fanin_groups, runs, states, store_entries, trigger_keys

DAY_MS = 86_400_000
RETENTION = {
    "EXOSPHERE_RETENTION_DAYS": "1",
    "EXOSPHERE_RETENTION_INTERVAL_SECONDS": "1",
    "EXOSPHERE_RETENTION_BATCH_RUNS": "2",  # several batches, and a walk past kept runs
}


async def _graphs(api: Api) -> None:
    await api.register(
        node("A", inputs=("x",), outputs=("y",)), node("B", inputs=("z",)), node("J", ("w",))
    )
    await api.create_graph(
        "u",
        {
            "nodes": [
                template_node("A", "a", api.ns, {"x": "1"}, ["b"]),
                template_node("B", "b", api.ns, {"z": "${{ a.outputs.y }}"}),
                template_node(
                    "J", "j", api.ns, {"w": "${{ a.outputs.y }}"}, unites={"identifier": "a"}
                ),
            ]
        },
    )
    await api.register(node("F", inputs=("x",)))
    await api.create_graph(
        "f",
        {
            "nodes": [template_node("F", "f", api.ns, {"x": "1"})],
            "retry_policy": {"max_retries": 0},
        },
    )


async def _joined_run(api: Api, http: httpx.AsyncClient, key: str) -> str:
    """A SUCCESS run with a fan-out of two, a join (a fan-in group), a store and a key."""
    r = await http.post(
        f"/v0/namespace/{api.ns}/graph/u/trigger",
        json={"store": {"s": "v"}},
        headers={"Idempotency-Key": key},
    )
    assert r.status_code == 200, r.text
    a = await api.claim_one("A")
    await api.executed(a["state_id"], {"y": "1"}, {"y": "2"})
    for b in await api.claim("B"):
        await api.executed(b["state_id"])
    j = await api.claim_one("J")
    await api.executed(j["state_id"])
    assert (await api.run_summary(r.json()["run_id"]))["status"] == "SUCCESS"
    return str(r.json()["run_id"])


async def _failed_run(api: Api) -> str:
    run_id = await api.trigger("f", store={"s": "v"})
    f = await api.claim_one("F")
    await api.errored(f["state_id"])
    assert (await api.run_summary(run_id))["status"] == "FAILED"
    return run_id


async def _execute(database_url: str, *statements: Any) -> None:
    database = Database(database_url)

    def run(connection: Any) -> None:
        for statement in statements:
            connection.execute(statement)
        connection.commit()

    try:
        await database.run_sync(run)
    finally:
        await database.close()


async def _rows(database_url: str, run_ids: list[str]) -> dict[str, int]:
    """Rows left per table for these runs."""
    database = Database(database_url)
    queries = {
        "runs": sa.select(sa.func.count()).select_from(runs).where(runs.c.run_id.in_(run_ids)),
        "states": sa.select(sa.func.count())
        .select_from(states)
        .where(states.c.run_id.in_(run_ids)),
        "store_entries": sa.select(sa.func.count())
        .select_from(store_entries)
        .where(store_entries.c.run_id.in_(run_ids)),
        "fanin_groups": sa.select(sa.func.count())
        .select_from(fanin_groups)
        .where(fanin_groups.c.run_id.in_(run_ids)),
        "trigger_keys": sa.select(sa.func.count())
        .select_from(trigger_keys)
        .where(trigger_keys.c.run_id.in_(run_ids)),
    }
    try:
        return await database.run_sync(
            lambda connection: {
                name: int(connection.scalar(query)) for name, query in queries.items()
            }
        )
    finally:
        await database.close()


def _age(run_ids: list[str], *, states_too: bool = True) -> list[Any]:
    """Statements that move these runs (and their states' times) three days back."""
    moved = [
        runs.update()
        .where(runs.c.run_id.in_(run_ids))
        .values(created_at=runs.c.created_at - 3 * DAY_MS)
    ]
    if states_too:
        moved.append(
            states.update()
            .where(states.c.run_id.in_(run_ids))
            .values(
                created_at=states.c.created_at - 3 * DAY_MS,
                updated_at=states.c.updated_at - 3 * DAY_MS,
            )
        )
    return moved


async def test_retention_deletes_old_finished_runs_only(database_url: str, tmp_path: Path) -> None:
    with (
        server_process(database_url, tmp_path / "one", RETENTION) as one,
        server_process(database_url, tmp_path / "two", RETENTION) as two,
    ):
        ns = unique_namespace("keep")
        async with httpx.AsyncClient(
            base_url=one.base_url, headers=one.headers, timeout=30
        ) as http:
            api = Api(http, ns)
            await _graphs(api)
            old_joined = await _joined_run(api, http, "old-key")
            old_failed = [await _failed_run(api) for _ in range(4)]
            old_pending = await api.trigger("f", start_delay=3_600_000)  # PENDING
            new_joined = await _joined_run(api, http, "new-key")
            new_failed = await _failed_run(api)
            # Created long ago, but its last state changed just now: not old yet.
            late = await _failed_run(api)

            expired = [old_joined, *old_failed]
            kept = [old_pending, new_joined, new_failed, late]
            before = await _rows(database_url, expired)
            assert before["fanin_groups"] >= 1 and before["trigger_keys"] == 1
            assert before["store_entries"] == len(expired)
            kept_before = await _rows(database_url, kept)

            # The oldest runs, a whole batch, are kept ones: retention walks past them.
            await _execute(
                database_url,
                *_age([old_pending]),
                *_age(expired),
                runs.update().where(runs.c.run_id == old_pending).values(created_at=1),
                runs.update().where(runs.c.run_id == late).values(created_at=2),
            )
            deadline = time.monotonic() + 30
            while (left := await _rows(database_url, expired))["runs"]:
                assert time.monotonic() < deadline, left
                await asyncio.sleep(0.2)
            assert left == dict.fromkeys(left, 0)
            assert await _rows(database_url, kept) == kept_before

            expect_error(await http.get(f"/v0/namespace/{ns}/run/{old_joined}"), 404)
            assert (await http.get(f"/v0/namespace/{ns}/run/{late}")).status_code == 200
            listing = (await http.get(f"/v0/namespace/{ns}/runs/1/50")).json()
            assert listing["total"] == len(kept)
            assert {r["run_id"] for r in listing["runs"]} == set(kept)

            # The deleted run's idempotency key went with it; the recent one holds.
            again = await http.post(
                f"/v0/namespace/{ns}/graph/u/trigger",
                json={"store": {"s": "v"}},
                headers={"Idempotency-Key": "old-key"},
            )
            assert again.json()["run_id"] not in expired
            replay = await http.post(
                f"/v0/namespace/{ns}/graph/u/trigger",
                json={"store": {"s": "v"}},
                headers={"Idempotency-Key": "new-key"},
            )
            assert replay.json()["run_id"] == new_joined

            # Once the pending run finishes, it goes too (its state is old).
            await _execute(
                database_url,
                states.update().where(states.c.run_id == old_pending).values(enqueue_after=0),
            )
            f = await api.claim_one("F")
            await api.errored(f["state_id"])
            await _execute(
                database_url,
                states.update().where(states.c.run_id == old_pending).values(updated_at=1),
            )
            while (await _rows(database_url, [old_pending]))["runs"]:
                assert time.monotonic() < deadline + 30, "finished old run was kept"
                await asyncio.sleep(0.2)

            metrics = ""
            for server in (one, two):
                text = (await http.get(f"{server.base_url}/metrics")).text
                metrics += "".join(
                    line for line in text.splitlines() if line.startswith("exosphere_runs_deleted")
                )
            assert "exosphere_runs_deleted_total" in metrics
    for server in (one, two):
        output = server.output()
        assert "Traceback" not in output and "background loop" not in output, output
