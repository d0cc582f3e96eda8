"""Entry points of the stock service: the HTTP API process and the worker process."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvloop
from fastapi import Depends, FastAPI, Request

from shared import tracing
from shared.broker import open_broker
from shared.db import create_pool
from shared.health import broker_check, database_check
from shared.logs import configure_logging
from shared.outbox import start_relays, stop_relays, wake_relays
from shared.settings import get_settings
from shared.web import create_app, serve
from stock import worker
from stock.api import router
from stock.feed import StockFeed

IMPORT_TYPES = ("text/csv", "application/x-ndjson")
IMPORT_PATH = "/stock/import"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    app.state.admin_token = settings.resolved_admin_token()
    app.state.pool = pool = await create_pool(settings.stock_database_url, settings.db_pool_size)
    app.state.broker = broker = await open_broker(
        settings.stock_amqp_url, delivery_limit=settings.delivery_limit, prefetch=settings.prefetch_count,
        name="stock-api")
    # Admin changes write EstoqueAlterado to the outbox; the API relays too, so they leave even
    # when no worker runs (one relay leads at a time, whichever process it is in).
    relays = start_relays(settings.stock_database_url, broker.exchange, handing=broker.handing) if settings.outbox_relay else None
    app.state.feed = StockFeed(pool, settings.max_feed_streams)
    app.state.sse_ping = settings.sse_ping_seconds
    await app.state.feed.start(broker.channel)
    try:
        yield
    finally:
        await stop_relays(relays)
        await broker.close()
        await pool.close()


def readiness(app: FastAPI) -> dict:  # type: ignore[type-arg]
    return {"database": database_check(app.state.pool), "broker": broker_check(app.state.broker)}


def create() -> FastAPI:
    app = create_app(service="stock", title="Stock", lifespan=lifespan, readiness=readiness,
                     body_types={IMPORT_PATH: IMPORT_TYPES},
                     body_limits={IMPORT_PATH: get_settings().import_max_bytes},
                     auth_first=frozenset({IMPORT_PATH}))
    app.include_router(router, dependencies=[Depends(wake_relays_after_writes)])
    return app


async def wake_relays_after_writes(request: Request) -> AsyncIterator[None]:
    """Stock changes written by a request leave from this process's relay as soon as the handler
    (and its transaction) is done, instead of at the relay's slow look."""
    yield
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        wake_relays()


def run_api() -> None:
    settings = get_settings()
    configure_logging("stock-api", settings.log_level)
    tracing.setup("stock-api")
    serve(tracing.wrap_asgi(create()), settings.stock_port, settings.bind_host, settings.access_log)


def run_worker() -> None:
    settings = get_settings()
    configure_logging("stock-worker", settings.log_level)
    tracing.setup("stock-worker")
    uvloop.install()
    asyncio.run(worker.main())
