-- Outbox rows the broker refuses (too large, unroutable, refused by a policy) are tried a bounded
-- number of times, then set aside here with their error so that the rows behind them go out
-- (shared/outbox.py); `dlq outbox` lists them and puts them back. The W3C `traceparent` travels
-- with each row into the message headers, like the request id.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS attempts integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS last_error text;

CREATE TABLE IF NOT EXISTS outbox_set_aside (
    id             bigint PRIMARY KEY,          -- the row's id in the outbox
    event_id       uuid NOT NULL,
    event_type     text NOT NULL,
    correlation_id text,
    request_id     text,
    traceparent    text,
    body           jsonb NOT NULL,
    created_at     timestamptz NOT NULL,
    attempts       integer NOT NULL,
    error          text NOT NULL,
    set_aside_at   timestamptz NOT NULL DEFAULT now()
);
