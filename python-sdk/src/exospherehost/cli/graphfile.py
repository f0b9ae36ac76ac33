"""Graph files: one graph template per YAML or JSON file, kept under version control.

A file names the graph, its nodes and settings, and says where each secret's value comes
from (an environment variable), never the value itself::

    name: hello
    namespace: hello-world          # optional: else --namespace / EXOSPHERE_NAMESPACE
    secrets:
      API_TOKEN: {from_env: MY_TOKEN}
    store_config:
      required_keys: [name]
    nodes:
      - identifier: greet
        node_name: Greet
        inputs: {name: "${{ store.name }}"}

This module is pure: it parses text, checks it, resolves secrets from a given environment
and converts between files and the server's template documents. It does no I/O besides
reading the files it is given.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..models import (
    MAX_TIMEOUT_SECONDS,
    CronTrigger,
    GraphNodeModel,
    RetryPolicyModel,
    StoreConfigModel,
    UnitesModel,
)

__all__ = [
    "FILE_SUFFIXES",
    "GraphFile",
    "Problem",
    "ResolvedGraph",
    "Source",
    "dump",
    "env_name_for",
    "from_template",
    "json_schema",
    "load_sources",
    "parse",
    "resolve",
    "to_data",
]

# Files a folder contributes (not recursive), in name order.
FILE_SUFFIXES = (".yaml", ".yml", ".json")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
NAME_MAX_LENGTH = 255
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --- the file format --------------------------------------------------------------------


class SecretReference(BaseModel):
    """Where a secret's value comes from when the file is applied."""

    model_config = ConfigDict(extra="forbid", title="SecretReference")

    from_env: str = Field(
        ...,
        pattern=_ENV_NAME.pattern,
        description="Name of the environment variable that holds the value at apply time",
    )


class FileUnites(UnitesModel):
    """Fan-in: run once every state descending from ``identifier`` is done."""

    model_config = ConfigDict(extra="forbid", title="Unites")


class FileNode(GraphNodeModel):
    """One node of the graph."""

    model_config = ConfigDict(extra="forbid", title="Node")

    namespace: str = Field(
        default="",
        description="Namespace where the node is registered; default: the graph's namespace",
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Input values (text); may contain ${{ node.outputs.field }} or "
        "${{ store.key }}",
    )
    unites: FileUnites | None = Field(default=None, description="Fan-in declaration")


class FileRetryPolicy(RetryPolicyModel):
    """How failed nodes are retried; omitted fields keep the server's defaults."""

    model_config = ConfigDict(extra="forbid", title="RetryPolicy")


class FileStoreConfig(StoreConfigModel):
    """Keys of each run's store: the ones a trigger must give, and default values."""

    model_config = ConfigDict(extra="forbid", title="StoreConfig")


class FileTrigger(BaseModel):
    """A schedule that triggers the graph."""

    model_config = ConfigDict(extra="forbid", title="Trigger")

    cron: str = Field(..., description="Cron expression (five fields, UTC), e.g. '*/5 * * * *'")

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5:
            raise ValueError(
                "a cron expression has five fields (minute hour day-of-month month "
                f"day-of-week), got {len(fields)}"
            )
        return " ".join(fields)


