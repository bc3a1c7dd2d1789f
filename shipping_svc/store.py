"""Shipping persistence: Core statements prepared once, one round trip per row touched."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, insert, select, update

from shipping_svc.models import ShipmentRow
from svckit.db import Prepared

__all__ = ["get_shipment", "insert_shipment", "set_status_if"]

_SHIPMENT = ShipmentRow.__table__  # type: ignore[attr-defined]

# The column order the statements select and insert in; rows are rebuilt from tuples in this order.
_FIELDS = tuple(ShipmentRow.model_fields)

_GET_SHIPMENT = Prepared(
    select(*[_SHIPMENT.c[name] for name in _FIELDS]).where(_SHIPMENT.c.order_id == bindparam("order_id"))
)
_INSERT_SHIPMENT = Prepared(insert(_SHIPMENT).values({name: bindparam(name) for name in _FIELDS}))
_SET_STATUS_IF = Prepared(
    update(_SHIPMENT)
    .where(_SHIPMENT.c.order_id == bindparam("order_id"), _SHIPMENT.c.status == bindparam("expected"))
    .values(status=bindparam("status"))
)


def get_shipment(connection: Connection, order_id: str) -> ShipmentRow | None:
    row = _GET_SHIPMENT.execute(connection, {"order_id": order_id}).fetchone()
    return ShipmentRow(**dict(zip(_FIELDS, row, strict=True))) if row else None


def insert_shipment(connection: Connection, row: ShipmentRow) -> None:
    """Insert the order's only row; the order_id primary key refuses a concurrent second one."""
    _INSERT_SHIPMENT.execute(connection, {name: getattr(row, name) for name in _FIELDS})


def set_status_if(connection: Connection, order_id: str, expected: str, status: str) -> bool:
    """Move the order's shipment from expected to status; False when a concurrent call moved it first."""
    params = {"order_id": order_id, "expected": expected, "status": status}
    return int(_SET_STATUS_IF.execute(connection, params).rowcount) == 1
