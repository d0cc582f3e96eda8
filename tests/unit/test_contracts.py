"""The contracts as files: the AsyncAPI 3 document of the events is valid against the AsyncAPI
schema (vendored in docs/schemas, no network at test time), matches the models it is generated
from, and the OpenAPI documents answer every error as a Problem with the route's real codes."""

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from orders.main import create as create_orders
from shared.asyncapi import EVENTS, document
from shared.events import AtualizarStatus, EstoqueAlterado, Line, PedidoCriado
from stock.main import create as create_stock

ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI_SCHEMA = json.loads((ROOT / "docs/schemas/asyncapi-3.0.0.schema.json").read_text())


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    doc = document()
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(ASYNCAPI_SCHEMA).iter_errors(doc)]
    assert not errors, errors[:5]
    for ref in refs(doc):
        resolve(doc, ref)


def test_the_validator_rejects_a_broken_document() -> None:
    """The vendored schema really checks something: AsyncAPI 2's `publish` is not an action in 3."""
    doc = document()
    next(iter(doc["operations"].values()))["action"] = "publish"
    assert list(jsonschema.Draft7Validator(ASYNCAPI_SCHEMA).iter_errors(doc))


def test_the_file_in_docs_is_the_generated_document() -> None:
    on_disk = json.loads((ROOT / "docs/asyncapi.json").read_text())
    assert on_disk == json.loads(json.dumps(document())), \
        "regenerate: .venv/bin/python -m shared.asyncapi > docs/asyncapi.json"


def test_every_event_has_a_message_a_channel_and_its_producer() -> None:
    doc = document()
    for model in EVENTS:
        name = model.__name__
        assert name in doc["components"]["messages"]
        assert doc["channels"][name]["address"] == name  # the routing key
        assert any(op["action"] == "send" and op["channel"]["$ref"] == f"#/channels/{name}"
                   for op in doc["operations"].values())


@pytest.mark.parametrize("event", [
    PedidoCriado(order_id="5f0c6c1e-7c4e-4b43-9d38-1d3c3f0f3a11", attempt=1, customer_id="c-1",
                 store_id="S1", items=[Line(sku="SKU-1", quantity=2)]),
    AtualizarStatus(order_id="5f0c6c1e-7c4e-4b43-9d38-1d3c3f0f3a11", attempt=1, status="EstoqueReservado"),
    EstoqueAlterado(store_id="S1", sku="SKU-1", on_hand=5, reserved=1, available=4, version=3, kind="reserved"),
])
def test_a_real_event_body_matches_its_schema(event: Any) -> None:
    doc = document()
    schema = {**resolve(doc, f"#/components/schemas/{type(event).__name__}"),
              "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(event.model_dump(mode="json"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({**event.model_dump(mode="json"), "event_id": 7})


@pytest.mark.parametrize("create", [create_orders, create_stock])
def test_openapi_errors_are_problems_with_real_codes(create: Any) -> None:
    doc = create().openapi()
    assert doc["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status", "detail"]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            codes = {int(c) for c in operation["responses"]}
            errors = {c for c in codes if c >= 400}
            if not operation.get("security"):
                assert not errors & {401, 403}, (method, path)
            else:
                assert {401, 403} <= errors, (method, path)
            if "requestBody" in operation:
                assert {413, 415, 422} <= errors, (method, path)
            if path != "/health/live":
                assert 503 in errors, (method, path)
            if method == "get":
                assert not errors & {409, 410}, (method, path)
            for code in errors:
                content = operation["responses"][str(code)]["content"]
                assert content == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
