"""The order's state machine (orders/domain.py): pure rules, no I/O."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from orders.domain import (
    SHOWS_ALLOCATIONS,
    Outcome,
    Refused,
    Status,
    apply_stock_answer,
    check_cancel,
    check_confirm,
    check_reserve,
)
from shared.events import Allocation, AtualizarStatus, Shortage

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=30)
EARLIER = NOW - timedelta(seconds=1)

ANSWERS = ["EstoqueReservado", "EstoqueNaoDisponivel", "ReservaExpirada", "EstoqueBaixado", "ReservaLiberada"]

# (status the order is in, stock's answer at the order's own attempt) -> the status it moves to.
MOVES: dict[tuple[Status, str], Status] = {
    (Status.PENDING, "EstoqueReservado"): Status.RESERVED,
    (Status.PENDING, "EstoqueNaoDisponivel"): Status.REJECTED,
    (Status.CONFIRMING, "EstoqueBaixado"): Status.CONFIRMED,
    (Status.PENDING, "ReservaExpirada"): Status.EXPIRED,  # it overtook its EstoqueReservado
    (Status.RESERVED, "ReservaExpirada"): Status.EXPIRED,
    (Status.CONFIRMING, "ReservaExpirada"): Status.EXPIRED,
}
RELEASE_AGAIN = {(Status.CANCELLED, "EstoqueReservado")}


def answer(status: str, attempt: int = 1, **extra: object) -> AtualizarStatus:
    if status == "EstoqueReservado":
        extra.setdefault("reserved_until", LATER)
    if status == "EstoqueNaoDisponivel":
        extra.setdefault("unavailable", [Shortage(sku="A", requested=3, available=1)])
        extra.setdefault("reason", "insufficient_stock")
    return AtualizarStatus(order_id=uuid.uuid4(), attempt=attempt, status=status, **extra)  # type: ignore[arg-type]


ALL_PAIRS = [(s, a) for s in Status for a in ANSWERS]


# ----- apply_stock_answer ---------------------------------------------------------------------

@pytest.mark.parametrize(("status", "kind"), ALL_PAIRS, ids=[f"{s}-{a}" for s, a in ALL_PAIRS])
def test_every_status_and_answer_at_the_current_attempt(status: Status, kind: str) -> None:
    outcome = apply_stock_answer(status, 2, answer(kind, attempt=2))
    assert isinstance(outcome, Outcome)
    if (status, kind) in MOVES:
        assert outcome.update is not None, outcome
        assert outcome.update.status == MOVES[status, kind]
        assert outcome.release_again is False
        assert outcome.ignored is None
    elif (status, kind) in RELEASE_AGAIN:
        assert outcome.update is None, "a cancelled order must stay cancelled"
        assert outcome.release_again is True
    else:
        assert outcome.update is None, f"{kind} must not move an order in status {status}"
        assert outcome.release_again is False
        assert outcome.ignored, "an ignored answer says why"


@pytest.mark.parametrize("order_attempt, answer_attempt", [(2, 1), (1, 2), (3, 1)])
@pytest.mark.parametrize(("status", "kind"), ALL_PAIRS, ids=[f"{s}-{a}" for s, a in ALL_PAIRS])
def test_an_answer_for_another_attempt_changes_nothing(
    status: Status, kind: str, order_attempt: int, answer_attempt: int
) -> None:
    outcome = apply_stock_answer(status, order_attempt, answer(kind, attempt=answer_attempt))
    assert outcome.update is None
    assert outcome.release_again is False
    assert outcome.ignored and "stale" in outcome.ignored


def test_hold_for_a_cancelled_order_is_released_again() -> None:
    outcome = apply_stock_answer(Status.CANCELLED, 1, answer("EstoqueReservado"))
    assert outcome.release_again is True
    assert outcome.update is None
    assert outcome.ignored


@pytest.mark.parametrize("kind", [a for a in ANSWERS if a != "EstoqueReservado"])
def test_other_answers_for_a_cancelled_order_do_not_release_again(kind: str) -> None:
    outcome = apply_stock_answer(Status.CANCELLED, 1, answer(kind))
    assert outcome.release_again is False
    assert outcome.update is None


def test_reserved_carries_the_hold_expiry() -> None:
    until = NOW + timedelta(seconds=1800)
    outcome = apply_stock_answer(Status.PENDING, 1, answer("EstoqueReservado", reserved_until=until))
    assert outcome.update is not None
    assert outcome.update.status == Status.RESERVED
    assert outcome.update.reserved_until == until
    assert outcome.update.reason is None


@pytest.mark.parametrize("reason", ["unknown_sku", "insufficient_stock"])
def test_rejected_carries_reason_and_every_short_line(reason: str) -> None:
    short = [Shortage(sku="A", requested=3, available=1), Shortage(sku="B", requested=2, available=0)]
    outcome = apply_stock_answer(
        Status.PENDING, 1, answer("EstoqueNaoDisponivel", unavailable=short, reason=reason))
    assert outcome.update is not None
    assert outcome.update.status == Status.REJECTED
    assert outcome.update.reason == reason
    assert outcome.update.unavailable == [
        {"sku": "A", "requested": 3, "available": 1},
        {"sku": "B", "requested": 2, "available": 0},
    ]
    assert outcome.update.reserved_until is None


def test_rejected_without_a_reason_defaults_to_insufficient_stock() -> None:
    outcome = apply_stock_answer(Status.PENDING, 1, answer("EstoqueNaoDisponivel", reason=None))
    assert outcome.update is not None
    assert outcome.update.reason == "insufficient_stock"


@pytest.mark.parametrize("status", [Status.RESERVED, Status.CONFIRMING])
def test_expired_says_why(status: Status) -> None:
    outcome = apply_stock_answer(status, 1, answer("ReservaExpirada"))
    assert outcome.update is not None
    assert outcome.update.status == Status.EXPIRED
    assert outcome.update.reason == "reservation_expired"


def test_sold_confirms_with_no_reason() -> None:
    outcome = apply_stock_answer(Status.CONFIRMING, 1, answer("EstoqueBaixado"))
    assert outcome.update is not None
    assert outcome.update.status == Status.CONFIRMED
    assert outcome.update.reason is None
    assert not outcome.update.unavailable


def test_a_duplicate_answer_after_the_move_is_ignored() -> None:
    """The same EstoqueReservado twice: the second one finds the order reserved already."""
    first = apply_stock_answer(Status.PENDING, 1, answer("EstoqueReservado"))
    assert first.update is not None
    second = apply_stock_answer(first.update.status, 1, answer("EstoqueReservado"))
    assert second.update is None and not second.release_again


# ----- check_confirm --------------------------------------------------------------------------

def test_confirm_a_live_reservation() -> None:
    assert check_confirm(Status.RESERVED, LATER, NOW) is None


@pytest.mark.parametrize("reserved_until", [EARLIER, NOW - timedelta(days=1)])
def test_confirm_a_reservation_past_its_time_is_gone(reserved_until: datetime) -> None:
    with pytest.raises(Refused) as refused:
        check_confirm(Status.RESERVED, reserved_until, NOW)
    assert refused.value.status_code == 410


@pytest.mark.parametrize("reserved_until", [None, EARLIER, LATER])
def test_confirm_an_expired_order_is_gone(reserved_until: datetime | None) -> None:
    with pytest.raises(Refused) as refused:
        check_confirm(Status.EXPIRED, reserved_until, NOW)
    assert refused.value.status_code == 410


@pytest.mark.parametrize("reserved_until", [None, LATER])
@pytest.mark.parametrize(
    "status", [Status.PENDING, Status.REJECTED, Status.CONFIRMING, Status.CONFIRMED, Status.CANCELLED])
def test_confirm_in_any_other_status_conflicts(status: Status, reserved_until: datetime | None) -> None:
    with pytest.raises(Refused) as refused:
        check_confirm(status, reserved_until, NOW)
    assert refused.value.status_code == 409
    assert refused.value.detail


# ----- check_cancel ---------------------------------------------------------------------------

@pytest.mark.parametrize("status", [Status.PENDING, Status.RESERVED, Status.REJECTED, Status.EXPIRED])
def test_cancel_is_allowed_and_changes_the_order(status: Status) -> None:
    assert check_cancel(status) is True


def test_cancel_a_cancelled_order_is_idempotent() -> None:
    assert check_cancel(Status.CANCELLED) is False


@pytest.mark.parametrize("status", [Status.CONFIRMED, Status.CONFIRMING])
def test_cancel_after_checkout_conflicts(status: Status) -> None:
    with pytest.raises(Refused) as refused:
        check_cancel(status)
    assert refused.value.status_code == 409


# ----- check_reserve --------------------------------------------------------------------------

@pytest.mark.parametrize("status", [Status.EXPIRED, Status.REJECTED])
def test_reserve_again_an_expired_or_rejected_order(status: Status) -> None:
    assert check_reserve(status) is None


@pytest.mark.parametrize(
    "status", [Status.PENDING, Status.RESERVED, Status.CONFIRMING, Status.CONFIRMED, Status.CANCELLED])
def test_reserve_in_any_other_status_conflicts(status: Status) -> None:
    with pytest.raises(Refused) as refused:
        check_reserve(status)
    assert refused.value.status_code == 409


# ----- allocations: set when reserved, kept through confirming/confirmed, [] otherwise ----------

def test_reserved_takes_the_allocations_sorted_by_store_and_sku() -> None:
    given = [Allocation(store_id="S2", sku="A", quantity=1), Allocation(store_id="S1", sku="B", quantity=2),
             Allocation(store_id="S1", sku="A", quantity=2)]
    outcome = apply_stock_answer(Status.PENDING, 1, answer("EstoqueReservado", allocations=given))
    assert outcome.update is not None
    assert outcome.update.allocations == [
        {"store_id": "S1", "sku": "A", "quantity": 2}, {"store_id": "S1", "sku": "B", "quantity": 2},
        {"store_id": "S2", "sku": "A", "quantity": 1}]


@pytest.mark.parametrize(("status", "kind", "expected"), [
    (Status.CONFIRMING, "EstoqueBaixado", None),      # confirmed keeps what reserved set
    (Status.RESERVED, "ReservaExpirada", []),
    (Status.CONFIRMING, "ReservaExpirada", []),
    (Status.PENDING, "EstoqueNaoDisponivel", []),
])
def test_allocations_are_kept_only_while_held_or_sold(status: Status, kind: str, expected: list[object] | None) -> None:
    outcome = apply_stock_answer(status, 1, answer(kind))
    assert outcome.update is not None
    assert outcome.update.allocations == expected
    assert (outcome.update.status in SHOWS_ALLOCATIONS) == (expected is None or expected != [])
