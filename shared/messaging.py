"""The messages of API.md §6: names of the topology, the one way a message is built, and
publishing in batches with a verdict per message.

Connecting, declaring the topology and consuming are in shared/broker.py."""

import asyncio
import logging
import re
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange
from aiormq.abc import ChannelFrame
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.common import FieldTable
from pamqp.frame import marshal
from pamqp.header import ContentHeader

log = logging.getLogger(__name__)

EXCHANGE = "inventory.events"
DEAD_LETTER_EXCHANGE = "inventory.dead-letters"

STOCK_ORDERS = "stock.orders"
ORDERS_STATUS = "orders.status"
QUEUES: dict[str, tuple[str, ...]] = {
    STOCK_ORDERS: ("PedidoCriado", "PedidoConfirmado", "PedidoCancelado"),
    ORDERS_STATUS: ("AtualizarStatus",),
}
# Events some queue must receive: publishing them is `mandatory`, so a missing binding is an
# error at the relay instead of a silently dropped order.
ROUTED_EVENTS = frozenset(e for events in QUEUES.values() for e in events)

# ----- what every message carries (API.md §6) ----------------------------------------------------
CONTENT_TYPE = "application/json"
# How long a batch waits for its confirms (and for room on the connection) before its messages
# count as not published: a frozen broker closes nothing. Clients notice a silent broker after
# three heartbeats (18 s with the HA cluster's 5 s): this is longer, so a live broker that is only
# slow is not given up on, and shorter than the relay's patience with an outage.
CONFIRM_TIMEOUT_SECONDS = 20.0

# The W3C trace context of the work in hand (a request, a message): carried like the request
# id, from the request or message that caused an event into the outbox row and the message.
TRACEPARENT: ContextVar[str | None] = ContextVar("traceparent", default=None)
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def valid_traceparent(value: object) -> str | None:
    """`value` if it is a W3C traceparent (version 00 shape, ids not all zero), else None:
    a malformed one is dropped, as the W3C spec asks, never passed on."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or not _TRACEPARENT.fullmatch(value) or value.startswith("ff"):
        return None
    _, trace_id, span_id, _ = value.split("-")
    return None if set(trace_id) == {"0"} or set(span_id) == {"0"} else value


def message_headers(event_id: str, request_id: str | None, traceparent: str | None) -> FieldTable:
    headers: FieldTable = {"x-request-id": request_id or event_id}
    if traceparent:
        headers["traceparent"] = traceparent
    return headers


def build_message(
    *,
    body: bytes,
    event_id: str,
    event_type: str,
    correlation_id: str | None,
    request_id: str | None,
    traceparent: str | None = None,
    headers: dict[str, str | int] | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body=body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event_id,
        type=event_type,
        correlation_id=correlation_id,
        headers={**message_headers(event_id, request_id, traceparent), **(headers or {})},
    )


def build_properties(
    *, event_id: str, event_type: str, correlation_id: str | None, request_id: str | None,
    traceparent: str | None = None,
) -> commands.Basic.Properties:
    """`build_message`'s properties, for `publish_each` (which skips aio-pika's Message)."""
    return commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
        message_id=event_id,
        message_type=event_type,
        correlation_id=correlation_id,
        headers=message_headers(event_id, request_id, traceparent),
    )


# ----- publishing in batches ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outgoing:
    body: bytes
    routing_key: str
    properties: commands.Basic.Properties  # from build_properties; message_id is required
    mandatory: bool


class FrameTooLarge(aiormq.exceptions.AMQPError):
    """The message's properties do not fit in one frame of this connection. Sent anyway, the
    broker would close the whole connection (FRAME_ERROR), cutting every channel on it."""

    reason = "properties of %d bytes exceed the connection's frame_max of %d"


async def publish_batch(exchange: AbstractExchange, messages: Sequence[Outgoing]) -> None:
    """`publish_each`, raising the first message's failure (tests and tools)."""
    for verdict in await publish_each(exchange, messages):
        if verdict is not None:
            raise verdict


