"""Changing the arguments of a queue on a running broker, without losing a message.

RabbitMQ refuses to redeclare a queue with other arguments (PRECONDITION_FAILED), and a queue's
arguments never change: the queue is replaced. While that happens a stand-in,
`<queue>.migrating`, declared with the new arguments and the same bindings, takes the messages
published meanwhile; the old queue is unbound, emptied into the stand-in, deleted and declared
again; then the stand-in is unbound and emptied into it. Messages are moved with publisher
confirms before each is acked, so a crash at any point loses none: it can only leave a copy in
both queues, which the consumers' inbox turns into a no-op. Every step can run again, by this
process or another starting at the same time, and `finish_migration` (called at every start)
completes a migration a crashed process left half done. One process migrates at a time (an
exclusive queue serves as the lock).

Processes of the previous version consuming the old queue lose their consumer when it is
deleted (the broker cancels it): restart them, as any upgrade does."""

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import (
    ChannelLockedResource,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

from shared.messaging import DEAD_LETTER_EXCHANGE, EXCHANGE, QUEUES

log = logging.getLogger(__name__)

DELETE_PATIENCE_SECONDS = 60  # consumers of the previous version still attached to the old queue
LOCK_PATIENCE_SECONDS = 120  # another process migrating (moving messages one by one)


def stand_in(name: str) -> str:
    return f"{name}.migrating"


async def migrate_queue(connection: AbstractRobustConnection, name: str, events: Sequence[str],
                        arguments: dict[str, Any]) -> None:
    """Replaces queue `name` by one declared with `arguments`, keeping its messages. The caller
    declares and binds the new queue, then calls `finish_migration`."""
    async with _migration_lock(connection, name):
        if not await _exists(connection, name) or await declares(connection, name, arguments):
            return  # another process migrated it meanwhile
        channel = await connection.channel(publisher_confirms=True)
        try:
            temp = await channel.declare_queue(stand_in(name), durable=True, arguments=arguments)
            for event in events:
                await temp.bind(EXCHANGE, routing_key=event)
            old = await channel.declare_queue(name, passive=True)
            for event in events:
                await old.unbind(EXCHANGE, routing_key=event)
        finally:
            await channel.close()
        await _drain_and_delete(connection, name, stand_in(name))
    log.warning("queue emptied and deleted for its new arguments", extra={"queue": name})


async def finish_migration(connection: AbstractRobustConnection, name: str) -> None:
    """Moves what a stand-in of `name` holds back into `name` and deletes it (no-op if none).
    `name` must already be declared with its new arguments and bindings."""
    if not await _exists(connection, stand_in(name)):
        return
    async with _migration_lock(connection, name):
        if not await _exists(connection, stand_in(name)):
            return
        channel = await connection.channel()
        try:
            temp = await channel.declare_queue(stand_in(name), passive=True)
            for event in QUEUES.get(name, ()):
                await temp.unbind(EXCHANGE, routing_key=event)
        finally:
            await channel.close()
        await _drain_and_delete(connection, stand_in(name), name)
    log.warning("queue migrated", extra={"queue": name})


@asynccontextmanager
async def _migration_lock(connection: AbstractRobustConnection, name: str) -> AsyncIterator[None]:
    """One migrating process at a time: an exclusive queue can exist on one connection only (the
    broker answers RESOURCE_LOCKED to the others) and goes with it if the process dies."""
    lock = f"{name}.migration-lock"
    deadline = asyncio.get_running_loop().time() + LOCK_PATIENCE_SECONDS
    while True:
        channel = await connection.channel()
        try:
            await channel.declare_queue(lock, exclusive=True)
            break
        except ChannelLockedResource:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            if not channel.is_closed:
                await channel.close()
    try:
        yield
    finally:
        channel = await connection.channel()
        try:
            await channel.queue_delete(lock)
        finally:
            await channel.close()


async def declares(connection: AbstractRobustConnection, name: str, arguments: dict[str, Any]) -> bool:
    """False if the queue exists with other arguments (the broker refuses the declaration and
    closes the channel: hence a channel of its own)."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
        return True
    except ChannelPreconditionFailed:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


async def _exists(connection: AbstractRobustConnection, name: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
        return True
    except ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


async def _drain_and_delete(connection: AbstractRobustConnection, source: str, target: str) -> None:
    """Quorum queues cannot be deleted `if_empty`: the queue is deleted once a passive
    declaration sees it with no message and no consumer (it is unbound, and the migration lock
    keeps other movers away, so nothing can arrive in between)."""
    deadline = asyncio.get_running_loop().time() + DELETE_PATIENCE_SECONDS
    channel = await connection.channel(publisher_confirms=True)
    try:
        while True:
            moved = await move_messages(channel, source, target)
            # Asked of the channel underneath: aio-pika's channel answers a passive declaration
            # of a queue it declared before with the figures of that first declaration.
            state = await (await channel.get_underlay_channel()).queue_declare(source, passive=True)
            if state.message_count == 0 and state.consumer_count == 0:
                await channel.queue_delete(source)
                log.info("queue drained", extra={"from": source, "to": target, "moved": moved})
                return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"queue {source} keeps {state.consumer_count} consumer(s) of the previous "
                                   "version: stop them, then start this process again")
            await asyncio.sleep(0.5)
    finally:
        await channel.close()


async def move_messages(channel: AbstractChannel, source: str, target: str) -> int:
    """Moves every ready message of `source` to `target`, each acked only once the broker
    confirmed its copy. Through the dead-letter exchange, bound to `target` by its name for the
    while: a service's broker user may not publish to the default exchange, nor events of the
    other service to `inventory.events` (tooling/access.py)."""
    queue = await channel.declare_queue(source, passive=True)
    dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
    await channel.declare_queue(target, passive=True)
    underlay = await channel.get_underlay_channel()
    await underlay.queue_bind(target, DEAD_LETTER_EXCHANGE, routing_key=target)
    moved = 0
    try:
        while (message := await queue.get(fail=False)) is not None:
            # Not acked if the copy fails: the message goes back to `source` with the channel.
            await dlx.publish(aio_pika.Message(
                message.body, headers=message.headers, content_type=message.content_type,
                content_encoding=message.content_encoding, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                priority=message.priority, correlation_id=message.correlation_id,
                message_id=message.message_id, timestamp=message.timestamp, type=message.type,
                app_id=message.app_id), routing_key=target, mandatory=True)
            await message.ack()
            moved += 1
    finally:
        if not channel.is_closed:
            await underlay.queue_unbind(target, DEAD_LETTER_EXCHANGE, routing_key=target)
    return moved
