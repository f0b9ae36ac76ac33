"""The ``exosphere`` command: graph files, runs, states and nodes from a terminal or CI.

Every command that talks to the state manager takes ``--namespace``, ``--uri``,
``--api-key`` (defaults from ``EXOSPHERE_NAMESPACE``, ``EXOSPHERE_STATE_MANAGER_URI`` and
``EXOSPHERE_API_KEY``) and ``-o text|json``. Commands are thin: they parse options, call
:class:`~exospherehost.StateManager`, and hand results to :mod:`.output`. Exit codes are
those of :class:`.errors.ExitCode`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import click
from click.core import ParameterSource
from click.shell_completion import get_completion_class

from .._version import VERSION
from ..errors import ApiError, GraphValidationError, GraphValidationTimeout
from ..models import RegisteredNode, RunDetails, RunStatus
from ..statemanager import StateManager
from . import graphfile
from .errors import CliError, ExitCode, describe_failure, validation_details
from .output import (
    Output,
    Progress,
    count_summary,
    paint_status,
    parents_of,
    progress_line,
    run_tree,
    state_json,
    table,
)
from .values import parse_duration, parse_pairs

__all__ = ["cli", "main"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# How often a waiting command asks the server again, in seconds.
POLL_INTERVAL = 0.5
VALIDATION_POLL_INTERVAL = 0.2
FAILED_STATUSES = ("ERRORED", "NEXT_CREATED_ERROR")


# --- sessions: options shared by the server commands ------------------------------------


@dataclass
class Session:
    """The settings of one command run and the clients it opened (one per namespace)."""

    out: Output
    uri: str | None
    api_key: str | None
    namespace: str | None
    namespace_is_explicit: bool
    clients: dict[str, StateManager] = field(default_factory=dict)

    def client(self, namespace: str | None = None) -> StateManager:
        """A client for ``namespace`` (default: the command's); a missing setting is a
        usage error naming the option and the variable."""
        chosen = namespace or self.namespace
        missing = []
        if not self.uri:
            missing.append("--uri (or EXOSPHERE_STATE_MANAGER_URI)")
        if not self.api_key:
            missing.append("--api-key (or EXOSPHERE_API_KEY)")
        if not chosen:
            missing.append("--namespace (or EXOSPHERE_NAMESPACE)")
        if missing:
            raise CliError("missing " + ", ".join(missing), kind="usage", code=ExitCode.USAGE)
        assert chosen is not None
        if chosen not in self.clients:
            self.clients[chosen] = StateManager(
                chosen, state_manager_uri=self.uri, key=self.api_key, retries=1
            )
        return self.clients[chosen]

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


CommandBody = Callable[..., Awaitable[ExitCode]]


def output_option[F: Callable[..., Any]](func: F) -> F:
    option = click.option(
        "-o",
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="text for people, json for scripts (one document on stdout).",
    )
    return option(func)


def server_command(func: CommandBody) -> Callable[..., None]:
    """Add the connection options to ``func`` (an ``async`` command body taking a
    :class:`Session` first) and run it: one event loop, failures as one line, exit code."""

    @click.option(
        "-n",
        "--namespace",
        envvar="EXOSPHERE_NAMESPACE",
        show_envvar=True,
        help="Namespace of the graphs and runs.",
    )
    @click.option(
        "--uri",
        envvar="EXOSPHERE_STATE_MANAGER_URI",
        show_envvar=True,
        help="State manager URL, e.g. http://127.0.0.1:8000.",
    )
    @click.option(
        "--api-key",
        envvar="EXOSPHERE_API_KEY",
        show_envvar=True,
        help="API key of the state manager.",
    )
    @output_option
    @functools.wraps(func)
    def command(
        namespace: str | None, uri: str | None, api_key: str | None, output: str, **options: Any
    ) -> None:
        context = click.get_current_context()
        source = context.get_parameter_source("namespace")
        session = Session(
            out=Output(output),
            uri=uri,
            api_key=api_key,
            namespace=namespace or None,
            namespace_is_explicit=source is ParameterSource.COMMANDLINE,
        )

        async def body() -> ExitCode:
            try:
                return await func(session, **options)
            finally:
                await session.aclose()

        context.exit(execute(session.out, uri or "", body))

    return command


def execute(out: Output, uri: str, body: Callable[[], Awaitable[ExitCode]]) -> int:
    """Run ``body`` in a fresh event loop; report a failure as one line and an exit code."""

    async def main() -> ExitCode:
        return await body()

    try:
        return int(asyncio.run(main()))
    except CliError as error:
        out.error(error)
        return int(error.code)
    except KeyboardInterrupt:
        out.error(
            CliError(
                "interrupted; what was started on the server goes on",
                kind="interrupted",
                code=ExitCode.INTERRUPTED,
            )
        )
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:
        failure = describe_failure(exc, uri)
        if failure is None:
            raise
        out.error(failure)
        return int(failure.code)


def example(*lines: str) -> str:
    """An epilog with examples (click keeps ``\\b`` paragraphs as written)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def duration(_ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def pairs(what: str) -> Callable[[click.Context, click.Parameter, tuple[str, ...]], dict[str, str]]:
    def convert(
        _ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
    ) -> dict[str, str]:
        try:
            return parse_pairs(value, what)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param=param) from None

    return convert


# --- the command tree -------------------------------------------------------------------


@click.group(
    context_settings=CONTEXT_SETTINGS,
    epilog=example(
        "exosphere graph apply -f examples/hello_world/graph.yaml",
        "exosphere run trigger hello --store name=Ada --wait",
        "exosphere run show RUN_ID",
    ),
)
@click.version_option(VERSION, "--version", prog_name="exosphere")
def cli() -> None:
    """Manage Exosphere graphs and runs: graph files in git, runs from a terminal or CI.

    Settings come from options or the environment: EXOSPHERE_STATE_MANAGER_URI,
    EXOSPHERE_API_KEY, EXOSPHERE_NAMESPACE. Exit codes: 0 success, 1 failure (refused,
    unreachable, invalid graph, failed run), 2 usage error, 3 --timeout passed,
    130 interrupted. See docs/cli.md.
    """


@cli.group(
    epilog=example("exosphere graph apply -f graphs/", "exosphere graph get hello > hello.yaml")
)
def graph() -> None:
    """Graph templates: apply files, get one as a file, list them."""


@cli.group(epilog=example("exosphere run trigger hello --wait", "exosphere run list -o json"))
def run() -> None:
    """Runs: trigger (and wait), list, show."""


@cli.group(epilog=example("exosphere state retry 66a1f0c2e4b0a1b2c3d4e5f6"))
def state() -> None:
    """States (one execution of a node in a run)."""


@cli.group(epilog=example("exosphere nodes list"))
def nodes() -> None:
    """Node types registered by workers."""


# --- graph ------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    name: str
    namespace: str
    file: str
    status: str  # VALID, INVALID, REJECTED, TIMEOUT or CHECKED (--dry-run)
    errors: list[str]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "file": self.file,
            "status": self.status,
            "errors": self.errors,
        }