class GraphFile(BaseModel):
    """One graph template as a file."""

    model_config = ConfigDict(extra="forbid", title="Exosphere graph file", populate_by_name=True)

    schema_: str | None = Field(
        default=None, alias="$schema", description="Optional: where editors find this schema"
    )
    name: str = Field(..., max_length=NAME_MAX_LENGTH, description="Name of the graph")
    namespace: str | None = Field(
        default=None,
        max_length=NAME_MAX_LENGTH,
        description="Namespace of the graph; default: --namespace or EXOSPHERE_NAMESPACE",
    )
    secrets: dict[str, SecretReference] = Field(
        default_factory=dict,
        description="Secrets by name, each read from an environment variable at apply time",
    )
    store_config: FileStoreConfig | None = Field(default=None, description="Run store keys")
    retry_policy: FileRetryPolicy | None = Field(default=None, description="Retry policy")
    triggers: list[FileTrigger] = Field(default_factory=list, description="Cron schedules")
    timeout: int | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_SECONDS,
        description="Default timeout (seconds) of nodes without their own: a state running "
        "longer is taken back as a failed attempt",
    )
    nodes: list[FileNode] = Field(..., min_length=1, description="The nodes of the graph")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("graph name cannot be empty")
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("namespace cannot be empty (leave it out to use --namespace)")
        return value.strip() if value is not None else None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of graph files (published as ``docs/graph-file.schema.json``)."""
    schema = GraphFile.model_json_schema(by_alias=True)
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


# --- reading files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something wrong with a file, said with where it is."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass(frozen=True)
class Source:
    """The text of one graph file and where it came from (a path, or ``-`` for stdin)."""

    label: str
    text: str
    is_json: bool


def load_sources(paths: Iterable[str], stdin: TextIO | None = None) -> list[Source | Problem]:
    """Read each path: a file, a folder (its ``*.yaml``, ``*.yml`` and ``*.json`` files,
    not recursive) or ``-`` (standard input)."""
    found: list[Source | Problem] = []
    for raw in paths:
        if raw == "-":
            found.append(Source("<stdin>", (stdin or sys.stdin).read(), is_json=False))
            continue
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
            if not files:
                found.append(Problem(raw, "folder has no .yaml, .yml or .json file"))
            found.extend(_read(p) for p in files)
        else:
            found.append(_read(path))
    return found


def _read(path: Path) -> Source | Problem:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Problem(str(path), "no such file or folder")
    except (OSError, UnicodeDecodeError) as exc:
        return Problem(str(path), f"cannot read: {exc}")
    return Source(str(path), text, is_json=path.suffix == ".json")


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def _parse_text(source: Source) -> Any:
    if source.is_json:
        try:
            return json.loads(source.text)
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno}, column {exc.colno}"
            raise _SyntaxProblem(f"invalid JSON: {exc.msg} ({where})") from None
    try:
        documents = list(yaml.load_all(source.text, Loader=_StrictLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise _SyntaxProblem(f"invalid YAML: {exc.problem or exc}{where}") from None
    except yaml.YAMLError as exc:
        raise _SyntaxProblem(f"invalid YAML: {exc}") from None
    documents = [d for d in documents if d is not None]
    if len(documents) > 1:
        raise _SyntaxProblem(f"holds {len(documents)} YAML documents; put one graph per file")
    return documents[0] if documents else None


class _SyntaxProblem(Exception):
    pass


def parse(source: Source) -> GraphFile | list[Problem]:
    """The graph in ``source``, or every problem found in it."""
    try:
        data = _parse_text(source)
    except _SyntaxProblem as exc:
        return [Problem(source.label, str(exc))]
    if not isinstance(data, dict):
        kind = "nothing" if data is None else type(data).__name__
        return [Problem(source.label, f"expected a mapping with name and nodes, found {kind}")]
    try:
        return GraphFile.model_validate(data)
    except ValidationError as exc:
        return [Problem(source.label, _describe(error, data)) for error in exc.errors()]


def _describe(error: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """One pydantic error as ``where: what``, naming a node by its identifier."""
    loc = list(error["loc"])
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = f"unknown field '{loc.pop()}'"
    elif kind == "missing":
        message = f"'{loc.pop()}' is required"
    where = _location(loc, data)
    return f"{where}: {message}" if where else message


def _location(loc: list[Any], data: Mapping[str, Any]) -> str:
    text = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            if index == 1 and loc[0] == "nodes":
                nodes = data.get("nodes")
                node = nodes[part] if isinstance(nodes, list) and part < len(nodes) else None
                if isinstance(node, dict) and isinstance(node.get("identifier"), str):
                    text += f" ({node['identifier']})"
        else:
            text += f".{part}" if text else str(part)
    return text


# --- applying: namespace and secrets ----------------------------------------------------


@dataclass
class ResolvedGraph:
    """A graph file made ready to send: namespace decided, secret values read."""

    name: str
    namespace: str
    source: str
    nodes: list[GraphNodeModel]
    secrets: dict[str, str] = field(repr=False)
    retry_policy: RetryPolicyModel | None
    store_config: StoreConfigModel | None
    triggers: list[CronTrigger] | None
    timeout: int | None = None


def resolve(
    graph: GraphFile,
    source: str,
    *,
    namespace: str | None,
    namespace_is_explicit: bool,
    environ: Mapping[str, str],
) -> ResolvedGraph | list[Problem]:
    """Decide the graph's namespace and read its secrets from ``environ``.

    The file's ``namespace`` wins over a default (``EXOSPHERE_NAMESPACE``); one given
    explicitly (``--namespace``) that differs from the file's is a problem. A secret whose
    variable is unset or empty is a problem: nothing is sent with a missing secret.
    """
    problems: list[Problem] = []
    chosen = graph.namespace or namespace
    if graph.namespace and namespace_is_explicit and namespace and namespace != graph.namespace:
        problems.append(
            Problem(
                source,
                f"the file says namespace '{graph.namespace}' but --namespace is '{namespace}'",
            )
        )
    if not chosen:
        problems.append(
            Problem(
                source,
                "no namespace: set 'namespace' in the file, --namespace or EXOSPHERE_NAMESPACE",
            )
        )
    secrets: dict[str, str] = {}
    for name, reference in graph.secrets.items():
        value = environ.get(reference.from_env)
        if not value:
            state = "is not set" if value is None else "is empty"
            problems.append(
                Problem(
                    source,
                    f"secret '{name}': environment variable {reference.from_env} {state}",
                )
            )
        else:
            secrets[name] = value
    if problems:
        return problems
    assert chosen is not None
    nodes = [
        GraphNodeModel(
            node_name=node.node_name,
            namespace=node.namespace or chosen,
            identifier=node.identifier,
            inputs=dict(node.inputs),
            next_nodes=node.next_nodes,
            unites=UnitesModel.model_validate(node.unites.model_dump()) if node.unites else None,
            timeout=node.timeout,
        )
        for node in graph.nodes
    ]
    return ResolvedGraph(
        name=graph.name,
        namespace=chosen,
        source=source,
        nodes=nodes,
        secrets=secrets,
        retry_policy=(
            RetryPolicyModel.model_validate(graph.retry_policy.model_dump())
            if graph.retry_policy
            else None
        ),
        store_config=(
            StoreConfigModel.model_validate(graph.store_config.model_dump())
            if graph.store_config
            else None
        ),
        triggers=[CronTrigger(expression=t.cron) for t in graph.triggers] or None,
        timeout=graph.timeout,
    )


# --- the other way: a stored template as a file -----------------------------------------


def env_name_for(secret: str) -> str:
    """The variable ``graph get`` names for a secret: its name in upper case, every
    character other than a letter, digit or ``_`` as ``_``."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", secret).upper()
    return name if _ENV_NAME.match(name) else f"_{name}"


