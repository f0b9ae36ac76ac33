-- Run cancellation and node timeouts.

-- When the run was cancelled (ms); NULL while it is not.
ALTER TABLE runs ADD COLUMN cancelled_at BIGINT;

-- A state's timeout (ms), fixed when it is created from its node (or graph) template;
-- NULL: only the server's lease applies.
ALTER TABLE states ADD COLUMN timeout_ms BIGINT;
