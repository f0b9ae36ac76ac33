"""The fan-out/fan-in example runs as its README says, with the output it shows."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sm_support import ServerProcess

README = Path(__file__).with_name("README.md")
REPO = Path(__file__).resolve().parents[2]
EXOSPHERE = Path(sys.executable).parent / "exosphere"

# The ``run_example`` fixture of examples/conftest.py.
RunExample = Callable[..., str]


def test_fan_out_fan_in(run_example: RunExample) -> None:
    output = run_example(
        "fan_out_fan_in", "fan-out-fan-in", "--pages", "25", "--title", "Annual report"
    )
    lines = output.splitlines()
    assert lines[0].endswith(": SUCCESS")
    assert lines[1:] == [
        "  plan        1 succeeded, 0 retried",
        "  split      25 succeeded, 0 retried",
        "  render     25 succeeded, 1 retried",
        "  publish     1 succeeded, 0 retried",
        "published 'Annual report': 25 pages",
    ]


def test_graph_file_with_the_cli(
    example_server: ServerProcess, start_example_worker: Callable[[str, str], None]
) -> None:
    """The README's `exosphere` commands: apply graph.yaml (its secret from SIGNING_KEY),
    trigger with --wait to SUCCESS, show the run."""
    start_example_worker("fan_out_fan_in", "fan-out-fan-in")
    [block] = re.findall(r"```bash\n(export SIGNING_KEY.*?)```", README.read_text(), re.DOTALL)
    env = example_server.client_env()
    outputs: list[subprocess.CompletedProcess[str]] = []
    for line in block.splitlines():
        words = shlex.split(line.split("  #")[0])
        if words[0] == "export":
            name, value = words[1].split("=", 1)
            env[name] = value
            continue
        assert words[:3] == ["uv", "run", "exosphere"], line
        args = words[3:]
        if args[:2] == ["run", "show"]:
            args = ["run", "show", outputs[-1].stdout.strip(), "-n", "fan-out-fan-in"]
        done = subprocess.run(
            [str(EXOSPHERE), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done)
    applied, triggered, shown = outputs
    assert applied.stdout == (
        "render-batch (namespace fan-out-fan-in, examples/fan_out_fan_in/graph.yaml): VALID\n"
    )
    run_id = triggered.stdout.strip()
    assert triggered.stderr == f"run {run_id}: SUCCESS  (SUCCESS 52 · RETRY_CREATED 1)\n"
    tree = shown.stdout.splitlines()
    assert tree[5] == "states     53: SUCCESS 52 · RETRY_CREATED 1"
    assert tree[7].startswith("plan (Plan) ")
    assert sum(" render (Render) " in line for line in tree) == 26
    assert sum(" attempt 2 " in line for line in tree) == 1
    assert sum(" publish (Publish) " in line for line in tree) == 1