@graph.command(
    "apply",
    epilog=example(
        "exosphere graph apply -f examples/hello_world/graph.yaml",
        "exosphere graph apply -f graphs/ --timeout 2m -o json",
        "exosphere graph get hello | exosphere graph apply -f -",
    ),
)
@click.option(
    "-f",
    "--file",
    "files",
    multiple=True,
    required=True,
    metavar="PATH",
    help="Graph file (YAML or JSON), a folder of them, or - for stdin. Repeatable.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default="60s",
    show_default=True,
    metavar="DURATION",
    callback=duration,
    help="How long to wait for the server to validate each graph.",
)
@click.option("--dry-run", is_flag=True, help="Check the files and secrets; send nothing.")
@server_command
async def graph_apply(
    session: Session, files: tuple[str, ...], timeout_s: float, dry_run: bool
) -> ExitCode:
    """Create or update graphs from files and wait until the server validated them.

    Every problem is listed, with the node it concerns; the exit code is 0 only when
    every graph is VALID. Secrets are read from the environment variables the file
    names; a missing one stops everything before any request is sent.
    """
    resolved = resolve_files(session, files)
    out = session.out
    results: list[ApplyResult] = []
    for graph_ in resolved:
        if dry_run:
            results.append(ApplyResult(graph_.name, graph_.namespace, graph_.source, "CHECKED", []))
        else:
            results.append(await apply_one(session, graph_, timeout_s))
    if out.json_mode:
        out.data({"graphs": [result.as_json() for result in results]})
    else:
        for result in results:
            out.line(
                f"{result.name} (namespace {result.namespace}, {result.file}): "
                f"{paint_status(result.status)}"
            )
            for error in result.errors:
                out.line(f"  - {error}")
    statuses = {result.status for result in results}
    if statuses & {"INVALID", "REJECTED"}:
        return ExitCode.FAILED
    if "TIMEOUT" in statuses:
        return ExitCode.TIMEOUT
    return ExitCode.OK


