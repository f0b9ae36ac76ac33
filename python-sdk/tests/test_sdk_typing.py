"""The package's types serve its users: user-style code passes strict mypy, misuse fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def mypy(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--cache-dir",
            "/dev/null",
            *map(str, paths),
        ],
        cwd=ROOT,  # the workspace's strict mypy configuration
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("example", ["hello_world", "fan_out_fan_in"])
def test_examples_pass_strict_mypy(example: str) -> None:
    folder = ROOT / "examples" / example
    result = mypy(folder / "worker.py", folder / "run.py")
    assert result.returncode == 0, result.stdout


MISUSE = """\
from datetime import timedelta

from exospherehost import GraphNodeModel, ReQueueAfterSignal, Runtime, StateManager


async def misuse() -> None:
    Runtime("ns", "name", [int])  # line 7: not a node class
    ReQueueAfterSignal(5)  # line 8: not a timedelta
    sm = StateManager("ns")
    await sm.trigger("g", store={"k": 1})  # line 10: store values are str
    node: GraphNodeModel = await sm.get_graph("g")  # line 11: returns a dict
    ReQueueAfterSignal(timedelta(seconds=1)).delay_ms + ""  # line 12: an int
"""


def test_misuse_is_a_type_error(tmp_path: Path) -> None:
    snippet = tmp_path / "misuse.py"
    snippet.write_text(MISUSE)
    result = mypy(snippet)
    assert result.returncode == 1, result.stdout
    flagged = {int(line.split(":")[1]) for line in result.stdout.splitlines() if ": error:" in line}
    assert flagged == {7, 8, 10, 11, 12}, result.stdout
