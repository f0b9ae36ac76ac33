"""The CLI's pure parts: the graph file format and its published schema, value parsing,
rendering, failure messages, help and completion (no server)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import click
import httpx
import jsonschema
import pydantic
import pytest
import yaml
from click.testing import CliRunner
from exospherehost.cli import cli
from exospherehost.cli import graphfile as gf
from exospherehost.cli.errors import ExitCode, describe_failure
from exospherehost.cli.output import count_summary, progress_line, run_tree, table
from exospherehost.cli.values import parse_duration, parse_pairs
from exospherehost.errors import ApiError, UnexpectedResponse
from exospherehost.models import RunDetails, RunGraph

ROOT = Path(__file__).resolve().parents[3]
SCHEMA_FILE = ROOT / "docs" / "graph-file.schema.json"
EXAMPLE_GRAPHS = sorted((ROOT / "examples").glob("*/graph.yaml"))


def source(text: str, *, is_json: bool = False, label: str = "g.yaml") -> gf.Source:
    return gf.Source(label, text, is_json=is_json)


def parsed(text: str) -> gf.GraphFile:
    result = gf.parse(source(text))
    assert isinstance(result, gf.GraphFile), result
    return result


def problems(text: str, *, is_json: bool = False) -> list[str]:
    result = gf.parse(source(text, is_json=is_json))
    assert isinstance(result, list), result
    return [str(problem) for problem in result]


# --- the published schema ---------------------------------------------------------------


def test_published_schema_is_the_generated_one() -> None:
    """docs/graph-file.schema.json is regenerated with `exosphere graph schema`."""
    assert json.loads(SCHEMA_FILE.read_text()) == gf.json_schema()


def test_example_graph_files_follow_the_schema() -> None:
    assert [path.parent.name for path in EXAMPLE_GRAPHS] == ["fan_out_fan_in", "hello_world"]
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    for path in EXAMPLE_GRAPHS:
        validator.validate(yaml.safe_load(path.read_text()))
        assert isinstance(gf.parse(source(path.read_text(), label=str(path))), gf.GraphFile)


def test_schema_rejects_what_the_parser_rejects() -> None:
    validator = jsonschema.Draft202012Validator(gf.json_schema())
    bad = {"name": "g", "nodes": [{"identifier": "a", "node_name": "A", "colour": "red"}]}
    assert list(validator.iter_errors(bad))
    assert problems(json.dumps(bad), is_json=True) == [
        "g.yaml: nodes[0] (a): unknown field 'colour'"
    ]


# --- parsing ----------------------------------------------------------------------------


def test_a_json_file_may_name_its_schema() -> None:
    text = json.dumps(
        {"$schema": "../docs/graph-file.schema.json", "name": "g",
         "nodes": [{"identifier": "a", "node_name": "A"}]}
    )  # fmt: skip
    graph = gf.parse(source(text, is_json=True))
    assert isinstance(graph, gf.GraphFile)
    assert gf.to_data(graph)["$schema"] == "../docs/graph-file.schema.json"


def test_syntax_and_shape_problems() -> None:
    assert problems('{"name": "g",\n "nodes": [}', is_json=True) == [
        "g.yaml: invalid JSON: Expecting value (line 2, column 12)"
    ]
    assert problems("name: a\nname: b\nnodes: []\n") == [
        "g.yaml: invalid YAML: key 'name' is given twice (line 2, column 1)"
    ]
    assert problems("name: a\n---\nname: b\n") == [
        "g.yaml: holds 2 YAML documents; put one graph per file"
    ]
    assert problems("") == ["g.yaml: expected a mapping with name and nodes, found nothing"]
    assert problems("- a\n- b\n") == ["g.yaml: expected a mapping with name and nodes, found list"]
    assert problems("name: ' '\nnodes: []\n") == [
        "g.yaml: name: graph name cannot be empty",
        "g.yaml: nodes: List should have at least 1 item after validation, not 0",
    ]


def test_every_field_problem_is_listed_with_its_node() -> None:
    text = """\
name: g
secrets: {TOKEN: {from_env: "not a name"}, OTHER: plain-value}
retry_policy: {max_retries: -1, strategy: SOMETIMES}
store_config: {required_keys: [a.b]}
nodes:
  - identifier: a
    node_name: A
    inputs: {x: 1}
    next_nodes: [b, b]
  - {identifier: b, node_name: "", unites: {identifier: a, strategy: NEVER}}
