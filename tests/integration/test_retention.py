"""Retention (API.md §6) against real PostgreSQL: idempotency keys go 24 h after use, inbox
entries (both services) and the tombstones of cancelled orders after 7 days; fresh rows, every
other order and the ledger stay. Several processes purging at once delete each row once."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from orders.main import PURGES as ORDERS_PURGES
from shared.db import create_pool, migrate
from shared.retention import Purge, purge_once
from shared.settings import Settings
from stock.worker import PURGES as STOCK_PURGES
from tooling.devenv import local_servers
from tooling.migrate import MIGRATIONS

DAY = 86400.0
pytestmark = pytest.mark.usefixtures("infrastructure")


@asynccontextmanager
async def database(service: str) -> AsyncIterator[str]:
    """A migrated database of `service` of its own, with no process running on it."""
    settings = Settings()
    pg, _ = local_servers(settings)
    assert pg is not None
    url = settings.orders_database_url if service == "orders" else settings.stock_database_url
    dsn = urlunsplit(urlsplit(url)._replace(path=f"/{service}_rt{uuid.uuid4().hex[:8]}"))
    await pg.ensure_database(dsn, fresh=True)
    await migrate(pg.migrator_dsn(dsn), MIGRATIONS[service])
    try:
        yield dsn
    finally:
        conn = await asyncpg.connect(pg.admin_dsn())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(dsn).path[1:]}" WITH (FORCE)')
        finally:
            await conn.close()


async def inbox(conn: asyncpg.Connection, count: int, age: float) -> set[str]:
    ids = {f"m-{uuid.uuid4()}" for _ in range(count)}
    await conn.execute("INSERT INTO inbox (message_id, handled_at) "
                       "SELECT unnest($1::text[]), now() - make_interval(secs => $2)", list(ids), age)
    return ids


async def purge_concurrently(dsn: str, purges: list[Purge], processes: int = 6) -> dict[str, int]:
    """`processes` pools purging at once, each until it has nothing more to do; the total."""
    pools = [await create_pool(dsn, 2) for _ in range(processes)]
    try:
        async def until_done(pool: asyncpg.Pool) -> dict[str, int]:
            total = {p.kind: 0 for p in purges}
            while any((done := await purge_once(pool, purges, 7)).values()):
                total = {k: total[k] + done[k] for k in total}
            return total

        results = await asyncio.gather(*(until_done(pool) for pool in pools))
        return {p.kind: sum(r[p.kind] for r in results) for p in purges}
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))


async def ids(conn: asyncpg.Connection, query: str, convert: Callable[[object], str] = str) -> set[str]:
    return {convert(r[0]) for r in await conn.fetch(query)}


async def test_orders_retention_deletes_old_keys_and_inbox_entries_only() -> None:
    async with database("orders") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            order_id = uuid.uuid4()
            await conn.execute("""INSERT INTO orders (order_id, customer_id, store_id, items, status,
                                  created_at, updated_at)
                                  VALUES ($1, 'c', 'S', '[]', 'confirmed', now() - interval '90 days',
                                          now() - interval '90 days')""", order_id)

            async def keys(count: int, age: float) -> set[str]:
                made = {f"k-{uuid.uuid4()}" for _ in range(count)}
                await conn.execute("""INSERT INTO idempotency_keys (key, request_hash, order_id, response,
                                      created_at) SELECT unnest($1::text[]), 'h', $2, '{}',
                                      now() - make_interval(secs => $3)""", list(made), order_id, age)
                return made

            old_keys, fresh_keys = await keys(40, 25 * 3600), await keys(10, 23 * 3600)
            old_inbox, fresh_inbox = await inbox(conn, 45, 7 * DAY + 60), await inbox(conn, 10, 6 * DAY)
            deleted = await purge_concurrently(dsn, ORDERS_PURGES)
            assert deleted == {"idempotency_keys": 40, "orders_inbox": 45}
            assert await ids(conn, "SELECT key FROM idempotency_keys") == fresh_keys
            assert not old_keys & await ids(conn, "SELECT key FROM idempotency_keys")
            assert await ids(conn, "SELECT message_id FROM inbox") == fresh_inbox
            assert not old_inbox & await ids(conn, "SELECT message_id FROM inbox")
            assert await conn.fetchval("SELECT count(*) FROM orders") == 1  # orders stay
        finally:
            await conn.close()


async def test_stock_retention_deletes_old_tombstones_and_inbox_entries_never_the_ledger() -> None:
    async with database("stock") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("""INSERT INTO stock_item (store_id, sku, on_hand, reserved, version, updated_at)
                                  VALUES ('S', 'A', 5, 0, 1, now() - interval '90 days')""")
            await conn.execute("""INSERT INTO movement (store_id, sku, version, kind, on_hand_delta,
                                  reserved_delta, on_hand, reserved, order_id, at, event_id)
                                  VALUES ('S', 'A', 1, 'created', 5, 0, 5, 0, NULL,
                                          now() - interval '90 days', gen_random_uuid())""")

            async def orders(state: str, count: int, age: float) -> set[str]:
                made = [uuid.uuid4() for _ in range(count)]
                await conn.execute("""INSERT INTO stock_order (order_id, attempt, state, updated_at)
                                      SELECT unnest($1::uuid[]), 1, $2, now() - make_interval(secs => $3)""",
                                   made, state, age)
                await conn.execute("""INSERT INTO stock_answer (order_id, attempt, body, answered_at)
                                      SELECT unnest($1::uuid[]), 1, '{}', now()""", made)
                return {str(i) for i in made}

            old_tombstones = await orders("cancelled", 50, 7 * DAY + 60)
            kept = (await orders("cancelled", 10, 6 * DAY) | await orders("sold", 10, 90 * DAY)
                    | await orders("rejected", 10, 90 * DAY) | await orders("expired", 10, 90 * DAY))
            old_inbox, fresh_inbox = await inbox(conn, 30, 8 * DAY), await inbox(conn, 10, 6 * DAY)
            deleted = await purge_concurrently(dsn, STOCK_PURGES)
            assert deleted == {"stock_inbox": 30, "tombstones": 50}
            assert await ids(conn, "SELECT order_id FROM stock_order") == kept
            assert await ids(conn, "SELECT order_id FROM stock_answer") == kept
            assert not old_tombstones & kept
            assert await ids(conn, "SELECT message_id FROM inbox") == fresh_inbox
            assert not old_inbox & fresh_inbox
            assert await conn.fetchval("SELECT count(*) FROM movement") == 1  # the ledger stays
            assert await conn.fetchval("SELECT count(*) FROM stock_item") == 1
        finally:
            await conn.close()


async def test_retention_with_nothing_due_deletes_nothing_and_uses_its_indexes() -> None:
    async with database("stock") as dsn:
        pool = await create_pool(dsn, 2)
        try:
            assert await purge_once(pool, STOCK_PURGES, 100) == {"stock_inbox": 0, "tombstones": 0}
            async with pool.acquire() as conn:
                await conn.execute("SET enable_seqscan = off")
                for purge in STOCK_PURGES:
                    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + purge.statement, 100))
                    assert "Seq Scan" not in plan, plan
        finally:
            await pool.close()
