-- Trigger idempotency keys, and an index for run retention.

-- One row per (namespace, Idempotency-Key) seen on a trigger, written in the same
-- transaction as the run it started; the primary key makes concurrent duplicates
-- create one run. Rows are purged once expires_at has passed.
CREATE TABLE trigger_keys (
	namespace TEXT NOT NULL, 
	idempotency_key TEXT NOT NULL, 
	request_hash VARCHAR(64) NOT NULL, 
	run_id VARCHAR(36) NOT NULL, 
	created_at BIGINT NOT NULL, 
	expires_at BIGINT NOT NULL, 
	PRIMARY KEY (namespace, idempotency_key)
);

CREATE INDEX ix_trigger_keys_expires_at ON trigger_keys (expires_at);

CREATE INDEX ix_trigger_keys_run_id ON trigger_keys (run_id);

-- Retention walks runs oldest first, across namespaces.
CREATE INDEX ix_runs_created_at ON runs (created_at, run_id);

-- The purge of fired cron records finds them by expiry, not by scanning every fired one.
CREATE INDEX ix_cron_triggers_expires_at ON cron_triggers (expires_at);