"""
    found = problems(text)
    assert found == [
        "g.yaml: secrets.TOKEN.from_env: String should match pattern '^[A-Za-z_][A-Za-z0-9_]*$'",
        "g.yaml: secrets.OTHER: Input should be a valid dictionary or instance of SecretReference",
        "g.yaml: store_config.required_keys: Key 'a.b' cannot contain '.' character",
        "g.yaml: retry_policy.max_retries: Input should be greater than or equal to 0",
        "g.yaml: retry_policy.strategy: Input should be 'EXPONENTIAL', 'EXPONENTIAL_FULL_JITTER', "
        "'EXPONENTIAL_EQUAL_JITTER', 'LINEAR', 'LINEAR_FULL_JITTER', 'LINEAR_EQUAL_JITTER', "
        "'FIXED', 'FIXED_FULL_JITTER' or 'FIXED_EQUAL_JITTER'",
        "g.yaml: nodes[0] (a).inputs.x: Input should be a valid string",
        "g.yaml: nodes[0] (a).next_nodes: Next node identifier b is not unique",
        "g.yaml: nodes[1] (b).node_name: Node name cannot be empty",
        "g.yaml: nodes[1] (b).unites.strategy: Input should be 'ALL_SUCCESS' or 'ALL_DONE'",
    ]


def test_load_sources_reads_files_folders_and_stdin(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text("b")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("not read: folders are not recursive")
    empty = tmp_path / "empty"
    empty.mkdir()
    found = gf.load_sources(
        [str(tmp_path), "-", str(tmp_path / "missing.yaml"), str(empty)],
        stdin=io.StringIO("from stdin"),
    )
    assert found == [
        gf.Source(str(tmp_path / "a.json"), "{}", is_json=True),
        gf.Source(str(tmp_path / "b.yml"), "b", is_json=False),
        gf.Source("<stdin>", "from stdin", is_json=False),
        gf.Problem(str(tmp_path / "missing.yaml"), "no such file or folder"),
        gf.Problem(str(empty), "folder has no .yaml, .yml or .json file"),
    ]


# --- resolving: namespace and secrets ---------------------------------------------------

GRAPH = """\
name: g
secrets: {api_token: {from_env: TOKEN}}
nodes:
  - {identifier: a, node_name: A, inputs: {x: "1"}, next_nodes: [b]}
  - {identifier: b, node_name: B, namespace: elsewhere, unites: {identifier: a}}
