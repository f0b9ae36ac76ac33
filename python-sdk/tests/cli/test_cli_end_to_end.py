"""The ``exosphere`` command against the real state manager on loopback and a real worker
process: graph files, runs, states, nodes, errors.

Each flow runs the console script as a real process (``exosphere``); the checks around it
(other output formats, more messages) run the same command in this process
(``exosphere_here``), which spares an interpreter start-up each.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml
from cli_support import (
    EXOSPHERE,
    Exosphere,
    Worker,
    cli_env,
    invoke_in_process,
    run_exosphere,
    start_worker,
    stop_worker,
)
from cli_worker import FAILURE
from sm_support import ServerProcess, free_port, unique_namespace

# Every part of the format: secrets, store config, retry policy, cron, next nodes, unites.
FULL_GRAPH = """\
name: {name}
secrets:
  api_token: {{from_env: CLI_TEST_TOKEN}}
store_config:
  required_keys: [name]
  default_values: {{suffix: "!"}}
retry_policy:
  max_retries: 1
  strategy: FIXED
  backoff_factor: 100
triggers:
  - cron: "0 0 1 1 *"
nodes:
  - identifier: greet
    node_name: Greet
    inputs:
      name: ${{{{ store.name }}}}
    next_nodes: [shout]
  - identifier: shout
    node_name: Shout
    inputs:
      text: ${{{{ greet.outputs.greeting }}}}
  - identifier: join
    node_name: Shout
    inputs:
      text: ${{{{ greet.outputs.greeting }}}}
    unites: {{identifier: greet, strategy: ALL_DONE}}
"""

HELLO = """\
name: hello
nodes:
  - identifier: greet
    node_name: Greet
    inputs: {name: "${{ store.name }}"}
