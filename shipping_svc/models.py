"""Tables of the shipping database."""

from __future__ import annotations

from sqlmodel import Field, SQLModel

__all__ = ["ShipmentRow"]


class ShipmentRow(SQLModel, table=True):
    """The shipment (or tombstone) of one order; items as compact "sku=qty;..." text.

    A tombstone keeps the address fields and items empty: nothing was ever shipped.
    """

    __tablename__ = "shipment"

    order_id: str = Field(primary_key=True, max_length=64)
    shipment_id: str = Field(max_length=40)
    status: str = Field(max_length=16)
    tracking_number: str = Field(max_length=20)
    recipient_name: str = Field(max_length=200)
    street: str = Field(max_length=200)
    city: str = Field(max_length=200)
    postal_code: str = Field(max_length=200)
    country_code: str = Field(max_length=2)
    items: str
    created_at: float
