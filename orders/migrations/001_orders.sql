-- The orders service's own database: orders, idempotency keys, outbox and inbox.
CREATE TABLE orders (
    order_id       uuid PRIMARY KEY,
    customer_id    text NOT NULL,
    store_id       text NOT NULL,
    items          jsonb NOT NULL,
    status         text NOT NULL CHECK (status IN
                     ('pending', 'reserved', 'rejected', 'confirming', 'confirmed', 'cancelled', 'expired')),
    attempt        integer NOT NULL DEFAULT 1,
    reason         text,
    unavailable    jsonb NOT NULL DEFAULT '[]',
    reserved_until timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- Newest first, optionally per customer and status; the cursor is (created_at, order_id).
CREATE INDEX orders_newest ON orders (created_at DESC, order_id DESC);
CREATE INDEX orders_customer_newest ON orders (customer_id, created_at DESC, order_id DESC);

-- Long-poll waiters (GET /orders/{id}?wait=) wake on this instead of polling the table.
CREATE FUNCTION notify_order_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('order_status', NEW.order_id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER orders_status_changed AFTER UPDATE OF status ON orders
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION notify_order_status();

CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    request_hash text NOT NULL,
    order_id     uuid NOT NULL,
    response     jsonb NOT NULL, -- the first answer's body: a replay returns exactly it
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);

CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    event_id       uuid NOT NULL,
    event_type     text NOT NULL,
    correlation_id text,
    request_id     text,
    body           jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_written AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();

CREATE TABLE inbox (
    message_id text PRIMARY KEY,
    handled_at timestamptz NOT NULL DEFAULT now()
);
