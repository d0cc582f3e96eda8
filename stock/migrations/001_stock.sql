-- The stock service's own database.
-- The invariant 0 <= reserved <= on_hand is a constraint: a bug fails loudly instead of overselling.
CREATE TABLE stock_item (
    store_id   text NOT NULL,
    sku        text NOT NULL,
    on_hand    integer NOT NULL,
    reserved   integer NOT NULL DEFAULT 0,
    version    bigint NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (store_id, sku),
    CONSTRAINT reserved_within_on_hand CHECK (reserved >= 0 AND reserved <= on_hand)
);

-- The ledger: one movement per change of an item, carrying the figures after it, so that
-- replaying the deltas gives today's figures and `as_of` is one index lookup.
CREATE TABLE movement (
    id             bigserial PRIMARY KEY,
    store_id       text NOT NULL,
    sku            text NOT NULL,
    version        bigint NOT NULL,
    kind           text NOT NULL CHECK (kind IN
                     ('created', 'adjusted', 'restocked', 'reserved', 'released', 'expired', 'sold')),
    on_hand_delta  integer NOT NULL,
    reserved_delta integer NOT NULL,
    on_hand        integer NOT NULL,
    reserved       integer NOT NULL,
    order_id       uuid,
    at             timestamptz NOT NULL,
    event_id       uuid NOT NULL,  -- the EstoqueAlterado that announced it: the live feed replays it
    UNIQUE (store_id, sku, version)
);
CREATE INDEX movement_as_of ON movement (store_id, sku, at DESC, version DESC);
CREATE INDEX movement_store_feed ON movement (store_id, id);

-- An order as stock knows it: the attempt it is at and the state of its hold.
-- A cancel that arrives before the order leaves a 'cancelled' row (a tombstone), so the late
-- PedidoCriado holds nothing.
CREATE TABLE stock_order (
    order_id   uuid PRIMARY KEY,
    store_id   text NOT NULL,
    attempt    integer NOT NULL,
    state      text NOT NULL CHECK (state IN ('held', 'rejected', 'sold', 'released', 'expired', 'cancelled')),
    expires_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_order_expiring ON stock_order (expires_at) WHERE state = 'held';

-- The held lines (a reservation) of orders in state 'held'; deleted when sold, released or expired.
CREATE TABLE reservation (
    order_id uuid NOT NULL REFERENCES stock_order (order_id),
    store_id text NOT NULL,
    sku      text NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, sku),
    FOREIGN KEY (store_id, sku) REFERENCES stock_item (store_id, sku)
);
CREATE INDEX reservation_item ON reservation (store_id, sku);

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
