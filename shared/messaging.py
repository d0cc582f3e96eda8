"""RabbitMQ topology (API.md §6), the one way a message is built, and publishing in batches.

Every queue is a durable quorum queue with a delivery limit; what it cannot deliver goes to
`<queue>.dlq` through the dead-letter exchange. Every service declares the whole topology at
start: declaring is idempotent, and no service then depends on another having started first."""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPConnectionError
from aiormq.abc import ChannelFrame
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.frame import marshal
from pamqp.header import ContentHeader
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

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


async def connect(url: str) -> AbstractRobustConnection:
    """A connection that re-establishes itself, its channels, queues and consumers after the
    broker comes back. The first connect is retried too: a service may start before the broker."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((OSError, AMQPConnectionError)),
        wait=wait_exponential(multiplier=0.2, max=3), stop=stop_after_delay(120), reraise=True,
        before_sleep=lambda s: log.warning("broker not reachable yet; retrying"),
    ):
        with attempt:
            return await aio_pika.connect_robust(url, client_properties={"connection_name": "inventory"})
    raise AssertionError("unreachable")


async def declare_topology(channel: AbstractChannel, delivery_limit: int) -> AbstractExchange:
    exchange = await channel.declare_exchange(
        EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    for name, events in QUEUES.items():
        queue = await declare_work_queue(channel, name, delivery_limit)
        for event in events:
            await queue.bind(exchange, routing_key=event)
        dead = await channel.declare_queue(
            f"{name}.dlq", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx, routing_key=f"{name}.dlq")
    return exchange


async def declare_work_queue(
    channel: AbstractChannel, name: str, delivery_limit: int
) -> AbstractQueue:
    return await channel.declare_queue(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": f"{name}.dlq",
        },
    )


# ----- what every message carries (API.md §6) ----------------------------------------------------
CONTENT_TYPE = "application/json"


def build_message(
    *,
    body: bytes,
    event_id: str,
    event_type: str,
    correlation_id: str | None,
    request_id: str | None,
    headers: dict[str, str | int] | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body=body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event_id,
        type=event_type,
        correlation_id=correlation_id,
        headers={"x-request-id": request_id or event_id, **(headers or {})},
    )


def build_properties(
    *, event_id: str, event_type: str, correlation_id: str | None, request_id: str | None
) -> commands.Basic.Properties:
    """`build_message`'s properties, for `publish_batch` (which skips aio-pika's Message)."""
    return commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
        message_id=event_id,
        message_type=event_type,
        correlation_id=correlation_id,
        headers={"x-request-id": request_id or event_id},
    )


# ----- publishing in batches ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outgoing:
    body: bytes
    routing_key: str
    properties: commands.Basic.Properties  # from build_properties; message_id is required
    mandatory: bool


async def publish_batch(exchange: AbstractExchange, messages: Sequence[Outgoing]) -> None:
    """Publishes `messages` in order and returns once the broker confirmed every one of them.

    Raises like `Exchange.publish` if any fails: `PublishError` for a `mandatory` message no
    queue takes, `DeliveryError` for a nack, `ChannelInvalidStateError` and the like when the
    channel closes first; the caller then publishes the whole batch again (consumers' inboxes
    drop the copies).

    Why not `Exchange.publish` per message: each costs ~150 µs of CPU (a message object, a lock,
    a timeout, a task, futures and one socket write), and stock publishes four messages per
    order. Here the frames of the whole batch go out in one write, and each message's
    confirmation is registered in aiormq's own channel bookkeeping as its `basic_publish` does,
    so the broker's acks, nacks and returns settle them the same way (~35 µs per message in all,
    measured). tests/integration/test_publishing.py pins that to the aiormq in use."""
    if not messages:
        return
    # The concrete Exchange knows its channel; the abstract interface does not say so.
    channel = await cast(aio_pika.Exchange, exchange).channel.get_underlay_channel()
    assert isinstance(channel, aiormq.Channel) and channel.publisher_confirms
    payload = _frames(channel, exchange.name, messages)
    # Futures made by the channel are failed by aiormq when the channel closes; plain ones are
    # cheaper (no bookkeeping per message), so one of the former watches over the batch.
    closed = channel.create_future()
    async with channel.lock:
        written = channel.create_future()
        # Queued first, registered next with no await in between: a cancellation while waiting
        # for room in the queue leaves no trace, and no confirm can arrive before registration.
        await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False, drain_future=written))
        first_tag = channel.delivery_tag + 1
        confirmations = [_expect_confirm(channel, first_tag + i, m) for i, m in enumerate(messages)]
        channel.delivery_tag += len(messages)
        await written  # the socket took it (flow control, as basic_publish waits)
    confirmed = asyncio.gather(*confirmations)
    try:
        await asyncio.wait((confirmed, closed), return_when=asyncio.FIRST_COMPLETED)
        if not confirmed.done():
            # The confirms will never come; they are left to go with the dead channel.
            closed.result()  # raises why the channel closed
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed before the confirms")
        confirmed.result()  # raises on a nack or a return
    finally:
        closed.cancel()
        for i, message in enumerate(messages):
            message_id = message.properties.message_id
            if (message.mandatory and message_id is not None
                    and channel.message_id_delivery_tag.get(message_id) == first_tag + i):
                del channel.message_id_delivery_tag[message_id]


def _frames(channel: aiormq.Channel, exchange: str, messages: Sequence[Outgoing]) -> bytes:
    methods: dict[tuple[str, bool], bytes] = {}  # one Basic.Publish frame per routing key
    parts: list[bytes] = []
    for m in messages:
        method = methods.get((m.routing_key, m.mandatory))
        if method is None:
            method = marshal(commands.Basic.Publish(
                exchange=exchange, routing_key=m.routing_key, mandatory=m.mandatory), channel.number)
            methods[(m.routing_key, m.mandatory)] = method
        parts.append(method)
        parts.append(marshal(ContentHeader(body_size=len(m.body), properties=m.properties), channel.number))
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
