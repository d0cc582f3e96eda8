"""The stock side's invariants, checked against the stock database itself. Shared by the tests
(integration, e2e, faults) and the benchmark, so it lives here and not under tests/: bench/
imports nothing from tests/."""

import asyncpg


async def check_stock_invariants(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, int]]:
    """Checks, for every item: 0 <= reserved <= on_hand; the held lines add up to `reserved`;
    the ledger is gap-free by version, its times never decrease, and it replays to the figures.
    Returns the figures by (store, sku).

    All reads share one snapshot (REPEATABLE READ): read one by one, a sweep committing between
    two of them would look like a broken invariant."""
    if conn.is_in_transaction():
        return await _check_stock_invariants(conn)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _check_stock_invariants(conn)


async def _check_stock_invariants(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, int]]:
    items = {(r["store_id"], r["sku"]): dict(r) for r in await conn.fetch(
        "SELECT store_id, sku, on_hand, reserved, version FROM stock_item")}
    holds = {(r["store_id"], r["sku"]): r["held"] for r in await conn.fetch(
        "SELECT store_id, sku, sum(quantity) AS held FROM hold GROUP BY 1, 2")}
    ledger = {(r["store_id"], r["sku"]): r for r in await conn.fetch("""
        SELECT store_id, sku, sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved,
               count(*) AS n, min(version) AS first, max(version) AS last,
               bool_and(ok_time) AS times_ok
        FROM (SELECT *, at >= coalesce(lag(at) OVER w, at) AS ok_time FROM movement
              WINDOW w AS (PARTITION BY store_id, sku ORDER BY version)) m
        GROUP BY 1, 2""")}
    for key, item in items.items():
        assert 0 <= item["reserved"] <= item["on_hand"], (key, item)
        assert holds.get(key, 0) == item["reserved"], (key, item, holds.get(key))
        entry = ledger[key]
        assert (entry["on_hand"], entry["reserved"]) == (item["on_hand"], item["reserved"]), (key, item, dict(entry))
        assert (entry["first"], entry["last"], entry["n"]) == (1, item["version"], item["version"]), (key, dict(entry))
        assert entry["times_ok"], key
    held_orders = await conn.fetchval("""
        SELECT count(*) FROM stock_order o
        WHERE o.state = 'held' AND NOT EXISTS (SELECT 1 FROM hold r WHERE r.order_id = o.order_id)""")
    assert held_orders == 0, "an order is 'held' without held lines"
    stray = await conn.fetchval("""
        SELECT count(*) FROM hold r JOIN stock_order o USING (order_id) WHERE o.state <> 'held'""")
    assert stray == 0, "held lines belong to an order that is no longer held"
    return items
