"""The command line, run as users run it: a real process."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sm_support import free_port, make_database, mongo_parts, standalone_mongo
from state_manager.settings import generate_encryption_key


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "state_manager", *args],
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "SYSTEMROOT", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k in keep}


def test_gen_key_prints_a_usable_key() -> None:
    result = run_cli("gen-key", env={})
    assert result.returncode == 0
    assert len(base64.urlsafe_b64decode(result.stdout.strip())) == 32


def test_production_without_secrets_exits_naming_them(tmp_path: Path) -> None:
    result = run_cli("--mode=production", env={"EXOSPHERE_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "STATE_MANAGER_SECRET" in result.stderr and "SECRETS_ENCRYPTION_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_mongo_uri_and_database_url_together_stop_start_up_naming_both(tmp_path: Path) -> None:
    env = {
        "EXOSPHERE_DATA_DIR": str(tmp_path),
        "MONGO_URI": "mongodb://127.0.0.1:27017",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "STATE_MANAGER_SECRET": "k",
        "SECRETS_ENCRYPTION_KEY": generate_encryption_key(),
    }
    result = run_cli("--mode=production", env=env)
    assert result.returncode == 2
    assert "MONGO_URI" in result.stderr and "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_standalone_mongo_is_refused_saying_a_replica_set_is_required(tmp_path: Path) -> None:
    with standalone_mongo() as uri:
        env = {
            "EXOSPHERE_DATA_DIR": str(tmp_path),
            "MONGO_URI": uri,
            "STATE_MANAGER_SECRET": "k",
            "SECRETS_ENCRYPTION_KEY": generate_encryption_key(),
        }
        for args in (("migrate",), ("--mode=production",)):
            result = run_cli(*args, env=env)
            assert result.returncode == 3, result.stderr
            assert "replica set" in result.stderr and "Traceback" not in result.stderr


def test_mongo_migrate_leaves_the_original_collections_and_says_so(tmp_path: Path) -> None:
    import pymongo

    with make_database("mongo", tmp_path) as database:
        uri, name = mongo_parts(database.url)
        with pymongo.MongoClient(uri) as client:
            client[name]["GraphTemplate"].insert_one({"_id": "theirs", "name": "g"})
        env = {
            "EXOSPHERE_DATA_DIR": str(tmp_path),
            "MONGO_URI": uri,
            "MONGO_DATABASE_NAME": name,
            "STATE_MANAGER_SECRET": "k",
            "SECRETS_ENCRYPTION_KEY": generate_encryption_key(),
        }
        unmigrated = run_cli("--mode=production", env=env)
        assert unmigrated.returncode == 3 and "state-manager migrate" in unmigrated.stderr
        migrated = run_cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        assert "up to date" in migrated.stdout
        assert "GraphTemplate" in migrated.stderr and "left untouched" in migrated.stderr
        with pymongo.MongoClient(uri) as client:
            assert list(client[name]["GraphTemplate"].find()) == [{"_id": "theirs", "name": "g"}]


def test_unmigrated_database_stops_production_start_naming_the_command(tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "STATE_MANAGER_SECRET": "k",
        "SECRETS_ENCRYPTION_KEY": generate_encryption_key(),
    }
    result = run_cli("--mode=production", env=env)
    assert result.returncode == 3
    assert "state-manager migrate" in result.stderr
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "up to date" in migrated.stdout


def test_development_mode_starts_with_zero_setup(tmp_path: Path) -> None:
    port = free_port()
    env = {**_base_env(), "EXOSPHERE_DATA_DIR": str(tmp_path / "data")}
    process = subprocess.Popen(
        [sys.executable, "-m", "state_manager", "--mode=development", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = None
        for _ in range(200):
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.TransportError:
                if process.poll() is not None:
                    break
                time.sleep(0.1)
        assert body == {"message": "OK"}
        secrets = (tmp_path / "data" / "dev-secrets.env").read_text()
        key = dict(line.split("=", 1) for line in secrets.split())["STATE_MANAGER_SECRET"]
        r = httpx.get(f"http://127.0.0.1:{port}/v0/namespaces", headers={"x-api-key": key})
        assert r.status_code == 200 and r.json() == {"namespaces": [], "count": 0}
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "dev-secrets.env" in output
    assert key not in output
