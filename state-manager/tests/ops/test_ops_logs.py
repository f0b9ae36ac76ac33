"""Logs of a real server process in production mode: JSON lines, request ids, no secrets.

The server runs as operators run it (``python -m state_manager --mode=production``,
settings from the environment, ``LOG_LEVEL=DEBUG``) and everything it writes is
captured. The run stores graph secrets, hands them to a worker, reports errors,
sends secret-looking values where a careless server might log them (a wrong API
key, a query string, an invalid body), and finally restarts with another
encryption key so that reading the secrets fails and is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sm_api import REQUEST_ID_HEADER, Api, expect_error, node, template_node
from sm_support import ServerProcess
from state_manager import logs
from state_manager.settings import generate_encryption_key

NS = "ops-logs"


def secret(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


@dataclass
class Sent:
    method: str
    path: str
    given_id: str | None
    echoed_id: str
    status: int


class Recorder:
    """httpx hooks: give each request its own id (unless the client sends none) and log it."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    async def add_id(self, request: httpx.Request) -> None:
        if REQUEST_ID_HEADER not in request.headers:
            request.headers[REQUEST_ID_HEADER] = str(uuid.uuid4())

    async def record(self, response: httpx.Response) -> None:
        request = response.request
        self.sent.append(
            Sent(
                request.method,
                request.url.path,
                request.headers.get(REQUEST_ID_HEADER),
                response.headers[REQUEST_ID_HEADER],
                response.status_code,
            )
        )

    def last(self) -> Sent:
        return self.sent[-1]


@dataclass
class Output:
    stdout: str
    stderr: str


@contextlib.contextmanager
def running(server: ServerProcess, output: list[Output]) -> Iterator[str]:
    """Start ``server``; stop it when the block exits and append its output."""
    server.start()
    try:
        yield server.base_url
    finally:
        server.stop()
        output.append(Output(server.log_path.read_text(), server.stderr_path.read_text()))


