"""The live stock feed of a store (Server-Sent Events).

Each stock API process consumes `EstoqueAlterado` from its own exclusive queue; a message only
wakes the streams of its store, which then read the ledger from their cursor. Reading the ledger
(not the message) is what makes `Last-Event-ID` exact: the event id is the movement's id, and a
client that reconnects gets every movement after it, in order, whichever instance it reaches."""

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from shared.messaging import EXCHANGE
from stock import db

log = logging.getLogger(__name__)
PAGE = 500
SAFETY_REREAD_SECONDS = 5.0  # also re-read now and then, should a notification be lost


class StockFeed:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._streams: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._queue: AbstractQueue | None = None
        self._bound = False
        self._binding = asyncio.Lock()
        self._unbinding: set[asyncio.Task[None]] = set()

    async def start(self, channel: AbstractChannel) -> None:
        self._queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self._queue.consume(self._on_message, no_ack=True)

    async def _follow(self, wanted: bool) -> None:
        """The queue is bound only while some client streams: with nobody listening, this
        instance would otherwise parse every stock change of every store for nothing (a third
        of a core at 300 orders/s, measured)."""
        async with self._binding:
            if self._queue is None or wanted == self._bound or wanted != bool(self._streams):
                return
            if wanted:
                await self._queue.bind(EXCHANGE, routing_key="EstoqueAlterado")
            else:
                await self._queue.unbind(EXCHANGE, routing_key="EstoqueAlterado")
            self._bound = wanted

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            store_id = orjson.loads(message.body).get("store_id")
        except (orjson.JSONDecodeError, AttributeError):
            return
        for wake in self._streams.get(store_id, ()):
            wake.set()

    async def head(self, store_id: str) -> int:
        return await self.pool.fetchval(db.FEED_HEAD, store_id)

    async def stream(self, store_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        wake = asyncio.Event()
        self._streams[store_id].add(wake)
        cursor = after
        try:
            await self._follow(True)
            while True:
                wake.clear()
                rows = await self.pool.fetch(db.FEED_AFTER, store_id, cursor, PAGE)
                for row in rows:
                    cursor = row["id"]
                    yield {"event": "stock", "id": str(cursor), "data": orjson.dumps(row["body"]).decode()}
                if len(rows) == PAGE:
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), timeout=SAFETY_REREAD_SECONDS)
                except TimeoutError:
                    pass
        finally:
            self._streams[store_id].discard(wake)
            if not self._streams[store_id]:
                self._streams.pop(store_id, None)
            if not self._streams:
                task = asyncio.get_running_loop().create_task(self._follow(False))
                self._unbinding.add(task)
                task.add_done_callback(self._unbinding.discard)
