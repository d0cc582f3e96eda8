"""A batch of several-store orders (stock/reserve.py decide_batch) against a fake connection:
many orders sharing a hot store are still decided in one batch of three statements, with every
candidate store's rows locked by one of them in (store_id, sku) order."""

import uuid
from datetime import UTC, datetime
from typing import Any

from shared.events import Line, PedidoCriado
from stock import db
from stock.reserve import Arrival, decide_batch

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeConnection:
    """Answers the batch's statements from `stock` ((store, sku) -> on_hand) and records them."""

    def __init__(self, stock: dict[tuple[str, str], int]) -> None:
        self.stock = stock
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        self.calls.append((sql, args))
        if sql == db.CLAIM_MESSAGES:
            return [{"message_id": m} for m in args[1]]
        if sql in (db.SAVE_DECISIONS, db.ANSWER_AGAIN):
            return []  # the claimed outbox rows: nothing to hand over here
        assert sql == db.LOCK_ROWS
        return [{"kind": "item", "store_id": s, "sku": k, "on_hand": self.stock[(s, k)], "reserved": 0,
                 "version": 1, "updated_at": NOW, "now": NOW}
                for s, k in zip(args[1], args[2], strict=True) if (s, k) in self.stock]

    async def execute(self, sql: str, *args: Any) -> None:
        self.calls.append((sql, args))


def order(stores: list[str], sku: str, quantity: int, split: bool = True) -> Arrival:
    cmd = PedidoCriado(order_id=uuid.uuid4(), attempt=1, customer_id="c", stores=stores, split=split,
                       items=[Line(sku=sku, quantity=quantity)])
    return Arrival(cmd, str(cmd.event_id), None)


async def test_many_orders_sharing_a_hot_store_are_one_batch_of_three_statements() -> None:
    hot, stores = "HOT", [f"S{i}" for i in range(5)]
    stock = {(hot, "X"): 50, **{(s, "X"): 10 for s in stores}}
    batch = [order([stores[i % 5], hot, stores[(i + 1) % 5]], "X", 1 + i % 3) for i in range(300)]
    conn = FakeConnection(stock)
    await decide_batch(conn, batch, ttl_seconds=60)  # type: ignore[arg-type]

    assert [sql for sql, _ in conn.calls] == [db.CLAIM_MESSAGES, db.LOCK_ROWS, db.SAVE_DECISIONS]
    _, (_, lock_stores, lock_skus) = conn.calls[1]
    keys = list(zip(lock_stores, lock_skus, strict=True))
    assert keys == sorted(set(keys)) == sorted(stock), "every candidate row once, in the lock order"

    args = conn.calls[2][1]
    states, movements = args[2], list(zip(*args[4:14], strict=True))
    # Each item's versions go up by one per movement, and its figures never pass on hand.
    left = dict(stock)
    by_item: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for m in movements:
        by_item.setdefault((m[0], m[1]), []).append(m)
        left[(m[0], m[1])] -= m[4]  # reserved_delta
    for key, moves in by_item.items():
        assert [m[2] for m in moves] == list(range(2, 2 + len(moves))), key
        assert all(0 <= m[6] <= m[5] == stock[key] for m in moves), key
    assert all(n >= 0 for n in left.values())
    # A refused order could not be split over what its stores had left at the end.
    for arrival, state in zip(batch, states, strict=True):
        if state == "rejected":
            assert sum(left[(s, "X")] for s in arrival.cmd.stores) < arrival.cmd.items[0].quantity
    assert states.count("held") >= 40


async def test_arrival_order_decides_who_gets_the_last_units() -> None:
    stock = {("A", "X"): 1, ("B", "X"): 1}
    first, second, third = order(["A", "B"], "X", 1), order(["B", "A"], "X", 1), order(["A", "B"], "X", 1)
    conn = FakeConnection(stock)
    await decide_batch(conn, [first, second, third], ttl_seconds=60)  # type: ignore[arg-type]
    args = conn.calls[2][1]
    assert list(zip(args[0], args[2], strict=True)) == [
        (first.cmd.order_id, "held"), (second.cmd.order_id, "held"), (third.cmd.order_id, "rejected")]
    assert [(m[0], m[7]) for m in zip(*args[4:14], strict=True)] == [
        ("A", first.cmd.order_id), ("B", second.cmd.order_id)]