def resolve_files(session: Session, files: tuple[str, ...]) -> list[graphfile.ResolvedGraph]:
    """Every graph of ``files``, checked and with its secrets; all problems at once."""
    problems: list[graphfile.Problem] = []
    resolved: list[graphfile.ResolvedGraph] = []
    for item in graphfile.load_sources(files):
        if isinstance(item, graphfile.Problem):
            problems.append(item)
            continue
        parsed = graphfile.parse(item)
        if isinstance(parsed, list):
            problems.extend(parsed)
            continue
        ready = graphfile.resolve(
            parsed,
            item.label,
            namespace=session.namespace,
            namespace_is_explicit=session.namespace_is_explicit,
            environ=os.environ,
        )
        if isinstance(ready, list):
            problems.extend(ready)
        else:
            resolved.append(ready)
    seen: dict[tuple[str, str], str] = {}
    for graph_ in resolved:
        key = (graph_.namespace, graph_.name)
        if key in seen:
            problems.append(
                graphfile.Problem(
                    graph_.source,
                    f"graph '{graph_.name}' in namespace '{graph_.namespace}' is also "
                    f"defined in {seen[key]}",
                )
            )
        seen.setdefault(key, graph_.source)
    if problems:
        lines = [str(problem) for problem in problems]
        message = lines[0] if len(lines) == 1 else f"{len(lines)} problems in the graph files:"
        raise CliError(message, kind="invalid_file", details=lines)
    return resolved


async def apply_one(
    session: Session, graph_: graphfile.ResolvedGraph, timeout_s: float
) -> ApplyResult:
    """Upsert one graph and wait for its validation."""
    client = session.client(graph_.namespace)
    result = ApplyResult(graph_.name, graph_.namespace, graph_.source, "VALID", [])
    try:
        await client.upsert_graph(
            graph_.name,
            graph_.nodes,
            graph_.secrets,
            retry_policy=graph_.retry_policy,
            store_config=graph_.store_config,
            triggers=graph_.triggers,
            timeout=graph_.timeout,
            validation_timeout=timeout_s,
            polling_interval=VALIDATION_POLL_INTERVAL,
        )
    except GraphValidationTimeout as exc:
        result.status = "TIMEOUT"
        result.errors = [f"validation still {exc.status} after {timeout_s:g} s"]
    except GraphValidationError as exc:
        result.status = "INVALID"
        result.errors = exc.errors or ["(the server gave no reason)"]
    except ApiError as exc:
        if exc.status_code not in (400, 422):
            raise
        result.status = "REJECTED"
        result.errors = rejection_details(exc)
    return result


