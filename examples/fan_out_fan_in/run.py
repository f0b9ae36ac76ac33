"""Fan-out / fan-in, the client: define ``render-batch``, run it, print a summary.

    EXOSPHERE_STATE_MANAGER_URI=http://127.0.0.1:8000 EXOSPHERE_API_KEY=dev-key \\
        uv run python examples/fan_out_fan_in/run.py --pages 25 --title "Annual report"

Start ``worker.py`` first.
"""

import argparse
import asyncio

from exospherehost import (
    GraphNodeModel,
    RetryPolicyModel,
    RetryStrategyEnum,
    StateManager,
    StoreConfigModel,
    UnitesModel,
)

NAMESPACE = "fan-out-fan-in"
GRAPH = "render-batch"

NODES = [
    GraphNodeModel(
        node_name="Plan",
        namespace=NAMESPACE,
        identifier="plan",
        inputs={"pages": "${{ store.pages }}", "title": "${{ store.title }}"},
        next_nodes=["split"],
    ),
    GraphNodeModel(
        node_name="Split",
        namespace=NAMESPACE,
        identifier="split",
        inputs={"pages": "${{ plan.outputs.pages }}"},
        next_nodes=["render"],
    ),
    GraphNodeModel(
        node_name="Render",
        namespace=NAMESPACE,
        identifier="render",
        inputs={"page": "${{ split.outputs.page }}", "title": "${{ plan.outputs.title }}"},
        next_nodes=["publish"],
    ),
    GraphNodeModel(
        node_name="Publish",
        namespace=NAMESPACE,
        identifier="publish",
        # A uniting node may read its target (plan), the target's ancestors and the store.
        inputs={"pages": "${{ plan.outputs.pages }}", "title": "${{ plan.outputs.title }}"},
        unites=UnitesModel(identifier="plan"),
    ),
]


async def main(pages: int, title: str) -> None:
    async with StateManager(NAMESPACE) as sm:
        await sm.upsert_graph(
            GRAPH,
            NODES,
            secrets={"signing_key": "example-signing-key"},
            retry_policy=RetryPolicyModel(
                max_retries=3, strategy=RetryStrategyEnum.FIXED, backoff_factor=500
            ),
            store_config=StoreConfigModel(
                required_keys=["pages"], default_values={"title": "untitled"}
            ),
        )
        run = await sm.trigger(GRAPH, store={"pages": str(pages), "title": title})
        graph = await sm.wait_for_run(run["run_id"], timeout=120)
        summary = await sm.get_run(run["run_id"])
        print(f"run {summary.run_id}: {summary.status.value}")
        for identifier in ("plan", "split", "render", "publish"):
            done = graph.count(identifier=identifier, status="SUCCESS")
            retried = graph.count(identifier=identifier, status="RETRY_CREATED")
            print(f"  {identifier:<8} {done:>4} succeeded, {retried} retried")
        [publish] = [node for node in graph.nodes if node.identifier == "publish"]
        details = await sm.get_run_node(GRAPH, run["run_id"], publish.id)
        print(details.outputs["message"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=25)
    parser.add_argument("--title", default="untitled")
    args = parser.parse_args()
    asyncio.run(main(args.pages, args.title))
