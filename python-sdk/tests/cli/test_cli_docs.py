"""The CLI's documentation matches the code and its examples run: the README's quick
start, the walkthrough of docs/cli.md (against the real server and the hello-world
example worker), and the commands, exit codes, error kinds and JSON shapes it lists."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from cli_support import EXOSPHERE, cli_env, run_exosphere, start_worker, stop_worker
from exospherehost.cli import cli
from exospherehost.cli.app import ApplyResult, graph_entry, node_entry, trigger_document
from exospherehost.cli.errors import ERROR_KINDS, CliError, ExitCode
from exospherehost.cli.output import state_json
from exospherehost.models import RegisteredNode, RunDetails, RunGraphNode
from sm_support import ServerProcess

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
HELLO_WORKER = ROOT / "examples" / "hello_world" / "worker.py"


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def commands(block: str) -> list[str]:
    """The lines of a shell block without comments."""
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def readme_settings(exports: list[str], server: ServerProcess, folder: Path) -> dict[str, str]:
    """Run the README's ``export`` lines with bash where the development server keeps its
    key (``.exosphere/dev-secrets.env``, here with the test server's key); the URI is the
    test server's instead of the development server's port."""
    (folder / ".exosphere").mkdir()
    (folder / ".exosphere" / "dev-secrets.env").write_text(
        f"STATE_MANAGER_SECRET={server.key}\nSECRETS_ENCRYPTION_KEY=unused\n"
    )
    script = "\n".join([*exports, "env -0"])
    done = subprocess.run(
        ["bash", "-euc", script], cwd=folder, env=cli_env(None, None), capture_output=True
    )
    assert done.returncode == 0, done.stderr
    exported = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if item)
    assert exported["EXOSPHERE_STATE_MANAGER_URI"] == "http://127.0.0.1:8000"
    assert exported["EXOSPHERE_API_KEY"] == server.key
    return {**exported, "EXOSPHERE_STATE_MANAGER_URI": server.base_url}


def test_readme_quick_start_runs(sm_server: ServerProcess, tmp_path: Path) -> None:
    """The CLI path of the README: a worker, `graph apply` of the example's file, and
    `run trigger --wait` to SUCCESS. Each line runs as written (`uv run X` as X)."""
    [block] = [b for b in blocks(README.read_text(), "sh") if "exosphere graph apply" in b]
    exports = [line for line in commands(block) if line.startswith("export ")]
    env = readme_settings(exports, sm_server, tmp_path)
    worker = None
    ran: list[str] = []
    results = {}
    try:
        for line in commands(block):
            if line.startswith("export "):
                continue
            words = shlex.split(line.removesuffix("&").strip())
            assert words[:2] == ["uv", "run"], line
            if line.endswith("&"):
                assert words[2:] == ["python", "examples/hello_world/worker.py"]
                command = [sys.executable, str(ROOT / words[3])]
                worker = start_worker(sm_server, "hello-world", tmp_path / "w.log", command, 1)
                ran.append("worker")
                continue
            assert words[2] == "exosphere", line
            name = " ".join(words[3:5])
            results[name] = run_exosphere(*words[3:], env=env, cwd=ROOT)
            assert results[name].code == 0, results[name]
            ran.append(name)
    finally:
        if worker is not None:
            stop_worker(worker)
    assert ran == [
        "worker",
        "graph apply",
        "run trigger",
    ]
    assert results["graph apply"].stdout == (
        "hello (namespace hello-world, examples/hello_world/graph.yaml): VALID\n"
    )
    run_id = results["run trigger"].stdout.strip()
    assert results["run trigger"].stderr == f"run {run_id}: SUCCESS  (SUCCESS 1)\n"


def test_cli_doc_walkthrough_runs(sm_server: ServerProcess, tmp_path: Path) -> None:
    """The walkthrough block of docs/cli.md, run by bash with `set -e` (any failing
    command fails the test), from a folder where `examples/` is this repository's."""
    text = CLI_DOC.read_text()
    block = text.split("<!-- walkthrough:", 1)[1]
    script = blocks(block, "sh")[0]
    first, rest = script.split("\n", 1)
    assert first == (
        "export EXOSPHERE_STATE_MANAGER_URI=http://127.0.0.1:8000 EXOSPHERE_API_KEY=dev-key"
    )
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = cli_env(sm_server, None)
    env["PATH"] = f"{EXOSPHERE.parent}{os.pathsep}{env['PATH']}"  # exosphere and python
    worker = start_worker(
        sm_server, "hello-world", tmp_path / "w.log", [sys.executable, str(HELLO_WORKER)], 1
    )
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", rest],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        stop_worker(worker)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert out[0].split() == ["NAME", "RUNTIME", "INPUTS", "OUTPUTS", "SECRETS"]
    assert "hello (namespace hello-world, examples/hello_world/graph.yaml): VALID" in out
    assert (tmp_path / "hello.yaml").read_text().startswith("name: hello\nnamespace: hello-world\n")
    assert out[-8].startswith("run ") and out[-7] == "graph      hello"  # run show's header
    assert out[-1].startswith("greet (Greet)  ")  # its one state
    assert "SUCCESS" in done.stderr and "Traceback" not in done.stderr


# --- what docs/cli.md lists ------------------------------------------------------------


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[str]:
    paths = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append(" ".join((*prefix, name)))
    return paths


def test_every_command_has_a_section() -> None:
    headings = re.findall(r"^### `exosphere ([a-z -]+?)(?: [A-Z\[-]|`)", CLI_DOC.read_text(), re.M)
    assert sorted(headings) == sorted([*command_paths(cli), "--version"])


def test_exit_codes_and_error_kinds_are_documented() -> None:
    text = CLI_DOC.read_text()
    table = text.split("## Exit codes", 1)[1].split("##", 1)[0]
    assert [int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)] == [
        int(code) for code in ExitCode
    ]
    kinds = text.split("`kind` is one of", 1)[1].split(";", 1)[0]
    assert re.findall(r"`([a-z_]+)`", kinds) == list(ERROR_KINDS)


