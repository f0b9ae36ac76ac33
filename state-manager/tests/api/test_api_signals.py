"""E12 prune, E13 re-enqueue-after, E14 manual retry, heartbeat, E15 secrets, and the 404s
every state route gives for unknown, malformed and foreign state ids."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sm_support
from sm_api import Api, error_locations, expect_error, node, template_node
from sm_support import read_states, serve

NS = "signals"

STATE_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "executed", {"outputs": []}),
    ("POST", "errored", {"error": "x"}),
    ("POST", "prune", {"data": {}}),
    ("POST", "re-enqueue-after", {"enqueue_after": 10}),
    ("POST", "manual-retry", {"fanout_id": "f-404"}),
    ("POST", "heartbeat", None),
    ("GET", "secrets", None),
]


async def _graph(api: Api, max_retries: int = 0) -> None:
    """Graph g: a (A: x -> y) then b (B: z from a.y); A needs secret tok."""
    await api.register(
        node("A", inputs=("x",), outputs=("y",), secrets=("tok",)), node("B", inputs=("z",))
    )
    await api.create_graph(
        "g",
        {
            "secrets": {"tok": "tök-✓ value", "unrelated": "u"},
            "nodes": [
                template_node("A", "a", NS, {"x": "in"}, ["b"]),
                template_node("B", "b", NS, {"z": "${{ a.outputs.y }}"}),
            ],
            "retry_policy": {"max_retries": max_retries},
        },
    )


def _ms(iso_text: str) -> int:
    return int(datetime.fromisoformat(iso_text).timestamp() * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _status(api: Api, run_id: str, state_id: str) -> str:
    status: str = (await api.node_details("g", run_id, state_id))["status"]
    return status


async def test_prune_ends_a_queued_branch(client: httpx.AsyncClient, database_url: str) -> None:
    api = Api(client, NS)
    await _graph(api)
    run_id = await api.trigger("g")
    a = await api.claim_one("A")
    sid = a["state_id"]
    for body, location in (
        ({}, ("body", "data")),
        ({"data": "x"}, ("body", "data")),
        ({"data": [1]}, ("body", "data")),
    ):
        assert error_locations(await api.post_state(sid, "prune", body)) == [location]
    r = await api.post_state(sid, "prune", {"data": {"reason": "enough", "n": 1}})
    assert r.status_code == 200, r.text
    # enqueue_after is the state's own (unchanged) time: here its creation time.
    assert r.json() == {"enqueue_after": _ms(a["created_at"]), "status": "PRUNED"}
    view = await api.run_graph(run_id)
    assert [(n["identifier"], n["status"]) for n in view["nodes"]] == [("a", "PRUNED")]
    [row] = await read_states(database_url, NS, run_id)
    assert row.data == {"reason": "enough", "n": 1}
    assert (await api.run_summary(run_id))["status"] == "SUCCESS"
    assert await api.claim("A", "B") == []

    # Only a QUEUED state can be pruned.
    expect_error(await api.post_state(sid, "prune", {"data": {}}), 400, "State is not queued")
    unclaimed = (await api.run_graph(await api.trigger("g")))["nodes"][0]["id"]
    expect_error(await api.post_state(unclaimed, "prune", {"data": {}}), 400, "State is not queued")
    done = await api.claim_one("A")
    await api.executed(done["state_id"], {"y": "1"})
    r = await api.post_state(done["state_id"], "prune", {"data": {}})
    expect_error(r, 400, "State is not queued")


async def test_re_enqueue_after_hands_the_same_state_back_later(
    client: httpx.AsyncClient, database_url: str
) -> None:
    api = Api(client, NS)
    await _graph(api)
    run_id = await api.trigger("g")
    sid = (await api.claim_one("A"))["state_id"]
    for body in ({}, {"enqueue_after": 0}, {"enqueue_after": -5}, {"enqueue_after": "soon"}):
        r = await api.post_state(sid, "re-enqueue-after", body)
        assert error_locations(r) == [("body", "enqueue_after")], body

    before = _now_ms()
    r = await api.post_state(sid, "re-enqueue-after", {"enqueue_after": 3_600_000})
    after = _now_ms()
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"enqueue_after", "status"} and body["status"] == "CREATED"
    assert before + 3_600_000 <= body["enqueue_after"] <= after + 3_600_000
    assert await _status(api, run_id, sid) == "CREATED"
    [row] = await read_states(database_url, NS, run_id)
    assert (row.enqueue_after, row.retry_count) == (body["enqueue_after"], 0)
    assert await api.claim("A") == []  # not before its time
    expect_error(
        await api.post_state(sid, "re-enqueue-after", {"enqueue_after": 5}),
        400,
        "State is not queued",
    )

    # A short delay: the same state id is claimed again, with the same inputs.
    second_run = await api.trigger("g")
    other = await api.claim_one("A")
    r = await api.post_state(other["state_id"], "re-enqueue-after", {"enqueue_after": 1})
    assert r.status_code == 200
    again = await api.claim("A", wait_ms=10_000)
    assert [(s["state_id"], s["inputs"]) for s in again] == [(other["state_id"], {"x": "in"})]
    await api.executed(other["state_id"], {"y": "1"})
    assert await _status(api, second_run, other["state_id"]) == "SUCCESS"
    r = await api.post_state(other["state_id"], "re-enqueue-after", {"enqueue_after": 5})
    expect_error(r, 400, "State is not queued")


async def test_manual_retry_of_finished_states(
    client: httpx.AsyncClient, database_url: str
) -> None:
    api = Api(client, NS)
    await _graph(api)
    run_id = await api.trigger("g")
    a = await api.claim_one("A")
    sid = a["state_id"]
    for body in ({}, {"fanout_id": ""}, {"fanout_id": "x" * 65}, {"fanout_id": 3}):
        r = await api.post_state(sid, "manual-retry", body)
        assert error_locations(r) == [("body", "fanout_id")], body
    # Not while it is QUEUED (or CREATED).
    r = await api.post_state(sid, "manual-retry", {"fanout_id": "f1"})
    expect_error(r, 400, "State is QUEUED; only a finished state can be retried manually")
    unclaimed = (await api.run_graph(await api.trigger("g")))["nodes"][0]["id"]
    r = await api.post_state(unclaimed, "manual-retry", {"fanout_id": "f1"})
    expect_error(r, 400, "State is CREATED; only a finished state can be retried manually")
    assert (await api.claim_one("A"))["state_id"] == unclaimed
    r = await api.post_state(unclaimed, "prune", {"data": {}})  # out of the way
    assert r.status_code == 200

    # An ERRORED state (no automatic retries in this graph).
    assert (await api.errored(sid, "bad"))["retry_created"] is False
    r = await api.post_state(sid, "manual-retry", {"fanout_id": "f1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "status"} and body["status"] == "CREATED"
    new_id = body["id"]
    assert new_id != sid
    assert await _status(api, run_id, sid) == "RETRY_CREATED"
    fresh = await api.node_details("g", run_id, new_id)
    assert (fresh["status"], fresh["identifier"], fresh["inputs"], fresh["parents"]) == (
        "CREATED",
        "a",
        {"x": "in"},
        {},
    )
    assert (fresh["outputs"], fresh["error"]) == ({}, None)
    rows = {row.id: row for row in await read_states(database_url, NS, run_id)}
    assert (rows[new_id].fanout_id, rows[new_id].manual_retry_fanout_id) == ("f1", "f1")
    assert rows[new_id].retry_count == 0
    assert rows[sid].error == "bad"
    # The same fanout_id again is a duplicate (the original is RETRY_CREATED: terminal),
    # also when requests race.
    responses = await asyncio.gather(
        *(api.post_state(sid, "manual-retry", {"fanout_id": "f1"}) for _ in range(4))
    )
    for r in responses:
        expect_error(r, 409, "Duplicate retry state detected")
    # A new fanout_id for an attempt that was already retried: retry the newest attempt.
    r = await api.post_state(sid, "manual-retry", {"fanout_id": "f-new"})
    expect_error(r, 400, "State was already retried; retry its latest attempt instead")
    assert len(await read_states(database_url, NS, run_id)) == len(rows)

    # The retry runs like the original; a SUCCESS state can be retried too and its
    # successors are created again.
    claimed = await api.claim_one("A")
    assert (claimed["state_id"], claimed["inputs"]) == (new_id, {"x": "in"})
    await api.executed(new_id, {"y": "Y"})
    first_b = await api.claim_one("B")
    r = await api.post_state(new_id, "manual-retry", {"fanout_id": "f2"})
    assert r.status_code == 200
    await api.executed((await api.claim_one("A"))["state_id"], {"y": "Y2"})
    second_b = await api.claim_one("B")
    assert (first_b["inputs"], second_b["inputs"]) == ({"z": "Y"}, {"z": "Y2"})
    summary = (await api.run_graph(run_id))["execution_summary"]
    assert summary == {
        "CREATED": 0,
        "QUEUED": 2,
        "EXECUTED": 0,
        "SUCCESS": 1,
        "ERRORED": 0,
        "NEXT_CREATED_ERROR": 0,
        "PRUNED": 0,
        "RETRY_CREATED": 2,
        "CANCELLED": 0,
    }


async def test_heartbeat_extends_the_lease_of_a_queued_state(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    await api.trigger("g")
    sid = (await api.claim_one("A"))["state_id"]
    lease_ms = 3600 * 1000  # the default STATE_LEASE_SECONDS
    before = _now_ms()
    r = await client.post(f"{api.base}/state/{sid}/heartbeat")
    after = _now_ms()
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"lease_expires_at"}
    assert before + lease_ms <= body["lease_expires_at"] <= after + lease_ms
    await api.executed(sid, {"y": "1"})
    r = await client.post(f"{api.base}/state/{sid}/heartbeat")
    expect_error(r, 400, "State is not queued")


async def test_secrets_of_a_state(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await _graph(api)
    await api.trigger("g")
    a = await api.claim_one("A")
    r = await client.get(f"{api.base}/state/{a['state_id']}/secrets")
    assert r.status_code == 200, r.text
    # Only the secrets the node declared, decrypted.
    assert r.json() == {"secrets": {"tok": "tök-✓ value"}}
    await api.executed(a["state_id"], {"y": "1"})
    b = await api.claim_one("B")
    r = await client.get(f"{api.base}/state/{b['state_id']}/secrets")
    assert r.json() == {"secrets": {}}
    # The current template's values are returned (an update replaces them).
    r = await api.upsert(
        "g",
        {
            "secrets": {"tok": "rotated"},
            "nodes": [
                template_node("A", "a", NS, {"x": "in"}, ["b"]),
                template_node("B", "b", NS, {"z": "${{ a.outputs.y }}"}),
            ],
        },
    )
    assert r.status_code == 201
    await api.wait_validated("g")
    r = await client.get(f"{api.base}/state/{a['state_id']}/secrets")
    assert r.json() == {"secrets": {"tok": "rotated"}}


async def test_state_routes_answer_404_for_unknown_malformed_and_foreign_ids(
    client: httpx.AsyncClient,
) -> None:
    api = Api(client, NS)
    await _graph(api)
    await api.trigger("g")
    real = (await api.claim_one("A"))["state_id"]
    bad_ids = [
        "0123456789abcdef01234567",  # well-formed, unknown
        "nope",
        "123",
        "0123456789abcdef0123456g",
        "0123456789abcdef012345678",
        real + "0",
        "%20" + real,
    ]
    targets = [(api.base, sid) for sid in bad_ids] + [("/v0/namespace/other-ns", real)]
    for base, sid in targets:
        for method, action, body in STATE_ROUTES:
            r = await client.request(method, f"{base}/state/{sid}/{action}", json=body)
            expect_error(r, 404, "State not found")
    # Nothing happened to the real state.
    await api.executed(real, {"y": "1"})


async def test_secrets_that_cannot_be_decrypted_give_a_json_500(
    database_url: str, tmp_path: Path
) -> None:
    settings = sm_support.test_settings(database_url, tmp_path / "data")
    with serve(settings) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as client:
            api = Api(client, NS)
            await _graph(api)
            await api.trigger("g")
            sid = (await api.claim_one("A"))["state_id"]
    other_key = replace(settings, secrets_encryption_key=sm_support.generate_encryption_key())
    with serve(other_key) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as client:
            r = await client.get(f"/v0/namespace/{NS}/state/{sid}/secrets")
            expect_error(r, 500, "stored secret cannot be decrypted with this key")
            assert "tök" not in r.text
