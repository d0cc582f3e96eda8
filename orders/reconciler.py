"""Never `pending` for good (API.md §6): orders left `pending` or `confirming` too long are
asked about again.

A PedidoCriado or PedidoConfirmado, or stock's answer to it, can be lost after the outbox let
it go: dead-lettered, purged, a queue deleted. Every orders process looks periodically for
unsettled orders untouched for `reconcile_after_seconds` and publishes their command again
through the outbox: the same attempt, a new event id (so stock's inbox does not drop it as a
duplicate). Stock decides an attempt it never saw, and answers an attempt it already decided
with the decision it made (stock/reserve.py asked_again), changing no stock; an answer that
arrives after the order moved on is ignored by the state machine.

Several processes run it at once: SKIP LOCKED gives each order to one of them, and `asked_at`
keeps an order from being asked again before another period passes."""

import asyncio
import logging
from typing import Any

import asyncpg

from orders import db
from orders.service import _order_created
from shared.events import Event, PedidoConfirmado
from shared.metrics import ASKED_AGAIN
from shared.outbox import INSERT_OUTBOX, wake_relays
from shared.settings import Settings

log = logging.getLogger(__name__)

def command_again(row: asyncpg.Record) -> Event:
    """The command an unsettled order waits on, as a new message of the same attempt."""
    if row["status"] == "confirming":
        return PedidoConfirmado(order_id=row["order_id"], attempt=row["attempt"])
    return _order_created(row["order_id"], row["attempt"], row)


async def reconcile_once(pool: asyncpg.Pool, after_seconds: float, batch_size: int) -> int:
    """Asks again about one batch of unsettled orders; returns how many."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(db.CLAIM_UNSETTLED, after_seconds, batch_size)
        if not rows:
            return 0
        events = [command_again(row) for row in rows]
        await conn.executemany(INSERT_OUTBOX, [_outbox_row(e) for e in events])
        await conn.execute(db.MARK_ASKED, [row["order_id"] for row in rows])
    wake_relays()
    for event in events:
        ASKED_AGAIN.labels(event.event_type).inc()  # type: ignore[attr-defined]
    log.warning("unsettled orders asked about again", extra={
        "orders": len(rows), "order_ids": [str(row["order_id"]) for row in rows[:10]]})
    return len(rows)


def _outbox_row(event: Any) -> tuple[Any, ...]:
    # No request id nor trace context: no request or message caused this one.
    return (event.event_id, event.event_type, str(event.order_id), None, None, event.model_dump(mode="json"))


async def reconcile_forever(pool: asyncpg.Pool, settings: Settings, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        try:
            while await reconcile_once(pool, settings.reconcile_after_seconds,
                                       settings.reconcile_batch_size) == settings.reconcile_batch_size:
                pass  # a full batch: more may be waiting
        except Exception:
            log.warning("reconciler failed; trying again next interval", exc_info=True)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=settings.reconcile_interval_seconds)
        except TimeoutError:
            pass
