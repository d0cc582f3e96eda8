"""Nothing relies on the order in which messages arrive (shared/outbox.py: relays of different
processes publish in no common order, so a later message can overtake an earlier one).

Every pair of stock answers one attempt of an order can receive from stock, delivered in both
orders, ends in the same status; and a run of answers spread over two attempts ends the same
whatever the interleaving."""

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from orders.domain import Status, apply_stock_answer
from shared.events import AtualizarStatus, Shortage

LATER = datetime.now(UTC) + timedelta(minutes=30)


def answer(status: str, attempt: int = 1) -> AtualizarStatus:
    extra: dict[str, object] = {}
    if status == "EstoqueReservado":
        extra["reserved_until"] = LATER
    if status == "EstoqueNaoDisponivel":
        extra["unavailable"] = [Shortage(sku="A", requested=3, available=1)]
    return AtualizarStatus(order_id="00000000-0000-4000-8000-000000000001", attempt=attempt,
                           status=status, **extra)  # type: ignore[arg-type]


def settle(status: Status, attempt: int, answers: list[AtualizarStatus]) -> Status:
    for a in answers:
        outcome = apply_stock_answer(status, attempt, a)
        if outcome.update is not None:
            status = outcome.update.status
    return status


# What stock can send for one attempt, each second message only after the first committed,
# with what the order does in between (a local action) and the final status expected.
SEQUENCES = [
    # reserved, then the hold expired: the expiry may arrive first
    (Status.PENDING, ["EstoqueReservado", "ReservaExpirada"], Status.EXPIRED),
    # cancelled while pending: stock's hold comes back as EstoqueReservado (released again) and
    # ReservaLiberada, in either order
    (Status.CANCELLED, ["EstoqueReservado", "ReservaLiberada"], Status.CANCELLED),
    # confirming: sold or expired, one of them; a duplicate of the other never arrives
    (Status.CONFIRMING, ["EstoqueBaixado", "EstoqueBaixado"], Status.CONFIRMED),
    (Status.CONFIRMING, ["ReservaExpirada", "ReservaExpirada"], Status.EXPIRED),
    # refused, and the refusal delivered twice
    (Status.PENDING, ["EstoqueNaoDisponivel", "EstoqueNaoDisponivel"], Status.REJECTED),
]


@pytest.mark.parametrize(("start", "statuses", "final"), SEQUENCES)
def test_every_order_of_arrival_of_one_attempts_answers_ends_the_same(
    start: Status, statuses: list[str], final: Status,
) -> None:
    for order in itertools.permutations(statuses):
        assert settle(start, 1, [answer(s) for s in order]) == final, order


def test_answers_of_an_older_attempt_arriving_late_change_nothing() -> None:
    # Attempt 1 was rejected and the order reserved again (attempt 2); attempt 1's answers,
    # delivered anywhere among attempt 2's, are stale.
    old = [answer("EstoqueNaoDisponivel", 1), answer("ReservaExpirada", 1)]
    new = [answer("EstoqueReservado", 2)]
    for order in itertools.permutations(old + new):
        assert settle(Status.PENDING, 2, list(order)) == Status.RESERVED, order
