"""Transactional outbox: events are written with the state change, and published after it.

Two ways out, both with publisher confirms:
- The hot writers claim their rows and publish them themselves from memory right after their
  commit (shared/handover.py): no read of the outbox on the way of an order.
- Every other writer wakes its own process's relays after its commit (`wake_relays`). A relay
  takes rows with `FOR UPDATE SKIP LOCKED` inside a transaction that deletes them, publishes
  them and commits only once the broker confirmed them: relays of several processes never take
  the same row, and a relay that dies mid-way leaves its rows to be taken again. A relay takes
  a claimed row only once it is ORPHAN_SECONDS old (its writer died before publishing it), and
  any row nobody woke a relay for at its slow look every SWEEP_SECONDS.
A row published twice (a crash after the confirm, before the delete) is a no-op at its
consumer (inbox).

Order: rows leave in id order within one batch, but processes overtake each other freely.
Nothing relies on order across messages: consumers use the order's `attempt` and state machine,
and stock changes carry their `version` (tests/integration/test_reordering.py delivers every
answer in every order).

A row the broker refuses (properties beyond the frame size, unroutable, nacked, refused by a
policy) never holds back the rows behind it: it is tried RETRIES times, then moved to
`outbox_set_aside` with its error, counted in /metrics, and `dlq outbox` lists and re-sends it.
A broker that is down or failing over refuses nothing: its rows wait, uncounted."""

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import aiormq
import asyncpg
from aio_pika.abc import AbstractExchange

from shared import metrics
from shared.events import Event
from shared.handover import HandOver, outgoing
from shared.messaging import ROUTED_EVENTS, TRACEPARENT, FrameTooLarge, publish_each

log = logging.getLogger(__name__)

BATCH = 500
RETRIES = 5  # tries of a row the broker refuses, before it is set aside
# A nack is also what a quorum queue answers while it has no leader (a node died, an election):
# a nacked row is set aside only once it is this old as well, never during a failover.
NACK_PATIENCE_SECONDS = 120.0
SWEEP_SECONDS = 5.0  # the slow look for rows nobody woke a relay for
ORPHAN_SECONDS = 10.0  # a claimed row this old lost its writer (shared/handover.py)
LANES = ("orders", "stock-changes")

_COLUMNS = ("id, event_id::text, event_type, correlation_id, request_id, traceparent, body::text AS body, attempts, "
            "EXTRACT(EPOCH FROM now() - created_at)::float8 AS age")
_UNCLAIMED = f"(NOT claimed OR created_at < now() - interval '{ORPHAN_SECONDS:g} seconds')"
_LANE = {"orders": f"event_type = ANY($1::text[]) AND {_UNCLAIMED}",
         "stock-changes": f"event_type <> ALL($1::text[]) AND {_UNCLAIMED}"}
TAKE = {lane: f"""DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE {where} ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING {_COLUMNS}""" for lane, where in _LANE.items()}
ANY_WAITING = {lane: f"SELECT EXISTS (SELECT 1 FROM outbox WHERE {where})" for lane, where in _LANE.items()}
DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"
RECORD_REFUSAL = "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1"
SET_ASIDE = """
WITH gone AS (DELETE FROM outbox WHERE id = $1 RETURNING *)
INSERT INTO outbox_set_aside (id, event_id, event_type, correlation_id, request_id, traceparent, body,
                              created_at, attempts, error)
SELECT id, event_id, event_type, correlation_id, request_id, traceparent, body, created_at, attempts + 1, $2
FROM gone
"""

INSERT_OUTBOX = """
INSERT INTO outbox (event_id, event_type, correlation_id, request_id, traceparent, body)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
"""


async def add_to_outbox(
    conn: asyncpg.Connection, event: Event, correlation_id: str | None, request_id: str | None
) -> None:
    body = event.model_dump(mode="json")
    await conn.execute(INSERT_OUTBOX, event.event_id, event.event_type,  # type: ignore[attr-defined]
                       correlation_id, request_id, TRACEPARENT.get(), body)


class _Unsettled(Exception):
    """Some rows of a batch were not confirmed: its transaction is rolled back."""

    def __init__(self, rows: Sequence[asyncpg.Record], verdicts: list[BaseException | None]) -> None:
        super().__init__("unsettled outbox batch")
        self.rows, self.verdicts = rows, verdicts


