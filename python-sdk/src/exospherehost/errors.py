"""Errors raised by the SDK.

::

    ExosphereError
    ├── ApiError                      the server answered with an unexpected status
    │   └── StateGoneError            4xx on a state report: the state is no longer ours
    ├── GraphValidationError          upsert_graph: the template ended INVALID
    │   └── GraphValidationTimeout    upsert_graph: still PENDING after validation_timeout
    └── UnexpectedResponse            a success answer that is not what the API returns
                                      (also a ValueError)

Network failures are not wrapped: they surface as ``httpx.RequestError`` subclasses.
The runtime never lets any of these escape while running nodes; they are raised by the
control-plane client (:class:`~exospherehost.StateManager`) and at runtime start-up.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "ExosphereError",
    "GraphValidationError",
    "GraphValidationTimeout",
    "StateGoneError",
    "UnexpectedResponse",
]


class ExosphereError(Exception):
    """Base class of the SDK's own errors."""


class ApiError(ExosphereError):
    """The state manager answered ``status_code`` where success was expected."""

    def __init__(self, method: str, url: str, status_code: int, body: Any) -> None:
        self.method = method
        self.url = url
        self.status_code = status_code
        self.body = body
        super().__init__(f"{method} {url} failed with HTTP {status_code}: {self.detail}")

    @property
    def detail(self) -> str:
        """The server's ``detail`` text when it sent one, else the whole body."""
        if isinstance(self.body, dict) and "detail" in self.body:
            return str(self.body["detail"])
        return str(self.body)


class StateGoneError(ApiError):
    """A report was refused with a 4xx: the state is finished, unknown or claimed again."""


class GraphValidationError(ExosphereError):
    """The graph template did not become ``VALID``; ``errors`` lists the server's reasons."""

    def __init__(self, graph_name: str, status: str, errors: list[str]) -> None:
        self.graph_name = graph_name
        self.status = status
        self.errors = list(errors)
        lines = "\n".join(f"  - {error}" for error in self.errors) or "  (no details given)"
        super().__init__(f"graph template {graph_name!r} is {status}; validation_errors:\n{lines}")


class GraphValidationTimeout(GraphValidationError):
    """Validation of the graph template did not finish in time."""

    def __init__(self, graph_name: str, status: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(graph_name, status, [f"validation still {status} after {timeout} s"])


class UnexpectedResponse(ExosphereError, ValueError):
    """The server answered with success but not with what the API returns there (another
    program listens at the URI, or a proxy answered)."""
