"""Deciding holds for a batch of orders in one transaction (PedidoCriado).

Under load a worker takes every PedidoCriado it has in hand and decides them together: one lock
of each row, the decisions made in memory one order after another (arrival order, so the first
customer wins), then every write as one set-based statement per table and one commit. A hot SKU
is then locked once per batch instead of once per order, which is what lets a flash sale go
faster than one-order-per-transaction ever can. A batch of one is the quiet-time case.

Lock order as everywhere (stock/db.py): the batch's orders first (by order_id), then all its
items at once in (store_id, sku) order."""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from shared.events import AtualizarStatus, PedidoCriado
from stock import db
from stock.domain import Figures, decide
from stock.holds import DECISION_LATENCY, HOLD_OUTCOMES

log = logging.getLogger(__name__)


@dataclass
class Item:
    """A locked item, followed in memory through the batch."""

    figures: Figures
    version: int
    at: datetime


@dataclass
class Writes:
    """Everything the batch will write, gathered as columns for set-based statements."""

    movements: list[tuple[Any, ...]] = field(default_factory=list)
    holds: list[tuple[uuid.UUID, str, str, int]] = field(default_factory=list)
    orders: list[tuple[uuid.UUID, str, int, str, datetime | None]] = field(default_factory=list)
    events: list[tuple[uuid.UUID, str, str | None, str | None, dict[str, Any]]] = field(default_factory=list)


def fresh_commands(
    cmds: list[PedidoCriado], known: dict[uuid.UUID, asyncpg.Record]
) -> list[PedidoCriado]:
    """Keeps, per order, the newest attempt not decided yet; drops cancelled orders (the
    tombstone rule: a late PedidoCriado holds nothing). Arrival order is kept."""
    newest: dict[uuid.UUID, PedidoCriado] = {}
    for cmd in cmds:
        row = known.get(cmd.order_id)
        if row is not None and row["state"] == "cancelled":
            log.info("order was cancelled before it arrived: holding nothing",
                     extra={"order_id": str(cmd.order_id)})
            continue
        if row is not None and row["attempt"] >= cmd.attempt:
            continue
        if row is not None and row["state"] == "held":
            # Orders asks again only after a hold ended, so this cannot happen; deciding it would
            # hold twice, so it is refused loudly instead.
            log.error("new attempt for an order stock still holds; ignored",
                      extra={"order_id": str(cmd.order_id), "attempt": cmd.attempt})
            continue
        if cmd.order_id not in newest or newest[cmd.order_id].attempt < cmd.attempt:
            newest[cmd.order_id] = cmd
    return [cmd for cmd in cmds if newest.get(cmd.order_id) is cmd]


async def decide_batch(
    conn: asyncpg.Connection, cmds: list[PedidoCriado], request_ids: dict[uuid.UUID, str | None],
    ttl_seconds: float,
) -> None:
    """Runs inside the caller's transaction, after the inbox check of every command.
    `request_ids` carries each order's X-Request-ID into the events the batch writes."""
    order_ids = sorted({c.order_id for c in cmds})
    await db.lock_orders(conn, order_ids)
    known = {r["order_id"]: r for r in await conn.fetch(db.LOCK_STOCK_ORDERS, order_ids)}
    cmds = fresh_commands(cmds, known)
    if not cmds:
        return
    keys = sorted({(c.store_id, line.sku) for c in cmds for line in c.items})
    rows = await conn.fetch(db.LOCK_ITEMS_FOR_BATCH, [k[0] for k in keys], [k[1] for k in keys])
    now: datetime = rows[0]["now"] if rows else await conn.fetchval(db.NOW)
    items = {(r["store_id"], r["sku"]): Item(Figures(r["on_hand"], r["reserved"]), r["version"],
                                             max(now, r["updated_at"])) for r in rows}
    expires_at = now + timedelta(seconds=ttl_seconds)
    writes = Writes()
    for cmd in cmds:
        _decide_one(cmd, items, expires_at, writes, request_ids.get(cmd.order_id))
    await _write(conn, items, writes)
    decided_at = datetime.now(UTC)
    for cmd in cmds:
        DECISION_LATENCY.observe(max(0.0, (decided_at - cmd.occurred_at).total_seconds()))


def _decide_one(
    cmd: PedidoCriado, items: dict[tuple[str, str], Item], expires_at: datetime, writes: Writes,
    request_id: str | None,
) -> None:
    lines = list(cmd.items)
    stock = {line.sku: items[(cmd.store_id, line.sku)].figures
             for line in lines if (cmd.store_id, line.sku) in items}
    decision = decide(lines, stock)
    if not decision.held:
        writes.orders.append((cmd.order_id, cmd.store_id, cmd.attempt, "rejected", None))
        _answer(writes, cmd, "EstoqueNaoDisponivel", request_id,
                unavailable=list(decision.shortages), reason=decision.reason)
        HOLD_OUTCOMES.labels("rejected").inc()
        return
    for line in sorted(lines, key=lambda line: line.sku):
        item = items[(cmd.store_id, line.sku)]
        item.figures = Figures(item.figures.on_hand, item.figures.reserved + line.quantity)
        item.version += 1
        writes.movements.append((cmd.store_id, line.sku, item.version, 0, line.quantity,
                                 item.figures.on_hand, item.figures.reserved, cmd.order_id, item.at,
                                 uuid.uuid4(), request_id))
        writes.holds.append((cmd.order_id, cmd.store_id, line.sku, line.quantity))
    writes.orders.append((cmd.order_id, cmd.store_id, cmd.attempt, "held", expires_at))
    _answer(writes, cmd, "EstoqueReservado", request_id, reserved_until=expires_at)
    HOLD_OUTCOMES.labels("held").inc()


def _answer(writes: Writes, cmd: PedidoCriado, status: str, request_id: str | None, **extra: Any) -> None:
    event = AtualizarStatus(order_id=cmd.order_id, attempt=cmd.attempt, status=status, **extra)  # type: ignore[arg-type]
    writes.events.append((event.event_id, event.event_type, str(cmd.order_id), request_id,
                          event.model_dump(mode="json")))


async def _write(conn: asyncpg.Connection, items: dict[tuple[str, str], Item], writes: Writes) -> None:
    await conn.execute(db.SAVE_STOCK_ORDERS, *zip(*writes.orders, strict=True))
    await db.lock_feeds(conn, sorted({m[0] for m in writes.movements}))
    if writes.movements:
        touched = {(m[0], m[1]) for m in writes.movements}
        final = [(key, items[key]) for key in sorted(touched)]
        await conn.execute(
            db.SET_ITEMS, [k[0] for k, _ in final], [k[1] for k, _ in final],
            [i.figures.reserved for _, i in final], [i.version for _, i in final], [i.at for _, i in final],
        )
        columns = list(zip(*writes.movements, strict=True))
        await conn.execute(db.INSERT_RESERVED_MOVEMENTS, *columns)
        await conn.execute(db.INSERT_HOLDS, *zip(*writes.holds, strict=True))
    await conn.execute(db.INSERT_OUTBOX_MANY, *zip(*writes.events, strict=True))
