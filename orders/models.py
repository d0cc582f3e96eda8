"""The order as clients send it and see it (API.md §2): shared by the full app (orders/api.py)
and the fast lane (orders/fastlane.py), so both validate alike."""

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orders.domain import Status
from shared.events import MAX_STORES, Allocation, Line, Shortage, StoreId

NO_NUL = r"^[^\x00]+$"  # PostgreSQL text cannot hold NUL
DEFAULT_STORE = "default"


class OrderIn(BaseModel):
    """One store (`store_id`, default "default") or several candidate stores (`stores`, nearest
    first, with `split`). Once validated, `stores` and `split` are always set: a one-store order
    has stores = [store_id], split = false; a several-store order has store_id = None."""

    model_config = ConfigDict(extra="forbid")
    customer_id: Annotated[str, Field(min_length=1, max_length=64, strict=True, pattern=NO_NUL)]
    store_id: StoreId | None = None
    stores: Annotated[list[StoreId], Field(min_length=1, max_length=MAX_STORES)] | None = None
    split: Annotated[bool, Field(strict=True)] = False
    items: Annotated[list[Line], Field(min_length=1, max_length=100)]

    @field_validator("store_id", "stores", "split", mode="before")
    @classmethod
    def not_null(cls, value: Any) -> Any:
        # Absent means the default; an explicit null is a client bug worth telling.
        if value is None:
            raise ValueError("may not be null; leave the field out instead")
        return value

    @field_validator("stores")
    @classmethod
    def one_kind_of_store(cls, stores: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("store_id") is not None:
            raise ValueError("give either store_id or stores, not both")
        if len(set(stores)) != len(stores):
            raise ValueError("a store may appear only once in stores")
        return stores

    @field_validator("split")
    @classmethod
    def split_needs_stores(cls, split: bool, info: ValidationInfo) -> bool:
        if "stores" in info.data and info.data["stores"] is None:
            raise ValueError("split may be given only with stores")
        return split

    @field_validator("items")
    @classmethod
    def no_sku_twice(cls, items: list[Line]) -> list[Line]:
        skus = [line.sku for line in items]
        if len(set(skus)) != len(skus):
            raise ValueError("a sku may appear only once per order")
        return items

    @model_validator(mode="after")
    def candidates(self) -> "OrderIn":
        if self.stores is None:
            self.store_id = self.store_id or DEFAULT_STORE
            self.stores = [self.store_id]
        return self


class Order(BaseModel):
    order_id: uuid.UUID
    customer_id: str
    store_id: str | None
    stores: list[str]
    split: bool
    items: list[Line]
    status: Status
    reason: str | None
    unavailable: list[Shortage]
    allocations: list[Allocation]
    reserved_until: datetime | None
    created_at: datetime
    updated_at: datetime


class OrderPage(BaseModel):
    items: list[Order]
    next_cursor: str | None
