"""Hello world, the worker: serves the ``Greet`` node until Ctrl-C (or SIGTERM).

    EXOSPHERE_STATE_MANAGER_URI=http://127.0.0.1:8000 EXOSPHERE_API_KEY=dev-key \\
        uv run python examples/hello_world/worker.py
"""

from exospherehost import BaseNode, Runtime
from pydantic import BaseModel

NAMESPACE = "hello-world"


class Greet(BaseNode):
    class Inputs(BaseModel):
        name: str

    class Outputs(BaseModel):
        greeting: str

    async def execute(self) -> Outputs:
        return self.Outputs(greeting=f"Hello, {self.inputs.name}!")


if __name__ == "__main__":
    # Blocks; the first Ctrl-C lets a running node finish and report before exiting.
    Runtime(namespace=NAMESPACE, name="hello-worker", nodes=[Greet]).start()
