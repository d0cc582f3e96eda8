"""Pure stock rules: whether an order can be held, and what each change does to an item."""

from dataclasses import dataclass

from shared.events import Line, Shortage


@dataclass(frozen=True)
class Figures:
    on_hand: int
    reserved: int

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


@dataclass(frozen=True)
class Decision:
    """All lines held, or none: every short line is reported together."""

    shortages: tuple[Shortage, ...] = ()
    reason: str | None = None

    @property
    def held(self) -> bool:
        return not self.shortages


def decide(lines: list[Line], stock: dict[str, Figures]) -> Decision:
    shortages: list[Shortage] = []
    unknown = False
    for line in lines:
        figures = stock.get(line.sku)
        if figures is None:
            unknown = True
            shortages.append(Shortage(sku=line.sku, requested=line.quantity, available=0))
        elif figures.available < line.quantity:
            shortages.append(
                Shortage(sku=line.sku, requested=line.quantity, available=max(0, figures.available))
            )
    if not shortages:
        return Decision()
    return Decision(tuple(shortages), "unknown_sku" if unknown else "insufficient_stock")


@dataclass(frozen=True)
class Change:
    """One item's change: deltas on (on_hand, reserved) and the ledger kind that records it."""

    sku: str
    on_hand_delta: int
    reserved_delta: int


def hold(lines: list[Line]) -> list[Change]:
    return [Change(line.sku, 0, line.quantity) for line in lines]


def let_go(lines: list[Line]) -> list[Change]:
    """Released on cancel or expired: the units go back to available."""
    return [Change(line.sku, 0, -line.quantity) for line in lines]


def sell(lines: list[Line]) -> list[Change]:
    """The held units leave the shelf for good."""
    return [Change(line.sku, -line.quantity, -line.quantity) for line in lines]
