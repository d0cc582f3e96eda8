-- Retention (shared/retention.py) finds the inbox entries older than 7 days through this index
-- (idempotency keys already have idempotency_keys_age).
CREATE INDEX IF NOT EXISTS inbox_age ON inbox (handled_at);