def rejection_details(exc: ApiError) -> list[str]:
    """The problems of a refused upsert, one per line (the server joins them with ``; ``)."""
    if exc.status_code == 422:
        return validation_details(exc.body)
    detail = exc.detail.removeprefix("Error validating graph template: ")
    # Each problem starts with a capital ("Node 'a' ...", "Graph has ..."); a "; " inside
    # one ("...; exactly one is required") is not a boundary.
    return [part for part in re.split(r";\s+(?=[A-Z])", detail) if part]


@graph.command(
    "get",
    epilog=example(
        "exosphere graph get hello > graphs/hello.yaml",
        "exosphere graph get hello -o json",
    ),
)
@click.argument("name")
@server_command
async def graph_get(session: Session, name: str) -> ExitCode:
    """Print graph NAME as a file that `graph apply` accepts (YAML; JSON with -o json).

    Secrets are written as references to environment variables named after them (in
    upper case): the server never returns their values.
    """
    client = session.client()
    template = await client.get_graph(name)
    document = graphfile.from_template(name, client.namespace, template)
    click.echo(graphfile.dump(document, as_json=session.out.json_mode), nl=False)
    return ExitCode.OK


@graph.command("list", epilog=example("exosphere graph list", "exosphere graph list -o json"))
@server_command
async def graph_list(session: Session) -> ExitCode:
    """List the graphs of the namespace with their validation status."""
    client = session.client()
    graphs = [graph_entry(template) for template in await client.list_graphs()]
    out = session.out
    if out.json_mode:
        out.data({"namespace": client.namespace, "graphs": graphs})
        return ExitCode.OK
    if not graphs:
        out.note(f"no graphs in namespace {client.namespace}")
        return ExitCode.OK
    rows = [
        [
            str(g["name"]),
            str(g["validation_status"]),
            str(g["node_count"]),
            ", ".join(g["triggers"]) or "-",
            str(g["updated_at"]),
        ]
        for g in graphs
    ]
    out.line(table(["NAME", "STATUS", "NODES", "CRON", "UPDATED"], rows, paint_status))
    return ExitCode.OK


def graph_entry(template: dict[str, Any]) -> dict[str, Any]:
    """One graph in ``graph list -o json``, from a template of ``GET /graphs/``."""
    return {
        "name": template.get("name"),
        "validation_status": template.get("validation_status"),
        "validation_errors": template.get("validation_errors") or [],
        "node_count": len(template.get("nodes") or []),
        "secrets": sorted(template.get("secrets") or {}),
        "triggers": [t["value"]["expression"] for t in template.get("triggers") or []],
        "updated_at": template.get("updated_at"),
    }


@graph.command(
    "schema",
    epilog=example("exosphere graph schema > graph-file.schema.json"),
)
@output_option
def graph_schema(output: str) -> None:
    """Print the JSON Schema of graph files (for editors; the same as
    docs/graph-file.schema.json). The output is JSON whatever -o says."""
    del output  # accepted like on every command; the schema is JSON either way
    Output("json").data(graphfile.json_schema())


# --- runs -------------------------------------------------------------------------------


