"""Inventory persistence as SQLAlchemy Core statements: one round trip per row touched."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Connection, func, insert, select, update

from inventory_svc.models import ReservationRow, StockRow

__all__ = [
    "get_reservation",
    "give_back",
    "insert_reservation",
    "known_skus",
    "move_reservation_status",
    "seed_if_empty",
    "stock_levels",
    "take",
]

_STOCK = StockRow.__table__  # type: ignore[attr-defined]
_RESERVATION = ReservationRow.__table__  # type: ignore[attr-defined]


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
    return set(connection.execute(select(_STOCK.c.sku).where(_STOCK.c.sku.in_(skus))).scalars())


def take(connection: Connection, sku: str, quantity: int) -> bool:
    """Move quantity from available to reserved if enough is free; atomic under concurrency."""
    result = connection.execute(
        update(_STOCK)
        .where(_STOCK.c.sku == sku, _STOCK.c.available >= quantity)
        .values(available=_STOCK.c.available - quantity, reserved=_STOCK.c.reserved + quantity)
    )
    return result.rowcount == 1


def give_back(connection: Connection, sku: str, quantity: int) -> None:
    connection.execute(
        update(_STOCK)
        .where(_STOCK.c.sku == sku)
        .values(available=_STOCK.c.available + quantity, reserved=_STOCK.c.reserved - quantity)
    )


def available(connection: Connection, sku: str) -> int:
    return int(connection.execute(select(_STOCK.c.available).where(_STOCK.c.sku == sku)).scalar_one())


def get_reservation(connection: Connection, order_id: str) -> ReservationRow | None:
    row = connection.execute(select(_RESERVATION).where(_RESERVATION.c.order_id == order_id)).first()
    return ReservationRow(**row._mapping) if row else None


def insert_reservation(connection: Connection, row: ReservationRow) -> None:
    connection.execute(insert(_RESERVATION).values(**row.model_dump()))


def move_reservation_status(connection: Connection, order_id: str, from_status: str, to_status: str) -> bool:
    """Change the status only if it is still from_status; False when a concurrent call got there first."""
    result = connection.execute(
        update(_RESERVATION)
        .where(_RESERVATION.c.order_id == order_id, _RESERVATION.c.status == from_status)
        .values(status=to_status)
    )
    return result.rowcount == 1


def stock_levels(connection: Connection, skus: list[str]) -> list[StockRow]:
    query = select(_STOCK).order_by(_STOCK.c.sku)
    if skus:
        query = query.where(_STOCK.c.sku.in_(skus))
    return [StockRow(**row._mapping) for row in connection.execute(query)]
