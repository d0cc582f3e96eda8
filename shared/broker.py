"""The one way a process opens RabbitMQ: connections that fail over between the brokers of a
cluster, the topology of API.md §6 (declared by every service at start: declaring is
idempotent, and no service then depends on another having started first), QoS, and a
connection for publishing apart from the one for consuming.

Every work queue is a durable quorum queue with a delivery limit; what it cannot deliver goes to
`<queue>.dlq` through the dead-letter exchange, *at least once*: the broker keeps a dead letter
in its queue until the dead-letter queue confirmed it (`x-dead-letter-strategy`, which needs
`x-overflow: reject-publish`). A queue declared earlier with other arguments is migrated in
place (shared/queue_migration.py)."""

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from shared.messaging import DEAD_LETTER_EXCHANGE, EXCHANGE, QUEUES
from shared.queue_migration import declares, finish_migration, migrate_queue

log = logging.getLogger(__name__)

CONNECT_PATIENCE_SECONDS = 120  # a service may start before the broker (compose)
ATTEMPT_TIMEOUT_SECONDS = 5  # one broker that does not answer (stopped, blackholed) is left soon
RECONNECT_SECONDS = 1
# Restoring channels, QoS, topology and consumers on a new connection. A queue.bind or a consume
# on a quorum queue can wait, with no timeout of aio-pika's, on a node that is frozen (SIGSTOP)
# but not yet known to be down: seen holding a reconnection there for good. Past this the
# connection is dropped and the next broker tried, round the list, until one restores it.
RESTORE_TIMEOUT_SECONDS = 15


# ----- connections that fail over ----------------------------------------------------------------
def broker_urls(amqp_url: str) -> list[str]:
    """`AMQP_URL` may list the brokers of one cluster, comma-separated (API.md §1)."""
    urls = [part.strip() for part in amqp_url.split(",") if part.strip()]
    if not urls:
        raise ValueError("AMQP_URL lists no broker")
    return urls


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection, over a list of brokers of one cluster.

    `connect_robust` reconnects to its one URL. aio-pika calls `_on_connection_close` both when a
    live connection is lost and when an attempt to connect fails (UnderlayConnection.connect),
    and every attempt connects to `self.url`: moving `url` to the next broker there makes each
    new attempt go to the next node, round the list, until one answers. Channels, queues and
    consumers are then restored on it as they are after any reconnection; publishes that were
    not confirmed fail, and the relay publishes them again."""

    def __init__(self, urls: list[str], **kwargs: Any) -> None:
        self.urls = [URL(url) for url in urls]
        self._at = 0
        super().__init__(self.urls[0], **kwargs)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called and len(self.urls) > 1:
            self._at = (self._at + 1) % len(self.urls)
            self.url = self.urls[self._at]
            log.warning("broker connection lost or refused; trying the next broker",
                        extra={"broker": f"{self.url.host}:{self.url.port}"})
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        try:
            async with asyncio.timeout(RESTORE_TIMEOUT_SECONDS):
                await super()._on_connected()
        except TimeoutError:
            log.warning("restoring channels and consumers timed out; dropping the connection",
                        extra={"broker": f"{self.url.host}:{self.url.port}"})
            transport = self.transport
            if transport is not None:
                # Its close moves to the next broker (above) and aio-pika's loop tries again.
                await asyncio.gather(transport.connection.close(ConnectionError("restore timed out")),
                                     return_exceptions=True)
            raise


async def connect(amqp_url: str, name: str = "inventory") -> AbstractRobustConnection:
    """A connection to the first broker of `amqp_url` that answers; it moves to another when its
    own is lost, and re-establishes its channels, queues and consumers there."""
    connection = FailoverConnection(
        broker_urls(amqp_url), client_properties={"connection_name": name},
        reconnect_interval=str(RECONNECT_SECONDS), fail_fast="0")
    try:
        await asyncio.wait_for(connection.connect(timeout=ATTEMPT_TIMEOUT_SECONDS), CONNECT_PATIENCE_SECONDS)
    except BaseException:
        await connection.close()
        raise
    return connection


# ----- topology ----------------------------------------------------------------------------------
def work_queue_arguments(name: str, delivery_limit: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": f"{name}.dlq",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_topology(connection: AbstractRobustConnection, channel: AbstractChannel,
                           delivery_limit: int) -> AbstractExchange:
    """Declares everything on `channel` (which then restores it after a reconnection)."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    for name, events in QUEUES.items():
        # The dead-letter queue first: at-least-once dead-lettering needs somewhere to go.
        dead = await channel.declare_queue(f"{name}.dlq", durable=True, arguments={"x-queue-type": "quorum"})
        await dead.bind(dlx, routing_key=f"{name}.dlq")
        arguments = work_queue_arguments(name, delivery_limit)
        if not await declares(connection, name, arguments):
            log.warning("queue declared with other arguments; migrating it", extra={"queue": name})
            await migrate_queue(connection, name, events, arguments)
        queue = await declare_work_queue(channel, name, delivery_limit)
        for event in events:
            await queue.bind(exchange, routing_key=event)
        await finish_migration(connection, name)
    return exchange


async def declare_work_queue(channel: AbstractChannel, name: str, delivery_limit: int) -> AbstractQueue:
    return await channel.declare_queue(name, durable=True, arguments=work_queue_arguments(name, delivery_limit))


# ----- the broker of a process -------------------------------------------------------------------
@dataclass
class Broker:
    """Consumers use `channel`; publishers (relays) use `exchange`, on a connection of their own,
    so that a publish the broker answers by closing the connection never cuts a consumer."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    publisher: AbstractRobustConnection
    exchange: AbstractExchange  # the relays'
    handing: AbstractExchange  # the outbox hand-over's, on a channel of its own (shared/handover.py)

    async def queue(self, name: str) -> AbstractQueue:
        # The queue object the topology declared on this channel: only those (and their
        # consumers) are restored after a reconnection; `ensure=False` would make a stray one.
        return await self.channel.get_queue(name)

    async def close(self) -> None:
        await self.publisher.close()
        await self.connection.close()


async def open_broker(amqp_url: str, *, delivery_limit: int, prefetch: int, name: str) -> Broker:
    """Connects, sets the QoS of the consuming channel and declares the topology."""
    connection = await connect(amqp_url, f"{name}-consume")
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=prefetch)
    await declare_topology(connection, channel, delivery_limit)
    publisher = await connect(amqp_url, f"{name}-publish")
    publishing = await publisher.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await publishing.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    handing = await publisher.channel(publisher_confirms=True, on_return_raises=True)
    handing_exchange = await handing.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    return Broker(connection, channel, publisher, exchange, handing_exchange)

