"""What the system itself recorded, read from its databases after a run: when each order was
created and decided (the orders service's own timestamps), and whether the figures add up.

Server latency is `updated_at - created_at` of the decision (pending -> reserved/rejected), on
the database's clock: it starts when the order's transaction began, so it leaves out the HTTP
path in front of it that the client latency includes."""

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from bench.load import summarize
from bench.probes import process_usage
from tooling.invariants import check_stock_invariants

# A run's orders are those with its store among their candidate stores (a one-store order has
# stores = [store_id]; a several-store run lists its first store in every order).
ORDERS_OF_STORE = "SELECT order_id, status, created_at, updated_at FROM orders WHERE stores ? $1"
UNSETTLED_COUNT = """
SELECT count(*) FILTER (WHERE status IN ('pending', 'confirming')) FROM orders WHERE stores ? $1
"""
# Units per sku held or sold in the store by the orders in the given statuses (their allocations).
UNITS_BY_SKU = """
SELECT a->>'sku' AS sku, sum((a->>'quantity')::int) AS units
FROM orders, jsonb_array_elements(allocations) AS a
WHERE stores ? $1 AND status = ANY($2::text[]) AND a->>'store_id' = $1
GROUP BY 1
"""
STOCK_OF_STORE = "SELECT sku, on_hand, reserved FROM stock_item WHERE store_id = $1"


async def wait_drained(orders_dsn: str, store: str, timeout: float) -> int:
    """Waits (bounded) until no order of `store` is pending or confirming; returns how many still are."""
    conn = await asyncpg.connect(orders_dsn)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = await conn.fetchval(UNSETTLED_COUNT, store)
            if left == 0 or asyncio.get_running_loop().time() > deadline:
                return int(left)
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def order_outcomes(
    orders_dsn: str, store: str, decided_at: dict[str, datetime] | None = None,
) -> dict[str, Any]:
    """Statuses, settled orders/s and server latency of the orders of `store`.

    `decided_at` gives the decision time of orders that moved on afterwards (confirmed or
    cancelled by the client), whose `updated_at` no longer is the decision's."""
    overrides = decided_at or {}
    conn = await asyncpg.connect(orders_dsn)
    try:
        rows = await conn.fetch(ORDERS_OF_STORE, store)
    finally:
        await conn.close()
    statuses = Counter(r["status"] for r in rows)
    created, decisions, latencies = [], [], []
    for r in rows:
        created.append(r["created_at"])
        if r["status"] == "pending":
            continue
        at = overrides.get(str(r["order_id"]), r["updated_at"])
        decisions.append(at)
        latencies.append((at - r["created_at"]).total_seconds() * 1000)
    window = (max(decisions) - min(created)).total_seconds() if decisions else 0.0
    return {
        "orders_in_db": len(rows),
        "statuses": dict(statuses),
        "decided": len(decisions),
        "undecided": statuses.get("pending", 0),
        "settle_window_s": round(window, 3),
        "settled_per_s": round(len(decisions) / window, 1) if window > 0 else None,
        "server_latency_ms": summarize(latencies),
    }


async def check_invariants(
    orders_dsn: str, stock_dsn: str, store: str, initial_on_hand: dict[str, int],
    compare_with_orders: bool = True, timeout: float = 30,
) -> dict[str, Any]:
    """The stock figures against each other (tooling.invariants.check_stock_invariants) and, once every
    order is settled, against the orders: per sku, reserved units == units of reserved orders,
    and units sold == units of confirmed orders. Cancels release asynchronously, so the
    comparison is retried until the deadline before it counts as a failure."""
    result: dict[str, Any] = {"reserved_and_sold_match_orders": None}  # None: not checked
    if compare_with_orders:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            mismatches = await _compare_with_orders(orders_dsn, stock_dsn, store, initial_on_hand)
            if not mismatches or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)
        result["reserved_and_sold_match_orders"] = not mismatches
        if mismatches:
            result["mismatches"] = mismatches[:10]
            result["mismatch_count"] = len(mismatches)
    conn = await asyncpg.connect(stock_dsn)
    try:
        # One snapshot for all its queries: consistent even if workers are still busy.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await check_stock_invariants(conn)
        result["stock_invariants"] = True
    except AssertionError as exc:
        result["stock_invariants"] = False
        result["stock_invariants_error"] = str(exc)[:500]
    finally:
        await conn.close()
    return result