@run.command(
    "trigger",
    epilog=example(
        "exosphere run trigger hello --store name=Ada",
        "exosphere run trigger hello --store name=Ada --wait --timeout 5m",
        "RUN_ID=$(exosphere run trigger nightly --start-delay 10m)",
        "exosphere run trigger nightly --idempotency-key nightly-2026-12-03",
    ),
)
@click.argument("graph_name", metavar="GRAPH")
@click.option(
    "--store",
    "store",
    multiple=True,
    metavar="KEY=VALUE",
    callback=pairs("--store"),
    help="A value of the run's store. Repeatable.",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="KEY=VALUE",
    callback=pairs("--input"),
    help="A root node input (literal text), overriding the graph's. Repeatable.",
)
@click.option(
    "--start-delay",
    callback=duration,
    metavar="DURATION",
    help="Start the run later: 500ms, 30s, 10m, 2h (a bare number is seconds).",
)
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help=(
        "Start the run once: the same KEY again (within the server's window) prints the "
        "first run's id and starts nothing; with another graph or body it is an error."
    ),
)
@click.option("--wait", is_flag=True, help="Wait for the run to finish; exit 1 if it FAILED.")
@click.option(
    "--timeout",
    "timeout_s",
    callback=duration,
    metavar="DURATION",
    help="With --wait (implied): give up after this long, exit 3. The run goes on.",
)
@server_command
async def run_trigger(
    session: Session,
    graph_name: str,
    store: dict[str, str],
    inputs: dict[str, str],
    start_delay: float | None,
    idempotency_key: str | None,
    wait: bool,
    timeout_s: float | None,
) -> ExitCode:
    """Start a run of GRAPH and print its id.

    With --wait, show progress on a terminal (states finished / total, by status) and
    exit 0 when the run ends SUCCESS, 1 when it FAILED, 3 when --timeout passes first.
    """
    client = session.client()
    out = session.out
    delay_ms = round((start_delay or 0) * 1000)
    answer = await client.trigger(
        graph_name,
        inputs=inputs,
        store=store,
        start_delay=delay_ms,
        idempotency_key=idempotency_key,
    )
    run_id = str(answer["run_id"])
    if not out.json_mode:
        out.line(run_id)
    if not (wait or timeout_s is not None):
        if out.json_mode:
            out.data(trigger_document(run_id, graph_name, client.namespace, None, []))
        return ExitCode.OK
    details, timed_out = await wait_for(client, out, run_id, timeout_s)
    failed: list[dict[str, Any]] = []
    if details.status is RunStatus.FAILED:
        view = await client.get_run_graph(run_id)
        parents = parents_of(view)
        failed = [
            state_json(s, parents.get(s.id)) for s in view.nodes if s.status in FAILED_STATUSES
        ]
    if out.json_mode:
        out.data(trigger_document(run_id, graph_name, client.namespace, details, failed))
    else:
        summary = count_summary(details.counts, paint_status)
        out.note(f"run {run_id}: {paint_status(details.status.value)}  ({summary})")
        for item in failed:
            out.note(
                f"  {item['identifier']} ({item['node_name']}) {item['id']}: "
                f"{paint_status(str(item['status']))} {item['error'] or ''}".rstrip()
            )
        if timed_out:
            out.note(
                f"still running after {timeout_s:g} s: {details.finished} of "
                f"{details.total_count} states finished; see `exosphere run show {run_id}`"
            )
    if timed_out:
        return ExitCode.TIMEOUT
    return ExitCode.OK if details.status is RunStatus.SUCCESS else ExitCode.FAILED


def trigger_document(
    run_id: str,
    graph_name: str,
    namespace: str,
    details: RunDetails | None,
    failed_states: list[dict[str, Any]],
) -> dict[str, Any]:
    """The ``run trigger -o json`` document (``run`` is ``None`` without ``--wait``)."""
    return {
        "run_id": run_id,
        "graph_name": graph_name,
        "namespace": namespace,
        "run": details.model_dump(mode="json") if details is not None else None,
        "failed_states": failed_states,
    }


