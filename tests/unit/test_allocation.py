"""The allocation rule across several stores (API.md §2, stock/domain.py allocate): first store
that holds every line, else (split) each line across the stores in list order, else a refusal
with the right reason and figures. Examples first, then properties over random stores, stock
and orders (hypothesis)."""

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.events import Allocation, Line, Shortage
from stock.domain import (
    INSUFFICIENT_STOCK,
    NO_SINGLE_STORE,
    UNKNOWN_SKU,
    Decision,
    Figures,
    Stock,
    allocate,
    available_in,
    hold,
)


def lines(*pairs: tuple[str, int]) -> list[Line]:
    return [Line(sku=sku, quantity=q) for sku, q in pairs]


def stock(**stores: dict[str, int]) -> Stock:
    """stock(S1={"A": 3}) -> {("S1", "A"): Figures(3, 0)}: available units per store and sku."""
    return {(store, sku): Figures(n, 0) for store, items in stores.items() for sku, n in items.items()}


def held(decision: Decision) -> list[tuple[str, str, int]]:
    assert decision.held, decision
    return [(a.store_id, a.sku, a.quantity) for a in decision.allocations]


# ----- the rule, example by example ------------------------------------------------------------

def test_the_first_store_in_list_order_that_holds_every_line_wins() -> None:
    figures = stock(S1={"A": 1, "B": 5}, S2={"A": 5, "B": 5}, S3={"A": 9, "B": 9})
    order = lines(("A", 2), ("B", 2))
    assert held(allocate(order, ["S1", "S2", "S3"], False, figures)) == [("S2", "A", 2), ("S2", "B", 2)]
    assert held(allocate(order, ["S3", "S2"], False, figures)) == [("S3", "A", 2), ("S3", "B", 2)]
    # Split changes nothing when one store can hold the whole order.
    assert held(allocate(order, ["S1", "S2", "S3"], True, figures)) == [("S2", "A", 2), ("S2", "B", 2)]


def test_split_takes_each_line_from_the_stores_in_list_order_as_much_as_each_has() -> None:
    figures = stock(S1={"A": 2, "B": 0}, S2={"A": 1, "B": 4}, S3={"A": 5, "B": 2})
    order = lines(("A", 4), ("B", 3))
    # List order, not fewest stores: S3 alone could cover A, yet S1 and S2 give first.
    assert held(allocate(order, ["S1", "S2", "S3"], True, figures)) == [
        ("S1", "A", 2), ("S2", "A", 1), ("S2", "B", 3), ("S3", "A", 1)]


def test_split_skips_a_store_that_lacks_the_sku() -> None:
    figures = stock(S1={"B": 1}, S2={"A": 2, "B": 1})
    assert held(allocate(lines(("A", 2), ("B", 2)), ["S1", "S2"], True, figures)) == [
        ("S1", "B", 1), ("S2", "A", 2), ("S2", "B", 1)]


def test_without_split_an_order_the_stores_could_cover_together_is_no_single_store() -> None:
    figures = stock(S1={"A": 2, "B": 0}, S2={"A": 0, "B": 2})
    decision = allocate(lines(("A", 2), ("B", 2)), ["S1", "S2"], False, figures)
    assert (decision.reason, decision.shortages, decision.allocations) == (NO_SINGLE_STORE, (), ())


def test_insufficient_stock_sums_available_over_the_candidate_stores() -> None:
    figures = {("S1", "A"): Figures(5, 4), ("S2", "A"): Figures(2, 0), ("S3", "A"): Figures(99, 0),
               ("S1", "B"): Figures(9, 0)}
    for split in (False, True):
        decision = allocate(lines(("A", 4), ("B", 1)), ["S1", "S2"], split, figures)  # S3 not a candidate
        assert decision.reason == INSUFFICIENT_STOCK
        assert decision.shortages == (Shortage(sku="A", requested=4, available=3),)
        assert decision.allocations == ()


def test_unknown_sku_means_in_none_of_the_candidate_stores() -> None:
    figures = stock(S1={"A": 5}, S2={"B": 5}, S9={"C": 5})
    decision = allocate(lines(("A", 9), ("B", 1), ("C", 1)), ["S1", "S2"], True, figures)
    assert decision.reason == UNKNOWN_SKU
    # Every line the stores together cannot cover, the unknown one at 0.
    assert decision.shortages == (Shortage(sku="A", requested=9, available=5),
                                  Shortage(sku="C", requested=1, available=0))


