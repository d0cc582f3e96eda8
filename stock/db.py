"""Every SQL statement of the stock service, in one place.

Lock order (the one rule that keeps concurrent transactions deadlock-free): first each order
involved (an advisory lock on its id, then its `stock_order` row), in order_id order; then
`stock_item` rows in (store_id, sku) order, always taken up front by the LOCK_* statements below
before any item is changed; last, once all item locks are held, each store's feed lock (below),
in store_id order. The order advisory lock exists because an order's first message finds no
row to lock: without it a cancel and its own PedidoCriado, handled at once by two workers, would
both see "no row" and each write blindly over the other."""

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from shared.handover import WRITTEN_COLUMNS
from stock.domain import Change

ITEM_COLUMNS = "store_id, sku, on_hand, reserved, on_hand - reserved AS available, version, updated_at"

LOCK_ITEMS = """
SELECT store_id, sku FROM stock_item
WHERE (store_id, sku) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY store_id, sku
FOR UPDATE
"""

# The EstoqueAlterado body (API.md §6) from a row carrying the figures after a change. The live
# feed builds the same body from the ledger, so a replayed event is identical to the live one.
def _stock_changed(at: str, kind: str) -> str:
    return f"""jsonb_build_object(
        'event_id', event_id, 'event_type', 'EstoqueAlterado', 'occurred_at', {at},
        'store_id', store_id, 'sku', sku, 'on_hand', on_hand, 'reserved', reserved,
        'available', on_hand - reserved, 'version', version, 'kind', {kind})"""


# Applies deltas to items (of any stores), appends one movement per item and announces
# each change (EstoqueAlterado) through the outbox, all in one statement. `at` takes the
# clock after the row lock and never goes below the previous change, so the ledger's times
# never decrease along its versions.
APPLY_CHANGES = f"""
WITH change AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[])
        AS c(store_id, sku, on_hand_delta, reserved_delta)
), updated AS (
    UPDATE stock_item s
    SET on_hand = s.on_hand + c.on_hand_delta,
        reserved = s.reserved + c.reserved_delta,
        version = s.version + 1,
        updated_at = greatest(clock_timestamp(), s.updated_at)
    FROM change c
    WHERE s.store_id = c.store_id AND s.sku = c.sku
    RETURNING s.store_id, s.sku, s.on_hand, s.reserved, s.version, s.updated_at,
              c.on_hand_delta, c.reserved_delta
), event AS (
    SELECT gen_random_uuid() AS event_id, u.* FROM updated u
), moved AS (
    INSERT INTO movement (store_id, sku, version, kind, on_hand_delta, reserved_delta,
                          on_hand, reserved, order_id, at, event_id)
    SELECT store_id, sku, version, $5, on_hand_delta, reserved_delta, on_hand, reserved, $6::uuid,
           updated_at, event_id
    FROM event
), announced AS (
    INSERT INTO outbox (event_id, event_type, correlation_id, request_id, body)
    SELECT event_id, 'EstoqueAlterado', $6::uuid::text, $7, {_stock_changed("updated_at", "$5::text")}
    FROM event
)
SELECT {ITEM_COLUMNS} FROM updated ORDER BY store_id, sku
"""

# Creates items that do not exist yet (version 1, ledger `created`), announced like any change.
CREATE_ITEMS = f"""
WITH created AS (
    INSERT INTO stock_item (store_id, sku, on_hand, reserved, version, updated_at)
    SELECT store_id, sku, on_hand, 0, 1, clock_timestamp()
    FROM unnest($1::text[], $2::text[], $3::int[]) AS n(store_id, sku, on_hand)
    ON CONFLICT DO NOTHING
    RETURNING *
), event AS (
    SELECT gen_random_uuid() AS event_id, 'created' AS kind, c.* FROM created c
), moved AS (
    INSERT INTO movement (store_id, sku, version, kind, on_hand_delta, reserved_delta,
                          on_hand, reserved, order_id, at, event_id)
    SELECT store_id, sku, 1, kind, on_hand, 0, on_hand, 0, NULL, updated_at, event_id FROM event
), announced AS (
    INSERT INTO outbox (event_id, event_type, correlation_id, request_id, body)
    SELECT event_id, 'EstoqueAlterado', NULL, $4, {_stock_changed("updated_at", "kind")}
    FROM event
)
SELECT {ITEM_COLUMNS} FROM created ORDER BY store_id, sku
"""