async def _compare_with_orders(
    orders_dsn: str, stock_dsn: str, store: str, initial_on_hand: dict[str, int],
) -> list[dict[str, Any]]:
    orders = await asyncpg.connect(orders_dsn)
    try:
        held = {r["sku"]: r["units"] for r in await orders.fetch(UNITS_BY_SKU, store, ["reserved", "confirming"])}
        sold = {r["sku"]: r["units"] for r in await orders.fetch(UNITS_BY_SKU, store, ["confirmed"])}
    finally:
        await orders.close()
    stock = await asyncpg.connect(stock_dsn)
    try:
        items = await stock.fetch(STOCK_OF_STORE, store)
    finally:
        await stock.close()
    mismatches = []
    for item in items:
        sku = item["sku"]
        units_sold = initial_on_hand.get(sku, item["on_hand"]) - item["on_hand"]
        if item["reserved"] != held.get(sku, 0) or units_sold != sold.get(sku, 0):
            mismatches.append({"sku": sku, "stock_reserved": item["reserved"],
                               "orders_reserved_units": held.get(sku, 0), "stock_sold": units_sold,
                               "orders_confirmed_units": sold.get(sku, 0)})
    return mismatches


async def wait_outbox_empty(dsn: str, timeout: float) -> float:
    """Waits (bounded) until the service's outbox is empty; returns the seconds it took.

    Seeding writes one EstoqueAlterado per item into the stock outbox, and the relay publishes
    the outbox in order: orders decided before it drained would wait behind the import."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    conn = await asyncpg.connect(dsn)
    try:
        while await conn.fetchval("SELECT count(*) FROM outbox") and loop.time() - started < timeout:
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return round(loop.time() - started, 2)


@asynccontextmanager
async def outbox_backlog(orders_dsn: str, stock_dsn: str, every: float = 0.5) -> AsyncIterator[dict[str, Any]]:
    """Samples both outboxes' backlog while the block runs: where events pile up is where the
    pipeline is slowest. Yields the dict it fills (max and mean of each)."""
    figures: dict[str, Any] = {}
    samples: dict[str, list[int]] = {"orders": [], "stock": []}
    conns = {"orders": await asyncpg.connect(orders_dsn), "stock": await asyncpg.connect(stock_dsn)}

    async def sample() -> None:
        while True:
            for name, conn in conns.items():
                samples[name].append(await conn.fetchval("SELECT count(*) FROM outbox"))
            await asyncio.sleep(every)

    task = asyncio.create_task(sample())
    try:
        yield figures
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for conn in conns.values():
            await conn.close()
        for name, values in samples.items():
            figures[f"{name}_outbox_max"] = max(values, default=0)
            figures[f"{name}_outbox_mean"] = round(sum(values) / len(values), 1) if values else 0


ACTIVE_BACKENDS = """
SELECT datname, coalesce(wait_event_type || ':' || wait_event, 'on CPU') AS state
FROM pg_stat_activity
WHERE datname = ANY($1::text[]) AND state <> 'idle' AND pid <> pg_backend_pid()
"""


@asynccontextmanager
async def database_waits(admin_dsn: str | None, dsns: list[str], every: float = 0.25,
                         ) -> AsyncIterator[dict[str, float]]:
    """What the system's PostgreSQL sessions were doing while the block ran: the mean number of
    non-idle sessions per database and wait event (e.g. `Lock:object` is NOTIFY's commit lock,
    `IO:WALSync` the commit flush). Needs the superuser DSN to see every role's sessions."""
    means: dict[str, float] = {}
    if admin_dsn is None:
        yield means
        return
    names = [urlsplit(dsn).path.lstrip("/") for dsn in dsns]
    counts: Counter[str] = Counter()
    samples = 0
    conn = await asyncpg.connect(admin_dsn)

    async def sample() -> None:
        nonlocal samples
        while True:
            for row in await conn.fetch(ACTIVE_BACKENDS, names):
                counts[f"{row['datname'].split('_')[0]} {row['state']}"] += 1
            samples += 1
            await asyncio.sleep(every)

    task = asyncio.create_task(sample())
    try:
        yield means
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await conn.close()
        means.update({k: round(v / max(samples, 1), 2) for k, v in counts.most_common(8)})


@asynccontextmanager
async def cpu_usage(pids: dict[str, int]) -> AsyncIterator[dict[str, dict[str, Any]]]:
    """CPU each part used while the block ran (bench.probes: our processes only): `cores` (share
    of one core; the busiest one is the first suspect for a bottleneck), `seconds` (to divide by
    the orders it served) and `counters` (wake-ups and system calls too)."""
    usage: dict[str, dict[str, Any]] = {"cores": {}, "seconds": {}, "counters": {}}
    async with process_usage(pids) as measured:
        yield usage
    usage.update(cores=measured.cores(), seconds=measured.cpu_seconds(), counters=measured.parts)


def new_store() -> str:
    """A store of its own per measured run: runs never see each other's orders or items."""
    return f"bench-{uuid.uuid4().hex[:8]}"
