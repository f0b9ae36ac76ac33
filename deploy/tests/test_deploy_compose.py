"""deploy/compose: schema validation against the compose specification, plus the
properties the deployment guide promises (health-gated start, replicas, secrets
that must be supplied)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from deploy_support import (
    COMPOSE_DIR,
    InterpolationError,
    compose_files,
    interpolate,
    interpolate_tree,
    load_dockerfile,
    load_yaml,
    parse_env_file,
    referenced_variables,
    settings_variables,
)

LOCAL = COMPOSE_DIR / "docker-compose.yml"
PROD = COMPOSE_DIR / "docker-compose.prod.yml"
MONGO = COMPOSE_DIR / "docker-compose.mongo.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
REQUIRED_SECRETS = ("STATE_MANAGER_SECRET", "SECRETS_ENCRYPTION_KEY")

# Values that satisfy every required variable, for validating interpolated files.
SAMPLE_ENV = {
    "STATE_MANAGER_SECRET": "sample-secret",
    "SECRETS_ENCRYPTION_KEY": "c2FtcGxlLWtleS1zYW1wbGUta2V5LXNhbXBsZS1rZXk=",
    "POSTGRES_PASSWORD": "sample-password",
    "DATABASE_URL": "postgresql://exosphere:sample@db.example.com:5432/exosphere",
    "STATE_MANAGER_IMAGE": "registry.example.com/exosphere-state-manager:0.1.0",
}


def compose_schema() -> dict[str, Any]:
    """The compose-spec JSON schema vendored by the check-jsonschema dev dependency
    (its licence ships beside it, in vendor/licenses/LICENSE.compose-spec)."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def validate_compose(document: Any) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class(schema).validate(document)