FEED_AFTER = f"""
SELECT id, {_stock_changed("at", "kind")} AS body
FROM movement WHERE store_id = $1 AND id > $2 ORDER BY id LIMIT $3
"""
FEED_HEAD = "SELECT coalesce(max(id), 0) FROM movement WHERE store_id = $1"

LOCK_ITEM = f"SELECT {ITEM_COLUMNS} FROM stock_item WHERE store_id = $1 AND sku = $2 FOR UPDATE"
SELECT_ITEM = f"SELECT {ITEM_COLUMNS} FROM stock_item WHERE store_id = $1 AND sku = $2"
LIST_ITEMS = f"""
SELECT {ITEM_COLUMNS} FROM stock_item
WHERE store_id = $1 AND ($2::text IS NULL OR sku > $2)
ORDER BY sku LIMIT $3
"""
ITEM_AS_OF = """
SELECT store_id, sku, on_hand, reserved, on_hand - reserved AS available, version, at AS updated_at
FROM movement
WHERE store_id = $1 AND sku = $2 AND at <= $3
ORDER BY at DESC, version DESC LIMIT 1
"""
LIST_MOVEMENTS = """
SELECT kind, on_hand_delta, reserved_delta, on_hand, reserved, order_id, version, at
FROM movement
WHERE store_id = $1 AND sku = $2 AND version > $3
ORDER BY version LIMIT $4
"""

# Takes the advisory lock of each order in $1, in order_id order.
LOCK_ORDER_IDS = """
SELECT pg_advisory_xact_lock(hashtextextended(id::text, 7000003))
FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS id ORDER BY id) ordered
"""
# The feed lock of a store, held from the first movement written until commit: movements of a
# store then take their ids in commit order, so the live feed (cursor = movement id) can never
# pass over a movement that commits later with a smaller id. Only the final writes and the
# commit are serialised per store; all checks happen before it is taken.
_LOCK_FEEDS_OF = """
SELECT pg_advisory_xact_lock(hashtextextended(store_id, 7000004))
FROM (SELECT DISTINCT store_id FROM unnest({stores}) AS store_id ORDER BY store_id) ordered
"""
LOCK_FEEDS = _LOCK_FEEDS_OF.format(stores="$1::text[]")
LOCK_STOCK_ORDER = "SELECT order_id, attempt, state, expires_at FROM stock_order WHERE order_id = $1 FOR UPDATE"
SAVE_STOCK_ORDER = """
INSERT INTO stock_order (order_id, attempt, state, expires_at, updated_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (order_id) DO UPDATE
SET attempt = EXCLUDED.attempt, state = EXCLUDED.state, expires_at = EXCLUDED.expires_at,
    updated_at = now()
"""
# An order's holds, one per (store, sku) it is held in.
TAKE_HOLDS = "DELETE FROM hold WHERE order_id = $1 RETURNING store_id, sku, quantity"
SELECT_HOLDS = """
SELECT order_id, store_id, sku, quantity FROM hold WHERE order_id = ANY($1::uuid[])
ORDER BY order_id, store_id, sku
"""
CLAIM_EXPIRED = """
SELECT order_id, attempt FROM stock_order
WHERE state = 'held' AND expires_at <= clock_timestamp()
ORDER BY expires_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
NOW = "SELECT clock_timestamp()"


async def lock_orders(conn: asyncpg.Connection, order_ids: Sequence[uuid.UUID]) -> None:
    await conn.execute(LOCK_ORDER_IDS, list(order_ids))


async def lock_feeds(conn: asyncpg.Connection, store_ids: Sequence[str]) -> None:
    """Call once every item lock the transaction needs is held (see LOCK_FEEDS)."""
    await conn.execute(LOCK_FEEDS, list(store_ids))


async def create_items(
    conn: asyncpg.Connection, rows: Sequence[tuple[str, str, int]], request_id: str | None
) -> list[asyncpg.Record]:
    """Creates items (version 1, ledger `created`); existing ones are left alone."""
    await lock_feeds(conn, sorted({r[0] for r in rows}))
    return await conn.fetch(CREATE_ITEMS, [r[0] for r in rows], [r[1] for r in rows],
                            [r[2] for r in rows], request_id)


async def lock_items(conn: asyncpg.Connection, keys: Iterable[tuple[str, str]]) -> None:
    """Locks the (store_id, sku) items in the one global order."""
    ordered = sorted(set(keys))
    await conn.execute(LOCK_ITEMS, [k[0] for k in ordered], [k[1] for k in ordered])


async def apply_changes(
    conn: asyncpg.Connection,
    kind: str,
    changes: Sequence[Change],
    order_id: uuid.UUID | None,
    request_id: str | None,
) -> list[asyncpg.Record]:
    """The one place an existing item changes (each change names its store). The caller holds
    the items' locks; the stores' feed locks are taken here, in store order."""
    await lock_feeds(conn, sorted({c.store_id for c in changes}))
    return await conn.fetch(
        APPLY_CHANGES,
        [c.store_id for c in changes],
        [c.sku for c in changes],
        [c.on_hand_delta for c in changes],
        [c.reserved_delta for c in changes],
        kind,
        order_id,
        request_id,
    )


def to_item(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "store_id": row["store_id"],
        "sku": row["sku"],
        "on_hand": row["on_hand"],
        "reserved": row["reserved"],
        "available": row["available"],
        "version": row["version"],
        "updated_at": row["updated_at"].isoformat(),
    }

IMPORT_DUPLICATE = """
SELECT line, store_id, sku FROM (
    SELECT line, store_id, sku, row_number() OVER (PARTITION BY store_id, sku ORDER BY line) AS n
    FROM import_row) r
