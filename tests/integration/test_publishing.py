"""`publish_batch` against a real RabbitMQ: what the relay relies on (shared/messaging.py).

It writes a whole batch at once and keeps the confirms in aiormq's own channel bookkeeping, so
these tests pin that bookkeeping: messages arrive in order with every property of API.md §6, a
broker's return or a channel closing fails the call instead of passing silently or hanging, and
the channel stays usable, confirms matching, for aio-pika's own publishes and the next batch."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import PublishError

from shared import messaging
from shared.broker import declare_topology
from shared.messaging import (
    EXCHANGE,
    Outgoing,
    build_message,
    build_properties,
    publish_batch,
    publish_each,
)
from shared.settings import Settings
from tooling.devenv import local_servers
from tooling.stack import _with_vhost

ROUTED = "AtualizarStatus"     # has a queue (orders.status)
UNROUTED = "EstoqueAlterado"   # has none unless someone binds one


@pytest.fixture(scope="module")
async def amqp(infrastructure: None) -> AsyncIterator[AbstractRobustConnection]:
    settings = Settings()
    _, rabbit = local_servers(settings)
    assert rabbit is not None, "tests need the local RabbitMQ"
    vhost = f"test-pub-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbit.ensure_vhost, vhost)
    connection = await aio_pika.connect_robust(_with_vhost(settings.amqp_url, vhost))
    try:
        yield connection
    finally:
        await connection.close()
        await asyncio.to_thread(rabbit.delete_vhost, vhost)


@pytest.fixture
async def channel(amqp: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    channel = await amqp.channel(publisher_confirms=True, on_return_raises=True)
    yield channel
    await channel.close()


async def changes_queue(channel: AbstractChannel) -> AbstractQueue:
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(EXCHANGE, routing_key=UNROUTED)
    return queue


def outgoing(routing_key: str, body: bytes, mandatory: bool, **ids: Any) -> Outgoing:
    event_id = ids.get("event_id", str(uuid.uuid4()))
    properties = build_properties(event_id=event_id, event_type=routing_key,
                                  correlation_id=ids.get("correlation_id", str(uuid.uuid4())),
                                  request_id=ids.get("request_id"))
    return Outgoing(body, routing_key, properties, mandatory)


async def take(queue: AbstractQueue, count: int, timeout: float = 15) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The next `count` messages of the queue, polled with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    while len(got) < count:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            got.append(message)
        elif loop.time() > deadline:
            raise AssertionError(f"{len(got)} of {count} messages arrived")
        else:
            await asyncio.sleep(0.05)  # polling the queue, bounded by the deadline
    return got


async def test_a_batch_arrives_in_order_with_every_property(
    amqp: AbstractRobustConnection, channel: AbstractChannel,
) -> None:
    exchange = await declare_topology(amqp, channel, delivery_limit=5)
    queue = await changes_queue(channel)
    big = b'{"pad": "' + b"x" * 300_000 + b'"}'  # more than one frame (frame_max is 128 KiB)
    batch = [outgoing(UNROUTED, b'{"n": %d}' % i, False, request_id=f"req-{i}") for i in range(300)]
    batch.insert(150, outgoing(UNROUTED, big, False))

    await publish_batch(exchange, batch)

    received = await take(queue, len(batch))
    assert [m.body for m in received] == [m.body for m in batch]
    for sent, message in zip(batch, received, strict=True):
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.message_id == sent.properties.message_id
        assert message.type == UNROUTED
        assert message.correlation_id == sent.properties.correlation_id
        assert message.headers["x-request-id"] == sent.properties.headers["x-request-id"]
    # The properties of API.md §6 as the one other way a message is built sets them.
    ids = {"event_id": str(uuid.uuid4()), "event_type": ROUTED, "correlation_id": "o-1", "request_id": "r-1"}
    ours, theirs = build_properties(**ids), build_message(body=b"{}", **ids).properties
    for name in ("content_type", "delivery_mode", "message_id", "message_type", "correlation_id", "headers"):
        assert getattr(ours, name) == getattr(theirs, name), name


async def test_a_mandatory_message_no_queue_takes_fails_the_batch_and_the_channel_goes_on(
    amqp: AbstractRobustConnection, channel: AbstractChannel,
) -> None:
    exchange = await declare_topology(amqp, channel, delivery_limit=5)
    queue = await changes_queue(channel)
    lost = outgoing("NoSuchEvent", b"{}", True)
    with pytest.raises(PublishError):
        await asyncio.wait_for(publish_batch(exchange, [
            outgoing(UNROUTED, b'{"n": 1}', False), lost, outgoing(UNROUTED, b'{"n": 2}', False)]), 15)

    # The confirms of later publishes still match their messages: aio-pika's own publish on
    # the same channel, then another batch.
    await exchange.publish(build_message(body=b'{"n": 3}', event_id=str(uuid.uuid4()),
                                         event_type=UNROUTED, correlation_id=None, request_id=None),
                           routing_key=UNROUTED)
    await asyncio.wait_for(publish_batch(exchange, [outgoing(UNROUTED, b'{"n": 4}', True)]), 15)
    assert [m.body for m in await take(queue, 4)] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']
    with pytest.raises(PublishError):  # and a return is still told apart from an ack
        await asyncio.wait_for(publish_batch(exchange, [outgoing("NoSuchEvent", b"{}", True)]), 15)


async def test_a_channel_closed_before_the_confirms_fails_the_call_instead_of_hanging(
    channel: AbstractChannel,
) -> None:
    # Publishing to an exchange that does not exist makes the broker close the channel: its
    # confirms never come.
    missing = await channel.get_exchange(f"no-such-exchange-{uuid.uuid4().hex[:6]}", ensure=False)
    with pytest.raises(Exception) as failure:
        await asyncio.wait_for(publish_batch(missing, [outgoing(UNROUTED, b"{}", False)] * 3), 15)
    assert not isinstance(failure.value, TimeoutError), "publish_batch hung on a closed channel"


# A frozen broker (SIGSTOP) closes nothing: its confirms never come and a connection to it stops
# taking frames. Both are played here on a live broker, from the client's side: its confirm
# frames are dropped, or the write queue is one that never empties.
async def test_confirms_that_never_come_end_in_timeout_verdicts_and_the_channel_goes_on(
    amqp: AbstractRobustConnection, channel: AbstractChannel, monkeypatch: pytest.MonkeyPatch,
) -> None:
    exchange = await declare_topology(amqp, channel, delivery_limit=5)
    queue = await changes_queue(channel)
    monkeypatch.setattr(messaging, "CONFIRM_TIMEOUT_SECONDS", 1.0)
    underlay = await channel.get_underlay_channel()

    async def dropped(frame: Any) -> None:
        return None

    monkeypatch.setattr(underlay, "_on_confirm_frame", dropped)
    batch = [outgoing(UNROUTED, b'{"n": %d}' % i, False) for i in range(5)]
    verdicts = await asyncio.wait_for(publish_each(exchange, batch), 15)
    assert all(isinstance(v, TimeoutError) for v in verdicts), verdicts
    monkeypatch.undo()
    # Not a refusal: the messages did go out (the relay would send them again), and the
    # channel's later confirms still match.
    await asyncio.wait_for(publish_batch(exchange, [outgoing(UNROUTED, b'{"n": 5}', True)]), 15)
    assert [m.body for m in await take(queue, 6)] == [b'{"n": %d}' % i for i in range(6)]


async def test_a_write_queue_that_never_empties_fails_the_call_in_time(
    amqp: AbstractRobustConnection, channel: AbstractChannel, monkeypatch: pytest.MonkeyPatch,
) -> None:
    exchange = await declare_topology(amqp, channel, delivery_limit=5)
    monkeypatch.setattr(messaging, "CONFIRM_TIMEOUT_SECONDS", 1.0)
    underlay = await channel.get_underlay_channel()
    full: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
    full.put_nowait(None)
    monkeypatch.setattr(underlay, "write_queue", full)
    tag = underlay.delivery_tag
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(publish_each(exchange, [outgoing(UNROUTED, b"{}", False)]), 15)
    assert underlay.delivery_tag == tag, "a batch never queued registered confirms"
    monkeypatch.undo()
    await asyncio.wait_for(publish_batch(exchange, [outgoing(UNROUTED, b"{}", True)]), 15)
