"""Every SQL statement of the orders service, in one place."""

import uuid
from datetime import datetime
from typing import Any

import asyncpg

ORDER_COLUMNS = (
    "order_id, customer_id, store_id, stores, split, items, status, reason, unavailable, "
    "allocations, reserved_until, created_at, updated_at"
)

# A batch of orders and the events announcing them in ONE statement (group commit): atomic
# without BEGIN/COMMIT round trips, one WAL flush for the whole batch (orders/service.py Intake).
INSERT_ORDERS_ANNOUNCED = f"""
WITH new AS (
    -- stores, items and body come as JSON text: asyncpg would read a list inside an array as a
    -- dimension
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::text[],
                         $7::uuid[], $8::text[], $9::text[], $10::text[])
        AS n(order_id, customer_id, store_id, stores, split, items, event_id, request_id, body, traceparent)
), created AS (
    INSERT INTO orders (order_id, customer_id, store_id, stores, split, items, status)
    SELECT order_id, customer_id, store_id, stores::jsonb, split, items::jsonb, 'pending' FROM new
    RETURNING {ORDER_COLUMNS}
), announced AS (
    -- claimed: published by this process right after the commit (shared/handover.py)
    INSERT INTO outbox (event_id, event_type, correlation_id, request_id, traceparent, body, claimed)
    SELECT event_id, 'PedidoCriado', order_id::text, request_id, traceparent, body::jsonb, true FROM new
    RETURNING id, correlation_id
)
SELECT c.*, a.id AS outbox_id FROM created c JOIN announced a ON a.correlation_id = c.order_id::text
"""

SELECT_ORDER = f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1"

LOCK_ORDER = f"SELECT {ORDER_COLUMNS}, attempt FROM orders WHERE order_id = $1 FOR UPDATE"

# A batch of stock's answers, one round trip before any write: its orders ($1) locked in
# order_id order (so concurrent batches cannot deadlock) and returned as they are once locked
# ('order' rows), then its message ids ($2) recorded in the inbox, those never handled before
# returned ('message' rows). The order locks come first: two copies of one message in two
# batches queue on their order instead of on each other's inbox row.
CLAIM_ANSWERS = """
WITH locked AS (
    SELECT order_id, status, attempt FROM orders WHERE order_id = ANY($1::uuid[]) ORDER BY order_id FOR UPDATE
), fresh AS (
    INSERT INTO inbox (message_id)
    SELECT DISTINCT message_id FROM unnest($2::text[]) AS message_id CROSS JOIN (SELECT count(*) FROM locked) l
    ORDER BY message_id
    ON CONFLICT DO NOTHING RETURNING message_id
)
SELECT 'order' AS kind, order_id, status, attempt, NULL::text AS message_id FROM locked
UNION ALL
SELECT 'message', NULL, NULL, NULL, message_id FROM fresh
"""

# Stock's answers of a batch, each order's final state (orders/service.py apply_answers).
# A null allocations keeps the order's own (orders/domain.py Update).
SET_STATUSES = f"""
UPDATE orders o SET status = n.status, reason = n.reason, unavailable = n.unavailable::jsonb,
                    allocations = coalesce(n.allocations::jsonb, o.allocations),
                    reserved_until = n.reserved_until, updated_at = now()
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
     AS n(order_id, status, reason, unavailable, allocations, reserved_until)
WHERE o.order_id = n.order_id
RETURNING {", ".join(f"o.{c}" for c in ORDER_COLUMNS.split(", "))}
"""

SET_STATUS = f"""
UPDATE orders SET status = $2, reason = $3, unavailable = $4, allocations = $5,
                  reserved_until = $6, attempt = $7, updated_at = now()
WHERE order_id = $1
RETURNING {ORDER_COLUMNS}
"""

LIST_ORDERS = f"""
SELECT {ORDER_COLUMNS} FROM orders
WHERE ($1::text IS NULL OR customer_id = $1)
  AND ($2::text IS NULL OR status = $2)
  AND ($3::timestamptz IS NULL OR (created_at, order_id) < ($3, $4::uuid))
ORDER BY created_at DESC, order_id DESC
LIMIT $5
"""

# One key, one request at a time: a concurrent duplicate fails this lock instead of waiting.
LOCK_IDEMPOTENCY_KEY = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))"
SELECT_IDEMPOTENCY_KEY = """
SELECT request_hash, response FROM idempotency_keys
WHERE key = $1 AND created_at > now() - interval '24 hours'
"""
SAVE_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys (key, request_hash, order_id, response) VALUES ($1, $2, $3, $4)
ON CONFLICT (key) DO UPDATE
SET request_hash = EXCLUDED.request_hash, order_id = EXCLUDED.order_id,
    response = EXCLUDED.response, created_at = now()
"""


def to_order(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "order_id": str(row["order_id"]),
        "customer_id": row["customer_id"],
        "store_id": row["store_id"],
        "stores": row["stores"],
        "split": row["split"],
        "items": row["items"],
        "status": row["status"],
        "reason": row["reason"],
        "unavailable": row["unavailable"],
        "allocations": row["allocations"],
        "reserved_until": _iso(row["reserved_until"]),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def fetch_order(conn: asyncpg.Connection | asyncpg.Pool, order_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow(SELECT_ORDER, order_id)
    return to_order(row) if row else None


# orders_pending_oldest_seconds (migration 040's partial index keeps it cheap)
OLDEST_PENDING_SECONDS = """
SELECT COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(updated_at)), 0)::float8
FROM orders WHERE status = 'pending'
"""

# ----- the reconciler (orders/reconciler.py) ----------------------------------------------------
# Unsettled orders untouched for $1 seconds (neither changed nor asked about), oldest first, at
# most $2; SKIP LOCKED: an order another process is reconciling, or that an answer is being
# applied to, is left to it. A range scan of the partial index orders_waiting (migration 040).
CLAIM_UNSETTLED = f"""
SELECT {ORDER_COLUMNS}, attempt FROM orders
WHERE status IN ('pending', 'confirming')
  AND updated_at < now() - make_interval(secs => $1)
  AND (asked_at IS NULL OR asked_at < now() - make_interval(secs => $1))
ORDER BY updated_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""
MARK_ASKED = "UPDATE orders SET asked_at = now() WHERE order_id = ANY($1::uuid[])"

# ----- retention (shared/retention.py, API.md §6) ----------------------------------------------
# Each deletes at most $1 rows due for deletion, oldest first, over an index, and counts them.
PURGE_IDEMPOTENCY_KEYS = """
WITH gone AS (
    DELETE FROM idempotency_keys WHERE key IN (
        SELECT key FROM idempotency_keys WHERE created_at < now() - interval '24 hours'
        ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING 1)
SELECT count(*) FROM gone
"""
