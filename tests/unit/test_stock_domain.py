"""The stock decision for a one-store order and the item changes (stock/domain.py): pure
rules, no I/O. Several stores: tests/unit/test_allocation.py."""

import random

import pytest

from shared.events import Allocation, Line, Shortage
from stock.domain import (
    Change,
    Conflict,
    Decision,
    Figures,
    Oversold,
    allocate,
    check_version,
    count,
    hold,
    let_go,
    sell,
)

STORE = "S1"


def lines(*pairs: tuple[str, int]) -> list[Line]:
    return [Line(sku=sku, quantity=q) for sku, q in pairs]


def decide(order: list[Line], stock: dict[str, Figures]) -> Decision:
    """The allocation rule for a one-store order (stores = [S1], no split)."""
    return allocate(order, [STORE], False, {(STORE, sku): f for sku, f in stock.items()})


def held_in_store(order: list[Line]) -> list[Allocation]:
    return [Allocation(store_id=STORE, sku=line.sku, quantity=line.quantity) for line in order]


def test_available_is_on_hand_minus_reserved() -> None:
    assert Figures(on_hand=10, reserved=3).available == 7


# ----- decide ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stock", [
    {"A": Figures(10, 0), "B": Figures(5, 0)},
    {"A": Figures(2, 0), "B": Figures(3, 2)},   # exactly what is asked for
    {"A": Figures(100, 98), "B": Figures(1, 0)},
])
def test_every_line_fits_so_the_order_is_held(stock: dict[str, Figures]) -> None:
    decision = decide(lines(("A", 2), ("B", 1)), stock)
    assert decision.held
    assert decision.shortages == ()
    assert decision.reason is None
    assert decision.allocations == (Allocation(store_id=STORE, sku="A", quantity=2),
                                    Allocation(store_id=STORE, sku="B", quantity=1))


def test_one_short_line_refuses_the_whole_order_and_only_it_is_reported() -> None:
    stock = {"A": Figures(10, 0), "B": Figures(5, 4), "C": Figures(3, 0)}
    decision = decide(lines(("A", 2), ("B", 2), ("C", 3)), stock)
    assert not decision.held
    assert decision.reason == "insufficient_stock"
    assert decision.shortages == (Shortage(sku="B", requested=2, available=1),)


def test_every_short_line_is_reported_in_line_order() -> None:
    stock = {"A": Figures(1, 0), "B": Figures(9, 0), "C": Figures(4, 4), "D": Figures(2, 1)}
    decision = decide(lines(("C", 1), ("A", 3), ("B", 9), ("D", 2)), stock)
    assert not decision.held
    assert decision.reason == "insufficient_stock"
    assert decision.shortages == (
        Shortage(sku="C", requested=1, available=0),
        Shortage(sku="A", requested=3, available=1),
        Shortage(sku="D", requested=2, available=1),
    )


def test_reserved_units_are_not_available() -> None:
    decision = decide(lines(("A", 3)), {"A": Figures(on_hand=10, reserved=8)})
    assert decision.shortages == (Shortage(sku="A", requested=3, available=2),)


def test_unknown_sku_is_reported_with_nothing_available() -> None:
    decision = decide(lines(("A", 1), ("X", 4)), {"A": Figures(10, 0)})
    assert not decision.held
    assert decision.reason == "unknown_sku"
    assert decision.shortages == (Shortage(sku="X", requested=4, available=0),)


def test_unknown_sku_wins_over_insufficient_stock_and_both_are_reported() -> None:
    decision = decide(lines(("A", 5), ("X", 1)), {"A": Figures(2, 0)})
    assert decision.reason == "unknown_sku"
    assert decision.shortages == (
        Shortage(sku="A", requested=5, available=2),
        Shortage(sku="X", requested=1, available=0),
    )


def test_an_empty_store_knows_no_sku() -> None:
    decision = decide(lines(("A", 1), ("B", 1)), {})
    assert decision.reason == "unknown_sku"
    assert [s.sku for s in decision.shortages] == ["A", "B"]
    assert all(s.available == 0 for s in decision.shortages)


@pytest.mark.parametrize("figures", [Figures(3, 5), Figures(0, 1)])
def test_available_is_never_reported_negative(figures: Figures) -> None:
    decision = decide(lines(("A", 1)), {"A": figures})
    assert not decision.held
    assert decision.shortages == (Shortage(sku="A", requested=1, available=0),)


