"""A stock worker process: consumes `stock.orders`, sweeps expired holds, relays its outbox.

Run as many as you like (`STOCK_WORKERS`): the queue spreads orders among them, row locks keep
them from overselling, SKIP LOCKED keeps their sweeps, purges and relays apart."""

import asyncio
import logging
import signal

import asyncpg
from aiohttp.web import AppRunner

from shared import metrics
from shared.batching import Batcher
from shared.broker import Broker, open_broker
from shared.consumer import TRANSIENT, Consumer
from shared.db import PURGE_INBOX, create_pool
from shared.gauges import dead_letter_gauges, outbox_gauges
from shared.health import broker_check, database_check
from shared.messaging import STOCK_ORDERS
from shared.outbox import start_relays, stop_relays, wake_relays
from shared.probe import start_probe
from shared.retention import Purge, purge_forever
from shared.runtime import tune_gc
from shared.settings import Settings, get_settings
from stock import consumer, db
from stock.db import OLDEST_OVERDUE_HOLD_SECONDS
from stock.holds import sweep_expired
from stock.reserve import Arrival

log = logging.getLogger(__name__)

# Retention (API.md §6): what the stock database lets go of (never the ledger).
PURGES = [Purge("stock_inbox", PURGE_INBOX), Purge("tombstones", db.PURGE_TOMBSTONES)]


async def sweep_forever(pool: asyncpg.Pool, settings: Settings, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            while (swept := await sweep_expired(pool, settings.sweep_batch_size)) == settings.sweep_batch_size:
                wake_relays()  # a full batch: more may be waiting
            if swept:
                wake_relays()
        except Exception:
            log.warning("expiry sweep failed; trying again next interval", exc_info=True)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=settings.sweep_interval_seconds)
        except TimeoutError:
            pass


def overdue_gauge(pool: asyncpg.Pool) -> metrics.Refresh:
    async def refresh() -> None:
        metrics.HOLDS_OVERDUE.set(max(0.0, await pool.fetchval(OLDEST_OVERDUE_HOLD_SECONDS)))

    return refresh


async def serve_probe(settings: Settings, pool: asyncpg.Pool, broker: Broker) -> AppRunner:
    """/health and /metrics on STOCK_WORKER_PORT + this worker's index (API.md §5)."""
    metrics.expose("stock-worker")
    metrics.on_scrape(outbox_gauges(pool))
    metrics.on_scrape(dead_letter_gauges(broker.connection, [STOCK_ORDERS]))
    metrics.on_scrape(overdue_gauge(pool))
    checks = {"database": database_check(pool), "broker": broker_check(broker)}
    return await start_probe(settings.bind_host, settings.worker_probe_port, checks)


async def main() -> None:
    settings = get_settings()
    pool = await create_pool(settings.stock_database_url, settings.db_pool_size)
    broker = await open_broker(settings.stock_amqp_url, delivery_limit=settings.delivery_limit,
                               prefetch=settings.prefetch_count, name="stock-worker")
    batcher: Batcher[Arrival] = Batcher(consumer.decide_pending(pool, settings.reservation_ttl_seconds),
                                        max_size=settings.batch_size, transient=TRANSIENT)
    orders = Consumer(await broker.queue(STOCK_ORDERS), broker.channel, consumer.routes(pool, batcher))
    tune_gc()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    relays = start_relays(settings.stock_database_url, broker.exchange, handing=broker.handing) if settings.outbox_relay else None
    probe = await serve_probe(settings, pool, broker)
    background = [asyncio.create_task(sweep_forever(pool, settings, stopping)),
                  asyncio.create_task(purge_forever(pool, PURGES, settings.retention_interval_seconds,
                                                    settings.retention_batch_size, stopping))]
    await orders.start()
    log.info("stock worker consuming", extra={"queue": STOCK_ORDERS})
    await stopping.wait()
    # Graceful: stop taking work, finish and ack what is in hand, publish what was written.
    log.info("stock worker stopping")
    await orders.stop()
    await batcher.close()
    await asyncio.gather(*background)
    await stop_relays(relays)
    await probe.cleanup()
    await broker.close()
    await pool.close()
