"""Transactional outbox: events are written with the state change, and a relay publishes them.

Exactly one relay per database publishes at a time (a session advisory lock), so events leave in
the order they were written; the others wait as stand-ins and take over within a second if the
leader dies. Rows are deleted only after the broker confirmed them: a crash in between publishes
them again, which the consumers' inbox turns into a no-op."""

import asyncio
import logging
from typing import Any

import asyncpg
from aio_pika.abc import AbstractExchange
from prometheus_client import Gauge

from shared.events import Event
from shared.messaging import ROUTED_EVENTS, build_message

log = logging.getLogger(__name__)

RELAY_LOCK = 7_000_002
BATCH = 500
OUTBOX_BACKLOG = Gauge("outbox_backlog", "Events written but not yet confirmed by the broker")

INSERT_OUTBOX = """
INSERT INTO outbox (event_id, event_type, correlation_id, request_id, body)
VALUES ($1, $2, $3, $4, $5::jsonb)
"""


async def add_to_outbox(
    conn: asyncpg.Connection, event: Event, correlation_id: str | None, request_id: str | None
) -> None:
    body = event.model_dump(mode="json")
    await conn.execute(
        INSERT_OUTBOX, event.event_id, event.event_type, correlation_id, request_id, body  # type: ignore[attr-defined]
    )


class OutboxRelay:
    def __init__(self, dsn: str, pool: asyncpg.Pool, exchange: AbstractExchange) -> None:
        self.dsn = dsn
        self.pool = pool
        self.exchange = exchange
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Publishes what is already written (if leader), then stops."""
        self._stopping.set()
        self._wake.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._lead()
            except Exception:
                log.warning("outbox relay interrupted; retrying", exc_info=True)
                await self._pause(1.0)

    async def _lead(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):
                if await self._pause(1.0):
                    return
            await conn.add_listener("outbox", self._on_notify)
            while True:
                published = await self.flush()
                if published == BATCH:
                    continue
                if self._stopping.is_set():
                    return
                await self._pause(1.0)
        finally:
            await conn.close()

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _pause(self, seconds: float) -> bool:
        """Waits for a NOTIFY, a stop or the timeout. True when stopping."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass
        self._wake.clear()
        return self._stopping.is_set()

    async def flush(self) -> int:
        rows = await self.pool.fetch(
            "SELECT id, event_id, event_type, correlation_id, request_id, body::text AS body "
            "FROM outbox ORDER BY id LIMIT $1",
            BATCH,
        )
        if not rows:
            OUTBOX_BACKLOG.set(0)
            return 0
        # All publishes of a batch are in flight together; the channel keeps their order.
        await asyncio.gather(*(self._publish(row) for row in rows))
        await self.pool.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        OUTBOX_BACKLOG.set(max(0, len(rows) - BATCH))
        return len(rows)

    async def _publish(self, row: asyncpg.Record) -> None:
        event_id = str(row["event_id"])
        message = build_message(
            body=row["body"].encode(),
            event_id=event_id,
            event_type=row["event_type"],
            correlation_id=row["correlation_id"],
            request_id=row["request_id"],
        )
        await self.exchange.publish(
            message, routing_key=row["event_type"], mandatory=row["event_type"] in ROUTED_EVENTS
        )