def test_decide_matches_the_rule_on_random_orders() -> None:
    """All or nothing, every short line and only those, available within [0, on_hand]."""
    rng = random.Random(1234)
    skus = [f"S{i}" for i in range(8)]
    for _ in range(2000):
        stock = {}
        for sku in rng.sample(skus, rng.randint(0, len(skus))):
            on_hand = rng.randint(0, 10)
            stock[sku] = Figures(on_hand, rng.randint(0, on_hand))
        order = lines(*((sku, rng.randint(1, 6)) for sku in rng.sample(skus, rng.randint(1, 5))))
        decision = decide(order, stock)
        short = [l for l in order if l.sku not in stock or stock[l.sku].available < l.quantity]
        assert decision.held == (not short)
        assert decision.allocations == (() if short else tuple(sorted(held_in_store(order), key=lambda a: a.sku)))
        assert [s.sku for s in decision.shortages] == [l.sku for l in short]
        assert [s.requested for s in decision.shortages] == [l.quantity for l in short]
        for s in decision.shortages:
            expected = stock[s.sku].available if s.sku in stock else 0
            assert s.available == expected and s.available >= 0
            assert s.available < s.requested
        if short:
            unknown = any(l.sku not in stock for l in short)
            assert decision.reason == ("unknown_sku" if unknown else "insufficient_stock")
        else:
            assert decision.reason is None


# ----- hold / let_go / sell -------------------------------------------------------------------

ORDER = lines(("A", 2), ("B", 5), ("C", 1))


@pytest.mark.parametrize(("change", "on_hand_sign", "reserved_sign"), [
    (hold, 0, +1),     # units move from available to reserved
    (let_go, 0, -1),   # released or expired: back to available
    (sell, -1, -1),    # sold: leave the shelf and the reservation
])
def test_changes_move_each_line_by_its_quantity(change, on_hand_sign: int, reserved_sign: int) -> None:  # type: ignore[no-untyped-def]
    changes = change(held_in_store(ORDER))
    assert changes == [
        Change(STORE, line.sku, on_hand_sign * line.quantity, reserved_sign * line.quantity) for line in ORDER
    ]


@pytest.mark.parametrize("ending", [let_go, sell])
def test_an_ended_hold_gives_back_exactly_what_was_held(ending) -> None:  # type: ignore[no-untyped-def]
    before = {"A": Figures(10, 0), "B": Figures(5, 0), "C": Figures(1, 0)}
    after = dict(before)
    for c in hold(held_in_store(ORDER)) + ending(held_in_store(ORDER)):
        after[c.sku] = after[c.sku].after(c)
    for sku, f in after.items():
        assert f.reserved == 0
        assert 0 <= f.reserved <= f.on_hand
        sold = next(l.quantity for l in ORDER if l.sku == sku) if ending is sell else 0
        assert f.on_hand == before[sku].on_hand - sold
        assert f.available == before[sku].available - sold


def test_holding_what_decide_allowed_keeps_reserved_within_on_hand() -> None:
    stock = {"A": Figures(2, 0), "B": Figures(5, 0), "C": Figures(1, 0)}
    decision = decide(ORDER, stock)
    assert decision.held
    for c in hold(decision.allocations):
        f = stock[c.sku].after(c)
        assert 0 <= f.reserved <= f.on_hand


@pytest.mark.parametrize(("figures", "change"), [
    (Figures(5, 4), Change(STORE, "A", 0, 2)),    # holding more than is available
    (Figures(5, 1), Change(STORE, "A", 0, -2)),   # letting go of more than is held
    (Figures(5, 5), Change(STORE, "A", -1, 0)),   # on hand below what is held
])
def test_a_change_that_would_oversell_is_refused(figures: Figures, change: Change) -> None:
    with pytest.raises(Oversold):
        figures.after(change)


def test_a_count_replaces_on_hand_but_never_below_what_is_held() -> None:
    assert count(STORE, "A", Figures(10, 4), 6) == Change(STORE, "A", -4, 0)
    assert count(STORE, "A", Figures(10, 4), 4) == Change(STORE, "A", -6, 0)
    with pytest.raises(Conflict):
        count(STORE, "A", Figures(10, 4), 3)


def test_a_stale_version_is_a_conflict() -> None:
    check_version(3, 3)
    with pytest.raises(Conflict, match="version 4"):
        check_version(4, 3)
