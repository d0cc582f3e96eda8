-- The last answer (AtualizarStatus body) stock gave each order, so that an order asked again for
-- an attempt already decided gets the same decision again (API.md §6: an order whose
-- PedidoCriado or answer was lost is decided again; stock must re-answer, not ignore it).
-- Kept by a statement trigger on the outbox, so every path that answers (the batch decisions,
-- confirm, cancel, the expiry sweep) is covered without each having to remember it; one
-- set-based upsert per statement, only for AtualizarStatus rows.
CREATE TABLE IF NOT EXISTS stock_answer (
    order_id    uuid PRIMARY KEY,
    attempt     integer NOT NULL,
    body        jsonb NOT NULL,
    answered_at timestamptz NOT NULL
);

CREATE OR REPLACE FUNCTION keep_stock_answer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stock_answer AS a (order_id, attempt, body, answered_at)
    SELECT DISTINCT ON (order_id) order_id, attempt, body, occurred_at FROM (
        SELECT (body->>'order_id')::uuid AS order_id, (body->>'attempt')::int AS attempt, body,
               (body->>'occurred_at')::timestamptz AS occurred_at, id
        FROM written WHERE event_type = 'AtualizarStatus') n
    ORDER BY order_id, attempt DESC, occurred_at DESC, id DESC
    ON CONFLICT (order_id) DO UPDATE
    SET attempt = EXCLUDED.attempt, body = EXCLUDED.body, answered_at = EXCLUDED.answered_at
    -- an old answer sent again (the dlq command re-inserts parked rows) never replaces a newer one
    WHERE (EXCLUDED.attempt, EXCLUDED.answered_at) >= (a.attempt, a.answered_at);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS outbox_keeps_answers ON outbox;
CREATE TRIGGER outbox_keeps_answers AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION keep_stock_answer();
