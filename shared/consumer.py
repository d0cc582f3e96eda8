"""The consuming side of every queue: parse, handle in one transaction, then ack.

- Each message goes to the handler its event type has in the service's routing table (`Route`).
- A message that cannot be parsed or validated, or that no route takes, is a poison message: it
  goes to `<queue>.dlq` at once with the reason in `x-dead-letter-reason`, and the queue keeps
  flowing. If that publish fails, the message is rejected instead and the queue dead-letters it
  (at least once, shared/broker.py); it is never left for a later bulk ack to swallow.
- A transient failure (deadlock, serialization) is retried here with backoff; past that the
  message is returned to the queue, and the quorum queue's delivery limit dead-letters it if it
  never succeeds. The database being unreachable (down, restarting, failing over) is retried
  here for up to OUTAGE_PATIENCE_SECONDS instead: an outage says nothing about the message, and
  returning it at each failure would spend the delivery limit on the outage (a database down
  for ~25 s dead-lettered healthy messages, and their orders stayed pending for good).
- The ack comes only after the handler's transaction committed: a crash before it redelivers,
  and the inbox makes the redelivery a no-op. Acks go out in bulk (`BulkAcks`): one
  `basic.ack(multiple=True)` for all the messages a batch committed, never past a message
  still in hand."""

import asyncio
import logging
import random
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any

import aio_pika
import aiormq
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import AbstractChannel as AmqpChannel
from asgi_correlation_id import correlation_id
from pydantic import ValidationError

from shared import metrics, tracing
from shared.db import UNAVAILABLE as DATABASE_UNAVAILABLE
from shared.edge import REQUEST_ID
from shared.messaging import DEAD_LETTER_EXCHANGE, TRACEPARENT, valid_traceparent

log = logging.getLogger(__name__)

# The database is not there (down, restarting, failing over: shared.db.UNAVAILABLE): nothing to
# do with the message being handled. (TimeoutError is an OSError too: a query that hangs, e.g. on
# a lock a stuck peer holds, is waited out the same way.)
UNAVAILABLE = DATABASE_UNAVAILABLE

TRANSIENT = (
    *UNAVAILABLE,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,  # two deliveries racing to create the same row
    asyncio.TimeoutError,
)
# How long one delivery keeps retrying while the database is unreachable before it is returned
# to the queue. With the delivery limit (5) a message outlives an outage of about half an hour.
OUTAGE_PATIENCE_SECONDS = 300.0
ATTEMPTS = 6  # for the other transient failures, per delivery

@dataclass(frozen=True, slots=True)
class Route:
    """How a queue's consumer reads and handles one event type: an entry of a service's routing
    table (orders/consumer.py, stock/consumer.py)."""

    parse: Callable[[dict[str, Any]], Any]  # the validated event from the JSON body
    handle: Callable[[Any, str], Awaitable[None]]  # (event, message_id), in its own transaction


Routes = Mapping[str, Route]


