"""The messages on the wire (API.md §6): one pydantic model per event type.

Glossary: the wire names come from the original design, in Portuguese, and stay as they are.

| wire name              | means                                                              |
|------------------------|--------------------------------------------------------------------|
| `PedidoCriado`         | order placed: orders asks stock to hold its lines (attempt n)      |
| `PedidoConfirmado`     | order confirmed at checkout: sell what is held                      |
| `PedidoCancelado`      | order cancelled: let go of anything held                            |
| `AtualizarStatus`      | update status: stock's answer to orders, one of the statuses below  |
| `EstoqueReservado`     | stock reserved: every line is held (`allocations` say where)        |
| `EstoqueNaoDisponivel` | stock unavailable: nothing is held (`reason`, `unavailable`)        |
| `ReservaExpirada`      | hold expired before checkout                                        |
| `EstoqueBaixado`       | stock written off: the held units are sold                          |
| `ReservaLiberada`      | hold released on cancel                                             |
| `EstoqueAlterado`      | stock changed: one movement of one item, for the live feed         |
| `AguardandoEstoque`    | waiting for stock: the order status `pending`                       |

Inside the code one name per concept: a **hold** is what stock keeps for an order until it is
sold, released or expired (the wire says "reserved"/"Reserva"); a **movement** is one change of
one item, and an item's movements in version order are its ledger (`/movements`).

Every body carries `event_id`, `event_type` and `occurred_at`.
"""

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

Sku = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
StoreId = Sku
MAX_STORES = 20


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sku: Sku
    quantity: Annotated[int, Field(ge=1, le=10_000, strict=True)]


class Shortage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sku: str
    requested: int
    available: int


class Allocation(BaseModel):
    """Units of one line held (or sold) in one store."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    store_id: str
    sku: str
    quantity: int


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class OrderEvent(Event):
    order_id: uuid.UUID
    attempt: Annotated[int, Field(ge=1)]


class PedidoCriado(OrderEvent):
    """Order placed. `stores` are the candidate stores, nearest first; `store_id` is the one store
    a one-store order named (None for a several-store order)."""

    event_type: Literal["PedidoCriado"] = "PedidoCriado"
    customer_id: str
    store_id: StoreId | None = None
    stores: Annotated[list[StoreId], Field(max_length=MAX_STORES)] = []
    split: bool = False
    items: Annotated[list[Line], Field(min_length=1, max_length=100)]

    @model_validator(mode="after")
    def _candidates(self) -> "PedidoCriado":
        # A message written before several stores existed names only store_id.
        if not self.stores:
            if self.store_id is None:
                raise ValueError("an order names store_id or stores")
            object.__setattr__(self, "stores", [self.store_id])
        if len(set(self.stores)) != len(self.stores):
            raise ValueError("stores must be distinct")
        return self


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
    # Where each line is held (EstoqueReservado) or was sold (EstoqueBaixado), by (store_id, sku).
    allocations: list[Allocation] = []
    unavailable: list[Shortage] = []
    # Why a hold was refused (`unknown_sku`, `insufficient_stock`, `no_single_store`): only stock
    # can tell.
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
# A union is a type form, not a class: some pydantic versions type TypeAdapter too narrowly
# (unused-ignore: the locked version does not).
stock_command_adapter: TypeAdapter[StockCommand] = TypeAdapter(
    StockCommand  # type: ignore[arg-type, unused-ignore]
)
