"""Transactional outbox: events are written with the state change, and a relay publishes them.

Exactly one relay per database and lane publishes at a time (a session advisory lock), so events
leave in the order they were written; the others wait as stand-ins and take over within a second
if the leader dies. Rows are deleted only after the broker confirmed them: a crash in between publishes
them again, which the consumers' inbox turns into a no-op."""

import asyncio
import logging

import asyncpg
from aio_pika.abc import AbstractExchange

from shared.events import Event
from shared.messaging import ROUTED_EVENTS, Outgoing, build_properties, publish_batch

log = logging.getLogger(__name__)

RELAY_LOCK = 7_000_002
BATCH = 500
POLL_SECONDS = 0.05
# Right after a publish, look again this soon, then twice as late after each empty look, up to
# POLL_SECONDS. The leader of a lane runs in one process; writers in the others cannot wake it
# (no NOTIFY, see OutboxRelay), so at a fixed 50 ms a stock worker's answer waited 25 ms on
# average for the relay of another worker (p50 59 ms at 100 orders/s, measured); a fixed 3 ms
# cost a third of a core of empty looks at 100 orders/s.
FIRST_LOOK_SECONDS = 0.002
_COLUMNS = "id, event_id::text, event_type, correlation_id, request_id, body::text AS body"
SELECT_ROUTED = f"SELECT {_COLUMNS} FROM outbox WHERE event_type = ANY($1::text[]) ORDER BY id LIMIT $2"
SELECT_UNROUTED = f"SELECT {_COLUMNS} FROM outbox WHERE event_type <> ALL($1::text[]) ORDER BY id LIMIT $2"

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
    """Publishes one lane of the outbox. Two lanes run side by side so that a flood of stock
    changes (an ERP import writes one EstoqueAlterado per item) never delays the messages an
    order waits for; order is kept within a lane, which is all any consumer relies on (per order
    for commands and answers, per item for stock changes).

    No NOTIFY wakes the relay: NOTIFY serialises every committing transaction on the server (it
    takes a global lock at commit), which halved the reservation throughput measured with pgbench.
    The relay is woken in-process by writers (`wake()`) and otherwise polls an index every
    POLL_SECONDS, which costs next to nothing when the outbox is empty."""

    def __init__(self, dsn: str, exchange: AbstractExchange, lane: str) -> None:
        self.dsn = dsn
        self.exchange = exchange
        self.lane = lane
        self._routed = lane == "orders"
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.lane}")

    def wake(self) -> None:
        self._wake.set()

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
        # A connection of its own: the lock lives as long as it does, and the relay never
        # competes with request handlers for a pooled connection.
        # A healthy relay talks to the server every POLL_SECONDS; one that hangs is cut off by
        # the server after a minute, which frees its lock for a stand-in.
        # Its DELETEs commit without waiting for the WAL flush: a delete lost in a crash only
        # publishes those events again, which the consumers' inboxes make no-ops; the relay's
        # next batch no longer waits a disk flush behind the last one.
        conn = await asyncpg.connect(self.dsn, server_settings={
            "idle_session_timeout": "60s", "synchronous_commit": "off"})
        try:
            lock = RELAY_LOCK + (0 if self._routed else 1)
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                # A stand-in: writers' wake-ups are for the leader (trying the lock at each
                # commit cost a round trip per batch), so only a stop cuts this wait short.
                if await self._pause(1.0, wakeable=False):
                    return
            pause = POLL_SECONDS
            while True:
                published = await self.flush(conn)
                if published == BATCH:
                    continue
                if self._stopping.is_set():
                    return
                pause = FIRST_LOOK_SECONDS if published else min(2 * pause, POLL_SECONDS)
                await self._pause(pause)
        finally:
            await conn.close()

    async def _pause(self, seconds: float, *, wakeable: bool = True) -> bool:
        """Waits for a wake-up (if `wakeable`), a stop or the timeout. True when stopping."""
        try:
            await asyncio.wait_for((self._wake if wakeable else self._stopping).wait(), timeout=seconds)
        except TimeoutError:
            pass
        self._wake.clear()
        return self._stopping.is_set()

    async def flush(self, conn: asyncpg.Connection) -> int:
        query = SELECT_ROUTED if self._routed else SELECT_UNROUTED
        rows = await conn.fetch(query, list(ROUTED_EVENTS), BATCH)
        if not rows:
            return 0
        # One write for the batch, in outbox order, then every confirm (see publish_batch).
        await publish_batch(self.exchange, [self._outgoing(row) for row in rows])
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        return len(rows)

    def _outgoing(self, row: asyncpg.Record) -> Outgoing:
        properties = build_properties(event_id=row["event_id"], event_type=row["event_type"],
                                      correlation_id=row["correlation_id"], request_id=row["request_id"])
        return Outgoing(row["body"].encode(), row["event_type"], properties, mandatory=self._routed)


_RUNNING: list[OutboxRelay] = []


def start_relays(dsn: str, exchange: AbstractExchange) -> list[OutboxRelay]:
    """Both lanes; each leads in at most one process at a time (an advisory lock per lane)."""
    relays = [OutboxRelay(dsn, exchange, "orders"), OutboxRelay(dsn, exchange, "stock-changes")]
    for relay in relays:
        relay.start()
    _RUNNING.extend(relays)
    return relays


async def stop_relays(relays: list[OutboxRelay]) -> None:
    await asyncio.gather(*(relay.stop() for relay in relays))
    for relay in relays:
        _RUNNING.remove(relay)


def wake_relays() -> None:
    """Called by a writer after its commit: publish now instead of at the next poll."""
    for relay in _RUNNING:
        relay.wake()
