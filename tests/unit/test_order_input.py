"""The order body (orders/models.py OrderIn, API.md §2): one store or several candidate stores,
and what the service receives once it is valid. The HTTP answers are in tests/e2e."""

from typing import Any

import pytest
from pydantic import ValidationError

from orders.models import OrderIn

ITEMS = [{"sku": "A", "quantity": 1}]


def valid(**fields: Any) -> dict[str, Any]:
    return OrderIn.model_validate({"customer_id": "c", "items": ITEMS, **fields}).model_dump()


def test_no_store_is_the_default_store_alone() -> None:
    body = valid()
    assert (body["store_id"], body["stores"], body["split"]) == ("default", ["default"], False)


def test_one_store_is_its_only_candidate() -> None:
    body = valid(store_id="S1")
    assert (body["store_id"], body["stores"], body["split"]) == ("S1", ["S1"], False)


@pytest.mark.parametrize("split", [None, False, True])
def test_several_stores_keep_their_order_and_have_no_store_id(split: bool | None) -> None:
    body = valid(stores=["S3", "S1", "S2"], **({} if split is None else {"split": split}))
    assert (body["store_id"], body["stores"], body["split"]) == (None, ["S3", "S1", "S2"], bool(split))


@pytest.mark.parametrize(("fields", "where"), [
    ({"store_id": "S1", "stores": ["S1"]}, "stores"),
    ({"split": True}, "split"),
    ({"store_id": "S1", "split": True}, "split"),
    ({"stores": None}, "stores"),
    ({"store_id": None}, "store_id"),
    ({"stores": ["S1"], "split": None}, "split"),
    ({"stores": []}, "stores"),
    ({"stores": ["S1", "S1"]}, "stores"),
    ({"stores": [f"S{i}" for i in range(21)]}, "stores"),
    ({"stores": ["S/1"]}, "stores"),
    ({"stores": ["S1"], "split": "yes"}, "split"),
])
def test_invalid_store_fields_are_refused_where_they_are(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as error:
        valid(**fields)
    assert any(where in map(str, e["loc"]) for e in error.value.errors()), error.value.errors()


def test_twenty_stores_are_the_most() -> None:
    assert len(valid(stores=[f"S{i}" for i in range(20)])["stores"]) == 20


def test_a_pedido_criado_from_before_several_stores_names_its_store_as_the_only_candidate() -> None:
    from shared.events import PedidoCriado

    old = {"order_id": "6f1c7c1e-4a5b-4c1d-9e8f-1a2b3c4d5e6f", "attempt": 1, "customer_id": "c",
           "store_id": "S1", "items": ITEMS, "event_type": "PedidoCriado"}
    cmd = PedidoCriado.model_validate(old)
    assert (cmd.store_id, cmd.stores, cmd.split) == ("S1", ["S1"], False)
    with pytest.raises(ValidationError):
        PedidoCriado.model_validate({**old, "store_id": None})
    with pytest.raises(ValidationError):
        PedidoCriado.model_validate({**old, "store_id": None, "stores": ["S1", "S1"]})
