"""Run the image's command exactly as deploy/Dockerfile states it.

No Docker engine is available, so the final stage's ENTRYPOINT + CMD and ENV are
read from the Dockerfile and executed in the workspace virtual environment, with
two substitutions: EXOSPHERE_DATA_DIR points at a temporary directory (the /data
volume) and a free port replaces 8000. The secrets an operator passes with
``docker run -e`` are put in the environment.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    COMPOSE_DIR,
    IMAGE_PORT,
    KUBERNETES_DIR,
    RunningServer,
    compose_files,
    free_port,
    generated_secrets,
    http_status,
    image_environment,
    interpolate,
    kubernetes_documents,
    launch,
    load_dockerfile,
    parse_dockerfile,
    run_to_completion,
    stop,
    substitute_port,
    wait_until_serving,
)
from sm_support import make_database, mongo_parts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    base = tmp_path_factory.mktemp("image")
    data_dir = base / "data"
    data_dir.mkdir()
    port = free_port()
    command = substitute_port(load_dockerfile().command(), port)
    running = launch(command, image_environment(data_dir), base, port)
    try:
        wait_until_serving(running)
        yield running
    finally:
        if running.process.poll() is None:
            stop(running.process)


def test_image_command_serves_health(server: RunningServer) -> None:
    with urllib.request.urlopen(server.url("/health"), timeout=5) as response:
        assert response.status == 200


def test_image_healthcheck_command_passes_against_the_running_server(
    server: RunningServer,
) -> None:
    healthcheck = load_dockerfile().final.last("HEALTHCHECK")
    assert healthcheck is not None
    probe = parse_dockerfile(
        "FROM scratch\nCMD " + healthcheck.arguments.split(None, 1)[1] + "\n"
    ).final.last("CMD")
    assert probe is not None
    argv = probe.exec_form()
    assert argv is not None and argv[0] == "python"
    script = argv[-1].replace(f"127.0.0.1:{IMAGE_PORT}", f"127.0.0.1:{server.port}")
    ok = subprocess.run([sys.executable, *argv[1:-1], script], capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr.decode()
    # ...and fails where nothing listens, so it can tell a dead server apart.
    dead = script.replace(f"127.0.0.1:{server.port}", f"127.0.0.1:{free_port()}")
    failed = subprocess.run([sys.executable, *argv[1:-1], dead], capture_output=True, check=False)
    assert failed.returncode != 0


def test_image_keeps_the_embedded_database_on_the_data_volume(server: RunningServer) -> None:
    # No DATABASE_URL: the SQLite file must live in EXOSPHERE_DATA_DIR (/data),
    # migrated on start because the image sets EXOSPHERE_AUTO_MIGRATE=true.
    assert http_status(server.url("/ready")) == 200, server.output()
    assert (server.data_dir / "exosphere.db").exists(), sorted(
        p.name for p in server.data_dir.iterdir()
    )
    # Production mode never writes development secrets.
    assert not (server.data_dir / "dev-secrets.env").exists()


def test_image_command_stops_cleanly_on_sigterm(server: RunningServer) -> None:
    code = stop(server.process)
    # 0, or the signal re-raised after a graceful shutdown (143 = 128 + SIGTERM as
    # reported by a parent such as uv or docker).
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), (
        f"exit code {code}:\n{server.output()}"
    )


def test_substitute_port() -> None:
    assert substitute_port(["x", "--port", "8000"], 1234) == ["x", "--port", "1234"]
    assert substitute_port(["x", "--port=8000"], 1234) == ["x", "--port=1234"]
    with pytest.raises(AssertionError):
        substitute_port(["x", "--host", "8000"], 1234)


# ------------------------------------------------------------ refusing to start


@pytest.mark.parametrize("missing", ["STATE_MANAGER_SECRET", "SECRETS_ENCRYPTION_KEY"])
def test_image_command_refuses_to_start_without_a_secret(tmp_path: Path, missing: str) -> None:
    env = image_environment(tmp_path)
    del env[missing]
    command = substitute_port(load_dockerfile().command(), free_port())
    code, output = run_to_completion(command, env, tmp_path)
    assert code != 0
    assert missing in output
    assert not (tmp_path / "dev-secrets.env").exists(), "production must never invent secrets"


def test_image_command_refuses_mongo_uri_beside_database_url(tmp_path: Path) -> None:
    env = {
        **image_environment(tmp_path),
        "MONGO_URI": "mongodb://db.example.com:27017/?replicaSet=rs0",
        "DATABASE_URL": "postgresql://exosphere@db.example.com:5432/exosphere",
    }
    command = substitute_port(load_dockerfile().command(), free_port())
    code, output = run_to_completion(command, env, tmp_path)
    assert code == 2
    assert "MONGO_URI" in output and "DATABASE_URL" in output


# ------------------------------------------- the multi-replica flow, on PostgreSQL


@pytest.fixture
def postgres_database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database; skipped locally without PostgreSQL, failed in CI."""
    with make_database("postgres", tmp_path, prefix="exo_deploy_") as database:
        yield database.url


def kubernetes_environment(data_dir: Path, database_url: str) -> dict[str, str]:
    """What a Kubernetes pod gets: the image's ENV, overridden by the ConfigMap of
    deploy/kubernetes (envFrom), plus real secrets and a test database."""
    (config,) = kubernetes_documents(KUBERNETES_DIR / "10-configmap.yaml")
    env = image_environment(data_dir)
    env.update({key: str(value) for key, value in config["data"].items()})
    env["EXOSPHERE_DATA_DIR"] = str(data_dir)
    env["DATABASE_URL"] = database_url
    return env


