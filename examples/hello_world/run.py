"""Hello world, the client: define the graph, start a run, print its result.

    EXOSPHERE_STATE_MANAGER_URI=http://127.0.0.1:8000 EXOSPHERE_API_KEY=dev-key \\
        uv run python examples/hello_world/run.py Ada

Start ``worker.py`` first: the server validates the graph against registered nodes.
"""

import asyncio
import sys

from exospherehost import GraphNodeModel, StateManager, StoreConfigModel

NAMESPACE = "hello-world"


async def main(name: str) -> None:
    async with StateManager(NAMESPACE) as sm:
        await sm.upsert_graph(
            "hello",
            [
                GraphNodeModel(
                    node_name="Greet",
                    namespace=NAMESPACE,
                    identifier="greet",
                    inputs={"name": "${{ store.name }}"},
                )
            ],
            secrets={},
            store_config=StoreConfigModel(required_keys=["name"]),
        )
        run = await sm.trigger("hello", store={"name": name})
        graph = await sm.wait_for_run(run["run_id"], timeout=60)
        [state] = graph.nodes
        details = await sm.get_run_node("hello", run["run_id"], state.id)
        print(f"run {run['run_id']}: {graph.status.value}")
        print(details.outputs["greeting"])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "world"))
