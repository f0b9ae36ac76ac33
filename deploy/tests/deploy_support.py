"""Shared helpers for the deployment tests: a small Dockerfile parser, a
``.dockerignore`` matcher, compose-style variable interpolation and readers for
the settings the server actually takes from its environment.

Everything here works offline: no Docker engine, no cluster, no network.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
DOCKERFILE = DEPLOY_DIR / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_DIR = DEPLOY_DIR / "compose"
KUBERNETES_DIR = DEPLOY_DIR / "kubernetes"
DOCS_DIR = REPO_ROOT / "docs"
SETTINGS_PY = REPO_ROOT / "state-manager" / "src" / "state_manager" / "settings.py"


# --------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    flags: tuple[str, ...]
    arguments: str
    line: int

    def flag(self, name: str) -> str | None:
        for item in self.flags:
            key, _, value = item.partition("=")
            if key == f"--{name}":
                return value
        return None

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of the arguments, or None for the shell form."""
        text = self.arguments.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: exec form must be a JSON list of strings")
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV values set in this stage, in order (later ones win)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(parse_env_arguments(instruction.arguments))
        return values


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def resolved_base(self, stage: Stage) -> str:
        return expand_args(stage.base, self.global_args)

    def command(self) -> list[str]:
        """What the final image runs: ENTRYPOINT followed by CMD (both exec form)."""
        entrypoint = self.final.last("ENTRYPOINT")
        cmd = self.final.last("CMD")
        parts: list[str] = []
        for instruction in (entrypoint, cmd):
            if instruction is None:
                continue
            exec_form = instruction.exec_form()
            if exec_form is None:
                raise ValueError(f"line {instruction.line}: use the exec (JSON) form")
            parts.extend(exec_form)
        return parts


_FLAG = re.compile(r"--[a-z-]+(=(\"[^\"]*\"|\S*))?")


def _split_flags(text: str) -> tuple[tuple[str, ...], str]:
    flags: list[str] = []
    rest = text.lstrip()
    while rest.startswith("--"):
        match = _FLAG.match(rest)
        if match is None:
            break
        flags.append(match.group(0))
        rest = rest[match.end() :].lstrip()
    return tuple(flags), rest


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (first line number, instruction text) with continuations joined and
    comment lines dropped, as BuildKit does (parser directives are comments too)."""
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        yield start, " ".join(part for part in buffer if part)
        buffer = []
    if buffer:
        yield start, " ".join(part for part in buffer if part)


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        flags, arguments = _split_flags(rest)
        instruction = Instruction(keyword, flags, arguments, line)
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name, line=line))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {line}: only ARG may precede the first FROM")
            key, _, default = arguments.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(instruction)
    if not stages:
        raise ValueError("no FROM instruction")
    return Dockerfile(global_args=global_args, stages=stages)


def load_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    return parse_dockerfile(path.read_text())


def parse_env_arguments(arguments: str) -> dict[str, str]:
    """Parse the arguments of ENV: ``a=1 b="two words"`` or the legacy ``KEY value``."""
    words = shlex.split(arguments, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"ENV argument without '=': {word!r}")
        values[key] = value
    return values


def expand_args(text: str, args: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return args.get(name, "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", replace, text)


# --------------------------------------------------------------------------- .dockerignore


def _glob_to_regex(pattern: str) -> str:
    """Translate a .dockerignore pattern (Go filepath.Match plus ``**``) to a regex."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            if body.startswith("^") or body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end + 1
        elif char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class DockerIgnore:
    rules: tuple[tuple[bool, re.Pattern[str]], ...]

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = os.path.normpath(line).lstrip("/")
            rules.append((negate, re.compile(_glob_to_regex(line))))
        return cls(tuple(rules))

    def excluded(self, relative_path: str) -> bool:
        """Whether the build context leaves this path out (the last match decides;
        a pattern matching a parent directory matches everything under it)."""
        parts = Path(relative_path).parts
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negate, regex in self.rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                result = not negate
        return result


def load_dockerignore() -> DockerIgnore:
    return DockerIgnore.parse(DOCKERIGNORE.read_text())


def context_files(source: Path, ignore: DockerIgnore) -> Iterator[Path]:
    """Files under ``source`` (a repository path) that the build context would contain."""
    if source.is_file():
        if not ignore.excluded(source.relative_to(REPO_ROOT).as_posix()):
            yield source
        return
    for directory, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(directory) / filename
            if not ignore.excluded(path.relative_to(REPO_ROOT).as_posix()):
                yield path


