"""The end of a hold (a reservation): sold on confirm, released on cancel, expired by the sweep.
Holds begin in stock/reserve.py.

Each function runs inside the caller's transaction, after the inbox check. The stock_order row
is locked first, then the items: see the lock order in stock/db.py."""

import logging
import uuid

import asyncpg
from asgi_correlation_id import correlation_id

from shared import metrics
from shared.events import AtualizarStatus, Line, PedidoCancelado, PedidoConfirmado
from shared.outbox import add_to_outbox
from stock import db
from stock.domain import let_go, sell

log = logging.getLogger(__name__)


async def _answer(conn: asyncpg.Connection, order_id: uuid.UUID, attempt: int, status: str, **extra: object) -> None:
    event = AtualizarStatus(order_id=order_id, attempt=attempt, status=status, **extra)  # type: ignore[arg-type]
    await add_to_outbox(conn, event, str(order_id), correlation_id.get())


async def on_order_confirmed(conn: asyncpg.Connection, cmd: PedidoConfirmado) -> None:
    await db.lock_orders(conn, [cmd.order_id])
    known = await conn.fetchrow(db.LOCK_STOCK_ORDER, cmd.order_id)
    if known is None or known["attempt"] != cmd.attempt:
        log.warning("confirm for an attempt stock does not hold", extra={"order_id": str(cmd.order_id)})
        return
    if known["state"] == "held":
        now = await conn.fetchval(db.NOW)
        kind = "sold" if known["expires_at"] > now else "expired"
        await end_hold(conn, cmd.order_id, known["store_id"], cmd.attempt, kind)
        await _answer(conn, cmd.order_id, cmd.attempt, "EstoqueBaixado" if kind == "sold" else "ReservaExpirada")
    elif known["state"] == "expired":
        await _answer(conn, cmd.order_id, cmd.attempt, "ReservaExpirada")
    elif known["state"] == "sold":  # asked again (orders/reconciler.py): the sale is answered again
        await _answer(conn, cmd.order_id, cmd.attempt, "EstoqueBaixado")


async def on_order_cancelled(conn: asyncpg.Connection, cmd: PedidoCancelado) -> None:
    await db.lock_orders(conn, [cmd.order_id])
    known = await conn.fetchrow(db.LOCK_STOCK_ORDER, cmd.order_id)
    if known is not None and known["state"] == "sold":
        log.error("cancel for an order already sold; keeping the sale", extra={"order_id": str(cmd.order_id)})
        return
    if known is not None and known["state"] == "held":
        await end_hold(conn, cmd.order_id, known["store_id"], known["attempt"], "released")
        await _answer(conn, cmd.order_id, known["attempt"], "ReservaLiberada")
    attempt = max(cmd.attempt, known["attempt"]) if known is not None else cmd.attempt
    store_id = known["store_id"] if known is not None else ""
    # The row stays as a tombstone: a PedidoCriado arriving late finds it and holds nothing.
    await conn.execute(db.SAVE_STOCK_ORDER, cmd.order_id, store_id, attempt, "cancelled", None)


async def end_hold(
    conn: asyncpg.Connection, order_id: uuid.UUID, store_id: str, attempt: int, kind: str
) -> None:
    """Sells, releases or expires a held order's lines. The stock_order row is locked."""
    taken = await conn.fetch(db.TAKE_HOLD_LINES, order_id)
    lines = [Line(sku=r["sku"], quantity=r["quantity"]) for r in taken]
    await db.lock_items_of_store(conn, store_id, [line.sku for line in lines])
    changes = sell(lines) if kind == "sold" else let_go(lines)
    await db.apply_changes(conn, store_id, kind, changes, order_id, correlation_id.get())
    await conn.execute(db.SAVE_STOCK_ORDER, order_id, store_id, attempt, kind, None)
    metrics.hold(kind)


async def sweep_expired(pool: asyncpg.Pool, batch_size: int) -> int:
    """Expires holds past their time, in one transaction per batch. Safe with any number of
    workers: SKIP LOCKED hands each expired order to exactly one of them, and an order being
    confirmed right now is locked, so it is either sold or expired, never both."""
    async with metrics.after_commit(), pool.acquire() as conn, conn.transaction():
        claimed = await conn.fetch(db.CLAIM_EXPIRED, batch_size)
        if not claimed:
            return 0
        lines = await conn.fetch(db.SELECT_HOLD_LINES, [r["order_id"] for r in claimed])
        pairs = sorted({(r["store_id"], r["sku"]) for r in lines})
        await conn.execute(db.LOCK_ITEMS_ANYWHERE, [p[0] for p in pairs], [p[1] for p in pairs])
        await db.lock_feeds(conn, sorted({p[0] for p in pairs}))
        for order in claimed:
            await end_hold(conn, order["order_id"], order["store_id"], order["attempt"], "expired")
            await _answer(conn, order["order_id"], order["attempt"], "ReservaExpirada")
    return len(claimed)
