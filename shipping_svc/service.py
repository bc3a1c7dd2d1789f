"""Shipping domain rules: one shipment per order, tracking numbers, order-independent cancellation."""

from __future__ import annotations

import secrets
import string
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection

from shipping_svc import store
from shipping_svc.store import ShipmentRecord
from svckit.errors import NotFound
from svckit.idempotency import OrderEffectRefusal
from svckit.validation import Line, PostalAddress, Violations, decode_lines, encode_lines

__all__ = [
    "CANCELLED",
    "CREATED",
    "TOMBSTONE",
    "OrderAlreadyShipped",
    "OrderCancelled",
    "Shipment",
    "ShipmentNotFound",
    "cancel_shipment",
    "create_shipment",
    "get_shipment",
    "validate_cancel",
    "validate_create",
]

CREATED, CANCELLED, TOMBSTONE = "CREATED", "CANCELLED", "TOMBSTONE"

_TRACKING_PREFIX = "SS"
_TRACKING_ALPHABET = string.ascii_uppercase + string.digits
_TRACKING_LENGTH = 12


@dataclass(frozen=True)
class Shipment:
    """The shipment of one order, or the tombstone that refuses one; a tombstone has no address."""

    shipment_id: str
    order_id: str
    status: str
    tracking_number: str
    address: PostalAddress | None
    items: list[Line]
    created_at: float


class ShipmentNotFound(NotFound):
    """The order has no shipment."""

    def __init__(self, order_id: str) -> None:
        super().__init__("SHIPMENT_NOT_FOUND", f"order {order_id} has no shipment", {"order_id": order_id})
        self.order_id = order_id


class OrderCancelled(OrderEffectRefusal):
    """The order's shipment was cancelled (or cancelled in advance, a tombstone): it cannot be shipped again."""

    REASON = "ORDER_CANCELLED"
    MESSAGE = "order {order_id} had its shipment cancelled; it cannot be shipped again"


class OrderAlreadyShipped(OrderEffectRefusal):
    """The order has a shipment already: one shipment per order."""

    REASON = "ORDER_ALREADY_SHIPPED"
    MESSAGE = "order {order_id} already has shipment {record_id}"
    RECORD_ID = "shipment_id"


def _view(row: ShipmentRecord, status: str | None = None) -> Shipment:
    address = None
    if row.status != TOMBSTONE:
        address = PostalAddress(row.recipient_name, row.street, row.city, row.postal_code, row.country_code)
    return Shipment(
        shipment_id=row.shipment_id,
        order_id=row.order_id,
        status=status or row.status,
        tracking_number=row.tracking_number,
        address=address,
        items=decode_lines(row.items),
        created_at=row.created_at,
    )


def _new_shipment_id() -> str:
    return "shp_" + uuid.uuid4().hex[:20]


def _new_tracking_number() -> str:
    # One read of the system's randomness, not one per character.
    random_bytes = secrets.token_bytes(_TRACKING_LENGTH)
    return _TRACKING_PREFIX + "".join(_TRACKING_ALPHABET[b % len(_TRACKING_ALPHABET)] for b in random_bytes)


def validate_create(order_id: str, address: PostalAddress | None, lines: list[Line]) -> None:
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.address("address", address)
    violations.lines("items", lines)
    violations.raise_if_any()


def validate_cancel(order_id: str, reason: str) -> None:
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.reason("reason", reason)
    violations.raise_if_any()


def create_shipment(connection: Connection, order_id: str, address: PostalAddress, lines: list[Line]) -> Shipment:
    """Ship the order once; refuses an order that has a shipment already or was cancelled.

    The tracking number is drawn here, inside the effect, so it is stored with the idempotency
    record and a replay answers with the same one.
    """
    existing = store.get_shipment(connection, order_id)
    if existing is not None:
        refusal = OrderCancelled if existing.status in (CANCELLED, TOMBSTONE) else OrderAlreadyShipped
        raise refusal(order_id, existing.shipment_id)
    row = ShipmentRecord(
        order_id=order_id,
        shipment_id=_new_shipment_id(),
        status=CREATED,
        tracking_number=_new_tracking_number(),
        recipient_name=address.recipient_name,
        street=address.street,
        city=address.city,
        postal_code=address.postal_code,
        country_code=address.country_code,
        items=encode_lines(lines),
        created_at=time.time(),
    )
    # A concurrent create (or cancel) that read no row either loses on the order_id primary key;
    # its transaction is retried and then sees this row.
    store.insert_shipment(connection, row)
    return _view(row)


def cancel_shipment(connection: Connection, order_id: str) -> tuple[Shipment, bool]:
    """Cancel the order's shipment; with none, leave a tombstone that refuses a late one.

    Returns the shipment and whether this call is the one that cancelled a created shipment.
    """
    existing = store.get_shipment(connection, order_id)
    if existing is None:
        tombstone = ShipmentRecord(
            order_id=order_id,
            shipment_id=_new_shipment_id(),
            status=TOMBSTONE,
            tracking_number="",
            recipient_name="",
            street="",
            city="",
            postal_code="",
            country_code="",
            items="",
            created_at=time.time(),
        )
        store.insert_shipment(connection, tombstone)
        return _view(tombstone), False
    if existing.status != CREATED:
        return _view(existing), False
    if not store.set_status_if(connection, order_id, CREATED, CANCELLED):
        # Another cancel committed between our read and our update: it did the cancelling.
        return _view(existing, CANCELLED), False
    return _view(existing, CANCELLED), True


def get_shipment(connection: Connection, order_id: str) -> Shipment:
    existing = store.get_shipment(connection, order_id)
    if existing is None:
        raise ShipmentNotFound(order_id)
    return _view(existing)
