"""Inventory domain rules: all-or-nothing reservations, no oversell, order-independent release."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection

from inventory_svc import store
from inventory_svc.store import ReservationRecord
from svckit.errors import FailedPrecondition, NotFound
from svckit.idempotency import OrderEffectRefusal
from svckit.validation import Line, Violations, decode_lines, encode_lines, quote

__all__ = [
    "RELEASED",
    "RESERVED",
    "TOMBSTONE",
    "OrderAlreadyReserved",
    "OrderReleased",
    "OutOfStock",
    "Reservation",
    "ReservationNotFound",
    "StockLevel",
    "UnknownSku",
    "release",
    "reserve",
]

RESERVED, RELEASED, TOMBSTONE = "RESERVED", "RELEASED", "TOMBSTONE"


@dataclass(frozen=True)
class Reservation:
    """Stock held (or once held, or refused in advance) for one order."""

    reservation_id: str
    order_id: str
    status: str
    items: list[Line]
    created_at: float


@dataclass(frozen=True)
class StockLevel:
    sku: str
    name: str
    available: int
    reserved: int


class UnknownSku(NotFound):
    """The catalogue has no such SKU: a fact of the store, so it is recorded under the key like any refusal."""

    def __init__(self, sku: str) -> None:
        super().__init__("UNKNOWN_SKU", f"unknown SKU {quote(sku)}", {"sku": sku[:64]})
        self.sku = sku


class ReservationNotFound(NotFound):
    """The order has no reservation."""

    def __init__(self, order_id: str) -> None:
        super().__init__("RESERVATION_NOT_FOUND", f"order {order_id} has no reservation", {"order_id": order_id})
        self.order_id = order_id


class OrderReleased(OrderEffectRefusal):
    """The order's stock was released (or released in advance, a tombstone): it cannot reserve again."""

    REASON = "ORDER_RELEASED"
    MESSAGE = "order {order_id} was released; it cannot reserve stock again"


class OrderAlreadyReserved(OrderEffectRefusal):
    """The order holds a reservation already: one reservation per order."""

    REASON = "ORDER_ALREADY_RESERVED"
    MESSAGE = "order {order_id} already holds reservation {record_id}"
    RECORD_ID = "reservation_id"


class OutOfStock(FailedPrecondition):
    """A line asks for more of a SKU than is free; nothing of the order is held."""

    def __init__(self, sku: str, available: int, requested: int) -> None:
        super().__init__(
            "OUT_OF_STOCK",
            f"SKU {sku} has {available} free, {requested} requested",
            {"sku": sku, "requested": str(requested)},
        )
        self.sku = sku
        self.available = available
        self.requested = requested


def _view(row: ReservationRecord) -> Reservation:
    return Reservation(row.reservation_id, row.order_id, row.status, decode_lines(row.items), row.created_at)


def validate_reserve(order_id: str, lines: list[Line]) -> None:
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.lines("items", lines)
    violations.raise_if_any()


def validate_release(order_id: str, reason: str) -> None:
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.reason("reason", reason)
    violations.raise_if_any()


def reserve(connection: Connection, order_id: str, lines: list[Line]) -> Reservation:
    """Hold every line or none; refuses an order that was released, or reserved already."""
    existing = store.get_reservation(connection, order_id)
    if existing is not None:
        refusal = OrderReleased if existing.status in (RELEASED, TOMBSTONE) else OrderAlreadyReserved
        raise refusal(order_id, existing.reservation_id)
    unknown = sorted({line.sku for line in lines} - store.known_skus(connection, [line.sku for line in lines]))
    if unknown:
        raise UnknownSku(unknown[0])
    store.lock_stock(connection, [line.sku for line in lines])
    # In SKU order, the order every transaction takes stock rows in (see store.lock_stock).
    for line in sorted(lines, key=lambda line: line.sku):
        if not store.take(connection, line.sku, line.quantity):
            # The caller's savepoint rolls back the lines already taken: all or nothing.
            raise OutOfStock(line.sku, store.available(connection, line.sku), line.quantity)
    row = ReservationRecord(
        order_id=order_id,
        reservation_id="res_" + uuid.uuid4().hex[:20],
        status=RESERVED,
        items=encode_lines(lines),
        created_at=time.time(),
    )
    store.insert_reservation(connection, row)
    return _view(row)


def release(connection: Connection, order_id: str) -> tuple[Reservation, bool]:
    """Give the order's stock back; with no reservation, leave a tombstone that refuses a late one."""
    existing = store.get_reservation(connection, order_id)
    if existing is None:
        tombstone = ReservationRecord(
            order_id=order_id,
            reservation_id="res_" + uuid.uuid4().hex[:20],
            status=TOMBSTONE,
            items="",
            created_at=time.time(),
        )
        store.insert_reservation(connection, tombstone)
        return _view(tombstone), False
    if existing.status != RESERVED:
        return _view(existing), False
    # Only the call that moves RESERVED to RELEASED gives the stock back, however many race.
    released_here = store.move_reservation_status(connection, order_id, RESERVED, RELEASED)
    if released_here:
        held = decode_lines(existing.items)
        store.lock_stock(connection, [line.sku for line in held])
        for line in sorted(held, key=lambda line: line.sku):
            store.give_back(connection, line.sku, line.quantity)
    existing.status = RELEASED
    return _view(existing), released_here


def get_reservation(connection: Connection, order_id: str) -> Reservation:
    existing = store.get_reservation(connection, order_id)
    if existing is None:
        raise ReservationNotFound(order_id)
    return _view(existing)


def stock_levels(connection: Connection, skus: list[str]) -> list[StockLevel]:
    rows = store.stock_levels(connection, skus)
    missing = sorted(set(skus) - {row.sku for row in rows})
    if missing:
        raise UnknownSku(missing[0])
    return [StockLevel(r.sku, r.name, r.available, r.reserved) for r in rows]
