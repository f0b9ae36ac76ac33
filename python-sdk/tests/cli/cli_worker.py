"""The worker the CLI tests drive: ``python cli_worker.py <namespace>``.

Serves ``Greet`` (a greeting from a name), ``Shout`` (upper-cases a text, reads a
secret), ``Fail`` (always raises) until SIGTERM, then exits 0.
"""

from __future__ import annotations

import sys

from exospherehost import BaseNode, Runtime
from pydantic import BaseModel

FAILURE = "no luck today"


class Greet(BaseNode):
    class Inputs(BaseModel):
        name: str

    class Outputs(BaseModel):
        greeting: str

    async def execute(self) -> Outputs:
        return self.Outputs(greeting=f"Hello, {self.inputs.name}!")


class Shout(BaseNode):
    class Inputs(BaseModel):
        text: str

    class Outputs(BaseModel):
        text: str

    class Secrets(BaseModel):
        api_token: str

    async def execute(self) -> Outputs:
        return self.Outputs(text=self.inputs.text.upper())


class Fail(BaseNode):
    class Inputs(BaseModel):
        name: str

    async def execute(self) -> None:
        raise ValueError(FAILURE)


NODES: list[type[BaseNode]] = [Greet, Shout, Fail]

if __name__ == "__main__":
    Runtime(sys.argv[1], "cli-test-worker", NODES, poll_interval=0.1).start()
