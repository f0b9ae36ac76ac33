"""The README's code runs: the quick start against the real server, the testing snippet."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sm_support import ServerProcess

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_testing_snippet_runs() -> None:
    worker, _run, snippet = python_blocks()[:3]
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(worker + "\n" + snippet, str(README), "exec"), namespace)
    asyncio.run(namespace["test_greet"]())


def wait_registered(server: ServerProcess, namespace: str, worker: subprocess.Popen[bytes]) -> None:
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": server.key}) as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            nodes = http.get(f"/v0/namespace/{namespace}/nodes/")
            if nodes.status_code == 200 and nodes.json()["count"] > 0:
                return
            assert worker.poll() is None, "the README worker exited"
            time.sleep(0.1)
    raise TimeoutError("the README worker did not register")


def test_quick_start_runs(sm_server: ServerProcess, tmp_path: Path) -> None:
    worker_code, run_code = python_blocks()[:2]
    (tmp_path / "worker.py").write_text(worker_code)
    (tmp_path / "run.py").write_text(run_code)
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "worker.py"],
            cwd=tmp_path,
            env=sm_server.client_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_registered(sm_server, "hello-world", worker)
        result = subprocess.run(
            [sys.executable, "run.py"],
            cwd=tmp_path,
            env=sm_server.client_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "SUCCESS"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