class Consumer:
    def __init__(self, queue: AbstractQueue, channel: AbstractChannel, routes: Routes) -> None:
        self.queue = queue
        self.channel = channel
        self.routes = routes
        self._tag: str | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._acks: weakref.WeakSet[BulkAcks] = weakref.WeakSet()

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stops taking messages, then lets the ones in hand finish and be acked."""
        if self._tag is not None:
            await self.queue.cancel(self._tag)
            self._tag = None
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=15)
        await asyncio.gather(*(acks.drain() for acks in list(self._acks)))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Registered before anything awaits: deliveries start in tag order, so by the time a
        # later message is handled, every earlier one of this channel is known to be in hand.
        try:
            acks = BulkAcks.of(message.channel)
        except aiormq.exceptions.ChannelInvalidStateError:
            return  # the channel closed under it: the broker delivers the message again
        acks.received(_tag(message))
        self._acks.add(acks)
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        token = correlation_id.set(_request_id(message))
        carried = valid_traceparent((message.headers or {}).get("traceparent"))
        try:
            # The consumer's span (tracing on) is the parent of every row this message causes;
            # off, the message's own traceparent is carried as it came.
            with tracing.span(f"{self.queue.name} process {message.type}", "consumer", carried, **{
                    "messaging.system": "rabbitmq", "messaging.destination.name": self.queue.name}) as mine:
                trace = TRACEPARENT.set(mine)
                try:
                    await self._process(message, acks)
                finally:
                    TRACEPARENT.reset(trace)
        finally:
            correlation_id.reset(token)
            if task is not None:
                self._in_flight.discard(task)

    def parse(self, message: AbstractIncomingMessage) -> tuple[Route, Any]:
        body = parse_json(message)
        event_type = message.type or body.get("event_type")
        route = self.routes.get(event_type) if isinstance(event_type, str) else None
        if route is None:
            raise ValueError(f"no handler for event type {event_type!r} on {self.queue.name}")
        if body.get("event_type", event_type) != event_type:
            raise ValueError(f"message type {event_type!r} does not match its body")
        return route, route.parse(body)

    async def _process(self, message: AbstractIncomingMessage, acks: "BulkAcks") -> None:
        try:
            route, event = self.parse(message)
        except (ValidationError, ValueError, orjson.JSONDecodeError) as exc:
            await self._settle(message, acks, self._dead_letter(message, f"invalid message: {exc}"[:1000]))
            metrics.consumed(self.queue.name, message.type, "dead_lettered")
            return
        message_id = message.message_id or str(event.event_id)
        try:
            await self._handle(route, event, message_id)
        except Exception:
            log.exception("handling failed; returning the message to the queue",
                          extra={"message_id": message_id, "event_type": message.type})
            await self._settle(message, acks, message.nack(requeue=True))
            metrics.consumed(self.queue.name, message.type, "redelivered")
            return
        acks.handled(_tag(message))
        metrics.consumed(self.queue.name, message.type, "acked")

    async def _handle(self, route: Route, event: Any, message_id: str) -> None:
        """The handler, retried on transient failures (see the module docstring). A plain loop:
        it costs nothing when the first attempt succeeds, which is nearly always."""
        started = asyncio.get_running_loop().time()
        for attempt in count(1):
            try:
                await route.handle(event, message_id)
                return
            except TRANSIENT as exc:
                waited = asyncio.get_running_loop().time() - started
                if _give_up(exc, attempt, waited):
                    raise
                _log_retry(exc, attempt)
                await asyncio.sleep(_backoff(attempt))

    @staticmethod
    async def _settle(message: AbstractIncomingMessage, acks: "BulkAcks", settling: Awaitable[Any]) -> None:
        """Acks or nacks `message` on its own; only then may bulk acks reach past it. If that
        fails on a channel still open, the message stays in hand until the channel closes
        (and the broker delivers it again): never acked by a later bulk ack."""
        try:
            await settling
        except Exception:
            log.warning("could not settle a message", extra={"message_id": message.message_id}, exc_info=True)
            if not message.channel.is_closed:
                return
        acks.settled(_tag(message))

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """To `<queue>.dlq` with the reason in a header; if that publish is not confirmed, the
        queue dead-letters it itself (a reject: at least once, with `x-first-death-reason`)."""
        log.warning("dead-lettering poison message", extra={"message_id": message.message_id, "reason": reason})
        try:
            await self._publish_dead_letter(message, reason)
        except Exception:
            log.warning("dead-letter publish failed; rejecting the message to the queue's dead-letter exchange",
                        extra={"message_id": message.message_id}, exc_info=True)
            await message.nack(requeue=False)
            return
        await message.ack()

    async def _publish_dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        dlx = await self.channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        headers = dict(message.headers or {})
        headers.update({"x-dead-letter-reason": reason, "x-original-queue": self.queue.name})
        await dlx.publish(
            aio_pika.Message(
                body=message.body,
                headers=headers,
                content_type=message.content_type,
                message_id=message.message_id,
                type=message.type,
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=f"{self.queue.name}.dlq",
            mandatory=True,
        )


class BulkAcks:
    """The acks of one channel, sent together.

    A batch commits many messages at once; acking each costs a frame, a write and the broker's
    work for each. Instead, the messages handled in one turn of the event loop are acked with a
    single `basic.ack(multiple=True)` up to the highest of them below the first message still in
    hand (multiple=True acks *every* unacked delivery up to that tag on the channel, so it must
    never reach past one not committed yet). Those handled above a message still in hand, e.g.
    one waiting on a lock, are acked one by one: never held back, or a slow message would stall
    the channel once its prefetch is used up. Messages nacked or dead-lettered are settled on
    their own first.

    One instance per channel (`of`), shared by every Consumer on it. Every delivery needing an
    ack on the channel must go through a Consumer: a bulk ack would cover one it does not know."""

    def __init__(self, channel: AmqpChannel) -> None:
        self._channel = weakref.ref(channel)  # not kept alive by _BULK_ACKS, which it keys
        self._in_hand: set[int] = set()
        self._handled: list[int] = []  # not acked yet
        self._flush_due = False
        self._last_send: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, channel: AmqpChannel) -> "BulkAcks":
        acks = _BULK_ACKS.get(channel)
        if acks is None:
            acks = _BULK_ACKS[channel] = cls(channel)
        return acks

    def received(self, tag: int) -> None:
        self._in_hand.add(tag)

    def handled(self, tag: int) -> None:
        """Committed: ack it (soon, with whatever else is handled by then)."""
        self._in_hand.discard(tag)
        self._handled.append(tag)
        self._flush_soon()

    def settled(self, tag: int) -> None:
        """Nacked or acked on its own: it no longer holds back the others."""
        self._in_hand.discard(tag)
        self._flush_soon()

    async def drain(self) -> None:
        """Sends what can be sent now and waits for it (at shutdown)."""
        self._flush()
        if self._last_send is not None:
            await asyncio.wait([self._last_send])

    def _flush_soon(self) -> None:
        # After the current turn of the loop: the other messages of the same batch, woken by
        # the same commit, are marked handled by then and share the ack.
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        first_in_hand = min(self._in_hand, default=None)
        below = [t for t in self._handled if first_in_hand is None or t < first_in_hand]
        above = [t for t in self._handled if first_in_hand is not None and t > first_in_hand]
        self._handled = []
        acks = [(max(below), True)] if below else []
        acks += [(tag, False) for tag in above]
        if acks:
            self._last_send = asyncio.create_task(self._send(acks, after=self._last_send))

    async def _send(self, acks: list[tuple[int, bool]], after: asyncio.Task[None] | None) -> None:
        # In the order decided: a bulk ack written before a single ack it already covered would
        # make that one an unknown tag, which closes the channel.
        if after is not None:
            await asyncio.wait([after])
        channel = self._channel()
        if channel is None:
            return  # gone, and its deliveries with it
        try:
            for tag, multiple in acks:
                await channel.basic_ack(tag, multiple=multiple)
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError,
                ConnectionError) as exc:
            # The channel is gone, and with it the deliveries: the broker hands them out again
            # and the inbox turns the copies into no-ops.
            log.warning("could not ack; the messages will be redelivered", extra={"error": repr(exc)})


_BULK_ACKS: "weakref.WeakKeyDictionary[AmqpChannel, BulkAcks]" = weakref.WeakKeyDictionary()


def _give_up(exc: BaseException, attempt: int, waited: float) -> bool:
    """After ATTEMPTS tries, unless the database was unreachable: then after OUTAGE_PATIENCE_SECONDS."""
    if isinstance(exc, UNAVAILABLE):
        return waited >= OUTAGE_PATIENCE_SECONDS
    return attempt >= ATTEMPTS


def _backoff(attempt: int) -> float:
    """Exponential from 50 ms with up to a second of jitter, at most 2 s."""
    return min(0.05 * 2 ** (attempt - 1) + random.uniform(0, 1), 2.0)


def _log_retry(exc: BaseException, attempt: int) -> None:
    if attempt & (attempt - 1):
        return  # attempts 1, 2, 4, 8...: an outage of minutes logs a few lines per message
    log.warning("transient failure; retrying", extra={
        "attempt": attempt, "error": f"{type(exc).__name__}: {exc}"})


def _tag(message: AbstractIncomingMessage) -> int:
    # Only messages consumed with no_ack lack a tag; every consumer here acks.
    assert message.delivery_tag is not None, "a consumed message carries its delivery tag"
    return message.delivery_tag


def _request_id(message: AbstractIncomingMessage) -> str | None:
    """The message's request id if it obeys the edge's rule (a publisher on the broker is a
    client too: its header goes into logs and into the answers' outbox rows), else the order id."""
    value = (message.headers or {}).get("x-request-id")
    if isinstance(value, str):
        value = value.encode(errors="replace")
    if isinstance(value, bytes) and REQUEST_ID.fullmatch(value):
        return value.decode()
    return message.correlation_id


def parse_json(message: AbstractIncomingMessage) -> dict[str, Any]:
    body = orjson.loads(message.body)
    if not isinstance(body, dict):
        raise ValueError("message body is not a JSON object")  # noqa: TRY004 - poison, dead-lettered
    return body
