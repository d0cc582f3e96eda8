"""Broker failover (shared/broker.py `connect`): with `AMQP_URL` listing several brokers, a
connection goes to the first that answers and moves to another when its own is lost; its
consumers and publishers carry on there.

Two "brokers" here are two TCP forwarders in front of the one local RabbitMQ: killing one (its
listener and every connection through it) is what the client sees when a node dies. The `ha`
suite runs the same function against a real 3-node cluster."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest

from shared.broker import connect
from shared.settings import Settings
from tooling.devenv import local_servers
from tooling.stack import _with_vhost, free_port


class Forwarder:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> "Forwarder":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def kill(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()


@pytest.fixture
async def broker_url(infrastructure: None) -> AsyncIterator[str]:
    settings = Settings()
    _, rabbit = local_servers(settings)
    assert rabbit is not None
    vhost = f"test-fo-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbit.ensure_vhost, vhost)
    try:
        yield _with_vhost(settings.amqp_url, vhost)
    finally:
        await asyncio.to_thread(rabbit.delete_vhost, vhost)


def via(url: str, port: int) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()


async def test_a_connection_moves_to_the_next_broker_and_its_consumer_goes_on(broker_url: str) -> None:
    real = urlsplit(broker_url)
    first, second = await Forwarder((real.hostname, real.port)).start(), await Forwarder((real.hostname, real.port)).start()
    dead = free_port()  # nothing listens there: the list's first broker never answers
    connection = await connect(",".join(via(broker_url, p) for p in (dead, first.port, second.port)))
    try:
        assert connection.url.port == first.port
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"q-{uuid.uuid4().hex[:6]}", durable=True,
                                            arguments={"x-queue-type": "quorum"})
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await got.put(message.body)
            await message.ack()

        await queue.consume(on_message)
        await channel.default_exchange.publish(aio_pika.Message(b"before"), routing_key=queue.name)
        assert await asyncio.wait_for(got.get(), 15) == b"before"

        await first.kill()  # the node dies: the connection tries the next ones, round the list

        async def publish_after_the_switch() -> None:
            while True:
                try:
                    await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key=queue.name)
                    return
                except (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError,
                        ConnectionError, RuntimeError):
                    await asyncio.sleep(0.2)  # reconnecting: published again, as the relay does

        await asyncio.wait_for(publish_after_the_switch(), 30)

        async def until_after() -> None:
            while await got.get() != b"after":
                pass  # "before" again: its ack may have died with the connection (at least once)

        await asyncio.wait_for(until_after(), 30)
        assert connection.url.port == second.port
    finally:
        await connection.close()
        await second.kill()
