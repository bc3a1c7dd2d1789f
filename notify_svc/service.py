"""Notification domain rules: one confirmation per order, recorded with its key, delivered through an outbox.

An order is confirmed once. SendConfirmation for an order that already has a confirmation, even
under another idempotency key, returns the existing notification instead of failing: a saga that
is retried with a new key must still finish, and the customer must not get a second message.
Recording is the idempotent effect: the notification, its delivery row (the outbox) and the
idempotency record commit together. Delivery happens afterwards, from the outbox, at least once
(see notify_svc.delivery), so neither a crash after the commit nor a replay loses it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Connection

from notify_svc import store
from notify_svc.store import DeliveryRecord, NotificationRecord
from svckit.page_token import encode_sequence
from svckit.validation import Line, Money, Violations

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_TRACKING_NUMBER_LENGTH",
    "DeliveryState",
    "DeliveryStatus",
    "Notification",
    "NotificationPage",
    "OrderSummary",
    "list_notifications",
    "record_confirmation",
    "render_body",
    "validate_list",
    "validate_send",
]

DEFAULT_PAGE_SIZE = 100
MAX_TRACKING_NUMBER_LENGTH = 64
# Minor-unit digits of the supported currencies that differ from the usual two.
_MINOR_UNIT_DIGITS = {"JPY": 0}


@dataclass(frozen=True)
class OrderSummary:
    """What the customer is told about the order."""

    items: list[Line]
    amount: Money | None
    tracking_number: str


class DeliveryState(StrEnum):
    """Where the delivery of a notification stands; stored by name in the delivery outbox."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class DeliveryStatus:
    """How a notification's delivery stands; next_attempt_at is set only while it is PENDING."""

    state: DeliveryState
    attempts: int
    last_error: str
    delivered_at: float | None
    next_attempt_at: float | None


@dataclass(frozen=True)
class Notification:
    """A recorded confirmation; delivery is None when not read, or not tracked (recorded before the outbox)."""

    notification_id: str
    order_id: str
    recipient: str
    channel: str
    body: str
    sent_at: float
    delivery: DeliveryStatus | None = None


@dataclass(frozen=True)
class NotificationPage:
    """Notifications newest first, with the token of the next page ("" on the last one)."""

    notifications: list[Notification]
    next_page_token: str


def _view(row: NotificationRecord, delivery: DeliveryRecord | None = None) -> Notification:
    status = None
    if delivery is not None:
        state = DeliveryState(delivery.state)
        next_attempt_at = delivery.due_at if state is DeliveryState.PENDING else None
        status = DeliveryStatus(state, delivery.attempts, delivery.last_error, delivery.delivered_at, next_attempt_at)
    return Notification(row.notification_id, row.order_id, row.recipient, row.channel, row.body, row.sent_at, status)


def validate_send(order_id: str, recipient: str, summary: OrderSummary | None) -> OrderSummary:
    """Check a confirmation request; returns its summary, which is then known to be present."""
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.email("recipient", recipient)
    if summary is None:
        violations.add("summary", "is required")
    else:
        violations.lines("summary.items", summary.items)
        violations.money("summary.amount", summary.amount)
        tracking_number = summary.tracking_number
        violations.text(
            "summary.tracking_number", tracking_number, required=True, max_length=MAX_TRACKING_NUMBER_LENGTH
        )
        if tracking_number.strip() and not tracking_number.isprintable():
            # The number goes into the body, which a log channel writes as one line.
            violations.add("summary.tracking_number", "must be printable text without line breaks")
    violations.raise_if_any()
    assert summary is not None  # refused above when missing
    return summary


def validate_list(
    order_id: str, page_size: int, page_token: str, delivery_state: str = ""
) -> tuple[int, int | None, DeliveryState | None]:
    """Check a list request; returns the page size to use, the sequence to read below and the state filter.

    delivery_state is a state's name, "" for no filter (the transport passes an unknown enum
    number as its digits, refused here).
    """
    violations = Violations()
    if delivery_state and delivery_state not in DeliveryState.__members__:
        known = ", ".join(DeliveryState)
        violations.add("delivery_state", f"unknown delivery state {delivery_state[:16]}; one of {known}")
    if order_id:
        violations.identifier("order_id", order_id)
    violations.page_size("page_size", page_size)
    # Digits within a signed 64-bit sequence, length checked before int() (which refuses 4,300+ digits).
    before_seq = violations.sequence_token("page_token", page_token)
    violations.raise_if_any()
    return page_size or DEFAULT_PAGE_SIZE, before_seq, DeliveryState(delivery_state) if delivery_state else None


def _format_money(money: Money) -> str:
    digits = _MINOR_UNIT_DIGITS.get(money.currency_code, 2)
    if digits == 0:
        return f"{money.minor_units} {money.currency_code}"
    major, minor = divmod(money.minor_units, 10**digits)
    return f"{major}.{minor:0{digits}d} {money.currency_code}"


def render_body(order_id: str, summary: OrderSummary) -> str:
    """The confirmation text, on one line; built only from the request, so replays render the same."""
    items = ", ".join(f"{line.quantity} x {line.sku}" for line in summary.items)
    charged = _format_money(summary.amount) if summary.amount else "nothing"
    return f"Order {order_id} is confirmed: {items}; charged {charged}; tracking number {summary.tracking_number}."


def record_confirmation(
    connection: Connection, order_id: str, recipient: str, summary: OrderSummary, channel: str, now: float
) -> Notification:
    """Record the order's confirmation and queue its delivery, due now; or return the one recorded earlier.

    See the module docstring. A fresh recording is for the deliverer to pick up once committed.
    """
    row = NotificationRecord(
        notification_id="ntf_" + uuid.uuid4().hex[:20],
        order_id=order_id,
        recipient=recipient,
        channel=channel,
        body=render_body(order_id, summary),
        sent_at=now,
    )
    if store.insert_if_absent(connection, row):
        store.insert_delivery(connection, row.notification_id, DeliveryState.PENDING, due_at=now)
        return _view(row)
    existing = store.get_by_order(connection, order_id)
    if existing is None:
        raise AssertionError(f"order {order_id} conflicted on insert but has no notification")
    return _view(existing)


def list_notifications(
    connection: Connection, order_id: str, page_size: int, before_seq: int | None, state: DeliveryState | None
) -> NotificationPage:
    """A page of notifications with their delivery, newest first (see store.newest_first for the filters)."""
    # One row more than the page tells whether another page follows, without a count query.
    rows = store.newest_first(connection, order_id, before_seq, state, page_size + 1)
    page, more = rows[:page_size], len(rows) > page_size
    next_token = ""
    if more:
        last_seq = page[-1][0].seq
        assert last_seq is not None  # read back from the table, so the database numbered it
        next_token = encode_sequence(last_seq)
    return NotificationPage([_view(row, delivery) for row, delivery in page], next_token)
