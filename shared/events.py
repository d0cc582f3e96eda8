"""The messages on the wire (API.md §6): one pydantic model per event type.

Commands from orders to stock are named as the original design named them (`PedidoCriado`, ...);
every body carries `event_id`, `event_type` and `occurred_at`.
"""

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Sku = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
StoreId = Sku


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sku: Sku
    quantity: Annotated[int, Field(ge=1, le=10_000, strict=True)]


class Shortage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sku: str
    requested: int
    available: int


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class OrderEvent(Event):
    order_id: uuid.UUID
    attempt: Annotated[int, Field(ge=1)]


class PedidoCriado(OrderEvent):
    event_type: Literal["PedidoCriado"] = "PedidoCriado"
    customer_id: str
    store_id: StoreId
    items: Annotated[list[Line], Field(min_length=1, max_length=100)]


class PedidoConfirmado(OrderEvent):
    event_type: Literal["PedidoConfirmado"] = "PedidoConfirmado"


class PedidoCancelado(OrderEvent):
    event_type: Literal["PedidoCancelado"] = "PedidoCancelado"


StockStatus = Literal[
    "EstoqueReservado", "EstoqueNaoDisponivel", "ReservaExpirada", "EstoqueBaixado", "ReservaLiberada"
]


class AtualizarStatus(OrderEvent):
    event_type: Literal["AtualizarStatus"] = "AtualizarStatus"
    status: StockStatus
    reserved_until: datetime | None = None
    unavailable: list[Shortage] = []
    # Why a hold was refused (`unknown_sku` or `insufficient_stock`): only stock can tell.
    reason: str | None = None


class EstoqueAlterado(Event):
    event_type: Literal["EstoqueAlterado"] = "EstoqueAlterado"
    store_id: str
    sku: str
    on_hand: int
    reserved: int
    available: int
    version: int
    kind: str


StockCommand = Annotated[
    PedidoCriado | PedidoConfirmado | PedidoCancelado, Field(discriminator="event_type")
]
stock_command_adapter: TypeAdapter[StockCommand] = TypeAdapter(StockCommand)
