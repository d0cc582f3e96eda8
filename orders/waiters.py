"""Long-poll support: wakes `GET /orders/{id}?wait=` as soon as the order's status changes.

One LISTEN connection per process receives the trigger's NOTIFY for every status change, from
whichever process made it, and resolves the futures of the requests waiting on that order."""

import asyncio
import logging
from collections import defaultdict
from typing import Any

import asyncpg

log = logging.getLogger(__name__)


class StatusWaiters:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._waiting: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="order-status-listener")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _listen(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self.dsn)
                await conn.add_listener("order_status", self._on_notify)
                closed = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(lambda _: closed.done() or closed.set_result(None))
                await closed
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("status listener lost its connection; reconnecting", exc_info=True)
            self._wake_all()  # anything missed while reconnecting: let waiters re-read
            await asyncio.sleep(0.5)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, order_id: str) -> None:
        for future in self._waiting.pop(order_id, ()):
            if not future.done():
                future.set_result(None)

    def _wake_all(self) -> None:
        for order_id in list(self._waiting):
            self._on_notify(None, 0, "", order_id)

    def register(self, order_id: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[order_id].add(future)
        return future

    def discard(self, order_id: str, future: asyncio.Future[None]) -> None:
        waiting = self._waiting.get(order_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                self._waiting.pop(order_id, None)
