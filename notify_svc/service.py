"""Notification domain rules: one confirmation per order, recorded with its key, listed newest first.

An order is confirmed once. SendConfirmation for an order that already has a confirmation, even
under another idempotency key, returns the existing notification instead of failing: a saga that
is retried with a new key must still finish, and the customer must not get a second message.
Recording is the idempotent effect (it commits with the idempotency record); delivery happens
after the commit and only when this call recorded the notification (`Recorded.fresh`), so
neither a replay nor a concurrent duplicate delivers twice.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection

from notify_svc import store
from notify_svc.store import NotificationRecord
from svckit.validation import Line, Money, Violations

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_TRACKING_NUMBER_LENGTH",
    "Notification",
    "NotificationPage",
    "OrderSummary",
    "Recorded",
    "list_notifications",
    "record_confirmation",
    "render_body",
    "validate_list",
    "validate_send",
]

DEFAULT_PAGE_SIZE = 100
MAX_TRACKING_NUMBER_LENGTH = 64
# Page tokens are row sequence numbers; PostgreSQL keeps them in a signed 64-bit column.
_MAX_SEQ = 2**63 - 1
# Minor-unit digits of the supported currencies that differ from the usual two.
_MINOR_UNIT_DIGITS = {"JPY": 0}


@dataclass(frozen=True)
class OrderSummary:
    """What the customer is told about the order."""

    items: list[Line]
    amount: Money | None
    tracking_number: str


@dataclass(frozen=True)
class Notification:
    """A confirmation that was recorded and delivered."""

    notification_id: str
    order_id: str
    recipient: str
    channel: str
    body: str
    sent_at: float


@dataclass(frozen=True)
class Recorded:
    """The order's notification, and whether this call recorded it (and so must deliver it)."""

    notification: Notification
    fresh: bool


@dataclass(frozen=True)
class NotificationPage:
    """Notifications newest first, with the token of the next page ("" on the last one)."""

    notifications: list[Notification]
    next_page_token: str


def _view(row: NotificationRecord) -> Notification:
    return Notification(row.notification_id, row.order_id, row.recipient, row.channel, row.body, row.sent_at)


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


def validate_list(order_id: str, page_size: int, page_token: str) -> tuple[int, int | None]:
    """Check a list request; returns the page size to use and the sequence to read below."""
    violations = Violations()
    if order_id:
        violations.identifier("order_id", order_id)
    violations.page_size("page_size", page_size)
    before_seq: int | None = None
    if page_token:
        if page_token.isascii() and page_token.isdigit() and 0 < int(page_token) <= _MAX_SEQ:
            before_seq = int(page_token)
        else:
            violations.add("page_token", "is not a token returned by a previous page")
    violations.raise_if_any()
    return page_size or DEFAULT_PAGE_SIZE, before_seq


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
    connection: Connection, order_id: str, recipient: str, summary: OrderSummary, channel: str
) -> Recorded:
    """Record the order's confirmation, or return the one recorded earlier (see the module docstring)."""
    row = NotificationRecord(
        notification_id="ntf_" + uuid.uuid4().hex[:20],
        order_id=order_id,
        recipient=recipient,
        channel=channel,
        body=render_body(order_id, summary),
        sent_at=time.time(),
    )
    if store.insert_if_absent(connection, row):
        return Recorded(_view(row), fresh=True)
    existing = store.get_by_order(connection, order_id)
    if existing is None:
        raise AssertionError(f"order {order_id} conflicted on insert but has no notification")
    return Recorded(_view(existing), fresh=False)


def list_notifications(
    connection: Connection, order_id: str, page_size: int, before_seq: int | None
) -> NotificationPage:
    # One row more than the page tells whether another page follows, without a count query.
    rows = store.newest_first(connection, order_id, before_seq, page_size + 1)
    page, more = rows[:page_size], len(rows) > page_size
    next_token = str(page[-1].seq) if more else ""
    return NotificationPage([_view(row) for row in page], next_token)
