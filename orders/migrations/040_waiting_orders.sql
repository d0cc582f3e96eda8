-- The orders still waiting for stock (pending) or for the sale (confirming), by how long: the
-- age of the oldest pending order is read from it at each Prometheus scrape
-- (orders_pending_oldest_seconds), without scanning every order ever taken. Small: an order
-- leaves it when stock answers.
CREATE INDEX IF NOT EXISTS orders_waiting ON orders (updated_at) WHERE status IN ('pending', 'confirming');
