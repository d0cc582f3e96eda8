"""Entry points of the stock service: the HTTP API process and the worker process."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvloop
from fastapi import FastAPI

from shared.db import create_pool
from shared.health import broker_check, database_check
from shared.logs import configure_logging
from shared.messaging import connect, declare_topology
from shared.outbox import start_relays, stop_relays
from shared.settings import get_settings
from shared.web import create_app, serve
from stock import worker
from stock.api import router
from stock.feed import StockFeed

IMPORT_TYPES = ("text/csv", "application/x-ndjson")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    app.state.admin_token = settings.resolved_admin_token()
    app.state.pool = pool = await create_pool(settings.stock_database_url, settings.db_pool_size)
    app.state.amqp = amqp = await connect(settings.stock_amqp_url)
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await declare_topology(channel, settings.delivery_limit)
    # Admin changes write EstoqueAlterado to the outbox; the API relays too, so they leave even
    # when no worker runs (one relay leads at a time, whichever process it is in).
    relays = start_relays(settings.stock_database_url, exchange) if settings.outbox_relay else []
    app.state.feed = StockFeed(pool)
    app.state.sse_ping = settings.sse_ping_seconds
    await app.state.feed.start(channel)
    try:
        yield
    finally:
        await stop_relays(relays)
        await amqp.close()
        await pool.close()


def readiness(app: FastAPI) -> dict:  # type: ignore[type-arg]
    return {"database": database_check(app.state.pool), "broker": broker_check(app.state.amqp)}


def create() -> FastAPI:
    app = create_app(service="stock", title="Stock", lifespan=lifespan, readiness=readiness,
                     body_types={"/stock/import": IMPORT_TYPES},
                     body_limits={"/stock/import": get_settings().import_max_bytes})
    app.include_router(router)
    return app


def run_api() -> None:
    settings = get_settings()
    configure_logging("stock-api", settings.log_level)
    serve(create(), settings.stock_port, settings.bind_host, settings.access_log)


def run_worker() -> None:
    settings = get_settings()
    configure_logging("stock-worker", settings.log_level)
    uvloop.install()
    asyncio.run(worker.main())