def test_a_sku_known_in_one_store_only_is_not_unknown() -> None:
    decision = allocate(lines(("A", 3)), ["S1", "S2"], False, stock(S2={"A": 1}))
    assert decision.reason == INSUFFICIENT_STOCK
    assert decision.shortages == (Shortage(sku="A", requested=3, available=1),)


def test_allocations_are_sorted_by_store_then_sku() -> None:
    figures = stock(S2={"Z": 1, "A": 1}, S1={"Z": 1, "A": 1})
    decision = allocate(lines(("Z", 2), ("A", 2)), ["S2", "S1"], True, figures)
    assert held(decision) == [("S1", "A", 1), ("S1", "Z", 1), ("S2", "A", 1), ("S2", "Z", 1)]


# ----- properties over random stores, stock and orders ------------------------------------------

STORES = ["S1", "S2", "S3", "S4"]
SKUS = ["A", "B", "C", "D", "E"]

figures_st = st.integers(0, 12).flatmap(lambda on_hand: st.builds(
    Figures, st.just(on_hand), st.integers(0, on_hand)))
stock_st = st.dictionaries(st.tuples(st.sampled_from(STORES), st.sampled_from(SKUS)), figures_st, max_size=20)
order_st = st.lists(st.sampled_from(SKUS), min_size=1, max_size=5, unique=True).flatmap(
    lambda skus: st.tuples(*(st.integers(1, 10) for _ in skus)).map(
        lambda qs: [Line(sku=s, quantity=q) for s, q in zip(skus, qs, strict=True)]))
stores_st = st.lists(st.sampled_from(STORES), min_size=1, max_size=4, unique=True)


@settings(max_examples=1500, deadline=None)
@given(stock_st, order_st, stores_st, st.booleans())
def test_allocation_never_exceeds_a_store_and_covers_every_line_or_none(
    figures: Stock, order: list[Line], stores: list[str], split: bool
) -> None:
    decision = allocate(order, stores, split, figures)
    taken: dict[tuple[str, str], int] = defaultdict(int)
    per_line: dict[str, int] = defaultdict(int)
    for a in decision.allocations:
        assert a.store_id in stores and a.quantity > 0
        taken[(a.store_id, a.sku)] += a.quantity
        per_line[a.sku] += a.quantity
    assert len(taken) == len(decision.allocations), "one allocation per (store, sku)"
    for (store, sku), quantity in taken.items():
        assert quantity <= available_in(figures, store, sku), (store, sku)
    if decision.held:
        assert per_line == {line.sku: line.quantity for line in order}  # every line, exactly
        # Holding it keeps every item within its invariant (the hold rule).
        for change in hold(decision.allocations):
            figures[(change.store_id, change.sku)].after(change)
    else:
        assert decision.allocations == ()  # none


@settings(max_examples=1500, deadline=None)
@given(stock_st, order_st, stores_st, st.booleans())
def test_allocation_follows_first_store_then_list_order_then_the_reasons(
    figures: Stock, order: list[Line], stores: list[str], split: bool
) -> None:
    decision = allocate(order, stores, split, figures)
    fits = [s for s in stores if all(available_in(figures, s, l.sku) >= l.quantity for l in order)]
    together = {l.sku: sum(available_in(figures, s, l.sku) for s in stores) for l in order}
    short = [l for l in order if together[l.sku] < l.quantity]
    if fits:
        assert held(decision) == sorted((fits[0], l.sku, l.quantity) for l in order)
    elif split and not short:
        expected = []
        for line in order:  # greedy in list order
            left = line.quantity
            for s in stores:
                take = min(left, available_in(figures, s, line.sku))
                if take:
                    expected.append((s, line.sku, take))
                    left -= take
        assert held(decision) == sorted(expected)
        assert len({a.store_id for a in decision.allocations}) >= 2  # else one store would fit
    else:
        assert not decision.held
        unknown = any(all((s, l.sku) not in figures for s in stores) for l in order)
        expected_reason = UNKNOWN_SKU if unknown else INSUFFICIENT_STOCK if short else NO_SINGLE_STORE
        assert decision.reason == expected_reason
        assert decision.shortages == tuple(
            Shortage(sku=l.sku, requested=l.quantity, available=together[l.sku]) for l in short)
        if decision.reason == NO_SINGLE_STORE:
            assert not split and decision.shortages == ()


def test_a_one_store_order_is_the_single_store_case() -> None:
    figures = stock(S1={"A": 1})
    assert allocate(lines(("A", 1)), ["S1"], False, figures).allocations == (
        Allocation(store_id="S1", sku="A", quantity=1),)
    assert allocate(lines(("A", 2)), ["S1"], False, figures).reason == INSUFFICIENT_STOCK
