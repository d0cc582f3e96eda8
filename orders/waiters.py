"""Long-poll support: wakes `GET /orders/{id}?wait=` as soon as the order's status changes.

A change applied by this process wakes its waiters at once (`changed`, called after commit),
handing them the order as the change wrote it: the long-poll answers without reading it again.
Changes made by another orders process are found by one query every POLL_SECONDS for all
waiting orders together, and only while someone waits (the poller sleeps otherwise). (PostgreSQL
NOTIFY would wake them too, but it serialises every commit on the server: see shared/outbox.py.)

The orders this process accepted and has not seen decided yet are remembered (`accepted`,
at most REMEMBERED): a long-poll for one of them starts waiting without reading it, since the
client asks right after its POST. Only a long-poll: were the order decided by another orders
process meanwhile, the poller finds it within POLL_SECONDS and the answer is read then; a plain
GET always reads."""

import asyncio
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from typing import Any

import asyncpg

from shared.edge import Capacity

log = logging.getLogger(__name__)
POLL_SECONDS = 0.1
REMEMBERED = 10_000
STATUSES = "SELECT order_id::text AS order_id, status FROM orders WHERE order_id = ANY($1::uuid[])"


class StatusWaiters:
    def __init__(self, pool: asyncpg.Pool, max_waiting: int) -> None:
        self.pool = pool
        self.capacity = Capacity("long-polls", max_waiting)
        # order id -> {future: the status its waiter read}; a future's result is the order as
        # written by the change, or None when only the fact of a change is known
        self._waiting: dict[str, dict[asyncio.Future[dict[str, Any] | None], str]] = defaultdict(dict)
        self._someone = asyncio.Event()  # set while anyone waits: the poller sleeps otherwise
        self._undecided: OrderedDict[str, dict[str, Any]] = OrderedDict()  # accepted here, oldest first
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="order-status-poller")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def accepted(self, order: dict[str, Any]) -> None:
        """An order this process just accepted (pending)."""
        self._undecided[order["order_id"]] = order
        if len(self._undecided) > REMEMBERED:
            self._undecided.popitem(last=False)

    def undecided(self, order_id: str) -> dict[str, Any] | None:
        """The order as accepted, if this process has not seen it change since (see above)."""
        return self._undecided.get(order_id)

    def register(self, order_id: str, status: str) -> "asyncio.Future[dict[str, Any] | None]":
        """A future resolved when the order leaves `status` (the status the caller just read):
        with the order as changed, or None if it must be read again."""
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting[order_id][future] = status
        self._someone.set()
        return future

    def discard(self, order_id: str, future: "asyncio.Future[dict[str, Any] | None]") -> None:
        waiting = self._waiting.get(order_id)
        if waiting is not None:
            waiting.pop(future, None)
            if not waiting:
                self._waiting.pop(order_id, None)
        if not self._waiting:
            self._someone.clear()

    def changed(self, orders: Mapping[str, dict[str, Any] | None]) -> None:
        """After a commit: these orders changed, each as given (None: read it again)."""
        for order_id, order in orders.items():
            self._undecided.pop(order_id, None)
            for future in self._waiting.pop(order_id, {}):
                if not future.done():
                    future.set_result(order)
        if not self._waiting:
            self._someone.clear()

    async def _poll(self) -> None:
        while True:
            await self._someone.wait()
            await asyncio.sleep(POLL_SECONDS)
            if not self._waiting:
                continue
            try:
                rows = await self.pool.fetch(STATUSES, list(self._waiting))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("long-poll status check failed; waiters keep waiting", exc_info=True)
                continue
            moved = [r["order_id"] for r in rows
                     if any(seen != r["status"] for seen in self._waiting.get(r["order_id"], {}).values())]
            self.changed(dict.fromkeys(moved))