def from_template(name: str, namespace: str, template: Mapping[str, Any]) -> GraphFile:
    """The file for a template as ``GET .../graph/{name}`` returns it.

    Secrets become references to variables named by :func:`env_name_for` (the server
    never returns values); settings equal to the server's defaults are left out.
    """
    data: dict[str, Any] = {"name": name, "namespace": namespace}
    secrets = sorted(template.get("secrets") or {})
    if secrets:
        data["secrets"] = {secret: {"from_env": env_name_for(secret)} for secret in secrets}
    store = StoreConfigModel.model_validate(template.get("store_config") or {})
    store_data = store.model_dump(mode="json", exclude_defaults=True)
    if store_data:
        data["store_config"] = store_data
    policy = RetryPolicyModel.model_validate(template.get("retry_policy") or {})
    policy_data = policy.model_dump(mode="json", exclude_defaults=True)
    if policy_data:
        data["retry_policy"] = policy_data
    triggers = [
        {"cron": trigger["value"]["expression"]} for trigger in template.get("triggers") or []
    ]
    if triggers:
        data["triggers"] = triggers
    if template.get("timeout") is not None:
        data["timeout"] = template["timeout"]
    data["nodes"] = [_file_node(node, namespace) for node in template.get("nodes") or []]
    return GraphFile.model_validate(data)


def _file_node(node: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    out: dict[str, Any] = {"identifier": node["identifier"], "node_name": node["node_name"]}
    if node.get("namespace") and node["namespace"] != namespace:
        out["namespace"] = node["namespace"]
    out["inputs"] = dict(node.get("inputs") or {})
    if node.get("next_nodes"):
        out["next_nodes"] = list(node["next_nodes"])
    unites = node.get("unites")
    if unites:
        out["unites"] = {"identifier": unites["identifier"], "strategy": unites["strategy"]}
    if node.get("timeout") is not None:
        out["timeout"] = node["timeout"]
    return out


def to_data(graph: GraphFile) -> dict[str, Any]:
    """The file as plain data, in the order a person reads it, defaults left out."""
    data = graph.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    order = ["$schema", "name", "namespace", "secrets", "store_config", "retry_policy"]
    order += ["triggers", "timeout", "nodes"]
    data["nodes"] = [_node_data(node) for node in data.get("nodes", [])]
    return {key: data[key] for key in order if key in data}


def _node_data(node: dict[str, Any]) -> dict[str, Any]:
    order = ["identifier", "node_name", "namespace", "inputs", "next_nodes", "unites", "timeout"]
    return {key: node[key] for key in order if key in node}


def dump(graph: GraphFile, *, as_json: bool) -> str:
    """The text of a file for ``graph``: YAML, or JSON with ``as_json``."""
    data = to_data(graph)
    if as_json:
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
