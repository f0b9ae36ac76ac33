from __future__ import annotations

import httpx
from sm_api import Api, node, template_node

NS = "smoke"


async def test_linear_run_with_store_secrets_and_fan_out(client: httpx.AsyncClient) -> None:
    api = Api(client, NS)
    await api.register(
        node("A", inputs=("x",), outputs=("y",), secrets=("tok",)), node("B", inputs=("z",))
    )
    await api.create_graph(
        "g",
        {
            "secrets": {"tok": "s3cret"},
            "nodes": [
                template_node("A", "a", NS, {"x": "${{ store.k }}"}, ["b"]),
                template_node("B", "b", NS, {"z": "got ${{ a.outputs.y }}"}),
            ],
            "store_config": {"required_keys": ["k"]},
        },
    )
    run_id = await api.trigger("g", store={"k": "v1"})
    states = await api.claim("A", "B")
    assert [s["inputs"] for s in states] == [{"x": "v1"}]
    sid = states[0]["state_id"]
    r = await client.get(f"{api.base}/state/{sid}/secrets")
    assert r.json() == {"secrets": {"tok": "s3cret"}}
    await api.executed(sid, {"y": "1"}, {"y": "2"})
    children = await api.claim("B")
    assert sorted(s["inputs"]["z"] for s in children) == ["got 1", "got 2"]
    for child in children:
        await api.executed(child["state_id"])
    run = await api.run_summary(run_id)
    assert (run["status"], run["success_count"], run["total_count"]) == ("SUCCESS", 4, 4)
