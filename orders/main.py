"""The orders process: HTTP API, the `orders.status` consumer and the outbox relay."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI

from orders import consumer
from orders.api import router
from orders.db import OLDEST_PENDING_SECONDS, PURGE_IDEMPOTENCY_KEYS
from orders.fastlane import FastLane
from orders.reconciler import reconcile_forever
from orders.service import Intake
from orders.waiters import StatusWaiters
from shared import metrics, tracing
from shared.batching import Batcher
from shared.broker import open_broker
from shared.consumer import TRANSIENT, Consumer
from shared.db import PURGE_INBOX, create_pool
from shared.gauges import dead_letter_gauges, outbox_gauges
from shared.health import broker_check, database_check
from shared.logs import configure_logging
from shared.messaging import ORDERS_STATUS
from shared.metrics import Refresh
from shared.outbox import start_relays, stop_relays
from shared.retention import Purge, purge_forever
from shared.settings import get_settings
from shared.web import create_app, serve

# Retention (API.md §6): what the orders database lets go of.
PURGES = [Purge("idempotency_keys", PURGE_IDEMPOTENCY_KEYS), Purge("orders_inbox", PURGE_INBOX)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    app.state.pool = pool = await create_pool(settings.orders_database_url, settings.db_pool_size)
    app.state.intake = intake = Intake(pool, settings.batch_size)
    app.state.broker = broker = await open_broker(
        settings.orders_amqp_url, delivery_limit=settings.delivery_limit, prefetch=settings.prefetch_count,
        name="orders")
    app.state.waiters = waiters = StatusWaiters(pool, settings.max_long_polls)
    waiters.start()
    batcher: Batcher[consumer.Pending] = Batcher(
        consumer.apply_pending(pool, on_applied=waiters.changed),
        max_size=settings.batch_size, transient=TRANSIENT,
    )
    status_consumer = Consumer(await broker.queue(ORDERS_STATUS), broker.channel, consumer.routes(batcher))
    # Orders writes no stock changes: its relay serves the one lane it has.
    relays = start_relays(settings.orders_database_url, broker.exchange, ["orders"], handing=broker.handing) if settings.outbox_relay else None
    await status_consumer.start()
    gauges = [metrics.on_scrape(refresh) for refresh in (
        outbox_gauges(pool), pending_gauge(pool), dead_letter_gauges(broker.connection, [ORDERS_STATUS]))]
    stopping = asyncio.Event()
    housekeeping = [
        asyncio.create_task(reconcile_forever(pool, settings, stopping)),
        asyncio.create_task(purge_forever(pool, PURGES, settings.retention_interval_seconds,
                                          settings.retention_batch_size, stopping)),
    ]
    try:
        yield
    finally:
        stopping.set()
        await asyncio.gather(*housekeeping)
        for remove in gauges:
            remove()
        await status_consumer.stop()
        await batcher.close()
        await intake.close()
        await stop_relays(relays)
        await waiters.stop()
        await broker.close()
        await pool.close()


def pending_gauge(pool: asyncpg.Pool) -> Refresh:
    async def refresh() -> None:
        metrics.PENDING_OLDEST.set(max(0.0, await pool.fetchval(OLDEST_PENDING_SECONDS)))

    return refresh


def readiness(app: FastAPI) -> dict:  # type: ignore[type-arg]
    return {"database": database_check(app.state.pool), "broker": broker_check(app.state.broker)}


def create() -> FastAPI:
    app = create_app(service="orders", title="Orders", lifespan=lifespan, readiness=readiness)
    app.include_router(router)
    return app


def run() -> None:
    settings = get_settings()
    configure_logging("orders", settings.log_level)
    tracing.setup("orders")
    serve(tracing.wrap_asgi(FastLane(create())), settings.orders_port, settings.bind_host, settings.access_log)
