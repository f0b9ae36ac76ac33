"""Use cases on registered nodes and graph templates, including their validation."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from state_manager.domain import cron
from state_manager.domain import graph as graph_rules
from state_manager.domain.ids import new_object_id
from state_manager.domain.models import GraphSpec, TriggerStatus, ValidationStatus
from state_manager.errors import InvalidRequest, NotFound
from state_manager.services.context import Context, retry_transient
from state_manager.store.contract import TemplateRow, Transaction

logger = logging.getLogger(__name__)


# -- registered nodes -------------------------------------------------------------


@retry_transient
async def register_nodes(
    ctx: Context, namespace: str, runtime_name: str, nodes: list[dict[str, Any]]
) -> None:
    """Create or overwrite node definitions (last writer wins)."""
    now = ctx.clock()
    async with ctx.db.write() as tx:
        for node in nodes:
            await tx.upsert_registered_node(
                {
                    "id": new_object_id(),
                    "namespace": namespace,
                    "name": node["name"],
                    "runtime_name": runtime_name,
                    "runtime_namespace": namespace,
                    "inputs_schema": node["inputs_schema"],
                    "outputs_schema": node["outputs_schema"],
                    "secrets": node["secrets"],
                    "created_at": now,
                    "updated_at": now,
                }
            )
    # Templates waiting on these nodes may validate now.
    ctx.validation_wakeup.set()


async def list_nodes(ctx: Context, namespace: str) -> list[dict[str, Any]]:
    async with ctx.db.read() as tx:
        return await tx.list_registered_nodes(namespace)


async def list_namespaces(ctx: Context) -> list[str]:
    async with ctx.db.read() as tx:
        return await tx.list_namespaces()


# -- templates ----------------------------------------------------------------------


@retry_transient
async def upsert_graph(
    ctx: Context, namespace: str, name: str, spec: GraphSpec, secrets: dict[str, str]
) -> TemplateRow:
    """Check a template's structure, store it as PENDING, and schedule validation."""
    errors = graph_rules.validate_graph(name, namespace, spec, secrets)
    foreign = sorted({n.namespace for n in spec.nodes if n.namespace != namespace})
    if foreign:
        errors.append(
            f"Nodes must be registered in the graph's namespace '{namespace}', "
            f"found namespace(s) {', '.join(repr(f) for f in foreign)}"
        )
    if errors:
        raise InvalidRequest("Error validating graph template: " + "; ".join(errors))
    now = ctx.clock()
    encrypted = {key: ctx.box.encrypt(value) for key, value in secrets.items()}
    async with ctx.db.write() as tx:
        template = await tx.save_template(
            {
                "id": new_object_id(),
                "namespace": namespace,
                "name": name,
                "spec": spec.model_dump(mode="json"),
                "secrets": encrypted,
                "validation_status": ValidationStatus.PENDING.value,
                "validation_errors": [],
                "version_id": None,
                "created_at": now,
                "updated_at": now,
            }
        )
        await tx.delete_pending_triggers(namespace, name)
    ctx.validation_wakeup.set()
    return template


async def get_graph(ctx: Context, namespace: str, name: str) -> TemplateRow:
    async with ctx.db.read() as tx:
        template = await tx.get_template(namespace, name)
    if template is None:
        raise NotFound(f"Graph template {name} not found in namespace {namespace}")
    return template


async def list_graphs(ctx: Context, namespace: str) -> list[TemplateRow]:
    async with ctx.db.read() as tx:
        return await tx.list_templates(namespace)


async def validate_pending(ctx: Context, limit: int = 50) -> int:
    """Validate PENDING templates against registered nodes. Returns how many were decided."""
    async with ctx.db.read() as tx:
        pending = await tx.pending_templates(limit)
    decided = 0
    for template in pending:
        if await _validate_one(ctx, template):
            decided += 1
    return decided


@retry_transient
async def _validate_one(ctx: Context, template: TemplateRow) -> bool:
    async with ctx.db.write() as tx:
        return await _validate(ctx, tx, template)


async def _validate(ctx: Context, tx: Transaction, template: TemplateRow) -> bool:
    now = ctx.clock()
    try:
        spec = GraphSpec.model_validate(template.spec)
        pairs = {(node.node_name, node.namespace) for node in spec.nodes}
        rows = await tx.registered_nodes_for(pairs)
        registry = {
            key: graph_rules.RegisteredSchema(
                inputs_schema=row["inputs_schema"],
                outputs_schema=row["outputs_schema"],
                secrets=list(row["secrets"]),
            )
            for key, row in rows.items()
        }
        errors = graph_rules.validate_against_registry(spec, template.secrets.keys(), registry)
    except Exception as exc:  # a template we cannot even read is INVALID, not a crash loop
        logger.exception("validation of graph template %s failed", template.name)
        errors = [f"Validation failed unexpectedly: {type(exc).__name__}"]
    if errors:
        return await tx.finish_validation(
            template.id, template.revision, ValidationStatus.INVALID, errors, None, now
        )
    input_fields = {
        node.identifier: graph_rules.input_fields(
            registry[(node.node_name, node.namespace)].inputs_schema
        )
        for node in spec.nodes
    }
    await tx.insert_version(
        {
            "id": new_object_id(),
            "namespace": template.namespace,
            "graph_name": template.name,
            "revision": template.revision,
            "spec": template.spec,
            "input_fields": input_fields,
            "created_at": now,
        }
    )
    version = await tx.get_version_by_revision(template.namespace, template.name, template.revision)
    assert version is not None
    if not await tx.finish_validation(
        template.id, template.revision, ValidationStatus.VALID, [], version.id, now
    ):
        return False
    await schedule_triggers(ctx, tx, template.namespace, template.name, spec, now)
    return True


async def schedule_triggers(
    ctx: Context, tx: Transaction, namespace: str, graph_name: str, spec: GraphSpec, now: int
) -> None:
    """Make sure each cron expression of ``spec`` has its next fire time recorded."""
    after = datetime.fromtimestamp(now / 1000, UTC)
    for expression in sorted({trigger.value.expression for trigger in spec.triggers}):
        fire_at = cron.next_fire(expression, after)
        await tx.insert_trigger(
            {
                "id": new_object_id(),
                "namespace": namespace,
                "graph_name": graph_name,
                "expression": expression,
                "trigger_time": int(fire_at.timestamp() * 1000),
                "trigger_status": TriggerStatus.PENDING.value,
                "expires_at": None,
                "run_id": None,
                "error": None,
            }
        )
