from __future__ import annotations

import asyncio

import httpx

NS = "smoke"


def node_schema(*fields: str) -> dict[str, object]:
    return {
        "type": "object",
        "title": "Inputs",
        "properties": {f: {"type": "string", "title": f} for f in fields},
        "required": list(fields),
    }


async def test_linear_run(client: httpx.AsyncClient) -> None:
    r = await client.put(
        f"/v0/namespace/{NS}/nodes/",
        json={
            "runtime_name": "rt",
            "runtime_namespace": NS,
            "nodes": [
                {
                    "name": "A",
                    "namespace": NS,
                    "inputs_schema": node_schema("x"),
                    "outputs_schema": node_schema("y"),
                    "secrets": ["tok"],
                },
                {
                    "name": "B",
                    "namespace": NS,
                    "inputs_schema": node_schema("z"),
                    "outputs_schema": node_schema(),
                    "secrets": [],
                },
            ],
        },
    )
    assert r.status_code == 200, r.text
    r = await client.put(
        f"/v0/namespace/{NS}/graph/g",
        json={
            "secrets": {"tok": "s3cret"},
            "nodes": [
                {
                    "node_name": "A",
                    "namespace": NS,
                    "identifier": "a",
                    "inputs": {"x": "${{ store.k }}"},
                    "next_nodes": ["b"],
                },
                {
                    "node_name": "B",
                    "namespace": NS,
                    "identifier": "b",
                    "inputs": {"z": "got ${{ a.outputs.y }}"},
                },
            ],
            "store_config": {"required_keys": ["k"]},
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["validation_status"] == "PENDING"
    for _ in range(50):
        r = await client.get(f"/v0/namespace/{NS}/graph/g")
        if r.json()["validation_status"] != "PENDING":
            break
        await asyncio.sleep(0.1)
    assert r.json()["validation_status"] == "VALID", r.json()
    r = await client.post(f"/v0/namespace/{NS}/graph/g/trigger", json={"store": {"k": "v1"}})
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    r = await client.post(
        f"/v0/namespace/{NS}/states/enqueue", json={"nodes": ["A", "B"], "batch_size": 5}
    )
    states = r.json()["states"]
    assert [s["inputs"] for s in states] == [{"x": "v1"}]
    sid = states[0]["state_id"]
    r = await client.get(f"/v0/namespace/{NS}/state/{sid}/secrets")
    assert r.json() == {"secrets": {"tok": "s3cret"}}
    r = await client.post(
        f"/v0/namespace/{NS}/state/{sid}/executed", json={"outputs": [{"y": "1"}, {"y": "2"}]}
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        f"/v0/namespace/{NS}/states/enqueue", json={"nodes": ["B"], "batch_size": 5}
    )
    got = sorted(s["inputs"]["z"] for s in r.json()["states"])
    assert got == ["got 1", "got 2"]
    for s in r.json()["states"]:
        r2 = await client.post(
            f"/v0/namespace/{NS}/state/{s['state_id']}/executed", json={"outputs": []}
        )
        assert r2.status_code == 200
    r = await client.get(f"/v0/namespace/{NS}/runs/1/10")
    run = r.json()["runs"][0]
    assert run["run_id"] == run_id
    assert (run["status"], run["success_count"], run["total_count"]) == ("SUCCESS", 4, 4)