def keys(value: Any) -> Any:
    """The shape of a JSON value: objects as their keys (recursively), lists by their
    first item."""
    if isinstance(value, dict):
        return {key: keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [keys(value[0])] if value else []
    return None


def documented(section: str) -> list[Any]:
    """The JSON examples of one part of docs/cli.md."""
    text = CLI_DOC.read_text()
    part = text.split(section, 1)[1].split("\n### ", 1)[0]
    return [json.loads(block) for block in blocks(part, "json")]


RUN = {
    "run_id": "r",
    "graph_name": "g",
    "success_count": 0,
    "pending_count": 0,
    "errored_count": 1,
    "retried_count": 1,
    "total_count": 2,
    "status": "FAILED",
    "created_at": "2026-01-01T12:00:00.000Z",
    "namespace": "ns",
    "counts": {"ERRORED": 1, "RETRY_CREATED": 1},
}


def test_documented_json_shapes_are_the_real_ones() -> None:
    [error] = documented("The error document:")
    assert keys(error) == keys(CliError("x", kind="usage").as_json())

    [apply] = documented("### `exosphere graph apply")
    result = ApplyResult("g", "ns", "f.yaml", "VALID", []).as_json()
    assert keys(apply) == keys({"graphs": [result]})

    [listing] = documented("### `exosphere graph list`")
    template = {"name": "g", "nodes": [], "secrets": {}, "triggers": []}
    assert keys(listing) == keys({"namespace": "ns", "graphs": [graph_entry(template)]})

    [trigger] = documented("### `exosphere run trigger")
    details = RunDetails.model_validate(RUN)
    state = RunGraphNode(id="s", node_name="N", identifier="n", status="ERRORED", error="e")
    real = trigger_document("r", "g", "ns", details, [state_json(state, None)])
    documented_counts = trigger["run"].pop("counts")
    real_counts = real["run"].pop("counts")
    assert keys(trigger) == keys(real)
    assert set(documented_counts) == {
        "CREATED", "QUEUED", "EXECUTED", "SUCCESS", "ERRORED", "NEXT_CREATED_ERROR", "PRUNED",
        "RETRY_CREATED", "CANCELLED",
    }  # fmt: skip
    assert real_counts == RUN["counts"]

    node = RegisteredNode(
        name="N",
        namespace="ns",
        runtime_name="rt",
        inputs_schema={"properties": {"a": {}}},
        outputs_schema={},
        secrets=[],
    )
    text = CLI_DOC.read_text()
    nodes_part = text.split("### `exosphere nodes list`", 1)[1].split("\n### ", 1)[0]
    for key in node_entry(node):
        assert f'"{key}"' in nodes_part, key
    [cancel] = documented("### `exosphere run cancel")
    assert set(cancel) == {"run_id", "namespace", "status", "cancelled_at", "cancelled_states"}
    show_part = text.split("### `exosphere run show", 1)[1].split("\n### ", 1)[0]
    for key in state_json(state, None):
        assert f'"{key}"' in show_part, key