# --------------------------------------------------------------------------- compose


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A required variable (``${NAME:?message}``) is missing or empty."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-file variable substitution (the subset the spec defines)."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op = match.group("op")
        arg = match.group("arg") or ""
        value = env.get(name)
        present = value is not None
        nonempty = bool(value)
        if op in (":-", "-"):
            use_default = not nonempty if op == ":-" else not present
            return arg if use_default else str(value)
        if op in (":?", "?"):
            missing = not nonempty if op == ":?" else not present
            if missing:
                raise InterpolationError(f"{name}: {arg}")
            return str(value)
        if op in (":+", "+"):
            use_alternative = nonempty if op == ":+" else present
            return arg if use_alternative else ""
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def referenced_variables(text: str) -> dict[str, str | None]:
    """Variables a compose file refers to, mapped to their operator (None: plain)."""
    found: dict[str, str | None] = {}
    for match in _INTERPOLATION.finditer(text):
        name = match.group("braced") or match.group("named")
        if name:
            found.setdefault(name, match.group("op"))
    return found


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def parse_env_file(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not KEY=VALUE: {raw!r}")
        values[key.strip()] = value.strip()
    return values


def compose_files() -> list[Path]:
    return sorted(COMPOSE_DIR.glob("docker-compose*.yml"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- Kubernetes


def kubernetes_manifests() -> list[Path]:
    return sorted(KUBERNETES_DIR.rglob("*.yaml"))


def kubernetes_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_kubernetes_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in kubernetes_manifests() for doc in kubernetes_documents(path)]


# --------------------------------------------------------------------------- settings


def settings_variables() -> dict[str, int | None]:
    """Environment variables read by ``Settings.from_env``, with their integer
    defaults where the code states one (``_int(env, NAME, default, minimum)``)."""
    tree = ast.parse(SETTINGS_PY.read_text())
    found: dict[str, int | None] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "get"
            and isinstance(func.value, ast.Name)
            and func.value.id == "env"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.setdefault(node.args[0].value, None)
        elif isinstance(func, ast.Name) and func.id == "_int" and len(node.args) >= 3:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found[name.value] = _constant_int(node.args[2])
    return found


def _constant_int(node: ast.expr) -> int:
    """Evaluate an integer expression made of literals (``10 * 1024 * 1024``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _constant_int(node.left), _constant_int(node.right)
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
    raise ValueError(f"not a constant integer expression: {ast.dump(node)}")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def workspace_runner() -> list[str]:
    """How to run a command in the workspace virtual environment: ``uv run`` when
    uv is on PATH (without re-syncing, so a test never changes the environment),
    else the interpreter's own bin directory."""
    uv = shutil.which("uv")
    if uv:
        return [uv, "run", "--no-sync", "--project", str(REPO_ROOT), "--"]
    return []


def resolve_in_venv(command: list[str]) -> list[str]:
    runner = workspace_runner()
    if runner:
        return [*runner, *command]
    candidate = Path(sys.executable).parent / command[0]
    return [str(candidate), *command[1:]]


def clean_environment(drop: Iterable[str]) -> dict[str, str]:
    """The test process's environment without the server's settings (so a
    developer's DATABASE_URL cannot leak in) and without an active virtualenv."""
    dropped = set(drop) | {"VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT"}
    return {key: value for key, value in os.environ.items() if key not in dropped}


# --------------------------------------------------------------------------- the image command

STARTUP_DEADLINE_SECONDS = 90.0
IMAGE_PORT = "8000"
# Variables of the image's ENV that describe the image's filesystem, not settings.
NOT_SETTINGS = {"PATH"}


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path
    command: list[str]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def substitute_port(command: list[str], port: int) -> list[str]:
    """Replace the image's port (``--port 8000`` or ``--port=8000``) with ``port``."""
    out: list[str] = []
    replaced = False
    for index, word in enumerate(command):
        if word == f"--port={IMAGE_PORT}":
            out.append(f"--port={port}")
            replaced = True
        elif word == IMAGE_PORT and index > 0 and command[index - 1] == "--port":
            out.append(str(port))
            replaced = True
        else:
            out.append(word)
    if not replaced:
        raise AssertionError(f"the image command does not pass --port {IMAGE_PORT}: {command}")
    return out


def generated_secrets() -> dict[str, str]:
    return {
        "STATE_MANAGER_SECRET": secrets.token_hex(32),
        "SECRETS_ENCRYPTION_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    }


def image_environment(data_dir: Path) -> dict[str, str]:
    env = clean_environment(settings_variables())
    image_env = load_dockerfile().final.env()
    for key, value in image_env.items():
        if key not in NOT_SETTINGS:
            env[key] = value
    env["EXOSPHERE_DATA_DIR"] = str(data_dir)
    env.update(generated_secrets())
    return env


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as `docker stop` sends; SIGKILL only if it will not go."""
    if process.poll() is None:
        # To the launched process only (uv forwards it), as docker stop signals PID 1.
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError("the server ignored SIGTERM for 30 s") from None
    return process.returncode


def launch(
    command: list[str],
    env: dict[str, str],
    workdir: Path,
    port: int,
    *,
    in_workspace: bool = True,
) -> RunningServer:
    """Start ``command`` in the background: through the workspace venv, or (with
    ``in_workspace=False``) looked up on the PATH of ``env``, as a container would."""
    log = workdir / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            resolve_in_venv(command) if in_workspace else command,
            cwd=workdir,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RunningServer(process, port, Path(env["EXOSPHERE_DATA_DIR"]), log, command)


def wait_until_serving(running: RunningServer, path: str = "/health") -> None:
    """Poll ``path`` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
    while http_status(running.url(path)) != 200:
        if running.process.poll() is not None:
            pytest.fail(
                f"`{' '.join(running.command)}` exited with {running.process.returncode} "
                f"before {path} answered 200:\n{running.output()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never answered 200:\n{running.output()}")
        time.sleep(0.2)


def run_to_completion(
    command: list[str], env: dict[str, str], workdir: Path, *, in_workspace: bool = True
) -> tuple[int, str]:
    result = subprocess.run(
        resolve_in_venv(command) if in_workspace else command,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=STARTUP_DEADLINE_SECONDS,
    )
    return result.returncode, result.stdout + result.stderr
