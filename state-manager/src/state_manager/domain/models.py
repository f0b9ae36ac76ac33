"""Value types of the domain: statuses, graph templates, retry policy, store config.

These are pydantic models because they double as request schemas: the field-level
rules here are the ones the v0 API answers with 422. Cross-node rules live in
:mod:`state_manager.domain.graph` and are answered with 400.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from state_manager.domain.timeouts import MAX_TIMEOUT_SECONDS

RESERVED_IDENTIFIER = "store"
# Names end up in indexed columns; PostgreSQL cannot index arbitrarily long text.
NAME_MAX_LENGTH = 255
# The longest delay a client may ask for (start_delay, re-enqueue-after): ten years in ms.
MAX_DELAY_MS = 10 * 365 * 24 * 3_600_000

Name = Annotated[str, StringConstraints(max_length=NAME_MAX_LENGTH)]

# Patterns for the OpenAPI schema that mirror rules the validators below apply (the
# validators give the messages; the patterns tell clients and schema-driven tools).
# ``_SPACE`` is what ``str.strip()`` removes; no text may hold U+0000 (see api/middleware).
_SPACE = r"\t-\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NUL_FREE_PATTERN = r"^[^\u0000]*$"
NON_BLANK_PATTERN = rf"^[^\u0000]*[^\u0000{_SPACE}][^\u0000]*$"
STORE_KEY_PATTERN = rf"^[^\u0000.]*[^\u0000.{_SPACE}][^\u0000.]*$"
_NON_BLANK: JsonDict = {"pattern": NON_BLANK_PATTERN}


def _json_integer(value: Any) -> Any:
    """JSON integers only: ``true`` or ``"5"`` are not numbers (``5.0`` is, as in JSON Schema)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be an integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]
# A timeout in whole seconds (a boolean or a string is refused), at most seven days.
TimeoutSeconds = Annotated[
    JsonInt,
    Field(
        gt=0,
        le=MAX_TIMEOUT_SECONDS,
        description="Seconds a claimed state may run before it is taken back as a failed "
        f"attempt (1 to {MAX_TIMEOUT_SECONDS}).",
    ),
]


class StateStatus(StrEnum):
    CREATED = "CREATED"
    QUEUED = "QUEUED"
    EXECUTED = "EXECUTED"
    SUCCESS = "SUCCESS"
    ERRORED = "ERRORED"
    NEXT_CREATED_ERROR = "NEXT_CREATED_ERROR"
    PRUNED = "PRUNED"
    RETRY_CREATED = "RETRY_CREATED"
    CANCELLED = "CANCELLED"  # its run was cancelled before it finished


class ValidationStatus(StrEnum):
    PENDING = "PENDING"
    ONGOING = "ONGOING"  # part of the enum for compatibility; never written
    VALID = "VALID"
    INVALID = "INVALID"


class UnitesStrategy(StrEnum):
    ALL_SUCCESS = "ALL_SUCCESS"
    ALL_DONE = "ALL_DONE"


class RetryStrategy(StrEnum):
    EXPONENTIAL = "EXPONENTIAL"
    EXPONENTIAL_FULL_JITTER = "EXPONENTIAL_FULL_JITTER"
    EXPONENTIAL_EQUAL_JITTER = "EXPONENTIAL_EQUAL_JITTER"
    LINEAR = "LINEAR"
    LINEAR_FULL_JITTER = "LINEAR_FULL_JITTER"
    LINEAR_EQUAL_JITTER = "LINEAR_EQUAL_JITTER"
    FIXED = "FIXED"
    FIXED_FULL_JITTER = "FIXED_FULL_JITTER"
    FIXED_EQUAL_JITTER = "FIXED_EQUAL_JITTER"


class RunStatus(StrEnum):
    SUCCESS = "SUCCESS"
    PENDING = "PENDING"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# A run is PENDING while one of its states has one of these statuses, and finished
# (every other run status) once none has: the run listing and retention both use it.
RUN_PENDING_STATE_STATUSES = frozenset(
    {StateStatus.CREATED, StateStatus.QUEUED, StateStatus.EXECUTED}
)
# The run statuses that retention deletes once old enough: every status but PENDING.
FINISHED_RUN_STATUSES = frozenset(set(RunStatus) - {RunStatus.PENDING})


class TriggerStatus(StrEnum):
    PENDING = "PENDING"
    TRIGGERING = "TRIGGERING"
    TRIGGERED = "TRIGGERED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


