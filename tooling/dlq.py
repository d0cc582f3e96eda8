"""`dlq`: dead letters of the queues, and outbox rows the broker refused.

    dlq list [QUEUE]                  counts of every .dlq queue (or one)
    dlq show QUEUE [-n N]             the first N dead letters of QUEUE.dlq, with their reason
    dlq requeue QUEUE [-n N]          moves up to N dead letters back to the exchange they came from
    dlq outbox SERVICE [-n N]         outbox rows of SERVICE (orders, stock) set aside by its relay
    dlq resend SERVICE [--id ID] [-n N]
                                      puts set-aside rows (all, up to N, or those given) back
                                      into the outbox: the relays publish them again

QUEUE is a work queue name (`stock.orders`, `orders.status`). Inspecting does not consume:
messages are fetched and returned (nack with requeue)."""

import argparse
import asyncio
import json
import sys

import aio_pika
import asyncpg

from shared.broker import broker_urls
from shared.messaging import EXCHANGE, QUEUES
from shared.outbox import LIST_SET_ASIDE, RESEND_SET_ASIDE
from shared.settings import get_settings

SERVICES = ("orders", "stock")


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


async def _queues(args: argparse.Namespace) -> None:
    # The first broker of the list that answers (a plain connection: this is a one-shot tool).
    urls = broker_urls(get_settings().amqp_url)
    for i, url in enumerate(urls):
        try:
            connection = await aio_pika.connect(url)
            break
        except (OSError, aio_pika.exceptions.AMQPConnectionError):
            if i == len(urls) - 1:
                raise
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if args.command == "list":
            await _list(channel, [args.queue] if args.queue else list(QUEUES))
        elif args.command == "show":
            await _show(channel, args.queue, args.n)
        else:
            await _requeue(channel, args.queue, args.n)


async def _outbox(args: argparse.Namespace) -> None:
    settings = get_settings()
    dsn = settings.orders_database_url if args.service == "orders" else settings.stock_database_url
    conn = await asyncpg.connect(dsn)
    try:
        if args.command == "outbox":
            for row in await conn.fetch(LIST_SET_ASIDE, args.n):
                print(json.dumps(dict(row), default=str))
        else:
            ids = await conn.fetch(RESEND_SET_ASIDE, args.id or None, args.n)
            print(f"put {len(ids)} row(s) back into the {args.service} outbox")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="dlq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "show", "requeue", "outbox", "resend"])
    parser.add_argument("target", nargs="?", metavar="QUEUE|SERVICE", choices=[*QUEUES, *SERVICES])
    parser.add_argument("-n", type=int, default=None)
    parser.add_argument("--id", type=int, action="append", help="a set-aside row's id (repeatable)")
    args = parser.parse_args()
    if args.command in ("outbox", "resend"):
        if args.target not in SERVICES:
            parser.error(f"{args.command} needs a SERVICE: {', '.join(SERVICES)}")
        args.service = args.target
        args.n = args.n or (1000 if args.command == "resend" else 100)
        asyncio.run(_outbox(args))
    else:
        if args.target is not None and args.target not in QUEUES:
            parser.error(f"QUEUE is one of {', '.join(QUEUES)}")
        if args.command != "list" and not args.target:
            parser.error("show and requeue need a QUEUE")
        args.queue, args.n = args.target, args.n or 10
        asyncio.run(_queues(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
