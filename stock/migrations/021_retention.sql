-- Retention (shared/retention.py) finds inbox entries older than 7 days and the tombstones of
-- orders cancelled more than 7 days ago through these indexes.
CREATE INDEX IF NOT EXISTS inbox_age ON inbox (handled_at);
CREATE INDEX IF NOT EXISTS stock_order_tombstones ON stock_order (updated_at) WHERE state = 'cancelled';
