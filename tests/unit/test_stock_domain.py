"""The stock decision and the item changes (stock/domain.py): pure rules, no I/O."""

import random

import pytest

from shared.events import Line, Shortage
from stock.domain import Change, Figures, decide, hold, let_go, sell


def lines(*pairs: tuple[str, int]) -> list[Line]:
    return [Line(sku=sku, quantity=q) for sku, q in pairs]


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
    changes = change(ORDER)
    assert changes == [
        Change(line.sku, on_hand_sign * line.quantity, reserved_sign * line.quantity) for line in ORDER
    ]


@pytest.mark.parametrize("ending", [let_go, sell])
def test_an_ended_hold_gives_back_exactly_what_was_held(ending) -> None:  # type: ignore[no-untyped-def]
    before = {"A": Figures(10, 0), "B": Figures(5, 0), "C": Figures(1, 0)}
    after = dict(before)
    for c in hold(ORDER) + ending(ORDER):
        f = after[c.sku]
        after[c.sku] = Figures(f.on_hand + c.on_hand_delta, f.reserved + c.reserved_delta)
    for sku, f in after.items():
        assert f.reserved == 0
        assert 0 <= f.reserved <= f.on_hand
        sold = next(l.quantity for l in ORDER if l.sku == sku) if ending is sell else 0
        assert f.on_hand == before[sku].on_hand - sold
        assert f.available == before[sku].available - sold


def test_holding_what_decide_allowed_keeps_reserved_within_on_hand() -> None:
    stock = {"A": Figures(2, 0), "B": Figures(5, 0), "C": Figures(1, 0)}
    assert decide(ORDER, stock).held
    for c in hold(ORDER):
        f = stock[c.sku]
        assert 0 <= f.reserved + c.reserved_delta <= f.on_hand + c.on_hand_delta
