"""Deciding holds for a batch of orders in one transaction (PedidoCriado).

Under load a worker takes every PedidoCriado it has in hand and decides them together: its
orders locked and its messages checked against the inbox by one statement, every row it needs
locked by the next, the decisions made in memory one order after another (arrival order, so the
first customer wins), then every write as one statement and one commit. A hot SKU is then locked
once per batch instead of once per order, which is what lets a flash sale go faster than
one-order-per-transaction ever can; and a batch costs five round trips to PostgreSQL whatever
its size. A batch of one is the quiet-time case.

Lock order as everywhere (stock/db.py): the batch's orders first (by order_id), then all its
items at once in (store_id, sku) order."""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from shared import metrics
from shared.events import AtualizarStatus, PedidoCriado
from stock import db
from stock.domain import Figures, decide

log = logging.getLogger(__name__)


@dataclass
class Item:
    """A locked item, followed in memory through the batch."""

    figures: Figures
    version: int
    at: datetime


Pending = tuple[PedidoCriado, str, str | None]  # the command, its message_id, its request id


@dataclass
class Locked:
    """What CLAIM_MESSAGES and LOCK_ROWS found, locked until commit."""

    fresh: set[str]  # message ids never handled before
    known: dict[uuid.UUID, asyncpg.Record]  # stock_order rows: attempt, state
    items: dict[tuple[str, str], Item]
    now: datetime  # read after the item locks


@dataclass
class Writes:
    """Everything the batch will write, as rows for the set-based SAVE_DECISIONS."""

    orders: list[tuple[uuid.UUID, str, int, str, datetime | None]] = field(default_factory=list)
    # (store_id, sku, version, quantity, on_hand, reserved, order_id, at, request_id)
    movements: list[tuple[Any, ...]] = field(default_factory=list)
    answers: list[tuple[uuid.UUID, str, str | None, dict[str, Any]]] = field(default_factory=list)


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


def asked_again(cmds: list[PedidoCriado], known: dict[uuid.UUID, asyncpg.Record]) -> list[PedidoCriado]:
    """The commands (new messages) for an attempt stock already decided: orders asks again when
    the first answer may have been lost (orders/reconciler.py), so it gets the same answer again
    rather than silence, once per message. None of them is in `fresh_commands`."""
    return [cmd for cmd in cmds if cmd.order_id in known and known[cmd.order_id]["attempt"] == cmd.attempt]


async def decide_batch(conn: asyncpg.Connection, batch: list[Pending], ttl_seconds: float) -> None:
    """Decides the batch inside the caller's transaction, each message recorded in the inbox; a
    message handled before changes nothing. Each order's request id goes into its events."""
    locked = await _lock(conn, [cmd for cmd, _, _ in batch], [m for _, m, _ in batch])
    firsts: list[PedidoCriado] = []
    for cmd, message_id, _ in batch:
        if message_id in locked.fresh:
            locked.fresh.discard(message_id)  # the same message twice in one batch counts once
            firsts.append(cmd)
    request_ids = {cmd.order_id: request_id for cmd, _, request_id in batch}
    again = asked_again(firsts, locked.known)
    if again:  # the decision already made, answered again; no stock changes
        await conn.execute(db.ANSWER_AGAIN, [c.order_id for c in again], [c.attempt for c in again],
                           [request_ids.get(c.order_id) for c in again])
        metrics.hold("answered_again", len(again))
    cmds = fresh_commands(firsts, locked.known)
    if not cmds:
        return
    expires_at = locked.now + timedelta(seconds=ttl_seconds)
    writes = Writes()
    for cmd in cmds:
        _decide_one(cmd, locked.items, expires_at, writes, request_ids.get(cmd.order_id))
    await conn.execute(db.SAVE_DECISIONS, *_columns(writes.orders, 5),
                       *_columns(writes.movements, 9), *_columns(writes.answers, 4))
    for cmd in cmds:
        metrics.decided(cmd.occurred_at)


async def _lock(conn: asyncpg.Connection, cmds: list[PedidoCriado], message_ids: list[str]) -> Locked:
    """Every line's item is locked, even of an order that turns out to be decided already: one
    round trip for all row locks is worth the rare needless one."""
    fresh = await conn.fetch(db.CLAIM_MESSAGES, [c.order_id for c in cmds], message_ids)
    keys = sorted({(c.store_id, line.sku) for c in cmds for line in c.items})
    rows = await conn.fetch(db.LOCK_ROWS, [c.order_id for c in cmds],
                            [k[0] for k in keys], [k[1] for k in keys])
    now: datetime = max(r["now"] for r in rows) if rows else datetime.now(UTC)
    locked = Locked({r["message_id"] for r in fresh}, {}, {}, now)
    for r in rows:
        if r["kind"] == "order":
            locked.known[r["order_id"]] = r
        else:
            figures = Figures(r["on_hand"], r["reserved"])
            locked.items[(r["store_id"], r["sku"])] = Item(figures, r["version"], max(now, r["updated_at"]))
    return locked


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
        metrics.hold("rejected")
        return
    for line in sorted(lines, key=lambda line: line.sku):
        item = items[(cmd.store_id, line.sku)]
        item.figures = Figures(item.figures.on_hand, item.figures.reserved + line.quantity)
        item.version += 1
        writes.movements.append((cmd.store_id, line.sku, item.version, line.quantity,
                                 item.figures.on_hand, item.figures.reserved, cmd.order_id, item.at,
                                 request_id))
    writes.orders.append((cmd.order_id, cmd.store_id, cmd.attempt, "held", expires_at))
    _answer(writes, cmd, "EstoqueReservado", request_id, reserved_until=expires_at)
    metrics.hold("held")


def _answer(writes: Writes, cmd: PedidoCriado, status: str, request_id: str | None, **extra: Any) -> None:
    event = AtualizarStatus(order_id=cmd.order_id, attempt=cmd.attempt, status=status, **extra)  # type: ignore[arg-type]
    writes.answers.append((event.event_id, str(cmd.order_id), request_id, event.model_dump(mode="json")))


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as the column arrays `unnest` takes (empty columns for no rows)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]
