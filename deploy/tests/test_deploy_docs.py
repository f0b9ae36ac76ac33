"""The documentation must match the code and the files: docs/configuration.md
against settings.py and the CLI, docs/deployment.md and deploy/README.md against
deploy/."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from deploy_support import (
    DEPLOY_DIR,
    DOCS_DIR,
    KUBERNETES_DIR,
    REPO_ROOT,
    clean_environment,
    kubernetes_documents,
    kubernetes_manifests,
    load_dockerfile,
    parse_env_arguments,
    resolve_in_venv,
    settings_variables,
)

CONFIGURATION = DOCS_DIR / "configuration.md"
DEPLOYMENT = DOCS_DIR / "deployment.md"
DEPLOY_README = DEPLOY_DIR / "README.md"

ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$|^MODE$")


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a level-2 heading) up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by the backticked first cell."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        first = re.match(r"`([^`]+)`", cells[0]) if line.startswith("|") else None
        if first:
            rows[first.group(1)] = cells[1:]
    return rows


def documented_variables() -> dict[str, list[str]]:
    return table_rows(section(CONFIGURATION.read_text(), "Environment variables"))


def documented_flags() -> dict[str, list[str]]:
    return table_rows(section(CONFIGURATION.read_text(), "Command line"))


# ------------------------------------------------------------ configuration.md


def test_every_setting_is_documented_and_every_documented_variable_exists() -> None:
    in_code = set(settings_variables())
    in_docs = set(documented_variables())
    assert in_code, "no variable found in settings.py: has the way it reads env changed?"
    assert not in_code - in_docs, f"undocumented: {sorted(in_code - in_docs)}"
    assert not in_docs - in_code, f"documented but not read: {sorted(in_docs - in_code)}"


def test_no_other_variable_name_appears_in_the_configuration_page() -> None:
    mentioned = set(re.findall(r"`\$?\{?([A-Z][A-Z0-9_]+)\}?", CONFIGURATION.read_text()))
    variables = {name for name in mentioned if ENV_NAME.match(name)}
    unknown = variables - set(settings_variables())
    assert not unknown, f"named in configuration.md but not read by settings.py: {unknown}"


def _first_integer(cell: str) -> int:
    match = re.search(r"\d[\d_,]*", cell)
    assert match, cell
    return int(match.group(0).replace("_", "").replace(",", ""))


def test_integer_defaults_match_the_code() -> None:
    documented = documented_variables()
    checked = 0
    for name, default in settings_variables().items():
        if default is None:
            continue
        assert _first_integer(documented[name][0]) == default, name
        checked += 1
    assert checked >= 5


def test_text_defaults_match_the_code() -> None:
    from state_manager.settings import Settings, generate_encryption_key

    secrets = {"STATE_MANAGER_SECRET": "s", "SECRETS_ENCRYPTION_KEY": generate_encryption_key()}
    settings = Settings.from_env(secrets)
    documented = {name: cells[0] for name, cells in documented_variables().items()}
    assert documented["MODE"] == f"`{settings.mode.value}`"
    assert documented["LOG_LEVEL"] == f"`{settings.log_level}`"
    assert documented["LOG_FORMAT"] == f"`{settings.log_format}`"
    assert documented["MONGO_DATABASE_NAME"] == f"`{settings.mongo_database_name}`"
    assert documented["EXOSPHERE_DATA_DIR"].startswith(f"`{settings.data_dir}`")
    assert documented["CORS_ORIGINS"] == f"`{','.join(settings.cors_origins)}`"
    assert f"`{settings.data_dir}/" not in documented["DATABASE_URL"]
    assert "$EXOSPHERE_DATA_DIR/exosphere.db" in documented["DATABASE_URL"]
    assert settings.resolved_database_url.endswith(f"{settings.data_dir}/exosphere.db")


def test_documented_mode_behaviour_matches_the_code(tmp_path: Path) -> None:
    from state_manager.settings import DEV_SECRETS_FILE, ConfigError, Settings

    documented = {name: cells[0] for name, cells in documented_variables().items()}
    for secret in ("STATE_MANAGER_SECRET", "SECRETS_ENCRYPTION_KEY"):
        assert "required in production" in documented[secret]
        assert "generated in development" in documented[secret]
    with pytest.raises(ConfigError, match=r"STATE_MANAGER_SECRET.*SECRETS_ENCRYPTION_KEY"):
        Settings.from_env({"MODE": "production", "EXOSPHERE_DATA_DIR": str(tmp_path)})
    development = Settings.from_env({"MODE": "development", "EXOSPHERE_DATA_DIR": str(tmp_path)})
    assert (tmp_path / DEV_SECRETS_FILE).exists()
    assert f"$EXOSPHERE_DATA_DIR/{DEV_SECRETS_FILE}" in CONFIGURATION.read_text()
    assert development.auto_migrate is True
    assert documented["EXOSPHERE_AUTO_MIGRATE"] == "on in development, off in production"
    production = Settings.from_env(
        {
            "STATE_MANAGER_SECRET": development.state_manager_secret,
            "SECRETS_ENCRYPTION_KEY": development.secrets_encryption_key,
        }
    )
    assert production.auto_migrate is False
    with pytest.raises(ConfigError, match="MONGO_URI and DATABASE_URL"):
        Settings.from_env(
            {
                "MODE": "development",
                "EXOSPHERE_DATA_DIR": str(tmp_path),
                "MONGO_URI": "mongodb://db:27017/?replicaSet=rs0",
                "DATABASE_URL": "postgresql://db/x",
            }
        )
    mongo = documented_variables()["MONGO_URI"][1]
    assert "naming both" in mongo and "replica set" in mongo


def _help(*arguments: str) -> str:
    result = subprocess.run(
        resolve_in_venv(["state-manager", *arguments, "--help"]),
        cwd=REPO_ROOT,
        env=clean_environment(settings_variables()),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"state-manager {' '.join(arguments)} --help:\n{result.stderr}"
    return result.stdout


def test_documented_commands_exist_in_the_cli() -> None:
    commands = set(table_rows(section(CONFIGURATION.read_text(), "Command line")))
    documented = {c.split()[0] for c in commands if not c.startswith("--")}
    assert documented == {"serve", "migrate", "gen-key"}
    top = _help()
    for command in documented:
        assert command in top, f"`{command}` is not in `state-manager --help`"


def test_documented_flags_exist_in_the_cli() -> None:
    flags = {name for name in documented_flags() if name.startswith("--")}
    assert flags == {"--mode", "--host", "--port", "--workers"}
    serve = _help("serve")
    for flag in flags:
        assert flag in serve, f"{flag} is not in `state-manager serve --help`"


def _run_cli(arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        resolve_in_venv(arguments),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_documented_commands_do_what_the_table_says(tmp_path: Path) -> None:
    from state_manager.settings import decode_encryption_key

    env = clean_environment(settings_variables())
    for launcher in (["state-manager"], ["python", "-m", "state_manager"]):
        generated = _run_cli([*launcher, "gen-key"], env)
        assert generated.returncode == 0, generated.stderr
        assert len(decode_encryption_key(generated.stdout.strip())) == 32
    env["EXOSPHERE_DATA_DIR"] = str(tmp_path)
    migrated = _run_cli(["state-manager", "migrate", "--mode=development"], env)
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / "exosphere.db").exists()


def test_documented_entry_points_exist() -> None:
    text = CONFIGURATION.read_text()
    assert "python -m state_manager" in text
    assert (REPO_ROOT / "state-manager" / "src" / "state_manager" / "__main__.py").exists()
    assert "run.py --mode=development" in text
    assert (REPO_ROOT / "state-manager" / "run.py").exists()


# ---------------------------------------------------- deployment.md and README


DOCS_THAT_DESCRIBE_DEPLOY = (DEPLOYMENT, DEPLOY_README)


@pytest.mark.parametrize("doc", DOCS_THAT_DESCRIBE_DEPLOY, ids=lambda p: p.name)
def test_every_deploy_path_mentioned_exists(doc: Path) -> None:
    # .env is the operator's own copy of .env.example, never part of the repository.
    text = re.sub(r"(deploy/)?compose/\.env\b(?!\.)", "", doc.read_text())
    for match in re.findall(r"deploy/[\w./-]*[\w/]", text):
        assert (REPO_ROOT / match).exists(), f"{doc.name} mentions {match}, which does not exist"
    base = DEPLOY_DIR if doc == DEPLOY_README else REPO_ROOT
    for relative in re.findall(r"`((?:compose|kubernetes)/[\w./-]+)`", text):
        assert (base / relative).exists() or (DEPLOY_DIR / relative).exists(), relative


def _apply_order(doc: Path) -> list[str]:
    return re.findall(r"^kubectl apply -f (deploy/kubernetes/\S+)$", doc.read_text(), re.M)


@pytest.mark.parametrize("doc", DOCS_THAT_DESCRIBE_DEPLOY, ids=lambda p: p.name)
def test_kubernetes_apply_order_covers_every_manifest_in_number_order(doc: Path) -> None:
    applied = _apply_order(doc)
    # The first block is the install; a later re-apply (upgrades) may repeat files.
    install: list[str] = []
    for path in applied:
        if path in install:
            break
        install.append(path)
    expected = sorted(p.relative_to(REPO_ROOT).as_posix() for p in kubernetes_manifests())
    assert sorted(install) == expected
    top = [p for p in install if "/postgres/" not in p]
    postgres = [p for p in install if "/postgres/" in p]
    assert top == sorted(top) and postgres == sorted(postgres)
    assert install[0].endswith("00-namespace.yaml")
    # The database exists before the migration Job that needs it.
    migrate = install.index("deploy/kubernetes/30-migrate-job.yaml")
    assert all(install.index(p) < migrate for p in postgres)
    assert "kubectl -n exosphere wait --for=condition=complete job/state-manager-migrate" in (
        doc.read_text()
    )


def test_deployment_guide_lists_every_manifest() -> None:
    rows = table_rows(section(DEPLOYMENT.read_text(), "Kubernetes"))
    expected = {p.relative_to(KUBERNETES_DIR).as_posix() for p in kubernetes_manifests()}
    assert set(rows) == expected


def test_deployment_guide_quotes_the_dockerfile_exactly() -> None:
    text = DEPLOYMENT.read_text()
    final = load_dockerfile().final
    for keyword in ("ENTRYPOINT", "CMD"):
        instruction = final.last(keyword)
        assert instruction is not None
        quoted = re.search(rf"`{keyword} (\[[^`]*\])`", text)
        assert quoted, f"deployment.md does not quote the {keyword}"
        assert json.loads(quoted.group(1)) == instruction.exec_form()
    env_quote = re.search(r"`ENV ([^`]*)`", text)
    assert env_quote
    documented_env = parse_env_arguments(env_quote.group(1))
    image_env = final.env()
    assert documented_env == {k: image_env[k] for k in documented_env}
    assert set(image_env) - set(documented_env) <= {
        "PATH",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
    }
    user = final.last("USER")
    assert user is not None and f"`{user.arguments}`" in text


@pytest.mark.parametrize("doc", DOCS_THAT_DESCRIBE_DEPLOY, ids=lambda p: p.name)
def test_docker_run_examples_use_real_settings_and_the_image_port(doc: Path) -> None:
    text = doc.read_text().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.strip().startswith("docker run")]
    assert runs, f"{doc.name} has no docker run example"
    known = set(settings_variables())
    for line in runs:
        for name in re.findall(r"-e ([A-Z_]+)=", line):
            assert name in known, f"{doc.name}: {name} is not a setting"
        for mapping in re.findall(r"-p (\S+)", line):
            assert mapping.split(":")[-1] == "8000"
        for volume in re.findall(r"-v (\S+)", line):
            assert volume.endswith(":/data")


def test_image_reference_in_docs_matches_the_manifests() -> None:
    images = {
        container["image"]
        for path in kubernetes_manifests()
        if "postgres" not in path.parts
        for doc in kubernetes_documents(path)
        if doc["kind"] in {"Deployment", "Job"}
        for container in doc["spec"]["template"]["spec"]["containers"]
    }
    assert len(images) == 1
    (image,) = images
    assert image in DEPLOYMENT.read_text()
    assert image in DEPLOY_README.read_text()