def parse_lines(text: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message", "request_id"} <= record.keys(), line
        records.append(record)
    return records


async def test_production_logs_are_json_with_request_ids_and_no_secrets(
    database_url: str, tmp_path: Path
) -> None:
    api_key = secret("api-key")
    wrong_key = secret("wrong-key")
    first_key, second_key = generate_encryption_key(), generate_encryption_key()
    token, password = secret("token"), secret("password")
    in_query, in_bad_body = secret("query"), secret("body")
    never_logged = {
        "API key": api_key,
        "wrong API key": wrong_key,
        "encryption key": first_key,
        "second encryption key": second_key,
        "graph secret": token,
        "second graph secret": password,
        "query string value": in_query,
        "invalid body value": in_bad_body,
    }
    # As operators run it: settings from the environment, everything it writes captured.
    server = ServerProcess(
        database_url,
        tmp_path / "data",
        {"LOG_LEVEL": "DEBUG"},
        key=api_key,
        encryption_key=first_key,
        separate_stderr=True,
    )
    output: list[Output] = []
    recorder = Recorder()
    hooks: dict[str, list[Any]] = {"request": [recorder.add_id], "response": [recorder.record]}
    anonymous_hooks: dict[str, list[Any]] = {"response": [recorder.record]}

    with running(server, output) as base_url:
        async with (
            httpx.AsyncClient(
                base_url=base_url, headers={"x-api-key": api_key}, event_hooks=hooks, timeout=30
            ) as client,
            httpx.AsyncClient(
                base_url=base_url, event_hooks=anonymous_hooks, timeout=30
            ) as anonymous,
        ):
            # Ids: none sent (one is generated), a malformed one (replaced), our own (kept).
            assert (await anonymous.get("/health")).status_code == 200
            r = await anonymous.get("/health", headers={REQUEST_ID_HEADER: "not-a-uuid"})
            assert r.status_code == 200
            assert (await client.get("/health", params={"token": in_query})).status_code == 200

            api = Api(client, NS)
            await api.register(
                node("A", inputs=("x",), outputs=("y",), secrets=("token", "password")),
                node("B", inputs=("z",)),
            )
            await api.create_graph(
                "g",
                {
                    "secrets": {"token": token, "password": password},
                    "nodes": [
                        template_node("A", "a", NS, {"x": "${{ store.k }}"}, ["b"]),
                        template_node("B", "b", NS, {"z": "${{ a.outputs.y }}"}),
                    ],
                    "store_config": {"required_keys": ["k"]},
                    "retry_policy": {"max_retries": 0},
                },
            )
            # Graphs that fail validation, on upsert and later: with secrets, errors in text.
            r = await api.upsert(
                "rejected",
                {
                    "secrets": {"token": token},
                    "nodes": [template_node("A", "a", NS, {"x": "${{ nowhere.outputs.y }}"})],
                },
            )
            assert 400 <= r.status_code < 500 and token not in r.text, r.text
            r = await api.upsert(
                "broken",
                {"secrets": {"token": token}, "nodes": [template_node("Missing", "m", NS)]},
            )
            assert r.status_code == 201, r.text
            broken = await api.wait_validated("broken")
            assert broken["validation_status"] == "INVALID" and broken["validation_errors"]

            await api.trigger("g", store={"k": "v"})
            a = await api.claim_one("A")
            r = await client.get(f"{api.base}/state/{a['state_id']}/secrets")
            assert r.json() == {"secrets": {"password": password, "token": token}}
            await api.executed(a["state_id"], {"y": "1"})
            b = await api.claim_one("B")
            await api.errored(b["state_id"], "upstream answered 503; giving up")
            expect_error(await api.post_state(b["state_id"], "errored", {"error": "again"}), 400)
            # Secret-looking values where a careless server would echo them into its logs.
            expect_error(await client.get("/v0/namespaces", headers={"x-api-key": wrong_key}), 401)
            expect_error(await anonymous.get("/v0/namespaces"), 401)
            r = await api.post_state(a["state_id"], "errored", {"error": {"token": in_bad_body}})
            expect_error(r, 422)
            expect_error(await client.get(f"{api.base}/state/{'0' * 24}/secrets"), 404)
            # A path that decodes to several lines still logs as one JSON line.
            r = await client.get(f"{api.base}/graph/g%0A%7B%22level%22%3A%22ERROR%22%7D")
            expect_error(r, 404)
            state_id = a["state_id"]

    # The same database under another encryption key: the stored secrets cannot be read.
    server.encryption_key = second_key
    with running(server, output) as base_url:
        async with httpx.AsyncClient(
            base_url=base_url, headers={"x-api-key": api_key}, event_hooks=hooks, timeout=30
        ) as client:
            r = await client.get(f"/v0/namespace/{NS}/state/{state_id}/secrets")
            expect_error(r, 500)
            undecryptable = recorder.last()

    captured = "".join(o.stdout + o.stderr for o in output)
    for what, value in never_logged.items():
        assert value not in captured, f"the {what} appears in the server's output"
    assert all(o.stdout == "" for o in output), "logs go to stderr only"

    for process_output in output:
        records = parse_lines(process_output.stderr)
        assert any(r["logger"].startswith("uvicorn") for r in records), "uvicorn logs as JSON"
        # LOG_LEVEL=DEBUG took effect (asyncio reports its selector at debug level).
        assert any(r["level"] == "DEBUG" for r in records), process_output.stderr
        # Between the first and the last request, every line belongs to a request.
        in_requests = [i for i, r in enumerate(records) if r["logger"] == "state_manager.access"]
        assert in_requests, process_output.stderr
        for record in records[in_requests[0] : in_requests[-1] + 1]:
            assert record["request_id"] is not None, record
    records = [r for o in output for r in parse_lines(o.stderr)]

    # Every request got an id back, logged once on its access line; no other ids appear.
    assert len(recorder.sent) >= 20
    echoed: set[str] = set()
    for sent in recorder.sent:
        if sent.given_id is None or sent.given_id == "not-a-uuid":
            assert sent.echoed_id != sent.given_id
            assert uuid.UUID(sent.echoed_id).version == 4
        else:
            assert sent.echoed_id == sent.given_id
        assert sent.echoed_id not in echoed, "request ids are unique"
        echoed.add(sent.echoed_id)
        access = [
            r
            for r in records
            if r["request_id"] == sent.echoed_id and r["logger"] == "state_manager.access"
        ]
        assert len(access) == 1, (sent, access)
        line = access[0]
        assert (line["method"], line["path"], line["status"]) == (
            sent.method,
            sent.path,
            sent.status,
        ), line
        assert line["level"] == "INFO" and isinstance(line["latency_ms"], float | int), line
    assert {r["request_id"] for r in records} - {None} <= echoed | server.probe_ids
    assert not any("not-a-uuid" in json.dumps(r) for r in records)

    # A line logged while serving a request (not the access line) carries that request's id.
    failures = [r for r in records if r["level"] == "ERROR"]
    assert [(r["logger"], r["request_id"]) for r in failures] == [
        ("state_manager.app", undecryptable.echoed_id)
    ], failures


def test_development_logs_are_text_lines_with_the_request_id(
    capsys: Any,
) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    access_disabled = logging.getLogger("uvicorn.access").disabled
    try:
        logs.configure("INFO", json_lines=False)
        token = logs.request_id_var.set("5a0e3d6c-1111-4222-8333-944455556666")
        try:
            logging.getLogger("state_manager.test").info("hello %s", "there")
        finally:
            logs.request_id_var.reset(token)
        logging.getLogger("state_manager.test").debug("below the level")
        logging.getLogger("state_manager.test").warning("outside a request")
        logging.getLogger("state_manager.test").info("GET /a\n2026 ERROR forged /b 200")
        try:
            raise ValueError("kept")
        except ValueError:
            logging.getLogger("state_manager.test").exception("failed")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.getLogger("uvicorn.access").disabled = access_disabled
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 4, lines
    assert lines[0].endswith(
        "INFO    state_manager.test [5a0e3d6c-1111-4222-8333-944455556666] hello there"
    ), lines
    assert lines[1].endswith("WARNING state_manager.test [None] outside a request"), lines
    # A message cannot forge a line; a traceback still spans lines after its record.
    assert lines[2].endswith(r"[None] GET /a\n2026 ERROR forged /b 200"), lines
    assert lines[3].endswith("ERROR   state_manager.test [None] failed"), lines
    assert lines[4] == "Traceback (most recent call last):", lines
    assert lines[-1] == "ValueError: kept", lines
