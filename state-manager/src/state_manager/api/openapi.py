"""The OpenAPI schema beyond what FastAPI derives from the routes.

- :func:`errors`: the error statuses of a route, all with one body model (``ErrorResponse``).
- :func:`install`: the schema served at ``/openapi.json``, completed with the rules the
  request middleware applies to every request (no U+0000 in any string, in the path or in
  any JSON value of the body, extra fields included) and with the limits that come from
  the settings (page size, runs and reports per request, the caps of claims).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from state_manager.api.schemas import ErrorResponse
from state_manager.domain.models import NUL_FREE_PATTERN
from state_manager.settings import Settings

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The request breaks a rule the schema cannot express, or holds a NUL character.",
    401: "Missing or wrong `x-api-key`.",
    404: "No such resource in this namespace.",
    409: "Conflicts with the current state of the resource (`code` names some refusals, "
    "e.g. run_cancelled).",
    413: "The request body exceeds MAX_REQUEST_BYTES, or a report creates too many states.",
    500: "An internal error, logged with the request id in `x-exosphere-request-id`.",
    503: "The database cannot serve the request now; the same request may succeed later.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for error statuses, each with the shared error body."""
    return {
        code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes
    }


# Any JSON value without U+0000 in its strings or keys (what the middleware lets through).
JSON_VALUE_REF = {"$ref": "#/components/schemas/JsonValue"}
JSON_VALUE: dict[str, Any] = {
    "description": "Any JSON value; no string or key holds a NUL character (U+0000).",
    "anyOf": [
        {"type": "string", "pattern": NUL_FREE_PATTERN},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": JSON_VALUE_REF},
        {
            "type": "object",
            "propertyNames": {"pattern": NUL_FREE_PATTERN},
            "additionalProperties": JSON_VALUE_REF,
        },
    ],
}
_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}
_SCHEMA_KEYWORDS = {"type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const", "not"}


def _complete(schema: Any) -> Any:
    """``schema`` with the NUL rule on every string and key, and ``JsonValue`` for every
    value left open (``Any`` fields, ``additionalProperties`` of models, list items)."""
    if not isinstance(schema, dict):
        return schema
    patterns = schema.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in schema:
        # pydantic writes ``dict[<str with a pattern>, V]`` as patternProperties; the
        # server refuses other keys, which this form says directly.
        ((pattern, values),) = patterns.items()
        names = {**schema.get("propertyNames", {}), "pattern": pattern}
        schema = {k: v for k, v in schema.items() if k != "patternProperties"}
        schema.update(propertyNames=names, additionalProperties=values)
    if not _SCHEMA_KEYWORDS & schema.keys():
        return {**schema, **JSON_VALUE_REF} if not schema else {**schema, "allOf": [JSON_VALUE_REF]}
    done: dict[str, Any] = {}
    for key, value in schema.items():
        if key in {"properties", "$defs"}:
            done[key] = {name: _complete(sub) for name, sub in value.items()}
        elif key in {"anyOf", "oneOf", "allOf"}:
            done[key] = [_complete(sub) for sub in value]
        elif key == "propertyNames":
            done[key] = {"pattern": NUL_FREE_PATTERN, **value}
        elif key in {"items", "additionalProperties"}:
            done[key] = JSON_VALUE_REF if value is True else _complete(value)
        else:
            done[key] = value
    kind = schema.get("type")
    if kind in {"integer", "number"}:
        # pydantic leaves the bounds of some constrained unions under their own names.
        for name, keyword in _BOUNDS.items():
            if name in done:
                done[keyword] = done.pop(name)
    if kind == "string" and "pattern" not in done and not {"enum", "const"} & schema.keys():
        done["pattern"] = NUL_FREE_PATTERN
    if kind == "object":
        done.setdefault("propertyNames", {"pattern": NUL_FREE_PATTERN})
        done.setdefault("additionalProperties", JSON_VALUE_REF)
    if kind == "array":
        done.setdefault("items", JSON_VALUE_REF)
    return done


def _limits(document: dict[str, Any], settings: Settings) -> None:
    """Write the limits that come from the settings into the schema."""
    schemas = document["components"]["schemas"]
    for name in ("StartRunsRequest", "ExchangeRequest"):
        for field in ("runs", "reports"):
            prop = schemas.get(name, {}).get("properties", {}).get(field)
            if prop is not None:
                prop["maxItems"] = settings.max_batch_size
    for name in ("EnqueueRequest",):
        props = schemas.get(name, {}).get("properties", {})
        if "batch_size" in props:
            props["batch_size"]["description"] += f" MAX_BATCH_SIZE is {settings.max_batch_size}."
        if "wait_ms" in props:
            props["wait_ms"]["description"] += f" MAX_WAIT_MS is {settings.max_wait_ms}."
    runs_path = document["paths"].get("/v0/namespace/{namespace_name}/runs/{page}/{size}", {})
    for parameter in runs_path.get("get", {}).get("parameters", []):
        if parameter["name"] == "size":
            parameter["schema"]["maximum"] = settings.max_page_size


def build(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The complete schema of ``app``."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = document.setdefault("components", {})
    components["schemas"] = {
        name: _complete(schema) for name, schema in components.get("schemas", {}).items()
    }
    components["schemas"]["JsonValue"] = JSON_VALUE
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _complete(parameter["schema"])
            for content in operation.get("requestBody", {}).get("content", {}).values():
                content["schema"] = _complete(content["schema"])
    _limits(document, settings)
    return document


def install(app: FastAPI, settings: Settings) -> None:
    """Serve :func:`build`'s schema (built once, on first use) at ``/openapi.json``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(document: dict[str, Any], path: str) -> set[str]:
    """The methods the schema documents for ``path`` (empty when no path matches), for
    the ``Allow`` header of a 405."""
    methods: set[str] = set()
    for template, operations in document.get("paths", {}).items():
        pattern = re.sub(r"\\\{[^}/]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods.update(method.upper() for method in operations)
    return methods
