-- Rows a hot writer publishes itself, from memory, right after its commit (shared/handover.py):
-- a relay leaves a claimed row alone unless it is old enough for its writer to have died
-- (shared/outbox.py ORPHAN_SECONDS). Adding a column with a constant default rewrites nothing.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claimed boolean NOT NULL DEFAULT false;
