"""The order's state machine: pure rules, no I/O.

    pending ──EstoqueReservado──▶ reserved ──confirm──▶ confirming ──EstoqueBaixado──▶ confirmed
       │                            │  └──ReservaExpirada──▶ expired ◀──ReservaExpirada──┘
       ├──EstoqueNaoDisponivel──▶ rejected            │
       └──ReservaExpirada (overtook its EstoqueReservado)──▶ expired
    rejected / expired ──reserve──▶ pending (attempt + 1)
    pending / reserved / rejected / expired ──cancel──▶ cancelled
"""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from shared.events import AtualizarStatus


class Status(StrEnum):
    PENDING = "pending"
    RESERVED = "reserved"
    REJECTED = "rejected"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# The statuses in which an order shows where its lines are held or sold (API.md §2).
SHOWS_ALLOCATIONS = frozenset({Status.RESERVED, Status.CONFIRMING, Status.CONFIRMED})
UNSETTLED = frozenset({Status.PENDING, Status.CONFIRMING})
CANCELLABLE = frozenset({Status.PENDING, Status.RESERVED, Status.REJECTED, Status.EXPIRED})
RESERVABLE = frozenset({Status.EXPIRED, Status.REJECTED})

# stock's answer -> (the statuses it may arrive in, the status it leads to)
TRANSITIONS: dict[str, tuple[frozenset[Status], Status]] = {
    "EstoqueReservado": (frozenset({Status.PENDING}), Status.RESERVED),
    "EstoqueNaoDisponivel": (frozenset({Status.PENDING}), Status.REJECTED),
    "EstoqueBaixado": (frozenset({Status.CONFIRMING}), Status.CONFIRMED),
    # Also from pending: stock expires only a hold it made, and the answer that made it may come
    # second (relays of different processes publish in no common order, shared/outbox.py).
    "ReservaExpirada": (frozenset({Status.PENDING, Status.RESERVED, Status.CONFIRMING}), Status.EXPIRED),
}


class Refused(Exception):
    """A command the order's status does not allow; `status_code` says how to answer."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class Update:
    """What applying a stock answer does to the order. `allocations` None: keep the order's own
    (confirmed keeps what reserved set); otherwise set them ([] outside SHOWS_ALLOCATIONS)."""

    status: Status
    reason: str | None = None
    unavailable: list[dict[str, object]] | None = None
    reserved_until: datetime | None = None
    allocations: list[dict[str, object]] | None = None


@dataclass(frozen=True)
class Outcome:
    update: Update | None = None
    release_again: bool = False  # a hold arrived for an order already cancelled
    ignored: str | None = None  # why nothing changed


def apply_stock_answer(status: Status, attempt: int, answer: AtualizarStatus) -> Outcome:
    if answer.attempt != attempt:
        return Outcome(ignored=f"stale attempt {answer.attempt} (order is at {attempt})")
    if answer.status == "ReservaLiberada":
        return Outcome(ignored="release acknowledged")
    if answer.status == "EstoqueReservado" and status == Status.CANCELLED:
        return Outcome(release_again=True, ignored="hold for a cancelled order: releasing it")
    allowed, target = TRANSITIONS[answer.status]
    if status not in allowed:
        return Outcome(ignored=f"{answer.status} is not valid in status {status}")
    if target == Status.RESERVED:
        allocations = [a.model_dump() for a in sorted(answer.allocations, key=lambda a: (a.store_id, a.sku))]
        return Outcome(Update(target, reserved_until=answer.reserved_until, allocations=allocations))
    if target == Status.REJECTED:
        unavailable = [s.model_dump() for s in answer.unavailable]
        reason = answer.reason or "insufficient_stock"
        return Outcome(Update(target, reason=reason, unavailable=unavailable, allocations=[]))
    if target == Status.EXPIRED:
        return Outcome(Update(target, reason="reservation_expired", allocations=[]))
    return Outcome(Update(target))  # confirmed: sold what reserved held, allocations kept


def check_confirm(status: Status, reserved_until: datetime | None, now: datetime) -> None:
    if status == Status.EXPIRED or (
        status == Status.RESERVED and (reserved_until is None or reserved_until <= now)
    ):
        raise Refused(410, "the hold has expired; reserve the order again")
    if status != Status.RESERVED:
        raise Refused(409, f"an order in status {status} cannot be confirmed")


def check_cancel(status: Status) -> bool:
    """True when the cancel changes something; False when it is already cancelled."""
    if status == Status.CANCELLED:
        return False
    if status not in CANCELLABLE:
        raise Refused(409, f"an order in status {status} cannot be cancelled")
    return True


def check_reserve(status: Status) -> None:
    if status not in RESERVABLE:
        raise Refused(409, f"only expired or rejected orders can be reserved again, not {status}")
