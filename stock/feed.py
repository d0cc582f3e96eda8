"""The live stock feed of a store (Server-Sent Events).

Each stock API process consumes `EstoqueAlterado` from its own exclusive queue; a message only
wakes the reader of its store, which reads the ledger after its cursor once and hands the rows to
every stream of that store: one database read per store per wake-up, whatever the number of
streams (each stream reading for itself once starved a pool of 10 with a few hundred clients).
Reading the ledger (not the message) is what makes `Last-Event-ID` exact: the event id is the
movement's id, and a client that reconnects gets every movement after it, in order, whichever
instance it reaches. (Movements of one store commit in id order: see db.lock_feeds.)"""

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from shared.edge import Capacity
from shared.messaging import EXCHANGE
from stock import db

log = logging.getLogger(__name__)
PAGE = 500
SAFETY_REREAD_SECONDS = 5.0  # also re-read now and then, should a notification be lost
BACKLOG_PAGES = 64  # read pages a stream may fall behind by; beyond, it is ended and resumes
RETRY_SECONDS = 1.0


class _Stream:
    __slots__ = ("lagging", "pages")

    def __init__(self) -> None:
        self.pages: asyncio.Queue[list[asyncpg.Record]] = asyncio.Queue(BACKLOG_PAGES)
        self.lagging = False


class _Store:
    """One store's reader and the streams it feeds."""

    def __init__(self, pool: asyncpg.Pool, store_id: str) -> None:
        self.pool = pool
        self.store_id = store_id
        self.streams: set[_Stream] = set()
        self.wake = asyncio.Event()
        self.ready = asyncio.Event()
        self.cursor = 0  # the last movement id read, once `ready`
        self.reads = 0  # database reads after the head: what the fan-out saves, for tests
        # A fresh context: the reader serves every stream, not the request that started it.
        self.task = asyncio.get_running_loop().create_task(
            self._read(), name=f"stock-feed-{store_id}", context=contextvars.Context())

    async def _read(self) -> None:
        while not self.ready.is_set():
            try:
                self.cursor = await self.pool.fetchval(db.FEED_HEAD, self.store_id)
                self.ready.set()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("stock feed head read failed; retrying", exc_info=True)
                await asyncio.sleep(RETRY_SECONDS)
        while True:
            self.wake.clear()
            try:
                full = await self._read_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("stock feed read failed; retrying", exc_info=True)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if full:
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=SAFETY_REREAD_SECONDS)
            except TimeoutError:
                pass

    async def _read_once(self) -> bool:
        rows = await self.pool.fetch(db.FEED_AFTER, self.store_id, self.cursor, PAGE)
        self.reads += 1
        if rows:
            self.cursor = rows[-1]["id"]
            for stream in self.streams:
                if stream.pages.full():
                    stream.lagging = True  # too slow a client: it is ended, and resumes
                else:
                    stream.pages.put_nowait(rows)
        return len(rows) == PAGE


class StockFeed:
    def __init__(self, pool: asyncpg.Pool, max_streams: int) -> None:
        self.pool = pool
        self.capacity = Capacity("event streams", max_streams)  # taken and given back by the API
        self._stores: dict[str, _Store] = {}
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
            if self._queue is None or wanted == self._bound or wanted != bool(self._stores):
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
        store = self._stores.get(store_id) if isinstance(store_id, str) else None
        if store is not None:
            store.wake.set()

    async def head(self, store_id: str) -> int:
        return await self.pool.fetchval(db.FEED_HEAD, store_id)

    async def stream(self, store_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
        store = self._stores.get(store_id)
        if store is None:
            store = self._stores[store_id] = _Store(self.pool, store_id)
        stream = _Stream()
        store.streams.add(stream)  # from here on, every row the reader reads reaches us
        try:
            await self._follow(True)
            await store.ready.wait()
            cursor = after
            # Resumed from before the reader's cursor: what lies between is read for this
            # stream alone, once; everything after it comes from the reader.
            while cursor < store.cursor:
                rows = await self.pool.fetch(db.FEED_AFTER, store_id, cursor, PAGE)
                caught_up = [r for r in rows if r["id"] <= store.cursor]
                for row in caught_up:
                    cursor = row["id"]
                    yield _event(row)
                if len(caught_up) < len(rows) or len(rows) < PAGE:
                    break
            while not stream.lagging:
                for row in await stream.pages.get():
                    if row["id"] > cursor:
                        cursor = row["id"]
                        yield _event(row)
        finally:
            self._leave(store, stream)

    def _leave(self, store: _Store, stream: _Stream) -> None:
        store.streams.discard(stream)
        if not store.streams and self._stores.get(store.store_id) is store:
            store.task.cancel()
            del self._stores[store.store_id]
        if not self._stores:
            task = asyncio.get_running_loop().create_task(self._follow(False))
            self._unbinding.add(task)
            task.add_done_callback(self._unbinding.discard)


def _event(row: asyncpg.Record) -> dict[str, Any]:
    return {"event": "stock", "id": str(row["id"]), "data": orjson.dumps(row["body"]).decode()}
