-- NOTIFY takes a server-wide lock at commit and serialised every committing transaction; the
-- outbox relay is woken in-process and polls instead (shared/outbox.py).
DROP TRIGGER IF EXISTS outbox_written ON outbox;
DROP FUNCTION IF EXISTS notify_outbox();
CREATE INDEX IF NOT EXISTS outbox_by_type ON outbox (event_type, id);