def _trimmed_non_empty(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{what} cannot be empty")
    return value


class Unites(BaseModel):
    """Fan-in declaration: wait for every descendant of ``identifier``'s fan-out group."""

    identifier: Name = Field(json_schema_extra=_NON_BLANK)
    strategy: UnitesStrategy = UnitesStrategy.ALL_SUCCESS

    @field_validator("identifier")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _trimmed_non_empty(value, "Unites identifier")


class NodeTemplate(BaseModel):
    """One node of a graph template."""

    node_name: Name = Field(json_schema_extra=_NON_BLANK)
    namespace: Name
    # Not "store" either (reserved): a 422 with a message, not written in the schema.
    identifier: Name = Field(json_schema_extra=_NON_BLANK)
    inputs: dict[str, Any]
    next_nodes: (
        Annotated[
            list[Annotated[Name, Field(json_schema_extra=_NON_BLANK)]],
            Field(json_schema_extra={"uniqueItems": True}),
        ]
        | None
    ) = None
    unites: Unites | None = None
    timeout: TimeoutSeconds | None = None

    @field_validator("node_name")
    @classmethod
    def _node_name(cls, value: str) -> str:
        return _trimmed_non_empty(value, "Node name")

    @field_validator("identifier")
    @classmethod
    def _identifier(cls, value: str) -> str:
        value = _trimmed_non_empty(value, "Node identifier")
        if value == RESERVED_IDENTIFIER:
            raise ValueError(f"Node identifier cannot be reserved word '{RESERVED_IDENTIFIER}'")
        return value

    @field_validator("next_nodes")
    @classmethod
    def _next_nodes(cls, value: list[str] | None) -> list[str]:
        if value is None:
            return []
        errors: list[str] = []
        seen: set[str] = set()
        cleaned: list[str] = []
        for raw in value:
            item = raw.strip()
            if not item:
                errors.append("Next node identifier cannot be empty")
            elif item in seen:
                errors.append(f"Next node identifier {item} is not unique")
            seen.add(item)
            cleaned.append(item)
        if errors:
            raise ValueError("; ".join(errors))
        return cleaned

    def successors(self) -> list[str]:
        return list(self.next_nodes or [])


class RetryPolicy(BaseModel):
    """How an errored state is retried. Delays are in milliseconds."""

    max_retries: JsonInt = Field(default=3, ge=0)
    strategy: RetryStrategy = RetryStrategy.EXPONENTIAL
    backoff_factor: JsonInt = Field(default=2000, gt=0)
    exponent: JsonInt = Field(default=2, gt=0)
    max_delay: JsonInt | None = Field(default=None, gt=0)


def _key_problems(keys: list[str]) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for key in keys:
        if not key:
            problems.append("Key cannot be empty")
        elif len(key) > NAME_MAX_LENGTH:
            problems.append(f"Key '{key[:20]}...' is longer than {NAME_MAX_LENGTH} characters")
        elif "." in key:
            problems.append(f"Key '{key}' cannot contain '.'")
        elif key in seen:
            problems.append(f"Key '{key}' is duplicated")
        seen.add(key)
    return problems


def _coerced_values(schema: JsonDict) -> None:
    """``default_values`` takes any JSON value and keeps its string form (v0 contract)."""
    schema.pop("patternProperties", None)
    schema["propertyNames"] = {"maxLength": NAME_MAX_LENGTH, "pattern": STORE_KEY_PATTERN}
    schema["additionalProperties"] = {"description": "Any JSON value, kept as its str()."}


class StoreConfig(BaseModel):
    """Per-run key/value store: keys a trigger must provide and defaults for the rest."""

    required_keys: list[
        Annotated[str, Field(max_length=NAME_MAX_LENGTH, pattern=STORE_KEY_PATTERN)]
    ] = Field(default_factory=list, json_schema_extra={"uniqueItems": True})
    default_values: dict[
        Annotated[str, Field(max_length=NAME_MAX_LENGTH, pattern=STORE_KEY_PATTERN)], str
    ] = Field(default_factory=dict, json_schema_extra=_coerced_values)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        problems: list[str] = []
        required = data.get("required_keys", [])
        if isinstance(required, list) and all(isinstance(k, str) for k in required):
            required = [k.strip() for k in required]
            problems += _key_problems(required)
        defaults = data.get("default_values", {})
        if isinstance(defaults, dict):
            stripped = [str(k).strip() for k in defaults]
            problems += _key_problems(stripped)
            defaults = {str(k).strip(): str(v) for k, v in defaults.items()}
        if problems:
            raise ValueError("; ".join(problems))
        return {**data, "required_keys": required, "default_values": defaults}


class CronValue(BaseModel):
    expression: str

    @field_validator("expression")
    @classmethod
    def _expression(cls, value: str) -> str:
        from state_manager.domain.cron import validate_expression

        return validate_expression(value)


class Trigger(BaseModel):
    """A template-level trigger. Only cron exists."""

    type: Literal["CRON"] = "CRON"
    value: CronValue


class GraphSpec(BaseModel):
    """The parts of a graph template that the user writes (the upsert body, minus secrets)."""

    model_config = ConfigDict(frozen=False)

    nodes: list[NodeTemplate]
    retry_policy: RetryPolicy = Field(default_factory=RetryPolicy)
    store_config: StoreConfig = Field(default_factory=StoreConfig)
    triggers: list[Trigger] = Field(default_factory=list)
    timeout: TimeoutSeconds | None = None  # default of nodes without their own

    def node(self, identifier: str) -> NodeTemplate | None:
        for node in self.nodes:
            if node.identifier == identifier:
                return node
        return None
