"""Deciding holds for a batch of orders in one transaction (PedidoCriado).

Under load a worker takes every PedidoCriado it has in hand and decides them together: its
orders locked and its messages checked against the inbox by one statement, every row it needs
locked by the next, the decisions made in memory one order after another (arrival order, so the
first customer wins), then every write as one statement and one commit. A hot SKU is then locked
once per batch instead of once per order, which is what lets a flash sale go faster than
one-order-per-transaction ever can; and a batch costs five round trips to PostgreSQL whatever
its size. A batch of one is the quiet-time case.

A several-store order locks its sku's rows in every candidate store, in the same statement as
everyone else's: orders sharing a hot store still share one lock of it per batch, so several
stores cost a batch more rows, never more round trips or transactions.

Lock order as everywhere (stock/db.py): the batch's orders first (by order_id), then all its
items at once in (store_id, sku) order."""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

from shared import metrics
from shared.events import AtualizarStatus, PedidoCriado
from stock import db
from stock.domain import Figures, allocate, decision_answer, hold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """A PedidoCriado as the worker received it."""

    cmd: PedidoCriado
    message_id: str
    request_id: str | None
    # Its message's traceparent (its consumer span's when tracing): the parent of the answer.
    traceparent: str | None = None


@dataclass
class Item:
    """A locked item, followed in memory through the batch."""

    figures: Figures
    version: int
    at: datetime


@dataclass
class Locked:
    """What CLAIM_MESSAGES and LOCK_ROWS found, locked until commit."""

    fresh: set[str]  # message ids never handled before
    known: dict[uuid.UUID, asyncpg.Record]  # stock_order rows: attempt, state
    items: dict[tuple[str, str], Item]
    now: datetime  # read after the item locks


class DecidedRow(NamedTuple):
    order_id: uuid.UUID
    attempt: int
    state: str
    expires_at: datetime | None


class MovementRow(NamedTuple):
    """A hold's movement: the item's figures after it, as SAVE_DECISIONS writes them."""

    store_id: str
    sku: str
    version: int
    on_hand_delta: int
    reserved_delta: int
    on_hand: int
    reserved: int
    order_id: uuid.UUID
    at: datetime
    request_id: str | None


class AnswerRow(NamedTuple):
    event_id: uuid.UUID
    correlation_id: str
    request_id: str | None
    body: dict[str, Any]
    traceparent: str | None


@dataclass
class Writes:
    """Everything the batch will write, as rows for the set-based SAVE_DECISIONS."""

    orders: list[DecidedRow] = field(default_factory=list)
    movements: list[MovementRow] = field(default_factory=list)
    answers: list[AnswerRow] = field(default_factory=list)


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


async def decide_batch(conn: asyncpg.Connection, batch: list[Arrival], ttl_seconds: float) -> list[asyncpg.Record]:
    """Decides the batch inside the caller's transaction, each message recorded in the inbox; a
    message handled before changes nothing. Each order's request id goes into its events.
    Returns the claimed outbox rows written, for the caller to hand over once committed."""
    locked = await _lock(conn, [a.cmd for a in batch], [a.message_id for a in batch])
    firsts: list[PedidoCriado] = []
    for arrival in batch:
        if arrival.message_id in locked.fresh:
            locked.fresh.discard(arrival.message_id)  # the same message twice in one batch counts once
            firsts.append(arrival.cmd)
    request_ids = {a.cmd.order_id: a.request_id for a in batch}
    traces = {a.cmd.order_id: a.traceparent for a in batch}
    again = asked_again(firsts, locked.known)
    written: list[asyncpg.Record] = []
    if again:  # the decision already made, answered again; no stock changes
        written += await conn.fetch(db.ANSWER_AGAIN, [c.order_id for c in again], [c.attempt for c in again],
                                    [request_ids.get(c.order_id) for c in again],
                                    [traces.get(c.order_id) for c in again])
        metrics.hold("answered_again", len(again))
    cmds = fresh_commands(firsts, locked.known)
    if not cmds:
        return written
    expires_at = locked.now + timedelta(seconds=ttl_seconds)
    writes = Writes()
    for cmd in cmds:
        _decide_one(cmd, locked.items, expires_at, writes, request_ids.get(cmd.order_id),
                    traces.get(cmd.order_id))
    written += await conn.fetch(db.SAVE_DECISIONS, *_columns(writes.orders, DecidedRow),
                                *_columns(writes.movements, MovementRow), *_columns(writes.answers, AnswerRow))
    for cmd in cmds:
        metrics.decided(cmd.occurred_at)
    return written


def candidate_items(cmds: list[PedidoCriado]) -> list[tuple[str, str]]:
    """Every (store_id, sku) a batch may hold, in the global lock order."""
    return sorted({(store, line.sku) for c in cmds for store in c.stores for line in c.items})


async def _lock(conn: asyncpg.Connection, cmds: list[PedidoCriado], message_ids: list[str]) -> Locked:
    """Every candidate item of every order is locked, even of an order that turns out to be
    decided already: one round trip for all row locks is worth the rare needless one."""
    fresh = await conn.fetch(db.CLAIM_MESSAGES, [c.order_id for c in cmds], message_ids)
    keys = candidate_items(cmds)
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
    request_id: str | None, traceparent: str | None,
) -> None:
    """The allocation rule on the batch's figures so far; a hold changes them for the orders
    after it (arrival order)."""
    stock = {key: items[key].figures
             for key in ((s, line.sku) for s in cmd.stores for line in cmd.items) if key in items}
    decision = allocate(cmd.items, cmd.stores, cmd.split, stock)
    if not decision.held:
        writes.orders.append(DecidedRow(cmd.order_id, cmd.attempt, "rejected", None))
        _add_answer(writes, decision_answer(cmd.order_id, cmd.attempt, decision, None), request_id, traceparent)
        metrics.hold("rejected")
        return
    for change in hold(decision.allocations):
        item = items[(change.store_id, change.sku)]
        item.figures = item.figures.after(change)
        item.version += 1
        writes.movements.append(MovementRow(
            change.store_id, change.sku, item.version, change.on_hand_delta, change.reserved_delta,
            item.figures.on_hand, item.figures.reserved, cmd.order_id, item.at, request_id))
    writes.orders.append(DecidedRow(cmd.order_id, cmd.attempt, "held", expires_at))
    _add_answer(writes, decision_answer(cmd.order_id, cmd.attempt, decision, expires_at), request_id, traceparent)
    metrics.hold("held")


def _add_answer(writes: Writes, event: AtualizarStatus, request_id: str | None,
                traceparent: str | None) -> None:
    writes.answers.append(AnswerRow(event.event_id, str(event.order_id), request_id,
                                    event.model_dump(mode="json"), traceparent))


def _columns(rows: list[Any], row_type: type[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows (named tuples of `row_type`) as the column arrays `unnest` takes."""
    if not rows:
        return [[] for _ in row_type._fields]  # type: ignore[attr-defined]
    return [list(column) for column in zip(*rows, strict=True)]
