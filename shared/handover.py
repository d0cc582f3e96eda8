"""The outbox rows a process has just committed, published by that process from memory.

The hot writers (a new order's PedidoCriado, a stock decision's AtualizarStatus and
EstoqueAlterado) insert their outbox rows `claimed` and get them back from the same statement
(RETURNING). After the commit they hand them here (`hand_over`): this process publishes them
with publisher confirms, then deletes the confirmed ones — no read of the outbox, no
transaction of its own, one DELETE for everything confirmed within DELETE_AFTER_SECONDS. At one
order at a time that is a fraction of a round trip where the relay's look took three.

Nothing is lost on the way:
- a process that dies after its commit leaves its claimed rows in the table, and any relay's
  slow look takes a claimed row once it is ORPHAN_SECONDS old (shared/outbox.py);
- a row the broker does not confirm (refused, nacked, broker down) is unclaimed and the relays
  are woken: they publish it with the outbox's whole refusal machinery (counted tries, set aside);
- a crash between the confirm and the DELETE publishes the row again later, which the
  consumer's inbox makes a no-op — as with the relay.

Claimed rows are never taken by a relay while young, so on the normal path every row is
published once, by the process that wrote it. Rows in memory are bounded (MAX_PENDING): beyond
that they stay claimed in the table and are taken as orphans."""

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
from aio_pika.abc import AbstractExchange

from shared.messaging import ROUTED_EVENTS, Outgoing, build_properties, publish_each
from shared.tracing import published

log = logging.getLogger(__name__)

BATCH = 500
MAX_PENDING = 20_000
# Published rows are deleted together at most this long after the first of them was confirmed:
# at low load one DELETE (and one commit) for several orders instead of one each.
DELETE_AFTER_SECONDS = 0.05
# What a claimed row's RETURNING gives: everything its message needs (same names as the relay's).
WRITTEN_COLUMNS = ("id, event_id::text AS event_id, event_type, correlation_id, request_id, traceparent, "
                   "body::text AS body")
DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"
UNCLAIM = "UPDATE outbox SET claimed = false WHERE id = ANY($1::bigint[])"


def outgoing(row: Mapping[str, Any]) -> Outgoing:
    """The message of an outbox row (a relay's or a claimed one): events some queue must receive
    are `mandatory`."""
    properties = build_properties(event_id=row["event_id"], event_type=row["event_type"],
                                  correlation_id=row["correlation_id"], request_id=row["request_id"],
                                  traceparent=published(row["traceparent"], row["event_type"]))
    return Outgoing(row["body"].encode(), row["event_type"], properties,
                    mandatory=row["event_type"] in ROUTED_EVENTS)


class HandOver:
    def __init__(self, dsn: str, exchange: AbstractExchange, on_unsent: Callable[[], None]) -> None:
        self.dsn = dsn
        self.exchange = exchange
        self.on_unsent = on_unsent  # wakes the relays, which take unclaimed rows at once
        self._pending: list[Mapping[str, Any]] = []
        self._confirmed: list[int] = []  # published, to be deleted at _delete_at
        self._delete_at = 0.0
        self._ready = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-hand-over")

    def give(self, rows: Sequence[Mapping[str, Any]]) -> None:
        room = MAX_PENDING - len(self._pending)
        self._pending.extend(rows[:max(room, 0)])
        if self._pending:
            self._ready.set()

    async def stop(self) -> None:
        """Publishes what is in hand, then stops."""
        self._stopping = True
        self._ready.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self._conn is not None:
            await self._conn.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            linger = max(0.0, self._delete_at - loop.time()) if self._confirmed else None
            try:
                await asyncio.wait_for(self._ready.wait(), timeout=linger)
            except TimeoutError:
                pass
            self._ready.clear()
            while self._pending:
                batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
                try:
                    await self._publish(batch)
                except Exception:  # noqa: BLE001 - left claimed: orphans, taken by a relay later
                    log.warning("handing over outbox rows failed; a relay takes them later", exc_info=True)
            if self._confirmed and (self._stopping or len(self._confirmed) >= BATCH
                                    or loop.time() >= self._delete_at):
                await self._delete()
            if self._stopping:
                return

    async def _publish(self, batch: list[Mapping[str, Any]]) -> None:
        try:
            verdicts: list[BaseException | None] = list(
                await publish_each(self.exchange, [outgoing(row) for row in batch]))
        except Exception as exc:  # noqa: BLE001 - the channel is gone: nothing was confirmed
            verdicts = [exc] * len(batch)
        if not self._confirmed:
            self._delete_at = asyncio.get_running_loop().time() + DELETE_AFTER_SECONDS
        self._confirmed += [row["id"] for row, verdict in zip(batch, verdicts, strict=True) if verdict is None]
        unsent = [row["id"] for row, verdict in zip(batch, verdicts, strict=True) if verdict is not None]
        if unsent:
            await self._execute(UNCLAIM, unsent)
            self.on_unsent()

    async def _delete(self) -> None:
        """The confirmed rows, together: a delete lost (a crash, the database away) only
        publishes them again later, as orphans, which the inboxes make no-ops."""
        confirmed, self._confirmed = self._confirmed, []
        try:
            await self._execute(DELETE, confirmed)
        except Exception:  # noqa: BLE001 - see above
            log.warning("deleting published outbox rows failed; they will be published again", exc_info=True)

    async def _execute(self, statement: str, ids: list[int]) -> None:
        """Once again on a new connection if this one was closed under it (the server ends it
        after a minute idle)."""
        try:
            await (await self._connection()).execute(statement, ids)
        except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
            if self._conn is not None:
                self._conn.terminate()
            self._conn = None
            await (await self._connection()).execute(statement, ids)

    async def _connection(self) -> asyncpg.Connection:
        """A connection of its own; its commits do not wait for the WAL flush: a delete lost in a
        crash only publishes those events again, which the inboxes make no-ops."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, server_settings={
                "idle_session_timeout": "60s", "synchronous_commit": "off"})
        return self._conn
