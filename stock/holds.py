"""The end of a hold: sold on confirm, released on cancel, expired by the sweep. Holds begin in
stock/reserve.py. A hold is an order's `stock_order` row (state `held`) and its `hold` rows, one
per (store, sku) it took units from; each ending acts on all of them, and each store's ledger
and feed show their own movements.

Each function runs inside the caller's transaction, after the inbox check. The stock_order row
is locked first, then the items: see the lock order in stock/db.py."""

import logging
import uuid

import asyncpg
from asgi_correlation_id import correlation_id

from shared import metrics
from shared.events import Allocation, PedidoCancelado, PedidoConfirmado
from shared.outbox import add_to_outbox
from stock import db
from stock.domain import ending_answer, let_go, sell

log = logging.getLogger(__name__)

async def _tell_orders(conn: asyncpg.Connection, order_id: uuid.UUID, attempt: int, ending: str) -> None:
    await add_to_outbox(conn, ending_answer(order_id, attempt, ending), str(order_id), correlation_id.get())


async def on_order_confirmed(conn: asyncpg.Connection, cmd: PedidoConfirmado) -> None:
    await db.lock_orders(conn, [cmd.order_id])
    known = await conn.fetchrow(db.LOCK_STOCK_ORDER, cmd.order_id)
    if known is None or known["attempt"] != cmd.attempt:
        log.warning("confirm for an attempt stock does not hold", extra={"order_id": str(cmd.order_id)})
        return
    if known["state"] == "held":
        now = await conn.fetchval(db.NOW)
        ending = "sold" if known["expires_at"] > now else "expired"
        await end_hold(conn, cmd.order_id, cmd.attempt, ending)
        await _tell_orders(conn, cmd.order_id, cmd.attempt, ending)
    elif known["state"] in ("expired", "sold"):  # sold: asked again (orders/reconciler.py)
        await _tell_orders(conn, cmd.order_id, cmd.attempt, known["state"])


async def on_order_cancelled(conn: asyncpg.Connection, cmd: PedidoCancelado) -> None:
    await db.lock_orders(conn, [cmd.order_id])
    known = await conn.fetchrow(db.LOCK_STOCK_ORDER, cmd.order_id)
    if known is not None and known["state"] == "sold":
        log.error("cancel for an order already sold; keeping the sale", extra={"order_id": str(cmd.order_id)})
        return
    if known is not None and known["state"] == "held":
        await end_hold(conn, cmd.order_id, known["attempt"], "released")
        await _tell_orders(conn, cmd.order_id, known["attempt"], "released")
    attempt = max(cmd.attempt, known["attempt"]) if known is not None else cmd.attempt
    # The row stays as a tombstone: a PedidoCriado arriving late finds it and holds nothing.
    await conn.execute(db.SAVE_STOCK_ORDER, cmd.order_id, attempt, "cancelled", None)


async def end_hold(conn: asyncpg.Connection, order_id: uuid.UUID, attempt: int, ending: str) -> None:
    """Sells, releases or expires every hold of a held order, in every store it holds units in.
    The stock_order row is locked; the items are locked here in the global order."""
    taken = [Allocation(store_id=r["store_id"], sku=r["sku"], quantity=r["quantity"])
             for r in await conn.fetch(db.TAKE_HOLDS, order_id)]
    await db.lock_items(conn, [(a.store_id, a.sku) for a in taken])
    changes = sell(taken) if ending == "sold" else let_go(taken)
    if changes:
        await db.apply_changes(conn, ending, changes, order_id, correlation_id.get())
    await conn.execute(db.SAVE_STOCK_ORDER, order_id, attempt, ending, None)
    metrics.hold(ending)


async def sweep_expired(pool: asyncpg.Pool, batch_size: int) -> int:
    """Expires holds past their time, in one transaction per batch. Safe with any number of
    workers: SKIP LOCKED hands each expired order to exactly one of them, and an order being
    confirmed right now is locked, so it is either sold or expired, never both."""
    async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetch(db.CLAIM_EXPIRED, batch_size)
        if not claimed:
            return 0
        holds = await conn.fetch(db.SELECT_HOLDS, [r["order_id"] for r in claimed])
        keys = {(r["store_id"], r["sku"]) for r in holds}
        await db.lock_items(conn, keys)  # all items of the batch at once, in the global order
        await db.lock_feeds(conn, sorted({store for store, _ in keys}))
        for order in claimed:
            await end_hold(conn, order["order_id"], order["attempt"], "expired")
            await _tell_orders(conn, order["order_id"], order["attempt"], "expired")
    return len(claimed)
