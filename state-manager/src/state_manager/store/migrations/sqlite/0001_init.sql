-- Initial schema.

CREATE TABLE cron_triggers (
	id VARCHAR(24) NOT NULL, 
	namespace TEXT NOT NULL, 
	graph_name TEXT NOT NULL, 
	expression TEXT NOT NULL, 
	trigger_time BIGINT NOT NULL, 
	trigger_status TEXT NOT NULL, 
	expires_at BIGINT, 
	run_id VARCHAR(36), 
	error TEXT, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_cron_triggers_fire UNIQUE (namespace, graph_name, expression, trigger_time)
);

CREATE INDEX ix_cron_triggers_due ON cron_triggers (trigger_status, trigger_time);

CREATE TABLE fanin_groups (
	group_id VARCHAR(24) NOT NULL, 
	run_id VARCHAR(36) NOT NULL, 
	identifier TEXT NOT NULL, 
	pending INTEGER NOT NULL, 
	failed INTEGER NOT NULL, 
	PRIMARY KEY (group_id)
);

CREATE TABLE graph_templates (
	id VARCHAR(24) NOT NULL, 
	namespace TEXT NOT NULL, 
	name TEXT NOT NULL, 
	spec JSON NOT NULL, 
	secrets JSON NOT NULL, 
	validation_status TEXT NOT NULL, 
	validation_errors JSON NOT NULL, 
	revision INTEGER NOT NULL, 
	version_id VARCHAR(24), 
	created_at BIGINT NOT NULL, 
	updated_at BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_graph_templates_namespace_name UNIQUE (namespace, name)
);

CREATE TABLE graph_versions (
	id VARCHAR(24) NOT NULL, 
	namespace TEXT NOT NULL, 
	graph_name TEXT NOT NULL, 
	revision INTEGER NOT NULL, 
	spec JSON NOT NULL, 
	input_fields JSON NOT NULL, 
	created_at BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_graph_versions_namespace_graph_revision UNIQUE (namespace, graph_name, revision)
);

CREATE TABLE registered_nodes (
	id VARCHAR(24) NOT NULL, 
	namespace TEXT NOT NULL, 
	name TEXT NOT NULL, 
	runtime_name TEXT NOT NULL, 
	runtime_namespace TEXT NOT NULL, 
	inputs_schema JSON NOT NULL, 
	outputs_schema JSON NOT NULL, 
	secrets JSON NOT NULL, 
	created_at BIGINT NOT NULL, 
	updated_at BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_registered_nodes_namespace_name UNIQUE (namespace, name)
);

CREATE TABLE runs (
	run_id VARCHAR(36) NOT NULL, 
	namespace TEXT NOT NULL, 
	graph_name TEXT NOT NULL, 
	version_id VARCHAR(24) NOT NULL, 
	created_at BIGINT NOT NULL, 
	PRIMARY KEY (run_id)
);

CREATE INDEX ix_runs_namespace_created_at ON runs (namespace, created_at);

CREATE TABLE states (
	id VARCHAR(24) NOT NULL, 
	namespace TEXT NOT NULL, 
	node_name TEXT NOT NULL, 
	identifier TEXT NOT NULL, 
	graph_name TEXT NOT NULL, 
	run_id VARCHAR(36) NOT NULL, 
	status TEXT NOT NULL, 
	inputs JSON NOT NULL, 
	outputs JSON NOT NULL, 
	data JSON NOT NULL, 
	error TEXT, 
	parents JSON NOT NULL, 
	groups JSON NOT NULL, 
	group_id VARCHAR(24) NOT NULL, 
	does_unites BOOLEAN NOT NULL, 
	state_fingerprint VARCHAR(64), 
	enqueue_after BIGINT NOT NULL, 
	retry_count INTEGER NOT NULL, 
	fanout_id VARCHAR(64) NOT NULL, 
	manual_retry_fanout_id VARCHAR(64) NOT NULL, 
	lease_expires_at BIGINT, 
	claimed_at BIGINT, 
	created_at BIGINT NOT NULL, 
	updated_at BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_states_retry_key UNIQUE (run_id, identifier, retry_count, fanout_id), 
	CONSTRAINT uq_states_fingerprint UNIQUE (state_fingerprint)
);

CREATE INDEX ix_states_claimable ON states (namespace, node_name, enqueue_after) WHERE status = 'CREATED';

CREATE INDEX ix_states_leases ON states (lease_expires_at) WHERE status = 'QUEUED';

CREATE INDEX ix_states_run_id ON states (run_id);

CREATE TABLE store_entries (
	run_id VARCHAR(36) NOT NULL, 
	"key" TEXT NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY (run_id, "key")
);
