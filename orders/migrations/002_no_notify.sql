-- NOTIFY takes a server-wide lock at commit and serialised every committing transaction; the
-- outbox relay and the long-poll waiters are woken in-process and poll instead (shared/outbox.py).
DROP TRIGGER IF EXISTS outbox_written ON outbox;
DROP FUNCTION IF EXISTS notify_outbox();
DROP TRIGGER IF EXISTS orders_status_changed ON orders;
DROP FUNCTION IF EXISTS notify_order_status();
CREATE INDEX IF NOT EXISTS outbox_by_type ON outbox (event_type, id);
