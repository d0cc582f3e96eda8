"""RabbitMQ topology (API.md §6) and the one way a message is built.

Every queue is a durable quorum queue with a delivery limit; what it cannot deliver goes to
`<queue>.dlq` through the dead-letter exchange. Every service declares the whole topology at
start: declaring is idempotent, and no service then depends on another having started first."""

import logging

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPConnectionError
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
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event_id,
        type=event_type,
        correlation_id=correlation_id,
        headers={"x-request-id": request_id or event_id, **(headers or {})},
    )