store_config: {required_keys: [name]}
"""

FAILING = """\
name: failing
retry_policy: {max_retries: 1, strategy: FIXED, backoff_factor: 50}
nodes:
  - identifier: fail
    node_name: Fail
    inputs: {name: x}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def one_line_error(stderr: str) -> str:
    """The whole stderr of a failed command: exactly one line, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def apply_hello(exosphere_here: Exosphere, tmp_path: Path) -> None:
    applied = exosphere_here("graph", "apply", "-f", str(write(tmp_path / "hello.yaml", HELLO)))
    assert applied.code == 0, applied


# --- graph files ------------------------------------------------------------------------


def test_apply_valid_then_get_round_trips(
    exosphere: Exosphere, exosphere_here: Exosphere, worker: Worker, tmp_path: Path
) -> None:
    source = write(tmp_path / "full.yaml", FULL_GRAPH.format(name="full"))
    applied = exosphere("graph", "apply", "-f", str(source), CLI_TEST_TOKEN="t0ken")
    assert applied.code == 0, applied
    assert applied.stdout.strip() == f"full (namespace {worker.namespace}, {source}): VALID"

    got = exosphere("graph", "get", "full")
    assert got.code == 0, got
    document = yaml.safe_load(got.stdout)
    assert document == {
        "name": "full",
        "namespace": worker.namespace,
        "secrets": {"api_token": {"from_env": "API_TOKEN"}},
        "store_config": {"required_keys": ["name"], "default_values": {"suffix": "!"}},
        "retry_policy": {"max_retries": 1, "strategy": "FIXED", "backoff_factor": 100},
        "triggers": [{"cron": "0 0 1 1 *"}],
        "nodes": [
            {
                "identifier": "greet",
                "node_name": "Greet",
                "inputs": {"name": "${{ store.name }}"},
                "next_nodes": ["shout"],
            },
            {
                "identifier": "shout",
                "node_name": "Shout",
                "inputs": {"text": "${{ greet.outputs.greeting }}"},
            },
            {
                "identifier": "join",
                "node_name": "Shout",
                "inputs": {"text": "${{ greet.outputs.greeting }}"},
                "unites": {"identifier": "greet", "strategy": "ALL_DONE"},
            },
        ],
    }
    # What `get` prints, `apply` accepts (the secret's value from the variable it names),
    # and the stored graph is unchanged: YAML from a file, JSON from stdin.
    again = write(tmp_path / "again.yaml", got.stdout)
    assert exosphere_here("graph", "apply", "-f", str(again), API_TOKEN="t0ken").code == 0
    assert exosphere_here("graph", "get", "full").stdout == got.stdout
    as_json = exosphere_here("graph", "get", "full", "-o", "json")
    assert as_json.json() == document
    piped = exosphere_here(
        "graph", "apply", "-f", "-", "-o", "json", stdin=as_json.stdout, API_TOKEN="x"
    )
    assert piped.code == 0, piped
    assert piped.json() == {
        "graphs": [
            {
                "name": "full",
                "namespace": worker.namespace,
                "file": "<stdin>",
                "status": "VALID",
                "errors": [],
            }
        ]
    }
    assert exosphere_here("graph", "get", "full").stdout == got.stdout

    listed = exosphere_here("graph", "list", "-o", "json")
    assert listed.code == 0, listed
    [entry] = [g for g in listed.json()["graphs"] if g["name"] == "full"]
    assert entry == {
        "name": "full",
        "validation_status": "VALID",
        "validation_errors": [],
        "node_count": 3,
        "secrets": ["api_token"],
        "triggers": ["0 0 1 1 *"],
        "updated_at": entry["updated_at"],
    }
    table = exosphere_here("graph", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "NODES", "CRON", "UPDATED"]
    assert any(line.split()[:3] == ["full", "VALID", "3"] for line in table[1:])


def test_apply_broken_files_lists_every_error(
    exosphere: Exosphere, exosphere_here: Exosphere, tmp_path: Path
) -> None:
    malformed = write(
        tmp_path / "malformed.yaml",
        textwrap.dedent(
            """\
            name: malformed
            nodes:
              - identifier: store
                node_name: Greet
                inputs: {name: 5}
                colour: red
              - identifier: second
            triggers:
              - cron: "* * *"
            """
        ),
    )
    not_yaml = write(tmp_path / "bad.yaml", "name: [unclosed\n")
    result = exosphere("graph", "apply", "-f", str(malformed), "-f", str(not_yaml))
    assert result.code == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: 6 problems in the graph files:"
    assert sorted(lines[1:]) == sorted(
        [
            f"  - {malformed}: nodes[0] (store).identifier: "
            "Node identifier cannot be reserved word 'store'",
            f"  - {malformed}: nodes[0] (store).inputs.name: Input should be a valid string",
            f"  - {malformed}: nodes[0] (store): unknown field 'colour'",
            f"  - {malformed}: nodes[1] (second): 'node_name' is required",
            f"  - {malformed}: triggers[0].cron: a cron expression has five fields "
            "(minute hour day-of-month month day-of-week), got 3",
            f"  - {not_yaml}: invalid YAML: expected ',' or ']', but got '<stream end>' "
            "(line 2, column 1)",
        ]
    )
    # Nothing was sent.
    assert exosphere_here("graph", "get", "malformed").code == 1


def test_apply_reports_server_errors_per_node(
    exosphere: Exosphere, exosphere_here: Exosphere, tmp_path: Path
) -> None:
    """Problems only the server can see: the structure (refused at once) and the nodes
    workers registered (found by validation). Each is listed; exit code 1."""
    structure = write(
        tmp_path / "structure.yaml",
        textwrap.dedent(
            """\
            name: structure
            nodes:
              - identifier: greet
                node_name: Greet
                inputs: {name: "${{ store.missing }}"}
              - identifier: loose
                node_name: Greet
                inputs: {name: x}
            """
        ),
    )
    registry = write(
        tmp_path / "registry.yaml",
        textwrap.dedent(
            """\
            name: registry
            nodes:
              - identifier: greet
                node_name: Greet
                inputs: {}
                next_nodes: [ghost]
              - identifier: ghost
                node_name: NeverRegistered
                inputs: {x: "${{ greet.outputs.greeting }}"}
            """
        ),
    )
    hello = write(tmp_path / "hello.yaml", HELLO)
    result = exosphere("graph", "apply", "-f", str(tmp_path), "-o", "json")
    assert result.code == 1, result
    by_name = {g["name"]: g for g in result.json()["graphs"]}
    assert [g["file"] for g in result.json()["graphs"]] == [
        str(hello),
        str(registry),
        str(structure),
    ]
    assert by_name["hello"]["status"] == "VALID"
    assert by_name["structure"]["status"] == "REJECTED"
    assert by_name["structure"]["errors"] == [
        "Graph has 2 root nodes (greet, loose); exactly one is required",
        "Input 'name' of node 'greet' references store key 'missing', which is in neither "
        "store_config.required_keys nor store_config.default_values",
    ]
    assert by_name["registry"]["status"] == "INVALID"
    errors = by_name["registry"]["errors"]
    assert any("'greet'" in e and "'name'" in e for e in errors), errors
    assert any("'ghost'" in e and "NeverRegistered" in e for e in errors), errors

    text = exosphere_here("graph", "apply", "-f", str(structure))
    assert text.code == 1
    assert text.stdout.splitlines()[1:] == [f"  - {e}" for e in by_name["structure"]["errors"]]


def test_missing_secret_stops_before_sending(
    exosphere: Exosphere, exosphere_here: Exosphere, tmp_path: Path
) -> None:
    source = write(tmp_path / "secret.yaml", FULL_GRAPH.format(name="unsent"))
    for run, env in ((exosphere, {}), (exosphere_here, {"CLI_TEST_TOKEN": ""})):
        result = run("graph", "apply", "-f", str(source), **env)
        assert result.code == 1, result
        state = "is empty" if env else "is not set"
        assert one_line_error(result.stderr) == (
            f"error: {source}: secret 'api_token': environment variable CLI_TEST_TOKEN {state}"
        )
    assert exosphere_here("graph", "get", "unsent").code == 1  # never sent

    checked = exosphere_here(
        "graph", "apply", "-f", str(source), "--dry-run", "-o", "json", CLI_TEST_TOKEN="t"
    )
    assert checked.code == 0, checked
    assert checked.json()["graphs"][0]["status"] == "CHECKED"
    assert exosphere_here("graph", "get", "unsent").code == 1  # a dry run sends nothing


def test_namespace_from_file_conflicts_with_option(
    exosphere_here: Exosphere, worker: Worker, tmp_path: Path
) -> None:
    source = write(tmp_path / "ns.yaml", f"namespace: {worker.namespace}\n" + HELLO)
    applied = exosphere_here("graph", "apply", "-f", str(source), EXOSPHERE_NAMESPACE="other")
    assert applied.code == 0, applied
    result = exosphere_here("graph", "apply", "-f", str(source), "--namespace", "other")
    assert result.code == 1
    assert one_line_error(result.stderr) == (
        f"error: {source}: the file says namespace '{worker.namespace}' but --namespace is 'other'"
    )


# --- runs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_trigger_wait_success(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """apply, trigger --wait to SUCCESS, then the run in list and show, on both databases."""
    if backend == "sqlite":  # the module's worker on the SDK tests' server
        server: ServerProcess = request.getfixturevalue("sm_server")
        worker: Worker = request.getfixturevalue("worker")
    else:
        server = request.getfixturevalue("sm_server_postgres")
        worker = start_worker(server, unique_namespace("cli-run"), tmp_path / "worker.log")
    try:
        env = cli_env(server, worker.namespace, CLI_TEST_TOKEN="t0ken")
        source = write(tmp_path / "full.yaml", FULL_GRAPH.format(name="full"))
        assert invoke_in_process("graph", "apply", "-f", str(source), env=env).code == 0

        waited = run_exosphere(
            "run", "trigger", "full", "--store", "name=Ada", "--wait", "-o", "json", env=env
        )
        assert waited.code == 0, waited
        document = waited.json()
        run_id = document["run_id"]
        assert document["graph_name"] == "full"
        assert document["namespace"] == worker.namespace
        assert document["failed_states"] == []
        run = document["run"]
        assert run["run_id"] == run_id
        assert run["status"] == "SUCCESS"
        assert (run["success_count"], run["total_count"], run["pending_count"]) == (3, 3, 0)
        assert run["counts"]["SUCCESS"] == 3
        assert set(run["counts"]) >= {"CREATED", "QUEUED", "ERRORED", "RETRY_CREATED"}

        text = invoke_in_process("run", "trigger", "full", "--store", "name=Bo", "--wait", env=env)
        assert text.code == 0, text
        second_id = text.stdout.strip()  # stdout: the run id alone
        assert len(second_id) == 36 and second_id != run_id
        assert text.stderr.strip() == f"run {second_id}: SUCCESS  (SUCCESS 3)"

        listed = invoke_in_process("run", "list", "-o", "json", env=env).json()
        assert [r["run_id"] for r in listed["runs"]][:2] == [second_id, run_id]

        shown = invoke_in_process("run", "show", run_id, "-o", "json", env=env)
        assert shown.code == 0, shown
        states = shown.json()["states"]
        assert shown.json()["run"] == run
        assert sorted(s["identifier"] for s in states) == ["greet", "join", "shout"]
        by_identifier = {s["identifier"]: s for s in states}
        greet = by_identifier["greet"]
        assert (greet["parent_id"], greet["status"], greet["retry_count"]) == (None, "SUCCESS", 0)
        assert by_identifier["shout"]["parent_id"] == greet["id"]
        assert by_identifier["join"]["parent_id"] == greet["id"]

        tree = invoke_in_process("run", "show", run_id, env=env).stdout.splitlines()
        assert tree[0].split() == ["run", run_id]
        assert tree[3].split() == ["status", "SUCCESS"]
        assert tree[5] == "states     3: SUCCESS 3"
        assert tree[7].split() == ["greet", "(Greet)", "SUCCESS", "attempt", "1", greet["id"]]
        assert {line.split()[1] for line in tree[8:]} == {"shout", "join"}
        assert tree[8].startswith("├─ ") and tree[9].startswith("└─ ")

        shout_id = by_identifier["shout"]["id"]
        state = invoke_in_process(
            "run", "show", run_id, "--state", shout_id, "-o", "json", env=env
        ).json()["state"]
        assert state["outputs"] == {"text": "HELLO, ADA!"}
        assert state["parents"] == {"greet": greet["id"]}
        details = invoke_in_process("run", "show", run_id, "--state", shout_id, env=env).stdout
        assert "  text: HELLO, ADA!" in details.splitlines()
    finally:
        if backend != "sqlite":
            stop_worker(worker)


def test_trigger_wait_failed_run_then_state_retry(
    exosphere: Exosphere, exosphere_here: Exosphere, tmp_path: Path
) -> None:
    failing = write(tmp_path / "failing.yaml", FAILING)
    assert exosphere_here("graph", "apply", "-f", str(failing)).code == 0

    result = exosphere("run", "trigger", "failing", "--wait", "-o", "json")
    assert result.code == 1, result
    document = result.json()
    assert document["run"]["status"] == "FAILED"
    assert (document["run"]["errored_count"], document["run"]["retried_count"]) == (1, 1)
    [failed] = document["failed_states"]
    assert failed["identifier"] == "fail"
    assert failed["status"] == "ERRORED"
    assert failed["retry_count"] == 1
    assert failed["error"] == f"ValueError: {FAILURE}"

    text = exosphere_here("run", "trigger", "failing", "--wait")
    assert text.code == 1
    run_id = text.stdout.strip()
    notes = text.stderr.splitlines()
    assert notes[0] == f"run {run_id}: FAILED  (RETRY_CREATED 1 · ERRORED 1)"
    assert notes[1].startswith("  fail (Fail) ")
    assert notes[1].endswith(f": ERRORED ValueError: {FAILURE}")

    tree = exosphere_here("run", "show", run_id).stdout.splitlines()
    assert tree[3].split() == ["status", "FAILED"]
    attempts = [line.split() for line in tree[7:]]
    assert [(a[2], a[4]) for a in attempts if a[0] == "fail"] == [
        ("RETRY_CREATED", "1"),
        ("ERRORED", "2"),
    ]
    assert tree.count(f"   error: ValueError: {FAILURE}") == 2

    retried = exosphere_here("state", "retry", failed["id"], "-o", "json")
    assert retried.code == 0, retried
    new_id = retried.json()["retry_state_id"]
    assert retried.json() == {"state_id": failed["id"], "retry_state_id": new_id}
    assert new_id != failed["id"]
    again = exosphere_here("state", "retry", failed["id"])
    assert again.code == 1
    assert one_line_error(again.stderr) == (
        "error: the state manager refused (HTTP 400): State was already retried; "
        "retry its latest attempt instead"
    )
    unknown = exosphere_here("state", "retry", "0" * 24)
    assert unknown.code == 1
    assert one_line_error(unknown.stderr).startswith("error: not found: ")


def test_trigger_timeout_has_its_own_exit_code(
    exosphere: Exosphere, exosphere_here: Exosphere, tmp_path: Path
) -> None:
    apply_hello(exosphere_here, tmp_path)
    result = exosphere(
        "run", "trigger", "hello", "--store", "name=Ada", "--start-delay", "1h", "--timeout",
        "1s", "-o", "json",
    )  # fmt: skip
    assert result.code == 3, result
    document = result.json()
    assert document["run"]["status"] == "PENDING"
    assert document["run"]["counts"]["CREATED"] == 1
    text = exosphere_here("run", "trigger", "hello", "--store", "name=Ada", "--start-delay",
                          "1h", "--wait", "--timeout", "500ms")  # fmt: skip
    assert text.code == 3
    run_id = text.stdout.strip()
    assert text.stderr.splitlines() == [
        f"run {run_id}: PENDING  (CREATED 1)",
        f"still running after 0.5 s: 0 of 1 states finished; see `exosphere run show {run_id}`",
    ]


def test_trigger_without_wait_and_inputs(exosphere_here: Exosphere, tmp_path: Path) -> None:
    apply_hello(exosphere_here, tmp_path)
    result = exosphere_here(
        "run", "trigger", "hello", "--store", "name=x=y", "--input", "name=Literal ${{ x }}",
        "-o", "json",
    )  # fmt: skip
    assert result.code == 0, result
    document = result.json()
    assert document == {
        "run_id": document["run_id"],
        "graph_name": "hello",
        "namespace": document["namespace"],
        "run": None,
        "failed_states": [],
    }
    exosphere_here("run", "trigger", "hello", "--store", "name=z", "--wait")  # drains the queue
    shown = exosphere_here("run", "show", document["run_id"], "-o", "json").json()
    [greet] = shown["states"]
    state = exosphere_here(
        "run", "show", document["run_id"], "--state", greet["id"], "-o", "json"
    ).json()["state"]
    assert state["inputs"] == {"name": "Literal ${{ x }}"}  # inputs are literal text

    refused = exosphere_here("run", "trigger", "hello")
    assert refused.code == 1
    assert one_line_error(refused.stderr) == (
        "error: the state manager refused (HTTP 400): Missing store keys: name"
    )


def test_trigger_with_an_idempotency_key_starts_one_run(
    exosphere_here: Exosphere, tmp_path: Path
) -> None:
    apply_hello(exosphere_here, tmp_path)
    args = ("run", "trigger", "hello", "--store", "name=once", "--idempotency-key", "cli-once")
    first = exosphere_here(*args)
    assert first.code == 0, first
    again = exosphere_here(*args, "--wait")
    assert again.code == 0, again
    assert again.stdout == first.stdout  # the same run id
    other = exosphere_here(
        "run", "trigger", "hello", "--store", "name=other", "--idempotency-key", "cli-once"
    )
    assert other.code == 1
    assert "HTTP 409" in one_line_error(other.stderr) and "cli-once" in other.stderr
    listed = exosphere_here("run", "list", "-o", "json").json()
    assert [run["run_id"] for run in listed["runs"]].count(first.stdout.strip()) == 1


def read_terminal(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``command`` with stdout and stderr on a pseudo-terminal; what it wrote there."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode()


def test_progress_and_colour_only_on_a_terminal(
    exosphere: Exosphere,
    exosphere_here: Exosphere,
    sm_server: ServerProcess,
    worker: Worker,
    tmp_path: Path,
) -> None:
    apply_hello(exosphere_here, tmp_path)
    env = cli_env(sm_server, worker.namespace)
    del env["NO_COLOR"]
    args = ["run", "trigger", "hello", "--store", "name=Ada", "--wait"]
    code, screen = read_terminal([str(EXOSPHERE), *args], env)
    assert code == 0, screen
    assert "\r\x1b[K[" in screen  # the progress line, redrawn in place
    assert "states  \x1b[32mSUCCESS\x1b[0m 1" in screen
    assert "\x1b[32mSUCCESS\x1b[0m  (\x1b[32mSUCCESS\x1b[0m 1)" in screen  # the summary, coloured

    piped = run_exosphere(*args, env=env)
    assert piped.code == 0
    assert "\x1b" not in piped.stdout + piped.stderr  # neither colour nor progress
    assert piped.stderr == f"run {piped.stdout.strip()}: SUCCESS  (SUCCESS 1)\n"


# --- nodes ------------------------------------------------------------------------------


def test_nodes_list(exosphere_here: Exosphere, worker: Worker) -> None:
    listed = exosphere_here("nodes", "list", "-o", "json")
    assert listed.code == 0, listed
    document = listed.json()
    assert document["namespace"] == worker.namespace
    nodes = {node["name"]: node for node in document["nodes"]}
    assert set(nodes) == {"Greet", "Shout", "Fail"}
    assert (nodes["Greet"]["inputs"], nodes["Greet"]["outputs"]) == (["name"], ["greeting"])
    assert nodes["Shout"]["secrets"] == ["api_token"]
    assert nodes["Fail"]["outputs"] == []
    assert nodes["Greet"]["runtime_name"] == "cli-test-worker"
    assert nodes["Greet"]["inputs_schema"]["properties"]["name"]["type"] == "string"
    table = exosphere_here("nodes", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "RUNTIME", "INPUTS", "OUTPUTS", "SECRETS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["Greet"] == ["Greet", "cli-test-worker", "name", "greeting", "-"]
    assert rows["Shout"] == ["Shout", "cli-test-worker", "text", "text", "api_token"]


# --- failures: one clear line, never a traceback ----------------------------------------


def test_stopped_server_wrong_key_and_unknown_names(
    exosphere: Exosphere, exosphere_here: Exosphere, sm_server: ServerProcess, worker: Worker
) -> None:
    stopped = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for run, args in (
        (exosphere, ("run", "trigger", "hello", "--wait")),
        (exosphere_here, ("graph", "list")),
        (exosphere_here, ("nodes", "list")),
    ):
        result = run(*args, EXOSPHERE_STATE_MANAGER_URI=stopped)
        assert result.code == 1, result
        assert one_line_error(result.stderr) == (
            f"error: cannot connect to the state manager at {stopped}: connection refused"
        )
    as_json = exosphere_here("run", "list", "-o", "json", EXOSPHERE_STATE_MANAGER_URI=stopped)
    assert as_json.json()["error"]["kind"] == "unreachable"

    wrong_key = exosphere("run", "list", EXOSPHERE_API_KEY="not-the-key")
    assert wrong_key.code == 1
    assert one_line_error(wrong_key.stderr) == (
        f"error: the state manager at {sm_server.base_url} refused the API key (HTTP 401); "
        "check --api-key or EXOSPHERE_API_KEY"
    )
    flag = exosphere_here("graph", "list", "--api-key", "not-the-key", "-o", "json")
    assert flag.code == 1
    assert flag.json()["error"] == {
        "kind": "unauthorized",
        "message": one_line_error(wrong_key.stderr).removeprefix("error: "),
        "status_code": 401,
        "details": [],
    }

    missing_graph = exosphere_here("graph", "get", "no-such-graph")
    assert missing_graph.code == 1
    assert one_line_error(missing_graph.stderr) == (
        f"error: not found: Graph template no-such-graph not found in namespace {worker.namespace}"
    )
    missing_run = exosphere_here("run", "show", "no-such-run")
    assert missing_run.code == 1
    assert one_line_error(missing_run.stderr) == (
        f"error: not found: Run no-such-run not found in namespace {worker.namespace}"
    )
    bad_page = exosphere_here("run", "list", "--size", "100000")
    assert bad_page.code == 1
    assert one_line_error(bad_page.stderr).startswith(
        "error: the state manager refused (HTTP 400): size must be between 1 and"
    )


def test_usage_errors_exit_2(sm_server: ServerProcess, tmp_path: Path) -> None:
    nothing = cli_env(None, None)
    missing = run_exosphere("run", "list", env=nothing)
    assert missing.code == 2
    assert one_line_error(missing.stderr) == (
        "error: missing --uri (or EXOSPHERE_STATE_MANAGER_URI), --api-key (or "
        "EXOSPHERE_API_KEY), --namespace (or EXOSPHERE_NAMESPACE)"
    )
    env = cli_env(sm_server, "ns")
    for args, fragment in (
        (("run", "trigger", "g", "--store", "novalue"), "--store 'novalue' is not KEY=VALUE"),
        (("run", "trigger", "g", "--timeout", "soon"), "'soon' is not a duration"),
        (("run", "list", "--page", "0"), "0 is not in the range x>=1"),
        (("graph", "apply"), "Missing option '-f' / '--file'"),
        (("run", "list", "-o", "xml"), "'xml' is not one of 'text', 'json'"),
    ):
        result = invoke_in_process(*args, env=env)
        assert result.code == 2, result
        assert fragment in result.stderr, result
        assert "Traceback" not in result.stderr
    bad_uri = invoke_in_process("run", "list", "--uri", "localhost:8000", env=env)
    assert bad_uri.code == 2
    assert one_line_error(bad_uri.stderr).startswith("error: invalid state manager URI")
    assert json.loads(invoke_in_process("graph", "schema", env=env).stdout)["title"]


def test_run_cancel(exosphere: Exosphere, exosphere_here: Exosphere, tmp_path: Path) -> None:
    apply_hello(exosphere_here, tmp_path)
    delayed = exosphere_here(
        "run", "trigger", "hello", "--store", "name=Ada", "--start-delay", "1h"
    )
    run_id = delayed.stdout.strip()
    cancelled = exosphere("run", "cancel", run_id)
    assert cancelled.code == 0, cancelled
    assert cancelled.stdout == f"run {run_id} CANCELLED (1 state(s) cancelled)\n"
    again = exosphere_here("run", "cancel", run_id, "-o", "json")
    assert again.code == 0, again
    document = again.json()
    assert document == {
        "run_id": run_id,
        "namespace": document["namespace"],
        "status": "CANCELLED",
        "cancelled_at": document["cancelled_at"],
        "cancelled_states": 1,
    }
    shown = exosphere_here("run", "show", run_id, "-o", "json").json()
    assert shown["run"]["status"] == "CANCELLED"
    assert [s["status"] for s in shown["states"]] == ["CANCELLED"]

    finished = exosphere_here("run", "trigger", "hello", "--store", "name=Bo", "--wait")
    assert finished.code == 0, finished
    refused = exosphere_here("run", "cancel", finished.stdout.strip())
    assert refused.code == 1
    line = one_line_error(refused.stderr)
    assert line.startswith("error: the state manager refused (HTTP 409): Run "), line
    assert "already finished (SUCCESS)" in line
    unknown = exosphere_here("run", "cancel", "00000000-0000-0000-0000-000000000000", "-o", "json")
    assert unknown.code == 1
    assert unknown.json()["error"]["kind"] == "not_found"