async def wait_for(
    client: StateManager, out: Output, run_id: str, timeout_s: float | None
) -> tuple[RunDetails, bool]:
    """Poll the run until it is no longer PENDING or ``timeout_s`` passes (then ``True``)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    progress = Progress(colour=out.colour)
    try:
        while True:
            details = await client.get_run_details(run_id)
            elapsed = loop.time() - started
            progress.show(progress_line(details, elapsed, paint_status))
            if details.status is not RunStatus.PENDING:
                return details, False
            if timeout_s is not None and elapsed >= timeout_s:
                return details, True
            pause = POLL_INTERVAL
            if timeout_s is not None:
                pause = max(0.0, min(pause, timeout_s - elapsed))
            await asyncio.sleep(pause)
    finally:
        progress.close()


@run.command("list", epilog=example("exosphere run list", "exosphere run list --page 2 -o json"))
@click.option("--page", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--size", default=20, show_default=True, type=click.IntRange(min=1))
@server_command
async def run_list(session: Session, page: int, size: int) -> ExitCode:
    """List the runs of the namespace, newest first, with their states counted."""
    client = session.client()
    listing = await client.list_runs(page, size)
    out = session.out
    if out.json_mode:
        out.data(listing.model_dump(mode="json"))
        return ExitCode.OK
    if not listing.runs:
        out.note(f"no runs in namespace {client.namespace} on page {page}")
        return ExitCode.OK
    rows = [
        [
            run_.run_id,
            run_.graph_name,
            run_.status.value,
            f"{run_.total_count - run_.pending_count}/{run_.total_count}",
            str(run_.errored_count),
            str(run_.retried_count),
            run_.created_at or "",
        ]
        for run_ in listing.runs
    ]
    headers = ["RUN ID", "GRAPH", "STATUS", "DONE", "ERRORED", "RETRIED", "CREATED"]
    out.line(table(headers, rows, paint_status))
    pages = max(1, -(-listing.total // listing.size))
    out.note(f"page {listing.page} of {pages} ({listing.total} runs)")
    return ExitCode.OK


@run.command(
    "show",
    epilog=example(
        "exosphere run show RUN_ID",
        "exosphere run show RUN_ID --state STATE_ID",
        "exosphere run show RUN_ID -o json",
    ),
)
@click.argument("run_id")
@click.option(
    "--state",
    "state_id",
    metavar="STATE_ID",
    help="Show this state in full (inputs, outputs, error, parents) instead of the tree.",
)
@server_command
async def run_show(session: Session, run_id: str, state_id: str | None) -> ExitCode:
    """Show a run: its status and counts, then its states as a tree (each under the state
    that created it) with status, node, attempt and error."""
    client = session.client()
    out = session.out
    details = await client.get_run_details(run_id)
    if state_id is not None:
        node = await client.get_run_node(details.graph_name, run_id, state_id)
        if out.json_mode:
            out.data({"run": details.model_dump(mode="json"), "state": node.model_dump()})
            return ExitCode.OK
        for label, value in (
            ("state", node.id),
            ("node", f"{node.identifier} ({node.node_name})"),
            ("status", paint_status(node.status)),
            ("run", f"{run_id} ({node.graph_name})"),
            ("created", node.created_at or ""),
            ("updated", node.updated_at or ""),
        ):
            out.line(f"{label:<8} {value}")
        for label, mapping in (
            ("parents", node.parents),
            ("inputs", node.inputs),
            ("outputs", node.outputs),
        ):
            out.line(f"{label}:" + ("" if mapping else " -"))
            for key, value in mapping.items():
                out.line(f"  {key}: {value}")
        if node.error:
            out.line(f"error:\n  {node.error}")
        return ExitCode.OK
    view = await client.get_run_graph(run_id)
    if out.json_mode:
        parents = parents_of(view)
        out.data(
            {
                "run": details.model_dump(mode="json"),
                "states": [state_json(s, parents.get(s.id)) for s in view.nodes],
            }
        )
        return ExitCode.OK
    for label, value in (
        ("run", run_id),
        ("graph", details.graph_name),
        ("namespace", details.namespace),
        ("status", paint_status(details.status.value)),
        ("created", details.created_at or ""),
        ("states", f"{details.total_count}: {count_summary(details.counts, paint_status)}"),
    ):
        out.line(f"{label:<10} {value}")
    out.line()
    for line in run_tree(view, paint_status):
        out.line(line)
    return ExitCode.OK


@run.command(
    "cancel",
    epilog=example("exosphere run cancel RUN_ID", "exosphere run cancel RUN_ID -o json"),
)
@click.argument("run_id")
@server_command
async def run_cancel(session: Session, run_id: str) -> ExitCode:
    """Cancel a run: its pending states never start, and the states being executed are
    refused when their workers report them. Cancelling a cancelled run again succeeds
    the same way; a finished run cannot be cancelled (exit 1, HTTP 409)."""
    client = session.client()
    answer = await client.cancel_run(run_id)
    out = session.out
    document: dict[str, Any] = {
        "run_id": str(answer.get("run_id", run_id)),
        "namespace": client.namespace,
        "status": str(answer.get("status", "CANCELLED")),
        "cancelled_at": answer.get("cancelled_at"),
        "cancelled_states": answer.get("cancelled_states"),
    }
    if out.json_mode:
        out.data(document)
        return ExitCode.OK
    out.line(
        f"run {document['run_id']} {paint_status(str(document['status']))} "
        f"({document['cancelled_states']} state(s) cancelled)"
    )
    return ExitCode.OK


# --- states and nodes -------------------------------------------------------------------


@state.command(
    "retry",
    epilog=example("exosphere state retry 66a1f0c2e4b0a1b2c3d4e5f6"),
)
@click.argument("state_id")
@server_command
async def state_retry(session: Session, state_id: str) -> ExitCode:
    """Run a finished state again (a manual retry) and print the new state's id.

    The server refuses a state that is still pending or was already retried (retry its
    latest attempt instead).
    """
    client = session.client()
    new_id = await client.retry_state(state_id)
    if session.out.json_mode:
        session.out.data({"state_id": state_id, "retry_state_id": new_id})
    else:
        session.out.line(new_id)
    return ExitCode.OK


@nodes.command("list", epilog=example("exosphere nodes list", "exosphere nodes list -o json"))
@server_command
async def nodes_list(session: Session) -> ExitCode:
    """List the node types that workers registered, with their input and output fields."""
    client = session.client()
    registered = await client.list_nodes()
    out = session.out
    if out.json_mode:
        out.data({"namespace": client.namespace, "nodes": [node_entry(n) for n in registered]})
        return ExitCode.OK
    if not registered:
        out.note(f"no nodes registered in namespace {client.namespace}")
        return ExitCode.OK
    rows = [
        [
            node.name,
            node.runtime_name,
            ", ".join(node.input_fields) or "-",
            ", ".join(node.output_fields) or "-",
            ", ".join(node.secrets) or "-",
        ]
        for node in registered
    ]
    out.line(table(["NAME", "RUNTIME", "INPUTS", "OUTPUTS", "SECRETS"], rows))
    return ExitCode.OK


def node_entry(node: RegisteredNode) -> dict[str, Any]:
    """One node type in ``nodes list -o json``."""
    return {
        "name": node.name,
        "runtime_name": node.runtime_name,
        "inputs": node.input_fields,
        "outputs": node.output_fields,
        "secrets": node.secrets,
        "inputs_schema": node.inputs_schema,
        "outputs_schema": node.outputs_schema,
    }


# --- shell completion -------------------------------------------------------------------


@cli.command(
    "completion",
    epilog=example(
        'eval "$(exosphere completion bash)"     # in ~/.bashrc',
        'eval "$(exosphere completion zsh)"      # in ~/.zshrc',
        "exosphere completion fish > ~/.config/fish/completions/exosphere.fish",
    ),
)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script of SHELL (commands, options, choices)."""
    completion_class = get_completion_class(shell)
    assert completion_class is not None  # the choices are the shells click supports
    script = completion_class(cli, {}, "exosphere", "_EXOSPHERE_COMPLETE").source()
    click.echo(script)


def main() -> None:
    """Entry point of the ``exosphere`` console script."""
    cli(prog_name="exosphere")