WHERE n > 1 ORDER BY line LIMIT 1
"""
IMPORT_LOCK_EXISTING = """
SELECT s.store_id, s.sku, s.on_hand, s.reserved, i.on_hand AS new_on_hand, i.line
FROM stock_item s JOIN import_row i USING (store_id, sku)
ORDER BY s.store_id, s.sku
FOR UPDATE OF s
"""
IMPORT_NEW = """
SELECT i.store_id, i.sku, i.on_hand FROM import_row i
WHERE NOT EXISTS (SELECT 1 FROM stock_item s WHERE s.store_id = i.store_id AND s.sku = i.sku)
ORDER BY i.store_id, i.sku
"""

# ----- batch decisions (stock/reserve.py) ---------------------------------------------------
# A batch takes five round trips whatever its size: BEGIN, CLAIM_MESSAGES, LOCK_ROWS,
# SAVE_DECISIONS, COMMIT. Where one statement must take its locks in the lock order, each step
# reads a one-row count of the step before: no row of it can be produced, and so locked, before
# every earlier lock is held.

# The orders' advisory locks ($1), then the inbox: the message ids among $2 never handled
# before. The order locks come first, so two copies of one message in two batches queue on
# their order instead of deadlocking on each other's inbox row. (The inbox's ON CONFLICT sees
# what committed while this statement waited; a read would not: see LOCK_ROWS.)
CLAIM_MESSAGES = f"""
WITH orders AS (SELECT count(*) AS locked FROM ({LOCK_ORDER_IDS}) l)
INSERT INTO inbox (message_id)
SELECT DISTINCT message_id FROM unnest($2::text[]) AS message_id CROSS JOIN orders
ORDER BY message_id
ON CONFLICT DO NOTHING RETURNING message_id
"""
# The orders' stock_order rows ('order' rows), then the items of every line ($2, $3; 'item'
# rows), locked. A statement of its own, after the order locks are held: its snapshot then
# includes what another transaction holding them committed (a cancel's tombstone, say), which
# one statement that waited for those locks would not see.
LOCK_ROWS = """
WITH known AS (
    SELECT order_id, attempt, state FROM stock_order
    WHERE order_id = ANY($1::uuid[])
    ORDER BY order_id FOR UPDATE
), items AS (
    SELECT s.store_id, s.sku, s.on_hand, s.reserved, s.version, s.updated_at
    FROM stock_item s CROSS JOIN (SELECT count(*) FROM known) after_orders
    WHERE (s.store_id, s.sku) IN (SELECT * FROM unnest($2::text[], $3::text[]))
    ORDER BY s.store_id, s.sku FOR UPDATE OF s
)
SELECT 'order' AS kind, order_id, attempt, state, NULL::text AS store_id, NULL::text AS sku,
       NULL::int AS on_hand, NULL::int AS reserved, NULL::bigint AS version,
       NULL::timestamptz AS updated_at, clock_timestamp() AS now