@pytest.mark.postgres
def test_postgres_replicas_wait_for_the_migration_job_then_become_ready(
    tmp_path: Path, postgres_database_url: str
) -> None:
    """The Kubernetes / production-compose sequence: replicas never migrate, so on
    an empty database they stop and name the migrate command; the migration Job's
    command migrates; then several replicas start and report ready."""
    env = kubernetes_environment(tmp_path, postgres_database_url)
    assert env["EXOSPHERE_AUTO_MIGRATE"] == "false"
    image_command = load_dockerfile().command()

    code, output = run_to_completion(substitute_port(image_command, free_port()), env, tmp_path)
    assert code != 0, "a replica must not start on an unmigrated database"
    assert "state-manager migrate" in output

    (job,) = kubernetes_documents(KUBERNETES_DIR / "30-migrate-job.yaml")
    job_args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    # Kubernetes `args` replace the image's CMD and keep its ENTRYPOINT.
    entrypoint_instruction = load_dockerfile().final.last("ENTRYPOINT")
    assert entrypoint_instruction is not None
    entrypoint = entrypoint_instruction.exec_form() or []
    code, output = run_to_completion([*entrypoint, *job_args], env, tmp_path)
    assert code == 0, output

    replicas: list[RunningServer] = []
    try:
        for _ in range(2):
            port = free_port()
            replicas.append(launch(substitute_port(image_command, port), env, tmp_path, port))
        for replica in replicas:
            wait_until_serving(replica, "/ready")
    finally:
        for replica in replicas:
            stop(replica.process)


def compose_services(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """The services of a compose file after substitution with ``env``."""
    document = yaml.safe_load(interpolate(path.read_text(), env))
    services: dict[str, Any] = document["services"]
    return services


SQL_COMPOSE_FILES = [p for p in compose_files() if "mongo" not in p.name]


@pytest.mark.postgres
@pytest.mark.parametrize("compose_file", SQL_COMPOSE_FILES, ids=lambda p: p.name)
def test_postgres_compose_stack_settings_start_a_ready_server(
    tmp_path: Path, postgres_database_url: str, compose_file: Path
) -> None:
    """Run the compose file's services as compose would (image ENTRYPOINT, the
    service's command or the image CMD, image ENV overridden by the service's
    environment), pointed at a test database: a `migrate` service first when the
    file has one, then the server, which must become ready and pass the service's
    healthcheck."""
    operator_env = {
        **generated_secrets(),
        "POSTGRES_PASSWORD": "unused",
        "DATABASE_URL": postgres_database_url,
        "STATE_MANAGER_IMAGE": "exosphere-state-manager:test",
    }
    services = compose_services(compose_file, operator_env)

    def service_env(name: str) -> dict[str, str]:
        env = image_environment(tmp_path)
        env.update({key: str(value) for key, value in services[name]["environment"].items()})
        # The stack's own database host is not reachable here: use the test database.
        env["DATABASE_URL"] = postgres_database_url
        return env

    _start_ready_server(tmp_path, services, service_env)


def test_mongo_compose_stack_settings_start_a_ready_server(tmp_path: Path) -> None:
    """The MongoDB compose file's server, its MONGO_URI pointed at a test database
    (SecantusDB, or EXOSPHERE_TEST_MONGO_URI): migrates on start and becomes ready."""
    compose_file = COMPOSE_DIR / "docker-compose.mongo.yml"
    operator_env = {**generated_secrets(), "STATE_MANAGER_IMAGE": "exosphere-state-manager:test"}
    services = compose_services(compose_file, operator_env)
    with make_database("mongo", tmp_path, prefix="exo_deploy_") as database:
        uri, name = mongo_parts(database.url)

        def service_env(service: str) -> dict[str, str]:
            env = image_environment(tmp_path)
            environment = services[service]["environment"]
            env.update({key: str(value) for key, value in environment.items()})
            assert "DATABASE_URL" not in env
            env.update({"MONGO_URI": uri, "MONGO_DATABASE_NAME": name})
            return env

        _start_ready_server(tmp_path, services, service_env)


def _start_ready_server(
    tmp_path: Path, services: dict[str, Any], service_env: Callable[[str], dict[str, str]]
) -> None:
    dockerfile = load_dockerfile()
    entrypoint_instruction = dockerfile.final.last("ENTRYPOINT")
    assert entrypoint_instruction is not None
    entrypoint = entrypoint_instruction.exec_form() or []

    if "migrate" in services:
        code, output = run_to_completion(
            [*entrypoint, *services["migrate"]["command"]], service_env("migrate"), tmp_path
        )
        assert code == 0, output

    server_service = services["state-manager"]
    assert "command" not in server_service, "the server runs the image's own CMD"
    port = free_port()
    server = launch(
        substitute_port(dockerfile.command(), port), service_env("state-manager"), tmp_path, port
    )
    try:
        wait_until_serving(server, "/ready")
        probe = server_service["healthcheck"]["test"]
        assert probe[0] == "CMD" and probe[1] == "python"
        script = probe[-1].replace(f"127.0.0.1:{IMAGE_PORT}", f"127.0.0.1:{port}")
        result = subprocess.run(
            [sys.executable, *probe[2:-1], script], capture_output=True, check=False
        )
        assert result.returncode == 0, result.stderr.decode()
    finally:
        stop(server.process)