"""


def resolve(text: str, namespace: str | None, explicit: bool, **environ: str) -> Any:
    return gf.resolve(
        parsed(text), "g.yaml", namespace=namespace, namespace_is_explicit=explicit, environ=environ
    )


def test_resolve_reads_secrets_and_fills_node_namespaces() -> None:
    ready = resolve(GRAPH, "ns", False, TOKEN="s3cr3t-value")
    assert isinstance(ready, gf.ResolvedGraph)
    assert (ready.name, ready.namespace) == ("g", "ns")
    assert ready.secrets == {"api_token": "s3cr3t-value"}
    assert [(n.identifier, n.namespace) for n in ready.nodes] == [("a", "ns"), ("b", "elsewhere")]
    assert ready.nodes[1].unites is not None and ready.nodes[1].unites.identifier == "a"
    assert (ready.retry_policy, ready.store_config, ready.triggers) == (None, None, None)
    assert "s3cr3t" not in repr(ready)  # secret values stay out of reprs and logs


def test_resolve_problems_are_all_listed() -> None:
    assert resolve(GRAPH, None, False) == [
        gf.Problem(
            "g.yaml",
            "no namespace: set 'namespace' in the file, --namespace or EXOSPHERE_NAMESPACE",
        ),
        gf.Problem("g.yaml", "secret 'api_token': environment variable TOKEN is not set"),
    ]
    in_file = "namespace: mine\n" + GRAPH
    assert resolve(in_file, "other", True, TOKEN="") == [
        gf.Problem("g.yaml", "the file says namespace 'mine' but --namespace is 'other'"),
        gf.Problem("g.yaml", "secret 'api_token': environment variable TOKEN is empty"),
    ]
    # A namespace from EXOSPHERE_NAMESPACE (not explicit) yields to the file's.
    ready = resolve(in_file, "other", False, TOKEN="v")
    assert isinstance(ready, gf.ResolvedGraph) and ready.namespace == "mine"


# --- from a stored template and back ----------------------------------------------------


def stored_template() -> dict[str, Any]:
    """A template as ``GET /graph/{name}`` answers."""
    return {
        "nodes": [
            {
                "node_name": "A",
                "namespace": "ns",
                "identifier": "a",
                "inputs": {"x": "${{ store.k }}"},
                "next_nodes": ["b"],
                "unites": None,
                "timeout": 30,
            },
            {
                "node_name": "B",
                "namespace": "other",
                "identifier": "b",
                "inputs": {},
                "next_nodes": [],
                "unites": {"identifier": "a", "strategy": "ALL_SUCCESS"},
                "timeout": None,
            },
        ],
        "timeout": 3600,
        "secrets": {"signing-key": True, "api_token": True},
        "retry_policy": {
            "max_retries": 3,
            "strategy": "LINEAR",
            "backoff_factor": 2000,
            "exponent": 2,
            "max_delay": 60000,
        },
        "store_config": {"required_keys": ["k"], "default_values": {}},
        "triggers": [{"type": "CRON", "value": {"expression": "*/5 * * * *"}}],
        "validation_status": "VALID",
        "validation_errors": [],
    }


def test_template_to_file_and_back_to_the_same_request() -> None:
    document = gf.from_template("g", "ns", stored_template())
    text = gf.dump(document, as_json=False)
    assert yaml.safe_load(text) == {
        "name": "g",
        "namespace": "ns",
        "secrets": {
            "api_token": {"from_env": "API_TOKEN"},
            "signing-key": {"from_env": "SIGNING_KEY"},
        },
        "store_config": {"required_keys": ["k"]},
        "retry_policy": {"strategy": "LINEAR", "max_delay": 60000},
        "triggers": [{"cron": "*/5 * * * *"}],
        "timeout": 3600,
        "nodes": [
            {
                "identifier": "a",
                "node_name": "A",
                "inputs": {"x": "${{ store.k }}"},
                "next_nodes": ["b"],
                "timeout": 30,
            },
            {
                "identifier": "b",
                "node_name": "B",
                "namespace": "other",
                "unites": {"identifier": "a"},
            },
        ],
    }
    assert json.loads(gf.dump(document, as_json=True)) == yaml.safe_load(text)
    for as_json in (False, True):
        again = gf.parse(source(gf.dump(document, as_json=as_json), is_json=as_json))
        assert isinstance(again, gf.GraphFile)
        ready = gf.resolve(
            again,
            "g",
            namespace=None,
            namespace_is_explicit=False,
            environ={"API_TOKEN": "1", "SIGNING_KEY": "2"},
        )
        assert isinstance(ready, gf.ResolvedGraph)
        template = stored_template()
        assert [n.model_dump(mode="json") for n in ready.nodes] == [
            {**node, "next_nodes": node["next_nodes"] or None} for node in template["nodes"]
        ]
        assert ready.retry_policy is not None and ready.store_config is not None
        assert ready.retry_policy.model_dump(mode="json") == template["retry_policy"]
        assert ready.store_config.model_dump(mode="json") == template["store_config"]
        assert [t.expression for t in ready.triggers or []] == ["*/5 * * * *"]
        assert ready.timeout == 3600
        assert ready.secrets == {"api_token": "1", "signing-key": "2"}


def test_env_name_for_secrets() -> None:
    assert gf.env_name_for("api_token") == "API_TOKEN"
    assert gf.env_name_for("signing-key.v2") == "SIGNING_KEY_V2"
    assert gf.env_name_for("2fa") == "_2FA"


# --- values -----------------------------------------------------------------------------


def test_parse_pairs() -> None:
    assert parse_pairs(["a=1", "b=x=y", " c =", "d= spaced "], "--store") == {
        "a": "1",
        "b": "x=y",
        "c": "",
        "d": " spaced ",
    }
    for bad, message in (
        (["a"], "--store 'a' is not KEY=VALUE"),
        (["=1"], "--store '=1' is not KEY=VALUE"),
        (["a=1", "a=2"], "--store key 'a' is given twice"),
    ):
        with pytest.raises(ValueError) as error:
            parse_pairs(bad, "--store")
        assert str(error.value) == message


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("1500ms", "30s", "5m", "2h", "45", "0.5")] == [
        1.5,
        30.0,
        300.0,
        7200.0,
        45.0,
        0.5,
    ]
    for bad in ("", "soon", "5d", "-1s", "1e3"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


# --- rendering --------------------------------------------------------------------------


def test_run_tree_nests_states_under_their_creators() -> None:
    def state(id_: str, identifier: str, status: str, **extra: Any) -> dict[str, Any]:
        return {"id": id_, "identifier": identifier, "node_name": identifier.title(),
                "status": status, "error": None, **extra}  # fmt: skip

    nodes = [
        state("s1", "split", "SUCCESS"),
        state("s2", "split", "SUCCESS"),
        state("w1", "work", "RETRY_CREATED", error="Boom: first\ntraceback lines"),
        state("w2", "work", "SUCCESS", retry_count=1),
        state("w3", "work", "ERRORED", error="Boom: always", retry_count=0),
        state("m1", "merge", "QUEUED"),
    ]
    edges = [("s1", "w1"), ("s1", "w2"), ("s2", "w3"), ("s1", "m1")]
    graph = RunGraph.model_validate(
        {
            "graph_name": "g",
            "root_states": [nodes[0], nodes[1]],
            "nodes": nodes,
            "edges": [{"source": s, "target": t} for s, t in edges],
            "node_count": len(nodes),
            "edge_count": len(edges),
            "execution_summary": {},
        }
    )
    assert run_tree(graph) == [
        "split (Split)     SUCCESS        attempt 1  s1",
        "├─ work (Work)    RETRY_CREATED  attempt 1  w1",
        "│     error: Boom: first",
        "├─ work (Work)    SUCCESS        attempt 2  w2",
        "└─ merge (Merge)  QUEUED         attempt 1  m1",
        "split (Split)     SUCCESS        attempt 1  s2",
        "└─ work (Work)    ERRORED        attempt 1  w3",
        "      error: Boom: always",
    ]


def run_details(**counts: int) -> RunDetails:
    pending = sum(counts.get(s, 0) for s in ("CREATED", "QUEUED", "EXECUTED"))
    total = sum(counts.values())
    return RunDetails.model_validate(
        {
            "run_id": "r",
            "graph_name": "g",
            "namespace": "ns",
            "success_count": counts.get("SUCCESS", 0),
            "pending_count": pending,
            "errored_count": counts.get("ERRORED", 0),
            "retried_count": counts.get("RETRY_CREATED", 0),
            "total_count": total,
            "status": "PENDING" if pending else "SUCCESS",
            "counts": counts,
        }
    )


def test_progress_line_and_counts() -> None:
    details = run_details(SUCCESS=3, QUEUED=1, CREATED=0, RETRY_CREATED=1)
    assert details.finished == 4
    assert progress_line(details, 2.4, width=10) == (
        "[████████░░] 4/5 states  SUCCESS 3 · QUEUED 1 · RETRY_CREATED 1  2s"
    )
    assert progress_line(run_details(), 0.0, width=4) == "[░░░░] 0/0 states  no states  0s"
    assert count_summary({"ERRORED": 1, "SUCCESS": 2, "NEW_STATUS": 1}) == (
        "SUCCESS 2 · ERRORED 1 · NEW_STATUS 1"
    )


def test_table_pads_columns() -> None:
    assert table(["A", "LONGER"], [["xyz", "1"], ["", "22"]]).splitlines() == [
        "A    LONGER",
        "xyz  1",
        "     22",
    ]


# --- failure messages -------------------------------------------------------------------

URI = "http://127.0.0.1:8000"


def api_error(status: int, body: Any) -> ApiError:
    return ApiError("GET", "/v0/namespace/ns/graph/g", status, body)


def test_api_failures_are_one_line_each() -> None:
    cases = [
        (
            api_error(401, {"detail": "Invalid API key"}),
            "unauthorized",
            f"the state manager at {URI} refused the API key (HTTP 401); "
            "check --api-key or EXOSPHERE_API_KEY",
        ),
        (
            api_error(404, {"detail": "Graph template g not found in namespace ns"}),
            "not_found",
            "not found: Graph template g not found in namespace ns",
        ),
        (
            api_error(404, {"detail": "Not Found"}),
            "not_found",
            "not found: GET /v0/namespace/ns/graph/g does not exist on this state manager",
        ),
        (
            api_error(
                422,
                {
                    "detail": [
                        {"loc": ["body", "nodes", 0, "name"], "msg": "Field required"},
                        {"loc": ["body"], "msg": "Value error, bad"},
                    ]
                },
            ),
            "invalid_request",
            "the state manager rejected the request: nodes.0.name: Field required; bad",
        ),
        (
            api_error(409, {"detail": "Duplicate"}),
            "refused",
            "the state manager refused (HTTP 409): Duplicate",
        ),
        (
            api_error(503, "<html>busy</html>"),
            "server_error",
            "the state manager failed (HTTP 503) without a JSON body (a proxy in between, "
            f"or another program at {URI}?)",
        ),
        (
            api_error(500, {"detail": "Internal Server Error"}),
            "server_error",
            "the state manager failed (HTTP 500): Internal Server Error",
        ),
    ]
    for exc, kind, message in cases:
        failure = describe_failure(exc, URI)
        assert failure is not None
        assert (failure.kind, failure.message, failure.code) == (kind, message, ExitCode.FAILED)
        assert failure.as_json()["error"]["status_code"] == exc.status_code


def test_answers_of_something_else_than_a_state_manager() -> None:
    html = api_error(404, "<!DOCTYPE HTML>\n<html>\n<body>File not found</body>\n</html>")
    failure = describe_failure(html, URI)
    assert failure is not None and failure.kind == "unexpected_answer"
    assert failure.message == (
        f"{URI} answered HTTP 404 to GET /v0/namespace/ns/graph/g without a JSON body; "
        "is it an Exosphere state manager?"
    )
    wrong_shape = describe_failure(UnexpectedResponse("expected a JSON object, got 'x'"), URI)
    assert wrong_shape is not None and wrong_shape.message == (
        f"unexpected answer from {URI}; is it an Exosphere state manager? "
        "(expected a JSON object, got 'x')"
    )
    with pytest.raises(pydantic.ValidationError) as invalid:
        RunDetails.model_validate({"run_id": "r"})
    missing_fields = describe_failure(invalid.value, URI)
    assert missing_fields is not None and "validation errors for RunDetails)" in (
        missing_fields.message
    )
    # Whatever a message quotes, it stays one line.
    multi = describe_failure(api_error(400, {"detail": "first\n  second\nthird"}), URI)
    assert multi is not None
    assert multi.message == "the state manager refused (HTTP 400): first second third"


def test_network_failures_use_the_system_words() -> None:
    refused = httpx.ConnectError("All connection attempts failed")
    refused.__cause__ = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    failure = describe_failure(refused, URI)
    assert failure is not None
    assert failure.message == f"cannot connect to the state manager at {URI}: connection refused"
    assert failure.kind == "unreachable"
    plain = describe_failure(httpx.ConnectError("All connection attempts failed"), URI)
    assert plain is not None and plain.message.endswith(": all connection attempts failed")
    slow = describe_failure(httpx.ReadTimeout("timed out"), URI)
    assert slow is not None and slow.message == f"the state manager at {URI} did not answer in time"
    bad_uri = describe_failure(httpx.UnsupportedProtocol("no scheme"), "localhost:1")
    assert bad_uri is not None and bad_uri.code == ExitCode.USAGE
    assert describe_failure(RuntimeError("a bug"), URI) is None  # bugs are not disguised


# --- help and completion ----------------------------------------------------------------


def all_commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += all_commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


def test_every_command_has_help_with_an_example() -> None:
    commands = all_commands(cli)
    assert len(commands) == 16
    runner = CliRunner()
    for path in commands:
        result = runner.invoke(cli, [*path, "--help"], prog_name="exosphere")
        assert result.exit_code == 0, (path, result.output)
        examples = result.output.split("Examples:\n", 1)[1]
        assert " ".join(("exosphere", *path)) in examples, path


def test_server_commands_take_the_shared_options() -> None:
    runner = CliRunner()
    for path in all_commands(cli):
        command = cli
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        if isinstance(command, click.Group) or path[-1] in ("schema", "completion"):
            continue
        names = {opt for param in command.params for opt in param.opts}
        assert {"--namespace", "--uri", "--api-key", "--output", "-o"} <= names, path
        help_text = runner.invoke(cli, [*path, "--help"]).output
        for variable in ("EXOSPHERE_NAMESPACE", "EXOSPHERE_STATE_MANAGER_URI", "EXOSPHERE_API_KEY"):
            assert variable in help_text, path


def test_shell_completion() -> None:
    runner = CliRunner()
    for shell in ("bash", "zsh", "fish"):
        script = runner.invoke(cli, ["completion", shell], prog_name="exosphere")
        assert script.exit_code == 0
        assert "_EXOSPHERE_COMPLETE" in script.output

    def complete(words: str, index: int) -> list[str]:
        env = {
            "_EXOSPHERE_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(index),
        }
        return runner.invoke(cli, [], prog_name="exosphere", env=env).output.split()

    assert complete("exosphere run t", 2) == ["plain,trigger"]
    assert complete("exosphere run list -o ", 4) == ["plain,text", "plain,json"]
    assert complete("exosphere graph apply --dr", 3) == ["plain,--dry-run"]


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"], prog_name="exosphere")
    assert result.output == "exosphere, version 0.0.3\n"
    assert os.environ.get("_EXOSPHERE_COMPLETE") is None