FROM known
UNION ALL
SELECT 'item', NULL, NULL, NULL, store_id, sku, on_hand, reserved, version, updated_at, clock_timestamp()
FROM items
"""
# Every write of a batch: the orders' decisions ($1-$4), the holds as movements with their
# EstoqueAlterado ($5-$14: one per (order, store, sku), deltas and figures after it as the
# domain computed them; an item's new figures are those of its last movement, its holds are the
# movements themselves) and the orders' AtualizarStatus ($15-$18). The feed locks
# (LOCK_FEEDS) come first: the movement insert reads them, so no movement takes its id before
# the store's feed is held. Waiting for them inside this statement is safe (unlike in
# LOCK_ROWS): it reads nothing but its parameters and rows this transaction holds locked.
SAVE_DECISIONS = f"""
WITH decided AS (
    INSERT INTO stock_order (order_id, attempt, state, expires_at, updated_at)
    SELECT *, now() FROM unnest($1::uuid[], $2::int[], $3::text[], $4::timestamptz[])
    ON CONFLICT (order_id) DO UPDATE
    SET attempt = EXCLUDED.attempt, state = EXCLUDED.state, expires_at = EXCLUDED.expires_at,
        updated_at = now()
), m AS (
    SELECT gen_random_uuid() AS event_id, * FROM unnest(
        $5::text[], $6::text[], $7::bigint[], $8::int[], $9::int[], $10::int[], $11::int[],
        $12::uuid[], $13::timestamptz[], $14::text[])
        AS m(store_id, sku, version, on_hand_delta, reserved_delta, on_hand, reserved, order_id,
             at, request_id)
), feeds AS (
    SELECT count(*) AS stores FROM ({_LOCK_FEEDS_OF.format(stores="$5::text[]")}) l
), moved AS (
    INSERT INTO movement (store_id, sku, version, kind, on_hand_delta, reserved_delta,
                          on_hand, reserved, order_id, at, event_id)
    SELECT store_id, sku, version, 'reserved', on_hand_delta, reserved_delta, on_hand, reserved,
           order_id, at, event_id
    FROM m CROSS JOIN feeds ORDER BY store_id, sku, version
), held AS (
    INSERT INTO hold (order_id, store_id, sku, quantity)
    SELECT order_id, store_id, sku, reserved_delta FROM m
), items AS (
    UPDATE stock_item s SET on_hand = last.on_hand, reserved = last.reserved,
                            version = last.version, updated_at = last.at
    FROM (SELECT DISTINCT ON (store_id, sku) * FROM m ORDER BY store_id, sku, version DESC) last
    WHERE s.store_id = last.store_id AND s.sku = last.sku
), changes AS (
    INSERT INTO outbox (event_id, event_type, correlation_id, request_id, body, claimed)
    SELECT event_id, 'EstoqueAlterado', order_id::text, request_id, {_stock_changed("at", "'reserved'")}, true
    FROM m ORDER BY store_id, sku, version
    RETURNING {WRITTEN_COLUMNS}
), answers AS (
    INSERT INTO outbox (event_id, event_type, correlation_id, request_id, body, traceparent, claimed)
    SELECT event_id, 'AtualizarStatus', correlation_id, request_id, body, traceparent, true
    FROM unnest($15::uuid[], $16::text[], $17::text[], $18::jsonb[], $19::text[])
        AS a(event_id, correlation_id, request_id, body, traceparent)
    RETURNING {WRITTEN_COLUMNS}
)
-- claimed: this worker publishes them right after its commit (shared/handover.py)
SELECT * FROM answers UNION ALL SELECT * FROM changes
"""
IMPORT_STORES = "SELECT DISTINCT store_id FROM import_row ORDER BY store_id"

# Answers again, with a new event id, orders ($1) asked again for an attempt ($2) already
# decided (stock/reserve.py asked_again): the last answer given (stock_answer, kept by a trigger
# on the outbox, migration 020), or for an order answered before answers were kept, one made
# from its state ($3, $4: request ids and traceparents). Reads only; the caller holds the orders' locks.
ANSWER_AGAIN = f"""
INSERT INTO outbox (event_id, event_type, correlation_id, request_id, traceparent, body, claimed)
SELECT event_id, 'AtualizarStatus', order_id::text, request_id, traceparent,
       body || jsonb_build_object('event_id', event_id, 'occurred_at', clock_timestamp()), true
