"""The scrape-time gauges against real PostgreSQL: the outbox backlog is counted, not capped at a
relay batch; ages are real ages; the oldest pending order is found through an index."""

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from orders.db import OLDEST_PENDING_SECONDS
from orders.main import pending_gauge
from shared.db import migrate
from shared.gauges import outbox_gauges
from shared.metrics import OUTBOX_BACKLOG, OUTBOX_OLDEST, PENDING_OLDEST
from shared.outbox import BATCH
from shared.settings import Settings
from tooling.devenv import local_servers
from tooling.migrate import MIGRATIONS


@pytest.fixture
async def orders_db(infrastructure: None) -> AsyncIterator[asyncpg.Pool]:
    settings = Settings()
    pg, _ = local_servers(settings)
    assert pg is not None
    parts = urlsplit(settings.orders_database_url)
    dsn = urlunsplit(parts._replace(path=f"/gauges_{uuid.uuid4().hex[:8]}"))
    await pg.ensure_database(dsn, fresh=True)
    await migrate(pg.migrator_dsn(dsn), MIGRATIONS["orders"])
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    yield pool
    await pool.close()
    admin = await asyncpg.connect(pg.admin_dsn())
    await admin.execute(f'DROP DATABASE "{urlsplit(dsn).path[1:]}" WITH (FORCE)')
    await admin.close()


async def test_outbox_backlog_is_counted_past_one_batch(orders_db: asyncpg.Pool) -> None:
    waiting = BATCH + 137
    await orders_db.execute(
        """INSERT INTO outbox (event_id, event_type, body, created_at)
           SELECT gen_random_uuid(), 'PedidoCriado', '{}', now() - interval '90 seconds'
           FROM generate_series(1, $1)""", waiting)
    await orders_db.execute("INSERT INTO outbox (event_id, event_type, body) "
                            "VALUES (gen_random_uuid(), 'EstoqueAlterado', '{}')")
    await outbox_gauges(orders_db)()
    assert OUTBOX_BACKLOG.labels("orders")._value.get() == waiting
    assert OUTBOX_BACKLOG.labels("stock-changes")._value.get() == 1
    assert 90 <= OUTBOX_OLDEST.labels("orders")._value.get() < 120
    assert OUTBOX_OLDEST.labels("stock-changes")._value.get() < 30
    await orders_db.execute("DELETE FROM outbox")
    await outbox_gauges(orders_db)()
    assert OUTBOX_BACKLOG.labels("orders")._value.get() == 0
    assert OUTBOX_OLDEST.labels("orders")._value.get() == 0


async def test_oldest_pending_order_age(orders_db: asyncpg.Pool) -> None:
    await pending_gauge(orders_db)()
    assert PENDING_OLDEST._value.get() == 0
    await orders_db.execute(
        """INSERT INTO orders (order_id, customer_id, store_id, items, status, updated_at)
           SELECT gen_random_uuid(), 'c', 'S', '[]', s, now() - make_interval(secs => n)
           FROM (VALUES ('confirmed', 3600), ('pending', 300), ('pending', 5), ('confirming', 900))
                AS v(s, n)""")
    await pending_gauge(orders_db)()
    assert 300 <= PENDING_OLDEST._value.get() < 330
    async with orders_db.acquire() as conn:
        await conn.execute("SET enable_seqscan = off")  # the plan a large table would get
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {OLDEST_PENDING_SECONDS}"))
    assert "orders_waiting" in plan, plan
