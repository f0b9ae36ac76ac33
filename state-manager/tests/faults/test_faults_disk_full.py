"""SQLite on a full disk: writes answer 503 with a JSON message, nothing committed is lost
or corrupted, and the server writes again by itself once space is freed.

The database lives on a small tmpfs the test mounts for itself (it needs root, as CI
has); the disk is filled with a file of zeros, then freed by deleting it. Twice: once
the same server process must carry on, once it is killed (``kill -9``) while the disk
is full and started again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sm_api import expect_error, node, template_node
from sm_support import ServerProcess
from state_manager.store.database import DISK_FULL

NS = "disk-full"
BASE = f"/v0/namespace/{NS}"
FILESYSTEM_MB = 8
BLOB_BYTES = 64 * 1024  # per run, in its store: fills the disk in a few dozen runs
MOST_WRITES = 400  # before the disk must have refused one


@contextlib.contextmanager
def small_filesystem() -> Iterator[Path]:
    """A tmpfs of a few MiB of its own, unmounted afterwards; skip locally, fail in CI,
    when it cannot be mounted."""
    folder = Path(tempfile.mkdtemp(prefix="exo-disk-full-"))
    command = ["mount", "-t", "tmpfs", "-o", f"size={FILESYSTEM_MB}m", "exo-disk-full", folder]
    try:
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        result = subprocess.CompletedProcess(command, 1, "", str(exc))
    if result.returncode != 0:
        folder.rmdir()
        problem = f"cannot mount a {FILESYSTEM_MB} MiB tmpfs (needs root): {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"the disk-full test must run in CI, but {problem}")
        pytest.skip(problem)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)
        folder.rmdir()


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem; returns the file that holds them."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as stream:
        while True:
            try:
                stream.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return filler
                chunk = chunk[: len(chunk) // 2]


def blob(tag: str) -> str:
    return (tag * (BLOB_BYTES // len(tag) + 1))[:BLOB_BYTES]


class Runs:
    """Triggers runs and remembers each one the server said it committed."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.committed: dict[str, str] = {}  # run id -> tag
        self.made = 0

    def trigger(self) -> httpx.Response:
        tag = f"run-{self.made:04d}|"
        self.made += 1
        response = self.client.post(
            f"{BASE}/graph/keep/trigger", json={"store": {"tag": tag, "blob": blob(tag)}}
        )
        if response.status_code == 200:
            self.committed[response.json()["run_id"]] = tag
        return response

    def until_refused(self) -> httpx.Response:
        """Trigger until the server refuses; only 200 or 503 are acceptable answers."""
        for _ in range(MOST_WRITES):
            response = self.trigger()
            if response.status_code != 200:
                expect_error(response, 503, DISK_FULL)
                return response
        raise AssertionError(f"{MOST_WRITES} runs were written to a full disk")


NODES = {"runtime_name": "r", "nodes": [node("Keep", inputs=("tag",), outputs=("tag",))]}


def set_up(client: httpx.Client) -> None:
    assert client.put(f"{BASE}/nodes/", json=NODES).status_code == 200
    graph = {
        "secrets": {},
        "nodes": [template_node("Keep", "keep", NS, inputs={"tag": "${{ store.tag }}"})],
        "store_config": {"required_keys": ["tag"]},
    }
    assert client.put(f"{BASE}/graph/keep", json=graph).status_code == 201
    for _ in range(300):
        status = client.get(f"{BASE}/graph/keep").json()["validation_status"]
        if status != "PENDING":
            break
        time.sleep(0.05)
    assert status == "VALID", status


def finish_one_run(client: httpx.Client, runs: Runs) -> None:
    """The whole write path works: trigger, claim, report, and the run reads SUCCESS."""
    response = runs.trigger()
    assert response.status_code == 200, response.text
    run_id = response.json()["run_id"]
    claimed = client.post(
        f"{BASE}/states/enqueue", json={"nodes": ["Keep"], "batch_size": 1000}
    ).json()["states"]
    assert claimed, "no state to claim"
    for state in claimed:
        report = client.post(
            f"{BASE}/state/{state['state_id']}/executed",
            json={"outputs": [{"tag": state["inputs"]["tag"]}]},
        )
        assert report.status_code == 200, report.text
    listed = client.get(f"{BASE}/runs/1/1000").json()["runs"]
    assert {r["run_id"]: r["status"] for r in listed}[run_id] == "SUCCESS"


def check_database(path: Path, committed: dict[str, str]) -> None:
    """Integrity check, then every committed run with its store intact."""
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = dict(
            connection.execute(
                "SELECT s.run_id, s.value FROM store_entries s WHERE s.key = 'blob'"
            ).fetchall()
        )
    finally:
        connection.close()
    missing = set(committed) - set(stored)
    assert not missing, f"{len(missing)} committed runs are gone: {sorted(missing)[:5]}"
    damaged = [run_id for run_id, tag in committed.items() if stored[run_id] != blob(tag)]
    assert not damaged, f"runs whose store changed: {damaged[:5]}"


def test_sqlite_full_disk_is_a_503_and_the_server_recovers(tmp_path: Path) -> None:
    with small_filesystem() as disk:
        database = disk / "state.db"
        server = ServerProcess(f"sqlite:///{database}", tmp_path / "server")
        server.start()
        try:
            with httpx.Client(
                base_url=server.base_url, headers=server.headers, timeout=30
            ) as client:
                set_up(client)
                runs = Runs(client)
                for _ in range(10):
                    assert runs.trigger().status_code == 200

                # Full: writes refused, reads served, the process keeps running.
                filler = fill(disk)
                runs.until_refused()
                expect_error(client.put(f"{BASE}/nodes/", json=NODES), 503, DISK_FULL)
                listed = client.get(f"{BASE}/runs/1/1000")
                assert listed.status_code == 200, listed.text
                assert set(runs.committed) <= {r["run_id"] for r in listed.json()["runs"]}
                assert server.process is not None and server.process.poll() is None

                # Space is back: the same process writes again, first request on.
                filler.unlink()
                finish_one_run(client, runs)

                # Full again, and the server dies while it is: a fresh one finds all.
                filler = fill(disk)
                runs.until_refused()
                server.kill()
                filler.unlink()
                check_database(database, runs.committed)
                server.start()
                finish_one_run(client, runs)
        finally:
            server.stop()
        for log in server.data_dir.glob("server-*.log"):
            output = log.read_text(errors="replace")
            assert '"unhandled error"' not in output, output[-3000:]
        check_database(database, runs.committed)