class OutboxRelay:
    """Publishes one lane of the outbox. Two lanes run side by side so that a flood of stock
    changes (an ERP import writes one EstoqueAlterado per item) never delays the messages an
    order waits for.

    No NOTIFY wakes the relay: NOTIFY serialises every committing transaction on the server (it
    takes a global lock at commit), which halved the reservation throughput measured with pgbench."""

    def __init__(self, dsn: str, exchange: AbstractExchange, lane: str) -> None:
        self.dsn = dsn
        self.exchange = exchange
        self.lane = lane
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # After a channel closed under a batch, the rows are tried one at a time for a while:
        # only then is a refusal that closes the channel the fault of one known row.
        self._one_by_one = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.lane}")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Publishes what is already written, then stops."""
        self._stopping.set()
        self._wake.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                # A connection of its own: the relay never competes with request handlers for a
                # pooled connection. Its commits do not wait for the WAL flush: a delete lost in
                # a crash only publishes those events again, which the inboxes make no-ops.
                conn = await asyncpg.connect(self.dsn, server_settings={
                    "idle_session_timeout": "60s", "synchronous_commit": "off"})
                try:
                    await self._serve(conn)
                    return
                finally:
                    await conn.close()
            except (Exception, asyncio.CancelledError) as exc:
                # A CancelledError not aimed at this task (one a library passed on as a reason)
                # must not end the relay: it would stop publishing for good, silently.
                if isinstance(exc, asyncio.CancelledError) and _cancelled():
                    raise
                if self._stopping.is_set():
                    return
                log.warning("outbox relay interrupted; retrying", extra={"lane": self.lane}, exc_info=True)
                await self._pause(1.0, wakeable=False)

    async def _serve(self, conn: asyncpg.Connection) -> None:
        look = True  # at start: rows a process left when it died
        while True:
            if look:
                while await self.flush(conn) == self._limit():
                    pass
            if self._stopping.is_set():
                return
            look = await self._pause(SWEEP_SECONDS) or await conn.fetchval(
                ANY_WAITING[self.lane], list(ROUTED_EVENTS))

    async def _pause(self, seconds: float, *, wakeable: bool = True) -> bool:
        """Waits for a wake-up (if `wakeable`), a stop or the timeout. True unless timed out."""
        try:
            await asyncio.wait_for((self._wake if wakeable else self._stopping).wait(), timeout=seconds)
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    def _limit(self) -> int:
        return 1 if self._one_by_one else BATCH

    async def flush(self, conn: asyncpg.Connection) -> int:
        """Publishes the next batch; the number of rows taken."""
        limit = self._limit()
        try:
            async with conn.transaction():
                rows = sorted(await conn.fetch(TAKE[self.lane], list(ROUTED_EVENTS), limit),
                              key=lambda r: r["id"])
                if not rows:
                    return 0
                verdicts = await publish_each(self.exchange, [outgoing(r) for r in rows])
                if any(v is not None for v in verdicts):
                    raise _Unsettled(rows, verdicts)
        except _Unsettled as unsettled:
            await self._settle(conn, unsettled.rows, unsettled.verdicts)
        if self._one_by_one:
            self._one_by_one -= 1
        return len(rows)

    async def _settle(self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record],
                      verdicts: list[BaseException | None]) -> None:
        """After a batch the broker did not wholly confirm: the confirmed rows are deleted, a
        row the broker refused counts a try (and is set aside after RETRIES), and the others wait."""
        alone = len(rows) == 1
        refused = [(row, v) for row, v in zip(rows, verdicts, strict=True) if v is not None and _refusal(v, alone)]
        outage = next((v for v in verdicts if v is not None and not _refusal(v, alone)), None)
        set_aside = [row for row, v in refused if _given_up(row, v)]
        async with conn.transaction():
            await conn.execute(DELETE, [row["id"] for row, v in zip(rows, verdicts, strict=True) if v is None])
            for row, verdict in refused:
                error = f"{type(verdict).__name__}: {verdict}"[:2000]
                fields = {"lane": self.lane, "event_id": row["event_id"], "error": error}
                if row in set_aside:
                    await conn.execute(SET_ASIDE, row["id"], error)
                    log.error("outbox row set aside: the broker refuses it", extra=fields)
                else:
                    await conn.execute(RECORD_REFUSAL, row["id"], error)
                    log.warning("the broker refused an outbox row", extra=fields)
        # Counted once committed (a rolled-back settlement is tried again).
        metrics.OUTBOX_REFUSED.labels(self.lane).inc(len(refused))
        metrics.OUTBOX_SET_ASIDE.labels(self.lane).inc(len(set_aside))
        if outage is not None:
            if isinstance(outage, aiormq.exceptions.AMQPChannelError | aiormq.exceptions.ConnectionClosed) \
                    and not alone:
                self._one_by_one = len(rows)  # the channel was closed by something in this batch
            raise outage  # the relay pauses, then tries again