async def publish_each(exchange: AbstractExchange, messages: Sequence[Outgoing]) -> list[BaseException | None]:
    """Publishes `messages` in order and returns, once the broker settled every one, a verdict
    per message: None when confirmed, else why not — `FrameTooLarge` (never sent),
    `PublishError` (a `mandatory` message no queue takes), `DeliveryError` (nacked), or the
    reason the channel closed first (for every message not confirmed by then).

    Why not `Exchange.publish` per message: each costs ~150 µs of CPU (a message object, a lock,
    a timeout, a task, futures and one socket write), and stock publishes four messages per
    order. Here the frames of the whole batch go out in one write, and each message's
    confirmation is registered in aiormq's own channel bookkeeping as its `basic_publish` does,
    so the broker's acks, nacks and returns settle them the same way (~35 µs per message in all,
    measured). tests/integration/test_publishing.py pins that to the aiormq in use."""
    verdicts: list[BaseException | None] = [None] * len(messages)
    if not messages:
        return verdicts
    # The concrete Exchange knows its channel; the abstract interface does not say so.
    channel = await cast(aio_pika.Exchange, exchange).channel.get_underlay_channel()
    assert isinstance(channel, aiormq.Channel) and channel.publisher_confirms
    frame_max = channel.connection.connection_tune.frame_max
    headers = [marshal(ContentHeader(body_size=len(m.body), properties=m.properties), channel.number)
               for m in messages]
    sent = [i for i, header in enumerate(headers) if not frame_max or len(header) <= frame_max]
    for i in set(range(len(messages))) - set(sent):
        verdicts[i] = FrameTooLarge(len(headers[i]), frame_max)
    if not sent:
        return verdicts
    payload = _frames(channel, exchange.name, [(messages[i], headers[i]) for i in sent])
    # Futures made by the channel are failed by aiormq when the channel closes; plain ones are
    # cheaper (no bookkeeping per message), so one of the former watches over the batch.
    closed = channel.create_future()
    # Every wait below is bounded: a broker that stops answering without closing the connection
    # (a frozen node, SIGSTOP) would otherwise hold the relay here for good, since neither the
    # write queue of a dead connection nor a confirm that never comes fails on its own.
    deadline = asyncio.get_running_loop().time() + CONFIRM_TIMEOUT_SECONDS
    try:
        confirmations, first_tag = await _write(channel, payload, [messages[i] for i in sent], deadline)
    except BaseException:
        closed.cancel()
        raise
    try:
        await asyncio.wait((asyncio.gather(*confirmations, return_exceptions=True), closed),
                           timeout=_left(deadline),
                           return_when=asyncio.FIRST_COMPLETED)
        for n, i in enumerate(sent):
            verdicts[i] = _verdict(confirmations[n], closed)
    finally:
        closed.cancel()
        for n, i in enumerate(sent):
            message_id = messages[i].properties.message_id
            if (messages[i].mandatory and message_id is not None
                    and channel.message_id_delivery_tag.get(message_id) == first_tag + n):
                del channel.message_id_delivery_tag[message_id]
    return verdicts


async def _write(channel: aiormq.Channel, payload: bytes, messages: Sequence[Outgoing],
                 deadline: float) -> tuple[list[asyncio.Future[object]], int]:
    """Queues the batch's frames and registers its confirms; TimeoutError if the lock or room in
    the write queue (a dead connection's never empties) is not had by `deadline`."""
    async with asyncio.timeout_at(deadline) as limit, channel.lock:
        written = channel.create_future()
        # Queued first, registered next with no await in between: a cancellation while waiting
        # for the lock or for room in the queue leaves no trace, and no confirm can arrive
        # before registration.
        await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False, drain_future=written))
        limit.reschedule(None)  # registered: the wait below ends by itself
        first_tag = channel.delivery_tag + 1
        confirmations = [_expect_confirm(channel, first_tag + n, m) for n, m in enumerate(messages)]
        channel.delivery_tag += len(messages)
        # The socket took it (flow control, as basic_publish waits).
        await asyncio.wait((written,), timeout=_left(deadline))
    return confirmations, first_tag


def _error(exc: BaseException | None) -> Exception | None:
    """A verdict the relay can raise and catch. aiormq closes the channels of a connection it
    found stuck (no heartbeat: a frozen broker) with the reader task's CancelledError as the
    reason; raised as a verdict, that ended the relay's task silently and for good."""
    if exc is None or isinstance(exc, Exception):
        return exc
    return aiormq.exceptions.ChannelInvalidStateError(f"channel closed: {exc!r}")


def _left(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _verdict(confirmation: asyncio.Future[object], closed: asyncio.Future[object]) -> BaseException | None:
    if confirmation.done() and not confirmation.cancelled():
        return _error(confirmation.exception())
    # The confirm will never come; it is left to go with the dead channel.
    confirmation.cancel()
    if closed.done() and not closed.cancelled() and closed.exception() is not None:
        return _error(closed.exception())
    if not closed.done():
        # Not refused, only unanswered: the relay keeps the row and publishes it again.
        return TimeoutError(f"no confirm within {CONFIRM_TIMEOUT_SECONDS} s")
    return aiormq.exceptions.ChannelInvalidStateError("channel closed before the confirms")


def _frames(channel: aiormq.Channel, exchange: str, messages: Sequence[tuple[Outgoing, bytes]]) -> bytes:
    methods: dict[tuple[str, bool], bytes] = {}  # one Basic.Publish frame per routing key
    parts: list[bytes] = []
    for m, header in messages:
        method = methods.get((m.routing_key, m.mandatory))
        if method is None:
            method = marshal(commands.Basic.Publish(
                exchange=exchange, routing_key=m.routing_key, mandatory=m.mandatory), channel.number)
            methods[(m.routing_key, m.mandatory)] = method
        parts.append(method)
        parts.append(header)
        for start in range(0, len(m.body), channel.max_content_size):
            parts.append(marshal(ContentBody(m.body[start:start + channel.max_content_size]), channel.number))
    return b"".join(parts)


def _expect_confirm(channel: aiormq.Channel, delivery_tag: int, message: Outgoing) -> asyncio.Future[object]:
    confirmation: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    channel.confirmations[delivery_tag] = confirmation
    if message.mandatory and message.properties.message_id is not None:
        # How aiormq finds the confirmation of a returned (unroutable) message.
        channel.message_id_delivery_tag[message.properties.message_id] = delivery_tag
    return confirmation
