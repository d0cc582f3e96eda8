"""The AsyncAPI 3 document of every event (API.md §6), generated from the models in
shared/events.py so it cannot drift from what the services send and accept.

The gateway serves it at `/asyncapi.json`; docs/asyncapi.json is the same document as a file
(`python -m shared.asyncapi > docs/asyncapi.json` after changing an event; a test compares them)."""

import json
import sys
from typing import Any

from pydantic import BaseModel

from shared.events import (
    AtualizarStatus,
    EstoqueAlterado,
    PedidoCancelado,
    PedidoConfirmado,
    PedidoCriado,
)
from shared.messaging import DEAD_LETTER_EXCHANGE, EXCHANGE, QUEUES

AMQP_BINDING = "0.3.0"
# event -> (who sends it, who receives it, what it means)
EVENTS: dict[type[BaseModel], tuple[str, str, str]] = {
    PedidoCriado: ("orders", "stock", "An order was created (or asked to be reserved again): stock "
                   "decides to hold all its lines or none."),
    PedidoConfirmado: ("orders", "stock", "Checkout: stock turns the hold into a sale."),
    PedidoCancelado: ("orders", "stock", "The customer gave up: stock releases whatever is held."),
    AtualizarStatus: ("stock", "orders", "Stock's answer about an order: reserved, unavailable, "
                      "expired, sold or released."),
    EstoqueAlterado: ("stock", "anyone", "A stock item changed (every ledger movement), for "
                      "storefronts and tills; no queue of this system consumes it."),
}
HEADERS = {
    "type": "object",
    "properties": {
        "x-request-id": {"type": "string", "description": "The request id of the HTTP request "
                         "that caused this message (1-128 of [A-Za-z0-9._:-])"},
        "traceparent": {"type": "string", "description": "W3C trace context of the order"},
    },
}


def _queue_of(event: str) -> str | None:
    return next((queue for queue, events in QUEUES.items() if event in events), None)


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in EVENTS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _message(model: type[BaseModel], description: str) -> dict[str, Any]:
    name = model.__name__
    return {
        "name": name,
        "title": name,
        "summary": description,
        "contentType": "application/json",
        "headers": HEADERS,
        "payload": {"$ref": f"#/components/schemas/{name}"},
        "correlationId": {"description": "The order id (AMQP correlation_id)",
                          "location": "$message.payload#/order_id"}
        if "order_id" in model.model_fields else None,
        "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING}},
    }


def _channel(name: str, sender: str, receiver: str, summary: str) -> dict[str, Any]:
    queue = _queue_of(name)
    where = f"bound to the durable quorum queue `{queue}` (dead letters: `{queue}.dlq` through " \
            f"`{DEAD_LETTER_EXCHANGE}`)" if queue else "bound to no queue of this system"
    return {
        "address": name,
        "title": name,
        "description": f"Routing key `{name}` on the topic exchange `{EXCHANGE}`, {where}. "
                       f"From {sender} to {receiver}.",
        "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        "bindings": {"amqp": {
            "is": "routingKey",
            "exchange": {"name": EXCHANGE, "type": "topic", "durable": True, "autoDelete": False,
                         "vhost": "/"},
            "bindingVersion": AMQP_BINDING,
        }},
    }


def _operations(name: str, sender: str, receiver: str) -> dict[str, Any]:
    channel = {"$ref": f"#/channels/{name}"}
    messages = [{"$ref": f"#/channels/{name}/messages/{name}"}]
    operations: dict[str, Any] = {
        f"{sender}Sends{name}": {
            "action": "send", "channel": channel, "messages": messages,
            "summary": f"{sender} publishes {name} from its outbox, with publisher confirms",
            "bindings": {"amqp": {"deliveryMode": 2, "mandatory": _queue_of(name) is not None,
                                  "bindingVersion": AMQP_BINDING}},
        },
    }
    if _queue_of(name):
        operations[f"{receiver}Receives{name}"] = {
            "action": "receive", "channel": channel, "messages": messages,
            "summary": f"{receiver} consumes {name} from `{_queue_of(name)}`; a redelivered "
                       "message changes nothing (inbox); an invalid one is dead-lettered at once",
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
        }
    return operations


def document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for model, (sender, receiver, summary) in EVENTS.items():
        name = model.__name__
        channels[name] = _channel(name, sender, receiver, summary)
        operations.update(_operations(name, sender, receiver))
        messages[name] = {k: v for k, v in _message(model, summary).items() if v is not None}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Inventory events",
            "version": "1.0.0",
            "description": "Every message between orders and stock (docs/API.md §6). Every "
                           "message is persistent JSON with `message_id` = the event id, `type` "
                           "= the event type, `correlation_id` = the order id.",
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:5672", "protocol": "amqp",
                              "description": "The broker `make run` starts (AMQP_URL)"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": _schemas()},
    }


if __name__ == "__main__":
    json.dump(document(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