def _given_up(row: asyncpg.Record, verdict: BaseException) -> bool:
    """Whether a refused row goes to `outbox_set_aside` now. Too large: at once (it never fits).
    Unroutable (a return): after RETRIES tries. Nacked: after RETRIES tries and
    NACK_PATIENCE_SECONDS, since the same nack that a policy gives for good, a quorum queue gives
    for the seconds of a leader election."""
    if isinstance(verdict, FrameTooLarge):
        return True
    if row["attempts"] + 1 < RETRIES:
        return False
    nacked = isinstance(verdict, aiormq.exceptions.DeliveryError) and not isinstance(
        verdict, aiormq.exceptions.PublishError)
    return not nacked or row["age"] >= NACK_PATIENCE_SECONDS


def _cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _refusal(verdict: BaseException, alone: bool) -> bool:
    """Whether the broker refused this message itself (as opposed to being unreachable).

    A return (unroutable), a nack or a frame too large name their message. A channel or
    connection the broker closes with an error code names none when a batch was in flight, but
    does when the message went alone. A connection lost, or closed by the broker for its own
    reasons (CONNECTION_FORCED at a shutdown: plain ConnectionClosed), refuses nothing."""
    if isinstance(verdict, FrameTooLarge | aiormq.exceptions.DeliveryError):
        return True
    closed_by_broker = (
        isinstance(verdict, aiormq.exceptions.ChannelClosed | aiormq.exceptions.ConnectionClosed)
        and type(verdict) not in (aiormq.exceptions.ChannelClosed, aiormq.exceptions.ConnectionClosed))
    return alone and closed_by_broker


_RUNNING: list[OutboxRelay] = []
_HANDING_OVER: list[HandOver] = []


class Relays(NamedTuple):
    lanes: list[OutboxRelay]
    hand_over: HandOver


def start_relays(dsn: str, exchange: AbstractExchange, lanes: Sequence[str] = LANES, *,
                 handing: AbstractExchange | None = None) -> Relays:
    """The relays of `lanes` publish on `exchange`, the hand-over on `handing` (a channel of its
    own: publishes of two tasks never interleave on one channel's confirms)."""
    relays = Relays([OutboxRelay(dsn, exchange, lane) for lane in lanes],
                    HandOver(dsn, handing or exchange, wake_relays))
    for relay in relays.lanes:
        relay.start()
    relays.hand_over.start()
    _RUNNING.extend(relays.lanes)
    _HANDING_OVER.append(relays.hand_over)
    return relays


async def stop_relays(relays: Relays | None) -> None:
    """What is in hand and what is written leave first (graceful stop)."""
    if relays is None:
        return
    _HANDING_OVER.remove(relays.hand_over)
    await relays.hand_over.stop()
    await asyncio.gather(*(relay.stop() for relay in relays.lanes))
    for relay in relays.lanes:
        _RUNNING.remove(relay)


def wake_relays() -> None:
    """Called by a writer after its commit: its events leave now, from this process."""
    for relay in _RUNNING:
        relay.wake()


def hand_over(rows: Sequence[Mapping[str, Any]]) -> None:
    """Called by a hot writer after its commit with the claimed rows it wrote (RETURNING
    shared.handover.WRITTEN_COLUMNS): this process publishes them now. With no relay running
    (OUTBOX_RELAY=false) they stay in the table, like every other row."""
    if rows and _HANDING_OVER:
        _HANDING_OVER[0].give(rows)



# ----- rows set aside (`dlq outbox`, `dlq resend`) ------------------------------------------------
LIST_SET_ASIDE = """
SELECT id, event_id::text, event_type, correlation_id, left(request_id, 200) AS request_id, attempts, error,
       set_aside_at, length(body::text) AS body_bytes
FROM outbox_set_aside ORDER BY id LIMIT $1
"""
# Back into the outbox as new rows (tries start again); a relay takes them at its next look.
RESEND_SET_ASIDE = """
WITH back AS (
    DELETE FROM outbox_set_aside
    WHERE id IN (SELECT id FROM outbox_set_aside WHERE $1::bigint[] IS NULL OR id = ANY($1::bigint[])
                 ORDER BY id LIMIT $2)
    RETURNING *
)
INSERT INTO outbox (event_id, event_type, correlation_id, request_id, traceparent, body, created_at)
SELECT event_id, event_type, correlation_id, request_id, traceparent, body, created_at FROM back ORDER BY id
RETURNING id
"""
