"""SQLAlchemy Core tables shared by the SQLite and PostgreSQL backends.

Times are integer milliseconds since the Unix epoch (UTC). JSON columns use the
plain ``JSON`` type (not JSONB) so that object key order — which matters for a
state's ``parents`` — survives a round trip on both backends.

The DDL that creates these tables lives in ``store/migrations/<dialect>/``; a
test checks that the migrated schema matches these definitions.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

ID = sa.String(24)
MS = sa.BigInteger

registered_nodes = sa.Table(
    "registered_nodes",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("runtime_name", sa.Text, nullable=False),
    sa.Column("runtime_namespace", sa.Text, nullable=False),
    sa.Column("inputs_schema", sa.JSON, nullable=False),
    sa.Column("outputs_schema", sa.JSON, nullable=False),
    sa.Column("secrets", sa.JSON, nullable=False),
    sa.Column("created_at", MS, nullable=False),
    sa.Column("updated_at", MS, nullable=False),
    sa.UniqueConstraint("namespace", "name", name="uq_registered_nodes_namespace_name"),
)

graph_templates = sa.Table(
    "graph_templates",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    # {"nodes": [...], "retry_policy": {...}, "store_config": {...}, "triggers": [...]}
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("secrets", sa.JSON, nullable=False),  # name -> ciphertext
    sa.Column("validation_status", sa.Text, nullable=False),
    sa.Column("validation_errors", sa.JSON, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),  # bumped by every upsert
    sa.Column("version_id", ID, nullable=True),  # graph_versions row once VALID
    sa.Column("created_at", MS, nullable=False),
    sa.Column("updated_at", MS, nullable=False),
    sa.UniqueConstraint("namespace", "name", name="uq_graph_templates_namespace_name"),
)

# An immutable snapshot of a template revision that passed validation. Runs are
# pinned to one, so re-upserting a template never changes a run in flight.
graph_versions = sa.Table(
    "graph_versions",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("graph_name", sa.Text, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("input_fields", sa.JSON, nullable=False),  # identifier -> [field, ...]
    sa.Column("created_at", MS, nullable=False),
    sa.UniqueConstraint(
        "namespace", "graph_name", "revision", name="uq_graph_versions_namespace_graph_revision"
    ),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("graph_name", sa.Text, nullable=False),
    sa.Column("version_id", ID, nullable=False),
    sa.Column("created_at", MS, nullable=False),
    sa.Column("cancelled_at", MS, nullable=True),  # set once, when the run is cancelled
    sa.Index("ix_runs_namespace_created_at", "namespace", "created_at"),
    sa.Index("ix_runs_created_at", "created_at", "run_id"),  # retention, oldest first
)

store_entries = sa.Table(
    "store_entries",
    metadata,
    sa.Column("run_id", sa.String(36), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

states = sa.Table(
    "states",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("node_name", sa.Text, nullable=False),
    sa.Column("identifier", sa.Text, nullable=False),
    sa.Column("graph_name", sa.Text, nullable=False),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("parents", sa.JSON, nullable=False),  # identifier -> state id, ordered
    # Fan-out groups this state descends from: unites target identifier -> group id.
    sa.Column("groups", sa.JSON, nullable=False),
    # The fan-out group this state is a member of: its own id, or the id of the
    # state whose report created it as a sibling.
    sa.Column("group_id", ID, nullable=False),
    sa.Column("does_unites", sa.Boolean, nullable=False),
    sa.Column("state_fingerprint", sa.String(64), nullable=True),
    sa.Column("enqueue_after", MS, nullable=False),
    sa.Column("retry_count", sa.Integer, nullable=False),
    sa.Column("fanout_id", sa.String(64), nullable=False),
    sa.Column("manual_retry_fanout_id", sa.String(64), nullable=False),
    sa.Column("lease_expires_at", MS, nullable=True),
    sa.Column("claimed_at", MS, nullable=True),
    sa.Column("created_at", MS, nullable=False),
    sa.Column("updated_at", MS, nullable=False),
    # The node's timeout (ms) when the state was created; NULL: the server's lease only.
    sa.Column("timeout_ms", MS, nullable=True),
    sa.UniqueConstraint(
        "run_id", "identifier", "retry_count", "fanout_id", name="uq_states_retry_key"
    ),
    sa.UniqueConstraint("state_fingerprint", name="uq_states_fingerprint"),
    sa.Index("ix_states_run_id", "run_id"),
    sa.Index(
        "ix_states_claimable",
        "namespace",
        "node_name",
        "enqueue_after",
        postgresql_where=sa.text("status = 'CREATED'"),
        sqlite_where=sa.text("status = 'CREATED'"),
    ),
    sa.Index(
        "ix_states_leases",
        "lease_expires_at",
        postgresql_where=sa.text("status = 'QUEUED'"),
        sqlite_where=sa.text("status = 'QUEUED'"),
    ),
)

# One row per fan-out group whose identifier is the target of a ``unites``.
# Counts the group's descendants by bucket so a join costs O(1) per branch.
fanin_groups = sa.Table(
    "fanin_groups",
    metadata,
    sa.Column("group_id", ID, primary_key=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("identifier", sa.Text, nullable=False),
    sa.Column("pending", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
)

cron_triggers = sa.Table(
    "cron_triggers",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("graph_name", sa.Text, nullable=False),
    sa.Column("expression", sa.Text, nullable=False),
    sa.Column("trigger_time", MS, nullable=False),
    sa.Column("trigger_status", sa.Text, nullable=False),
    sa.Column("expires_at", MS, nullable=True),
    sa.Column("run_id", sa.String(36), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.UniqueConstraint(
        "namespace", "graph_name", "expression", "trigger_time", name="uq_cron_triggers_fire"
    ),
    sa.Index("ix_cron_triggers_due", "trigger_status", "trigger_time"),
    sa.Index("ix_cron_triggers_expires_at", "expires_at"),  # purge of fired records
)

# One row per Idempotency-Key given to a trigger (per namespace), written in the same
# transaction as the run it started. ``request_hash`` tells a retry (same body) from a
# reuse of the key for another request (409). Purged once ``expires_at`` has passed.
trigger_keys = sa.Table(
    "trigger_keys",
    metadata,
    sa.Column("namespace", sa.Text, primary_key=True),
    sa.Column("idempotency_key", sa.Text, primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("created_at", MS, nullable=False),
    sa.Column("expires_at", MS, nullable=False),
    sa.Index("ix_trigger_keys_expires_at", "expires_at"),
    sa.Index("ix_trigger_keys_run_id", "run_id"),
)

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", MS, nullable=False),
)