FROM (
    SELECT gen_random_uuid() AS event_id, o.order_id, r.request_id, r.traceparent, coalesce(a.body, jsonb_build_object(
        'event_type', 'AtualizarStatus', 'order_id', o.order_id, 'attempt', o.attempt,
        'status', CASE o.state WHEN 'held' THEN 'EstoqueReservado'
                               WHEN 'rejected' THEN 'EstoqueNaoDisponivel'
                               WHEN 'sold' THEN 'EstoqueBaixado'
                               WHEN 'expired' THEN 'ReservaExpirada'
                               ELSE 'ReservaLiberada' END,
        'reserved_until', CASE WHEN o.state = 'held' THEN o.expires_at END,
        'allocations', CASE WHEN o.state = 'held' THEN (
            SELECT coalesce(jsonb_agg(jsonb_build_object('store_id', h.store_id, 'sku', h.sku,
                                                         'quantity', h.quantity)
                                      ORDER BY h.store_id, h.sku), '[]'::jsonb)
            FROM hold h WHERE h.order_id = o.order_id) ELSE '[]'::jsonb END,
        'unavailable', '[]'::jsonb, 'reason', NULL)) AS body
    FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[]) AS r(order_id, attempt, request_id, traceparent)
    JOIN stock_order o ON o.order_id = r.order_id AND o.attempt = r.attempt
    LEFT JOIN stock_answer a ON a.order_id = o.order_id AND a.attempt = o.attempt
    -- a tombstone (cancelled before stock decided anything) was never answered: nobody waits
    -- on it (the order is cancelled in orders), so a late PedidoCriado still gets silence
    WHERE NOT (o.state = 'cancelled' AND a.body IS NULL)
) again
RETURNING {WRITTEN_COLUMNS}
"""

# holds_overdue_seconds: how far the expiry sweep is behind (stock_order_expiring keeps it cheap)
OLDEST_OVERDUE_HOLD_SECONDS = """
SELECT COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(expires_at)), 0)::float8
FROM stock_order WHERE state = 'held' AND expires_at <= clock_timestamp()
"""

# ----- retention (shared/retention.py, API.md §6) ----------------------------------------------
# Each deletes at most $1 rows due for deletion, oldest first, over an index, and counts them.
# A cancelled order's row (its tombstone: a late PedidoCriado finds it and holds nothing) and
# its last answer. Held lines never belong to a cancelled order: they went when it was released.
PURGE_TOMBSTONES = """
WITH gone AS (
    DELETE FROM stock_order WHERE order_id IN (
        SELECT order_id FROM stock_order
        WHERE state = 'cancelled' AND updated_at < now() - interval '7 days'
        ORDER BY updated_at LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING order_id
), answers AS (
    DELETE FROM stock_answer a USING gone WHERE a.order_id = gone.order_id
)
SELECT count(*) FROM gone
"""
