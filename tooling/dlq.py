"""`dlq`: list, inspect and re-publish dead letters.

    dlq list [QUEUE]              counts of every .dlq queue (or one)
    dlq show QUEUE [-n N]         the first N dead letters of QUEUE.dlq, with their reason
    dlq requeue QUEUE [-n N]      moves up to N dead letters back to the exchange they came from

QUEUE is a work queue name (`stock.orders`, `orders.status`). Inspecting does not consume:
messages are fetched and returned (nack with requeue)."""

import argparse
import asyncio
import json
import sys

import aio_pika

from shared.messaging import EXCHANGE, QUEUES
from shared.settings import get_settings


async def _queue(channel: aio_pika.abc.AbstractChannel, name: str) -> aio_pika.abc.AbstractQueue:
    return await channel.declare_queue(f"{name}.dlq", passive=True)


async def _list(channel: aio_pika.abc.AbstractChannel, names: list[str]) -> None:
    for name in names:
        queue = await _queue(channel, name)
        print(f"{name}.dlq\t{queue.declaration_result.message_count}")


async def _show(channel: aio_pika.abc.AbstractChannel, name: str, limit: int) -> None:
    queue = await _queue(channel, name)
    held = []
    for _ in range(limit):
        message = await queue.get(fail=False)
        if message is None:
            break
        held.append(message)
        headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (message.headers or {}).items()
                   if k in ("x-dead-letter-reason", "x-original-queue", "x-request-id", "x-first-death-reason")}
        print(json.dumps({"message_id": message.message_id, "type": message.type, "headers": headers,
                          "body": message.body.decode(errors="replace")[:2000]}, default=str))
    for message in held:
        await message.nack(requeue=True)


async def _requeue(channel: aio_pika.abc.AbstractChannel, name: str, limit: int) -> None:
    queue = await _queue(channel, name)
    exchange = await channel.get_exchange(EXCHANGE)
    moved = 0
    for _ in range(limit):
        message = await queue.get(fail=False)
        if message is None:
            break
        headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-death")
                   and k not in ("x-dead-letter-reason", "x-original-queue", "x-first-death-reason",
                                 "x-first-death-queue", "x-first-death-exchange", "x-delivery-count")}
        await exchange.publish(
            aio_pika.Message(message.body, headers=headers, content_type=message.content_type,
                             message_id=message.message_id, type=message.type,
                             correlation_id=message.correlation_id,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=message.type or "", mandatory=True)
        await message.ack()
        moved += 1
    print(f"re-published {moved} message(s) from {name}.dlq")


async def _main(args: argparse.Namespace) -> None:
    connection = await aio_pika.connect(get_settings().amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if args.command == "list":
            await _list(channel, [args.queue] if args.queue else list(QUEUES))
        elif args.command == "show":
            await _show(channel, args.queue, args.n)
        else:
            await _requeue(channel, args.queue, args.n)


def main() -> None:
    parser = argparse.ArgumentParser(prog="dlq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "show", "requeue"])
    parser.add_argument("queue", nargs="?", choices=list(QUEUES))
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    if args.command != "list" and not args.queue:
        parser.error("show and requeue need a QUEUE")
    asyncio.run(_main(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
