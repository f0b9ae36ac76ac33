"""Exit codes of the ``exosphere`` command and the one-line messages of its failures."""

from __future__ import annotations

import os
import re
from enum import IntEnum
from typing import Any

import httpx
import pydantic

from ..errors import ApiError, UnexpectedResponse

__all__ = ["ERROR_KINDS", "CliError", "ExitCode", "describe_failure", "validation_details"]


class ExitCode(IntEnum):
    """What ``exosphere`` exits with (documented in ``docs/cli.md``)."""

    OK = 0
    """The command did what it was asked; a waited-for run ended SUCCESS."""
    FAILED = 1
    """The command failed: the server was unreachable or refused the request, a graph is
    invalid, a waited-for run ended FAILED or CANCELLED."""
    USAGE = 2
    """The command line is wrong (unknown option, missing argument or setting)."""
    TIMEOUT = 3
    """``--timeout`` passed before the run (or the graph's validation) finished."""
    INTERRUPTED = 130
    """Ctrl-C while waiting; what was started on the server goes on."""


# The ``kind`` of a failure, a stable word for scripts (documented in docs/cli.md).
ERROR_KINDS = (
    "unreachable",
    "unauthorized",
    "not_found",
    "refused",
    "invalid_request",
    "server_error",
    "invalid_file",
    "unexpected_answer",
    "usage",
    "interrupted",
)


class CliError(Exception):
    """A failure to report as one line (plus ``details``) and an exit code; ``kind`` is
    one of :data:`ERROR_KINDS`."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        code: ExitCode = ExitCode.FAILED,
        details: list[str] | None = None,
        status_code: int | None = None,
    ) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        message = re.sub(r"\s*\n\s*", " ", message.strip())  # one line, whatever it quotes
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.code = code
        self.details = list(details or [])
        self.status_code = status_code

    def as_json(self) -> dict[str, Any]:
        """The ``{"error": ...}`` document printed with ``-o json``."""
        return {
            "error": {
                "kind": self.kind,
                "message": self.message,
                "status_code": self.status_code,
                "details": self.details,
            }
        }


def describe_failure(exc: BaseException, uri: str) -> CliError | None:
    """The message for a network or API failure talking to ``uri``; ``None`` for anything
    else (a bug, which should surface as such)."""
    if isinstance(exc, ApiError):
        return _api_error(exc, uri)
    if isinstance(exc, UnexpectedResponse | pydantic.ValidationError):
        return CliError(
            f"unexpected answer from {uri}; is it an Exosphere state manager? ({_first(exc)})",
            kind="unexpected_answer",
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return CliError(
            f"invalid state manager URI {uri!r}: {exc} (expected http://host:port)",
            kind="usage",
            code=ExitCode.USAGE,
        )
    if isinstance(exc, httpx.ConnectError):
        return CliError(
            f"cannot connect to the state manager at {uri}: {_reason(exc)}", kind="unreachable"
        )
    if isinstance(exc, httpx.TimeoutException):
        return CliError(f"the state manager at {uri} did not answer in time", kind="unreachable")
    if isinstance(exc, httpx.HTTPError):
        return CliError(
            f"request to the state manager at {uri} failed: {_reason(exc)}", kind="unreachable"
        )
    return None


def _reason(exc: BaseException) -> str:
    """The system's words for a network failure ("connection refused"), found among the
    exceptions httpx chained, else httpx's own message."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            # asyncio words a refusal "Connect call failed (host, port)"; the errno says it.
            if isinstance(seen.errno, int) and seen.errno > 0:
                return os.strerror(seen.errno).lower()
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip()
    return text[0].lower() + text[1:] if text else type(exc).__name__


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _api_error(exc: ApiError, uri: str) -> CliError:
    status = exc.status_code
    detail = exc.detail
    if not isinstance(exc.body, dict) and status >= 500:
        return CliError(
            f"the state manager failed (HTTP {status}) without a JSON body "
            f"(a proxy in between, or another program at {uri}?)",
            kind="server_error",
            status_code=status,
        )
    if not isinstance(exc.body, dict):
        return CliError(
            f"{uri} answered HTTP {status} to {exc.method} {exc.url} without a JSON body; "
            "is it an Exosphere state manager?",
            kind="unexpected_answer",
            status_code=status,
        )
    if status == 401:
        return CliError(
            f"the state manager at {uri} refused the API key (HTTP 401); "
            "check --api-key or EXOSPHERE_API_KEY",
            kind="unauthorized",
            status_code=status,
        )
    if status == 404:
        if detail == "Not Found":  # the framework's answer: no such route on this server
            detail = f"{exc.method} {exc.url} does not exist on this state manager"
        return CliError(f"not found: {detail}", kind="not_found", status_code=status)
    if status == 422:
        details = validation_details(exc.body)
        return CliError(
            "the state manager rejected the request: " + "; ".join(details),
            kind="invalid_request",
            status_code=status,
            details=details,
        )
    if status >= 500:
        return CliError(
            f"the state manager failed (HTTP {status}): {detail}",
            kind="server_error",
            status_code=status,
        )
    return CliError(
        f"the state manager refused (HTTP {status}): {detail}", kind="refused", status_code=status
    )


def validation_details(body: Any) -> list[str]:
    """The problems of a 422 answer (FastAPI's ``detail`` list), one line each."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if not isinstance(detail, list):
        return [str(detail)]
    lines = []
    for item in detail:
        if not isinstance(item, dict):
            lines.append(str(item))
            continue
        loc = [str(part) for part in item.get("loc", []) if part != "body"]
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        lines.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return lines
