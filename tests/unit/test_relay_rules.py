"""Rules of the relay and the consumer that need no broker: which failures count against a
message, and a dead letter that could not be published is never acked by a later bulk ack."""

import asyncio
from typing import Any

import aiormq
from pamqp import commands

from shared import outbox
from shared.consumer import BulkAcks, Consumer, Route
from shared.messaging import FrameTooLarge, _verdict, valid_traceparent
from shared.outbox import OutboxRelay, _refusal


def test_what_the_broker_refuses_counts_against_the_message_and_an_outage_does_not() -> None:
    returned = aiormq.exceptions.PublishError.__new__(aiormq.exceptions.PublishError)
    nacked = aiormq.exceptions.DeliveryError(None, commands.Basic.Nack())
    channel_refused = aiormq.exceptions.ChannelPreconditionFailed("message too large")
    frame_error = aiormq.exceptions.ConnectionFrameError("frame too large")
    for refused in (returned, nacked, FrameTooLarge(200_000, 131_072)):
        assert _refusal(refused, alone=False) and _refusal(refused, alone=True)
    # A channel or connection the broker closes blames a message only when it went alone.
    for ambiguous in (channel_refused, frame_error):
        assert not _refusal(ambiguous, alone=False) and _refusal(ambiguous, alone=True)
    for outage in (ConnectionResetError(), aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"),
                   aiormq.exceptions.ChannelInvalidStateError("closed"), aiormq.exceptions.ChannelClosed(None, None)):
        assert not _refusal(outage, alone=True)


def test_a_nacked_row_is_set_aside_only_once_old_enough_never_during_a_failover() -> None:
    returned = aiormq.exceptions.PublishError.__new__(aiormq.exceptions.PublishError)
    nacked = aiormq.exceptions.DeliveryError(None, commands.Basic.Nack())
    young, old = outbox.NACK_PATIENCE_SECONDS - 1, outbox.NACK_PATIENCE_SECONDS
    last_try = outbox.RETRIES - 1
    assert outbox._given_up({"attempts": 0, "age": 0.0}, FrameTooLarge(200_000, 131_072))  # type: ignore[arg-type]
    assert not outbox._given_up({"attempts": last_try - 1, "age": old}, returned)  # type: ignore[arg-type]
    assert outbox._given_up({"attempts": last_try, "age": 0.0}, returned)  # type: ignore[arg-type]
    # A quorum queue without a leader nacks for the seconds of an election: tries alone are not enough.
    assert not outbox._given_up({"attempts": last_try + 50, "age": young}, nacked)  # type: ignore[arg-type]
    assert outbox._given_up({"attempts": last_try, "age": old}, nacked)  # type: ignore[arg-type]
    assert not outbox._given_up({"attempts": last_try - 1, "age": old * 10}, nacked)  # type: ignore[arg-type]


def test_only_a_well_formed_traceparent_is_carried() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert valid_traceparent(good) == good and valid_traceparent(good.encode()) == good
    for bad in (None, 7, "", good.upper(), good + "-x", "ff" + good[2:], "00-" + "0" * 32 + good[35:],
                good[:36] + "0" * 16 + good[52:], "x" * 140_000):
        assert valid_traceparent(bad) is None, bad


class FakeChannel:
    def __init__(self) -> None:
        self.is_closed = False
        self.acks: list[tuple[int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


class FakeMessage:
    def __init__(self, channel: FakeChannel, tag: int, body: bytes, nack_fails: bool = False) -> None:
        self.channel, self.delivery_tag, self.body = channel, tag, body
        self.headers: dict[str, Any] = {}
        self.message_id, self.type, self.correlation_id = f"m-{tag}", "Ping", None
        self.content_type = "application/json"
        self.settled: list[str] = []
        self._nack_fails = nack_fails

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        if self._nack_fails:
            raise aiormq.exceptions.AMQPError("nack failed")
        self.settled.append(f"nack(requeue={requeue})")


class RefusingExchange:
    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise aiormq.exceptions.PublishError.__new__(aiormq.exceptions.PublishError)


class FakeAmqpChannel:
    async def get_exchange(self, name: str, ensure: bool = False) -> RefusingExchange:
        return RefusingExchange()


class FakeQueue:
    name = "test.queue"


def consumer(handled: list[str]) -> Consumer:
    async def handle(event: Any, message_id: str) -> None:
        handled.append(message_id)

    route = Route(lambda body: type("Ping", (), {"event_id": body["n"]})(), handle)
    return Consumer(FakeQueue(), FakeAmqpChannel(), {"Ping": route})  # type: ignore[arg-type]


async def handle_in_turn(c: Consumer, *messages: FakeMessage) -> None:
    for message in messages:
        await c._on_message(message)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the bulk ack goes out after the current turn of the loop
    for message in messages:
        await BulkAcks.of(message.channel).drain()  # type: ignore[arg-type]


async def test_a_dead_letter_that_cannot_be_published_is_rejected_to_the_queue_not_acked() -> None:
    channel, handled = FakeChannel(), []
    poison, good = FakeMessage(channel, 1, b"not json"), FakeMessage(channel, 2, b'{"n": 2}')
    await handle_in_turn(consumer(handled), poison, good)
    # The queue's own dead-lettering (at least once) takes it; the bulk ack of the good one
    # may then cover its tag, which the broker has already settled.
    assert poison.settled == ["nack(requeue=False)"]
    assert handled == ["m-2"] and channel.acks == [(2, True)]


async def test_a_message_that_cannot_be_settled_is_never_covered_by_a_later_bulk_ack() -> None:
    channel, handled = FakeChannel(), []
    poison = FakeMessage(channel, 1, b"not json", nack_fails=True)
    good = FakeMessage(channel, 2, b'{"n": 2}')
    await handle_in_turn(consumer(handled), poison, good)
    assert poison.settled == []
    assert channel.acks == [(2, False)], "a bulk ack covered a message neither acked nor rejected"


async def test_a_channel_closed_with_a_cancellation_as_reason_is_an_outage_not_the_end_of_the_relay(
    monkeypatch: Any,
) -> None:
    # aiormq closes the channels of a connection it found stuck (a frozen broker) with the
    # reader task's CancelledError as the reason: the verdict must be an error the relay catches.
    loop = asyncio.get_running_loop()
    confirmation, closed = loop.create_future(), loop.create_future()
    closed.set_exception(asyncio.CancelledError())
    verdict = _verdict(confirmation, closed)
    assert isinstance(verdict, Exception) and not _refusal(verdict, alone=True)

    # And a CancelledError that is not aimed at the relay's task does not end it.
    served: list[int] = []

    class Conn:
        async def close(self) -> None:
            return None

    async def connect(*args: Any, **kwargs: Any) -> Conn:
        return Conn()

    async def serve(self: OutboxRelay, conn: Any) -> None:
        served.append(1)
        if len(served) == 1:
            raise asyncio.CancelledError()
        self._stopping.set()

    monkeypatch.setattr(outbox.asyncpg, "connect", connect)
    monkeypatch.setattr(OutboxRelay, "_serve", serve)
    relay = OutboxRelay("postgresql://unused", None, "orders")  # type: ignore[arg-type]
    await asyncio.wait_for(relay._run(), 10)
    assert len(served) == 2, "the relay ended at a CancelledError it was not the target of"
