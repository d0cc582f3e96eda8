"""Pure stock rules, no I/O: where an order's lines are held (the allocation rule), what each
change does to an item (the hold rule and its endings), and the errors stock's own rules raise.

An order is held all lines or none (API.md §2):
1. the first candidate store (list order) that can hold every line holds the whole order;
2. else, with `split`, each line is taken from the stores in list order, as much as each has;
3. else nothing is held: `unknown_sku` if some sku exists in none of the stores, else
   `insufficient_stock` if the stores together cannot cover some line, else `no_single_store`.
"""

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from shared.events import Allocation, AtualizarStatus, Line, Shortage, StockStatus

UNKNOWN_SKU = "unknown_sku"
INSUFFICIENT_STOCK = "insufficient_stock"
NO_SINGLE_STORE = "no_single_store"


class StockError(Exception):
    """A request stock's rules refuse (the HTTP layer picks the status)."""


class UnknownItem(StockError):
    pass


class Conflict(StockError):
    """The item is not in the state the request assumed (version, units held, concurrent create)."""


class VersionRequired(StockError):
    """Changing an existing item needs its current version."""


class Oversold(StockError):
    """A change would break 0 <= reserved <= on_hand: a bug, never a customer's fault."""


@dataclass(frozen=True)
class Change:
    """One item's change: deltas on (on_hand, reserved); its ledger kind is the caller's."""

    store_id: str
    sku: str
    on_hand_delta: int
    reserved_delta: int


@dataclass(frozen=True)
class Figures:
    on_hand: int
    reserved: int

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    def after(self, change: Change) -> "Figures":
        """The figures once `change` is applied; refuses to break the invariant."""
        figures = Figures(self.on_hand + change.on_hand_delta, self.reserved + change.reserved_delta)
        if not 0 <= figures.reserved <= figures.on_hand:
            raise Oversold(f"{change} on {self} gives {figures}")
        return figures


Stock = Mapping[tuple[str, str], Figures]  # (store_id, sku) -> the item's figures


@dataclass(frozen=True)
class Decision:
    """Held (allocations, sorted by store and sku) or refused (reason and the short lines)."""

    allocations: tuple[Allocation, ...] = ()
    shortages: tuple[Shortage, ...] = ()
    reason: str | None = None

    @property
    def held(self) -> bool:
        return self.reason is None


def available_in(stock: Stock, store_id: str, sku: str) -> int:
    figures = stock.get((store_id, sku))
    return max(0, figures.available) if figures is not None else 0


def allocate(lines: Sequence[Line], stores: Sequence[str], split: bool, stock: Stock) -> Decision:
    """Where the order's lines are held, or why none is (the rule in this module's docstring)."""
    for store in stores:
        if all(available_in(stock, store, line.sku) >= line.quantity for line in lines):
            return Decision(_sorted([Allocation(store_id=store, sku=line.sku, quantity=line.quantity)
                                     for line in lines]))
    together = {line.sku: sum(available_in(stock, s, line.sku) for s in stores) for line in lines}
    shortages = tuple(Shortage(sku=line.sku, requested=line.quantity, available=together[line.sku])
                      for line in lines if together[line.sku] < line.quantity)
    if split and not shortages:
        return Decision(_sorted([a for line in lines for a in _split(line, stores, stock)]))
    if any(all((store, line.sku) not in stock for store in stores) for line in lines):
        return Decision(shortages=shortages, reason=UNKNOWN_SKU)
    if shortages:
        return Decision(shortages=shortages, reason=INSUFFICIENT_STOCK)
    return Decision(reason=NO_SINGLE_STORE)


def _split(line: Line, stores: Sequence[str], stock: Stock) -> Iterable[Allocation]:
    left = line.quantity
    for store in stores:
        take = min(left, available_in(stock, store, line.sku))
        if take > 0:
            yield Allocation(store_id=store, sku=line.sku, quantity=take)
            left -= take
        if left == 0:
            return


def _sorted(allocations: list[Allocation]) -> tuple[Allocation, ...]:
    return tuple(sorted(allocations, key=lambda a: (a.store_id, a.sku)))


# ----- what each step of a hold's life does to the items it touches --------------------------

def hold(allocations: Iterable[Allocation]) -> list[Change]:
    """The hold rule: the units move from available to reserved; on hand is unchanged."""
    return [Change(a.store_id, a.sku, 0, a.quantity) for a in allocations]


def let_go(allocations: Iterable[Allocation]) -> list[Change]:
    """Released on cancel or expired: the units go back to available."""
    return [Change(a.store_id, a.sku, 0, -a.quantity) for a in allocations]


def sell(allocations: Iterable[Allocation]) -> list[Change]:
    """The held units leave the shelf for good."""
    return [Change(a.store_id, a.sku, -a.quantity, -a.quantity) for a in allocations]


def count(store_id: str, sku: str, current: Figures, on_hand: int) -> Change:
    """A counted quantity (PUT) replaces on hand; it may not go below the units held."""
    if on_hand < current.reserved:
        raise Conflict(f"on_hand {on_hand} is below the {current.reserved} units held")
    return Change(store_id, sku, on_hand - current.on_hand, 0)


def check_version(current: int, expected: int) -> None:
    if current != expected:
        raise Conflict(f"version mismatch: the item is at version {current}, not {expected}; "
                       "read it again and retry")


# ----- stock's answer to orders (AtualizarStatus), built here only ------------------------------

# How a hold ended (its stock_order state and ledger kind) -> the status orders hears.
ENDING_STATUS: dict[str, StockStatus] = {
    "sold": "EstoqueBaixado", "expired": "ReservaExpirada", "released": "ReservaLiberada",
}


def decision_answer(
    order_id: uuid.UUID, attempt: int, decision: Decision, reserved_until: datetime | None
) -> AtualizarStatus:
    """EstoqueReservado with where each line is held, or EstoqueNaoDisponivel with why not."""
    if decision.held:
        return AtualizarStatus(order_id=order_id, attempt=attempt, status="EstoqueReservado",
                               reserved_until=reserved_until, allocations=list(decision.allocations))
    return AtualizarStatus(order_id=order_id, attempt=attempt, status="EstoqueNaoDisponivel",
                           unavailable=list(decision.shortages), reason=decision.reason)


def ending_answer(order_id: uuid.UUID, attempt: int, ending: str) -> AtualizarStatus:
    """The end of a hold (sold, expired, released), as orders hears it."""
    return AtualizarStatus(order_id=order_id, attempt=attempt, status=ENDING_STATUS[ending])
