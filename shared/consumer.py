"""The consuming side of every queue: parse, handle in one transaction, then ack.

- A message that cannot be parsed or validated is a poison message: it goes to `<queue>.dlq`
  at once with the reason in `x-dead-letter-reason`, and the queue keeps flowing.
- A transient failure (deadlock, serialization) is retried here with backoff; past that the
  message is returned to the queue, and the quorum queue's delivery limit dead-letters it if it
  never succeeds. The database being unreachable (down, restarting, failing over) is retried
  here for up to OUTAGE_PATIENCE_SECONDS instead: an outage says nothing about the message, and
  returning it at each failure would spend the delivery limit on the outage (a database down
  for ~25 s dead-lettered healthy messages, and their orders stayed pending for good).
- The ack comes only after the handler's transaction committed: a crash before it redelivers,
  and the inbox makes the redelivery a no-op."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from asgi_correlation_id import correlation_id
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from shared.messaging import DEAD_LETTER_EXCHANGE

log = logging.getLogger(__name__)

TRANSIENT = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.UniqueViolationError,  # two deliveries racing to create the same row
    asyncio.TimeoutError,
)

# The database is not there: nothing to do with the message being handled. (TimeoutError is an
# OSError too: a query that hangs, e.g. on a lock a stuck peer holds, is waited out the same way.)
UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
)
# How long one delivery keeps retrying while the database is unreachable before it is returned
# to the queue. With the delivery limit (5) a message outlives an outage of about half an hour.
OUTAGE_PATIENCE_SECONDS = 300.0
ATTEMPTS = 6  # for the other transient failures, per delivery

Parse = Callable[[AbstractIncomingMessage], Any]
Handle = Callable[[Any, str], Awaitable[None]]


class Consumer:
    def __init__(self, queue: AbstractQueue, channel: AbstractChannel, parse: Parse, handle: Handle) -> None:
        self.queue = queue
        self.channel = channel
        self.parse = parse
        self.handle = handle
        self._tag: str | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stops taking messages, then lets the ones in hand finish and be acked."""
        if self._tag is not None:
            await self.queue.cancel(self._tag)
            self._tag = None
        deadline = asyncio.get_running_loop().time() + 15
        while self._in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        token = correlation_id.set(_request_id(message))
        try:
            await self._process(message)
        finally:
            correlation_id.reset(token)
            if task is not None:
                self._in_flight.discard(task)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            event = self.parse(message)
        except (ValidationError, ValueError, orjson.JSONDecodeError) as exc:
            await self._dead_letter(message, f"invalid message: {exc}"[:1000])
            return
        message_id = message.message_id or str(event.event_id)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TRANSIENT),
                wait=wait_exponential_jitter(initial=0.05, max=2),
                stop=_give_up,
                reraise=True,
                before_sleep=_log_retry,
            ):
                with attempt:
                    await self.handle(event, message_id)
        except Exception:
            log.exception("handling failed; returning the message to the queue",
                          extra={"message_id": message_id, "event_type": message.type})
            await message.nack(requeue=True)
            return
        await message.ack()

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        log.warning("dead-lettering poison message",
                    extra={"message_id": message.message_id, "reason": reason})
        dlx = await self.channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        headers = dict(message.headers or {})
        headers.update({"x-dead-letter-reason": reason, "x-original-queue": self.queue.name})
        await dlx.publish(
            aio_pika.Message(
                body=message.body,
                headers=headers,
                content_type=message.content_type,
                message_id=message.message_id,
                type=message.type,
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=f"{self.queue.name}.dlq",
            mandatory=True,
        )
        await message.ack()


def _give_up(state: RetryCallState) -> bool:
    """After ATTEMPTS tries, unless the database was unreachable: then after OUTAGE_PATIENCE_SECONDS."""
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, UNAVAILABLE):
        return stop_after_delay(OUTAGE_PATIENCE_SECONDS)(state)
    return stop_after_attempt(ATTEMPTS)(state)


def _log_retry(state: RetryCallState) -> None:
    if state.attempt_number & (state.attempt_number - 1):
        return  # attempts 1, 2, 4, 8...: an outage of minutes logs a few lines per message
    exc = state.outcome.exception() if state.outcome else None
    log.warning("transient failure; retrying", extra={
        "attempt": state.attempt_number, "error": f"{type(exc).__name__}: {exc}"})


def _request_id(message: AbstractIncomingMessage) -> str | None:
    value = (message.headers or {}).get("x-request-id")
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value) if value else message.correlation_id


def parse_json(message: AbstractIncomingMessage) -> dict[str, Any]:
    body = orjson.loads(message.body)
    if not isinstance(body, dict):
        raise ValueError("message body is not a JSON object")
    return body