def interpolated(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    text = interpolate(path.read_text(), SAMPLE_ENV if env is None else env)
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def test_there_are_exactly_the_three_documented_files() -> None:
    assert compose_files() == sorted([LOCAL, MONGO, PROD])


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    validate_compose(load_yaml(path))


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_compose_file_still_matches_the_schema_after_interpolation(path: Path) -> None:
    validate_compose(interpolated(path))


def test_schema_check_rejects_an_invalid_file() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_compose({"services": {"x": {"image": "y", "depends_on": {"z": {"when": 1}}}}})


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
def test_secrets_are_required_never_defaulted(path: Path, secret: str) -> None:
    text = path.read_text()
    references = referenced_variables(text)
    assert references.get(secret) == ":?", f"{secret} must be written ${{{secret}:?...}}"
    env = {key: value for key, value in SAMPLE_ENV.items() if key != secret}
    with pytest.raises(InterpolationError, match=secret):
        interpolate(text, env)
    # An empty value, as in a copied but unfilled .env, is refused too.
    with pytest.raises(InterpolationError, match=secret):
        interpolate(text, {**env, secret: ""})


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_no_literal_secret_in_any_service_environment(path: Path) -> None:
    for name, service in load_yaml(path)["services"].items():
        environment = service.get("environment", {})
        for key in (*REQUIRED_SECRETS, "POSTGRES_PASSWORD"):
            if key in environment:
                value = str(environment[key])
                assert value.startswith("${") and ":?" in value, f"{name}.{key}: {value}"


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_every_variable_is_documented_in_env_example(path: Path) -> None:
    documented = parse_env_file(ENV_EXAMPLE.read_text())
    missing = sorted(set(referenced_variables(path.read_text())) - set(documented))
    assert not missing, f"add to .env.example: {missing}"


def test_env_example_has_no_stale_entry() -> None:
    used: set[str] = set()
    for path in compose_files():
        used |= set(referenced_variables(path.read_text()))
    stale = sorted(set(parse_env_file(ENV_EXAMPLE.read_text())) - used)
    assert not stale, f"in .env.example but used by no compose file: {stale}"


def test_env_example_leaves_every_secret_empty() -> None:
    values = parse_env_file(ENV_EXAMPLE.read_text())
    for key in (*REQUIRED_SECRETS, "POSTGRES_PASSWORD", "DATABASE_URL"):
        assert values.get(key) == "", f"{key} must be empty in .env.example"


def test_env_example_alone_does_not_start_either_stack() -> None:
    values = parse_env_file(ENV_EXAMPLE.read_text())
    for path in compose_files():
        with pytest.raises(InterpolationError):
            interpolate(path.read_text(), values)


def test_server_environment_names_are_real_settings() -> None:
    known = set(settings_variables())
    for path in compose_files():
        for service in load_yaml(path)["services"].values():
            if str(service.get("image", "")).startswith(("postgres", "mongo")):
                continue
            for key in service.get("environment", {}):
                assert key in known, f"{path.name}: {key} is not read by settings.py"


# --------------------------------------------------------------------- local stack


def test_local_stack_gates_the_server_on_a_healthy_postgres_16() -> None:
    document = interpolated(LOCAL)
    services = document["services"]
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert postgres["healthcheck"]["test"]
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in document["volumes"], "PostgreSQL data must be on a named volume"
    server = services["state-manager"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["healthcheck"]["test"]
    url = server["environment"]["DATABASE_URL"]
    assert url.startswith("postgresql://")
    assert "@postgres:5432/" in url
    assert SAMPLE_ENV["POSTGRES_PASSWORD"] in url
    assert server["build"] == {"context": "../..", "dockerfile": "deploy/Dockerfile"}
    assert (COMPOSE_DIR / server["build"]["context"] / server["build"]["dockerfile"]).exists()


def test_mongo_stack_gates_the_server_on_a_healthy_single_node_replica_set() -> None:
    document = interpolated(MONGO)
    services = document["services"]
    mongo = services["mongo"]
    assert mongo["image"] == "mongo:7"
    assert mongo["command"][:2] == ["--replSet", "rs0"]
    assert "rs.initiate" in " ".join(mongo["healthcheck"]["test"])
    assert "ports" not in mongo, "MongoDB is not published on the host"
    assert mongo["volumes"][0].split(":")[0] in document["volumes"]
    server = services["state-manager"]
    assert server["depends_on"]["mongo"]["condition"] == "service_healthy"
    environment = server["environment"]
    assert "DATABASE_URL" not in environment  # both set would stop start-up
    assert environment["MONGO_URI"] == "mongodb://mongo:27017/?replicaSet=rs0"
    assert environment["MONGO_DATABASE_NAME"] == "exosphere"
    assert server["build"] == interpolated(LOCAL)["services"]["state-manager"]["build"]


def test_local_stack_publishes_the_image_port() -> None:
    server = interpolated(LOCAL)["services"]["state-manager"]
    exposed = load_dockerfile().final.last("EXPOSE")
    assert exposed is not None
    assert server["ports"] == [f"127.0.0.1:8000:{exposed.arguments.split('/')[0]}"]


# ---------------------------------------------------------------- production style


def test_production_file_runs_three_replicas_with_restart_and_update_policies() -> None:
    services = interpolated(PROD)["services"]
    server = services["state-manager"]
    deploy = server["deploy"]
    assert deploy["replicas"] == 3
    assert deploy["restart_policy"]["condition"] in {"on-failure", "any"}
    assert deploy["update_config"]["parallelism"] >= 1
    assert deploy["resources"]["limits"]["memory"]
    assert server["environment"]["EXOSPHERE_AUTO_MIGRATE"] == "false"
    assert server["environment"]["DATABASE_URL"] == SAMPLE_ENV["DATABASE_URL"]
    assert server["image"] == SAMPLE_ENV["STATE_MANAGER_IMAGE"]


def test_production_file_migrates_once_before_the_replicas_start() -> None:
    services = interpolated(PROD)["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["image"] == services["state-manager"]["image"]
    assert migrate["environment"] == services["state-manager"]["environment"]
    assert "replicas" not in migrate.get("deploy", {})
    condition = services["state-manager"]["depends_on"]["migrate"]["condition"]
    assert condition == "service_completed_successfully"


def test_production_port_range_has_a_port_per_replica() -> None:
    server = interpolated(PROD)["services"]["state-manager"]
    host_ports = server["ports"][0].split(":")[1]
    first, last = (int(p) for p in host_ports.split("-"))
    assert last - first + 1 == server["deploy"]["replicas"]


def test_interpolation_helper() -> None:
    assert interpolate("a${X:-d}b", {}) == "adb"
    assert interpolate("a${X:-d}b", {"X": ""}) == "adb"
    assert interpolate("a${X-d}b", {"X": ""}) == "ab"
    assert interpolate("$$X ${Y}", {"Y": "1"}) == "$X 1"
    assert interpolate_tree({"k": ["${Y}"]}, {"Y": "v"}) == {"k": ["v"]}
    with pytest.raises(InterpolationError, match="Y: need it"):
        interpolate("${Y:?need it}", {})
