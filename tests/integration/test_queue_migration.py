"""Dead-lettering at least once on a broker that already runs the queues (shared/broker.py,
shared/queue_migration.py): queues declared by the previous version, with other arguments and
messages in them, are replaced in place by every process starting at once, and lose nothing."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from shared.broker import connect, declare_topology, work_queue_arguments
from shared.messaging import DEAD_LETTER_EXCHANGE, EXCHANGE, QUEUES, STOCK_ORDERS
from shared.settings import Settings
from tooling.devenv import Rabbit, local_servers
from tooling.stack import _with_vhost

OLD_ARGUMENTS = {  # what the previous version declared: dead-lettering at most once
    "x-queue-type": "quorum", "x-delivery-limit": 5,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE, "x-dead-letter-routing-key": f"{STOCK_ORDERS}.dlq",
}


@pytest.fixture
async def vhost(infrastructure: None) -> AsyncIterator[tuple[Rabbit, str, str]]:
    settings = Settings()
    _, rabbit = local_servers(settings)
    assert rabbit is not None, "tests need the local RabbitMQ"
    name = f"test-mig-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbit.ensure_vhost, name)
    try:
        yield rabbit, name, _with_vhost(settings.amqp_url, name)
    finally:
        await asyncio.to_thread(rabbit.delete_vhost, name)


async def old_broker(url: str, messages: int) -> list[str]:
    """The topology of the previous version, with `messages` commands waiting in stock.orders."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await channel.declare_queue(STOCK_ORDERS, durable=True, arguments=OLD_ARGUMENTS)
        for event in QUEUES[STOCK_ORDERS]:
            await queue.bind(exchange, routing_key=event)
        ids = [str(uuid.uuid4()) for _ in range(messages)]
        for message_id in ids:
            await exchange.publish(aio_pika.Message(b"{}", message_id=message_id, type="PedidoCriado"),
                                   routing_key="PedidoCriado")
        return ids


async def start_a_process(url: str) -> AbstractRobustConnection:
    connection = await connect(url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await declare_topology(connection, channel, delivery_limit=5)
    return connection


async def test_queues_of_the_previous_version_are_migrated_by_processes_starting_together(
    vhost: tuple[Rabbit, str, str],
) -> None:
    rabbit, name, url = vhost
    waiting = await old_broker(url, 200)

    processes = await asyncio.gather(*(start_a_process(url) for _ in range(3)))
    try:
        listed = await asyncio.to_thread(rabbit.ctl, "list_queues", "-p", name, "name", "arguments",
                                         "--no-table-headers", "--quiet")
        assert "stock.orders.migrating" not in listed.stdout
        # The queue now has the new arguments: declaring it with them is accepted...
        channel = await processes[0].channel()
        queue = await channel.declare_queue(STOCK_ORDERS, durable=True,
                                            arguments=work_queue_arguments(STOCK_ORDERS, 5))
        # ...it kept every message, each once, and takes new ones through its bindings.
        exchange = await channel.get_exchange(EXCHANGE)
        await exchange.publish(aio_pika.Message(b"{}", message_id="after"), routing_key="PedidoCancelado")
        got: list[str] = []
        deadline = asyncio.get_running_loop().time() + 15
        while len(got) < len(waiting) + 1 and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)  # polling the queue, bounded by the deadline
            else:
                got.append(str(message.message_id))
        assert sorted(got) == sorted([*waiting, "after"])
        assert "at-least-once" in listed.stdout and "reject-publish" in listed.stdout
    finally:
        for connection in processes:
            await connection.close()


async def test_a_fresh_broker_gets_the_new_arguments_and_a_second_start_changes_nothing(
    vhost: tuple[Rabbit, str, str],
) -> None:
    _, _, url = vhost
    for _ in range(2):
        connection = await start_a_process(url)
        await connection.close()
