"""Fan-out / fan-in, the worker: serves the four nodes of the ``render-batch`` graph.

    EXOSPHERE_STATE_MANAGER_URI=http://127.0.0.1:8000 EXOSPHERE_API_KEY=dev-key \\
        uv run python examples/fan_out_fan_in/worker.py
"""

import hashlib
from collections import Counter

from exospherehost import BaseNode, Runtime
from pydantic import BaseModel

NAMESPACE = "fan-out-fan-in"


class Plan(BaseNode):
    """Root: reads the batch size from the run's store."""

    class Inputs(BaseModel):
        pages: str
        title: str

    class Outputs(BaseModel):
        pages: str
        title: str

    async def execute(self) -> Outputs:
        return self.Outputs(pages=self.inputs.pages, title=self.inputs.title)


class Split(BaseNode):
    """Fan-out: one output per page, so one ``Render`` state per page."""

    class Inputs(BaseModel):
        pages: str

    class Outputs(BaseModel):
        page: str

    async def execute(self) -> list[Outputs]:
        return [self.Outputs(page=str(page)) for page in range(1, int(self.inputs.pages) + 1)]


class Render(BaseNode):
    """One page. Uses a secret; page 3 fails on its first attempt, and the graph's retry
    policy runs it again. A plain ``def``: the runtime runs it in a thread pool."""

    attempts: Counter[str] = Counter()

    class Inputs(BaseModel):
        page: str
        title: str

    class Outputs(BaseModel):
        digest: str

    class Secrets(BaseModel):
        signing_key: str

    def execute(self) -> Outputs:
        key = f"{self.inputs.title}/{self.inputs.page}"
        Render.attempts[key] += 1
        if self.inputs.page == "3" and Render.attempts[key] == 1:
            raise ConnectionError("renderer busy, try again")
        text = f"{self.secrets.signing_key}:{self.inputs.title}:{self.inputs.page}"
        return self.Outputs(digest=hashlib.sha256(text.encode()).hexdigest()[:12])


class Publish(BaseNode):
    """Fan-in: ``unites`` on ``plan``, so it runs once, after every page is rendered."""

    class Inputs(BaseModel):
        pages: str
        title: str

    class Outputs(BaseModel):
        message: str

    async def execute(self) -> Outputs:
        return self.Outputs(message=f"published {self.inputs.title!r}: {self.inputs.pages} pages")


if __name__ == "__main__":
    Runtime(
        namespace=NAMESPACE,
        name="render-worker",
        nodes=[Plan, Split, Render, Publish],
        workers=8,
    ).start()
