"""Tables of the inventory database."""

from __future__ import annotations

from sqlmodel import Field, SQLModel

__all__ = ["ReservationRow", "StockRow"]


class StockRow(SQLModel, table=True):
    """One SKU: what is free to reserve and what live reservations hold."""

    __tablename__ = "stock"

    sku: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    available: int
    reserved: int = 0


class ReservationRow(SQLModel, table=True):
    """The reservation (or tombstone) of one order; items as compact "sku=qty;..." text."""

    __tablename__ = "reservation"

    order_id: str = Field(primary_key=True, max_length=64)
    reservation_id: str = Field(max_length=40)
    status: str = Field(max_length=16)
    items: str
    created_at: float
