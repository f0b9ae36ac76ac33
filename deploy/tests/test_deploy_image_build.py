"""Replay deploy/Dockerfile's builder stage without Docker, then run the image's
command from the virtual environment it produced.

Each builder COPY receives what the build context holds after .dockerignore; the
stage's RUN commands run with its ENV, the venv redirected from /app/.venv into a
temporary directory. uv installs from its cache or PyPI. The result is what the
final stage copies, so running the image's ENTRYPOINT/CMD with the image's PATH
pointing into it checks that the image would hold a complete, working server
(package data such as migrations included) and nothing from the dev group.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_support import (
    REPO_ROOT,
    clean_environment,
    context_files,
    free_port,
    http_status,
    image_environment,
    launch,
    load_dockerfile,
    load_dockerignore,
    run_to_completion,
    stop,
    substitute_port,
    wait_until_serving,
)

IMAGE_VENV = "/app/.venv"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv must be on PATH to replay the builder stage")
    base = tmp_path_factory.mktemp("builder")
    builder = load_dockerfile().stage("builder")
    ignore = load_dockerignore()
    workdir_instruction = builder.last("WORKDIR")
    assert workdir_instruction is not None
    workdir = base / "fs" / workdir_instruction.arguments.lstrip("/")
    venv = base / "venv"
    env = clean_environment([])
    env.update(builder.env())
    assert env["UV_PROJECT_ENVIRONMENT"] == IMAGE_VENV, "the final stage copies /app/.venv"
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    for instruction in builder.instructions:
        if instruction.keyword == "COPY" and not instruction.flag("from"):
            *sources, destination = instruction.arguments.split()
            target = workdir / destination
            for source in sources:
                origin = REPO_ROOT / source
                for file in context_files(origin, ignore):
                    if origin.is_dir():
                        out = target / file.relative_to(origin)
                    elif destination.endswith("/") or len(sources) > 1:
                        out = target / file.name
                    else:
                        out = target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)
        elif instruction.keyword == "RUN":
            result = subprocess.run(
                ["bash", "-c", instruction.arguments],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, f"line {instruction.line}: {result.stderr}"
    return venv


def test_builder_installs_the_server_and_nothing_for_development(image_venv: Path) -> None:
    assert (image_venv / "bin" / "state-manager").exists()
    site = image_venv / "lib" / "python3.12" / "site-packages"
    assert (site / "state_manager" / "settings.py").exists(), "installed, not linked"
    for pth in site.glob("*.pth"):
        assert "state-manager" not in pth.read_text(), f"{pth.name}: editable install"
    for dev_only in ("pytest", "ruff", "mypy", "hadolint", "exospherehost", "uv"):
        assert not (site / dev_only).exists(), f"{dev_only} must not be in the image's venv"


def image_path_environment(venv: Path, data_dir: Path) -> dict[str, str]:
    """The image's ENV with its PATH, /app/.venv mapped to the replayed venv."""
    env = image_environment(data_dir)
    image_path = load_dockerfile().final.env()["PATH"]
    env["PATH"] = image_path.replace(IMAGE_VENV, str(venv)).replace("${PATH}", env["PATH"])
    return env


def test_built_venv_runs_the_image_command_on_a_fresh_data_volume(
    image_venv: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = image_path_environment(image_venv, data_dir)
    found = shutil.which("state-manager", path=env["PATH"])
    assert found is not None and Path(found).parent == image_venv / "bin"
    port = free_port()
    command = substitute_port(load_dockerfile().command(), port)
    server = launch(command, env, tmp_path, port, in_workspace=False)
    try:
        wait_until_serving(server, "/health")
        # Migrations shipped inside the package were found and applied.
        assert http_status(server.url("/ready")) == 200, server.output()
        assert (data_dir / "exosphere.db").exists()
    finally:
        stop(server.process)


def test_built_venv_runs_the_other_commands(image_venv: Path, tmp_path: Path) -> None:
    env = image_path_environment(image_venv, tmp_path)
    entrypoint_instruction = load_dockerfile().final.last("ENTRYPOINT")
    assert entrypoint_instruction is not None
    entrypoint = entrypoint_instruction.exec_form() or []
    code, output = run_to_completion([*entrypoint, "gen-key"], env, tmp_path, in_workspace=False)
    assert code == 0, output
    code, output = run_to_completion([*entrypoint, "migrate"], env, tmp_path, in_workspace=False)
    assert code == 0, output
    assert (tmp_path / "exosphere.db").exists()
