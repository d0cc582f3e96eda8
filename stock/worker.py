"""A stock worker process: consumes `stock.orders`, sweeps expired holds, relays its outbox.

Run as many as you like (`STOCK_WORKERS`): the queue spreads orders among them, row locks keep
them from overselling, SKIP LOCKED keeps their sweeps apart, and one relay leads at a time."""

import asyncio
import logging
import signal

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiohttp.web import AppRunner
from asgi_correlation_id import correlation_id

from shared import metrics
from shared.batching import Batcher
from shared.consumer import TRANSIENT, Consumer, parse_json
from shared.db import create_pool, first_delivery
from shared.events import PedidoCancelado, PedidoConfirmado, PedidoCriado, stock_command_adapter
from shared.gauges import dead_letter_gauges, outbox_gauges
from shared.health import broker_check, database_check
from shared.messaging import STOCK_ORDERS, connect, declare_topology
from shared.outbox import start_relays, stop_relays, wake_relays
from shared.probe import start_probe
from shared.retention import Purge, purge_forever
from shared.runtime import tune_gc
from shared.settings import Settings, get_settings
from stock import db
from stock.db import OLDEST_OVERDUE_HOLD_SECONDS
from stock.holds import on_order_cancelled, on_order_confirmed, sweep_expired
from stock.reserve import Arrival, decide_batch

log = logging.getLogger(__name__)

Command = PedidoCriado | PedidoConfirmado | PedidoCancelado
# Retention (API.md §6): what the stock database lets go of (never the ledger).
PURGES = [Purge("stock_inbox", db.PURGE_INBOX), Purge("tombstones", db.PURGE_TOMBSTONES)]


def parse(message: AbstractIncomingMessage) -> Command:
    body = parse_json(message)
    if message.type and body.get("event_type", message.type) != message.type:
        raise ValueError(f"message type {message.type!r} does not match its body")
    return stock_command_adapter.validate_python(body)


def decide_pending(pool: asyncpg.Pool, settings: Settings):  # type: ignore[no-untyped-def]
    """Decides a batch of PedidoCriado in one transaction (stock/reserve.py)."""

    async def flush(batch: list[Arrival]) -> None:
        async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
            await decide_batch(conn, batch, settings.reservation_ttl_seconds)
        wake_relays()

    return flush


def handler(pool: asyncpg.Pool, batcher: Batcher[Arrival]):  # type: ignore[no-untyped-def]
    async def handle(cmd: Command, message_id: str) -> None:
        if isinstance(cmd, PedidoCriado):
            await batcher.submit(Arrival(cmd, message_id, correlation_id.get()))
            return
        async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
            if not await first_delivery(conn, message_id):
                return
            if isinstance(cmd, PedidoConfirmado):
                await on_order_confirmed(conn, cmd)
            else:
                await on_order_cancelled(conn, cmd)
        wake_relays()

    return handle


async def sweep_forever(pool: asyncpg.Pool, settings: Settings, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            while await sweep_expired(pool, settings.sweep_batch_size) == settings.sweep_batch_size:
                pass  # a full batch: more may be waiting
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


async def serve_probe(settings: Settings, pool: asyncpg.Pool, amqp: AbstractRobustConnection) -> AppRunner:
    """/health and /metrics on STOCK_WORKER_PORT + this worker's index (API.md §5)."""
    metrics.expose("stock-worker")
    metrics.on_scrape(outbox_gauges(pool))
    metrics.on_scrape(dead_letter_gauges(amqp, [STOCK_ORDERS]))
    metrics.on_scrape(overdue_gauge(pool))
    checks = {"database": database_check(pool), "broker": broker_check(amqp)}
    return await start_probe(settings.bind_host, settings.worker_probe_port, checks)


async def main() -> None:
    settings = get_settings()
    pool = await create_pool(settings.stock_database_url, settings.db_pool_size)
    amqp = await connect(settings.stock_amqp_url)
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=settings.prefetch_count)
    exchange = await declare_topology(channel, settings.delivery_limit)
    queue = await channel.get_queue(STOCK_ORDERS)
    batcher: Batcher[Arrival] = Batcher(decide_pending(pool, settings), max_size=settings.batch_size,
                                        transient=TRANSIENT)
    consumer = Consumer(queue, channel, parse, handler(pool, batcher))
    tune_gc()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    relays = start_relays(settings.stock_database_url, exchange) if settings.outbox_relay else []
    probe = await serve_probe(settings, pool, amqp)
    sweeper = asyncio.create_task(sweep_forever(pool, settings, stopping))
    retention = asyncio.create_task(purge_forever(pool, PURGES, settings.retention_interval_seconds,
                                                  settings.retention_batch_size, stopping))
    await consumer.start()
    log.info("stock worker consuming", extra={"queue": STOCK_ORDERS})
    await stopping.wait()
    # Graceful: stop taking work, finish and ack what is in hand, publish what was written.
    log.info("stock worker stopping")
    await consumer.stop()
    await batcher.close()
    await sweeper
    await retention
    await stop_relays(relays)
    await probe.cleanup()
    await amqp.close()
    await pool.close()
