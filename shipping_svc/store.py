"""Shipping persistence: Core statements prepared once, one round trip per row touched.

Rows travel as a plain dataclass, not a SQLModel table object: building one of those costs more
(about 150 us) than the statement that reads or writes it. `shipping_svc.models.ShipmentRow`
remains the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Table, bindparam, insert, select, update

from shipping_svc.models import ShipmentRow
from svckit.db import Prepared, record_columns

__all__ = ["ShipmentRecord", "get_shipment", "insert_shipment", "set_status_if"]


@dataclass(slots=True)
class ShipmentRecord:
    """A row of the shipment table (see ShipmentRow)."""

    order_id: str
    shipment_id: str
    status: str
    tracking_number: str
    recipient_name: str
    street: str
    city: str
    postal_code: str
    country_code: str
    items: str
    created_at: float


_SHIPMENT: Table = ShipmentRow.__table__  # type: ignore[attr-defined]
# The order statements select and insert columns in; a record is built from a row by position.
_FIELDS = record_columns(ShipmentRecord, _SHIPMENT)

_GET_SHIPMENT = Prepared(
    select(*[_SHIPMENT.c[name] for name in _FIELDS]).where(_SHIPMENT.c.order_id == bindparam("order_id"))
)
_INSERT_SHIPMENT = Prepared(insert(_SHIPMENT).values({name: bindparam(name) for name in _FIELDS}))
_SET_STATUS_IF = Prepared(
    update(_SHIPMENT)
    .where(_SHIPMENT.c.order_id == bindparam("order_id"), _SHIPMENT.c.status == bindparam("expected"))
    .values(status=bindparam("status"))
)


def get_shipment(connection: Connection, order_id: str) -> ShipmentRecord | None:
    row = _GET_SHIPMENT.execute(connection, {"order_id": order_id}).fetchone()
    return ShipmentRecord(*row) if row else None


def insert_shipment(connection: Connection, row: ShipmentRecord) -> None:
    """Insert the order's only row; the order_id primary key refuses a concurrent second one."""
    _INSERT_SHIPMENT.execute(connection, {name: getattr(row, name) for name in _FIELDS})


def set_status_if(connection: Connection, order_id: str, expected: str, status: str) -> bool:
    """Move the order's shipment from expected to status; False when a concurrent call moved it first."""
    params = {"order_id": order_id, "expected": expected, "status": status}
    return int(_SET_STATUS_IF.execute(connection, params).rowcount) == 1
