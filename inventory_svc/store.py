"""Inventory persistence: Core statements prepared once, one round trip per row touched."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import Connection, bindparam, func, insert, select, update

from inventory_svc.models import ReservationRow, StockRow
from svckit.db import Prepared, declare_row_locks, record_columns

__all__ = [
    "ReservationRecord",
    "available",
    "get_reservation",
    "give_back",
    "insert_reservation",
    "known_skus",
    "lock_stock",
    "move_reservation_status",
    "seed_if_empty",
    "stock_levels",
    "take",
]


@dataclass(slots=True)
class ReservationRecord:
    """A row of the reservation table."""

    order_id: str
    reservation_id: str
    status: str
    items: str
    created_at: float


_STOCK = StockRow.__table__  # type: ignore[attr-defined]
_RESERVATION = ReservationRow.__table__  # type: ignore[attr-defined]
_RESERVATION_FIELDS = record_columns(ReservationRecord, _RESERVATION)

_SKU_EXISTS = Prepared(select(_STOCK.c.sku).where(_STOCK.c.sku == bindparam("sku")))
_TAKE = Prepared(
    update(_STOCK)
    .where(_STOCK.c.sku == bindparam("sku"), _STOCK.c.available >= bindparam("quantity"))
    .values(available=_STOCK.c.available - bindparam("quantity"), reserved=_STOCK.c.reserved + bindparam("quantity"))
)
_GIVE_BACK = Prepared(
    update(_STOCK)
    .where(_STOCK.c.sku == bindparam("sku"))
    .values(available=_STOCK.c.available + bindparam("quantity"), reserved=_STOCK.c.reserved - bindparam("quantity"))
)
_AVAILABLE = Prepared(select(_STOCK.c.available).where(_STOCK.c.sku == bindparam("sku")))
_GET_RESERVATION = Prepared(
    select(*[_RESERVATION.c[name] for name in _RESERVATION_FIELDS]).where(
        _RESERVATION.c.order_id == bindparam("order_id")
    )
)
_INSERT_RESERVATION = Prepared(insert(_RESERVATION).values({name: bindparam(name) for name in _RESERVATION_FIELDS}))
_MOVE_STATUS = Prepared(
    update(_RESERVATION)
    .where(_RESERVATION.c.order_id == bindparam("order_id"), _RESERVATION.c.status == bindparam("from_status"))
    .values(status=bindparam("to_status"))
)


def seed_if_empty(connection: Connection, catalogue_file: Path) -> int:
    if connection.execute(select(func.count()).select_from(_STOCK)).scalar_one():
        return 0
    entries = json.loads(catalogue_file.read_text())
    connection.execute(
        insert(_STOCK),
        [{"sku": e["sku"], "name": e["name"], "available": int(e["stock"]), "reserved": 0} for e in entries],
    )
    return len(entries)


def known_skus(connection: Connection, skus: list[str]) -> set[str]:
    return {sku for sku in skus if _SKU_EXISTS.execute(connection, {"sku": sku}).fetchone() is not None}


def lock_stock(connection: Connection, skus: list[str]) -> None:
    """Name the stock rows about to be written, which the caller then writes in SKU order.

    Stock rows are shared by every order, so two transactions (of two processes on one database)
    that wrote them in different orders could each wait for the other's rows: a deadlock. Written
    in SKU order, in every transaction and across the units of a batch, they cannot.
    """
    declare_row_locks(connection, ["stock/" + sku for sku in skus])


def take(connection: Connection, sku: str, quantity: int) -> bool:
    """Move quantity from available to reserved if enough is free; atomic under concurrency."""
    return int(_TAKE.execute(connection, {"sku": sku, "quantity": quantity}).rowcount) == 1


def give_back(connection: Connection, sku: str, quantity: int) -> None:
    _GIVE_BACK.execute(connection, {"sku": sku, "quantity": quantity})


def available(connection: Connection, sku: str) -> int:
    return int(_AVAILABLE.execute(connection, {"sku": sku}).fetchone()[0])


def get_reservation(connection: Connection, order_id: str) -> ReservationRecord | None:
    row = _GET_RESERVATION.execute(connection, {"order_id": order_id}).fetchone()
    return ReservationRecord(*row) if row else None


def insert_reservation(connection: Connection, row: ReservationRecord) -> None:
    _INSERT_RESERVATION.execute(connection, asdict(row))


def move_reservation_status(connection: Connection, order_id: str, from_status: str, to_status: str) -> bool:
    """Change the status only if it is still from_status; False when a concurrent call got there first."""
    params = {"order_id": order_id, "from_status": from_status, "to_status": to_status}
    return int(_MOVE_STATUS.execute(connection, params).rowcount) == 1


def stock_levels(connection: Connection, skus: list[str]) -> list[StockRow]:
    query = select(_STOCK).order_by(_STOCK.c.sku)
    if skus:
        query = query.where(_STOCK.c.sku.in_(skus))
    return [StockRow(**row._mapping) for row in connection.execute(query)]
