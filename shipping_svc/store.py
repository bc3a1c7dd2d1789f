"""Shipping persistence as SQLAlchemy Core statements: one round trip per row touched."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select, update

from shipping_svc.models import ShipmentRow

__all__ = ["get_shipment", "insert_shipment", "set_status_if"]

_SHIPMENT = ShipmentRow.__table__  # type: ignore[attr-defined]


def get_shipment(connection: Connection, order_id: str) -> ShipmentRow | None:
    row = connection.execute(select(_SHIPMENT).where(_SHIPMENT.c.order_id == order_id)).first()
    return ShipmentRow(**row._mapping) if row else None


def insert_shipment(connection: Connection, row: ShipmentRow) -> None:
    """Insert the order's only row; the order_id primary key refuses a concurrent second one."""
    connection.execute(insert(_SHIPMENT).values(**row.model_dump()))


def set_status_if(connection: Connection, order_id: str, expected: str, status: str) -> bool:
    """Move the order's shipment from expected to status; False when a concurrent call moved it first."""
    result = connection.execute(
        update(_SHIPMENT).where(_SHIPMENT.c.order_id == order_id, _SHIPMENT.c.status == expected).values(status=status)
    )
    return result.rowcount == 1
