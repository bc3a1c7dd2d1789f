"""Payment domain rules: one charge per order, full refunds, order-independent refunds, a ledger of both.

Payment tokens are simulated; these test tokens behave deterministically:

=========================  ===========================================================
payment_token              outcome of Charge
=========================  ===========================================================
``tok_declined``           FAILED_PRECONDITION, reason ``CARD_DECLINED``
``tok_insufficient_funds`` FAILED_PRECONDITION, reason ``INSUFFICIENT_FUNDS``
any other ``tok_...``      charged (e.g. ``tok_visa``)
empty, not ``tok_...``,    INVALID_ARGUMENT naming ``payment_token``
or over 128 characters
=========================  ===========================================================

A declined charge leaves no payment, so the order may be charged later with another token.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection

from payment_svc import store
from payment_svc.store import LedgerEntryRecord, PaymentRecord
from svckit.errors import FailedPrecondition, NotFound
from svckit.idempotency import OrderEffectRefusal
from svckit.page_token import encode_sequence
from svckit.validation import MAX_PAYMENT_TOKEN_LENGTH, PAYMENT_TOKEN_PREFIX, Money, Violations

__all__ = [
    "CHARGE",
    "CHARGED",
    "DECLINING_TOKENS",
    "DEFAULT_PAGE_SIZE",
    "MAX_TOKEN_LENGTH",
    "REFUND",
    "REFUNDED",
    "TOKEN_PREFIX",
    "TOMBSTONE",
    "CardDeclined",
    "InsufficientFunds",
    "LedgerEntry",
    "LedgerPage",
    "LedgerQuery",
    "OrderAlreadyCharged",
    "OrderRefunded",
    "Payment",
    "PaymentNotFound",
    "charge",
    "get_payment",
    "ledger_page",
    "parse_ledger_query",
    "refund",
    "validate_charge",
    "validate_order_id",
    "validate_refund",
]

CHARGED, REFUNDED, TOMBSTONE = "CHARGED", "REFUNDED", "TOMBSTONE"
CHARGE, REFUND = "CHARGE", "REFUND"

TOKEN_PREFIX = PAYMENT_TOKEN_PREFIX
MAX_TOKEN_LENGTH = MAX_PAYMENT_TOKEN_LENGTH


class PaymentNotFound(NotFound):
    """The order has no payment."""

    def __init__(self, order_id: str) -> None:
        super().__init__("PAYMENT_NOT_FOUND", f"order {order_id} has no payment", {"order_id": order_id})
        self.order_id = order_id


class OrderRefunded(OrderEffectRefusal):
    """The order was refunded (or refunded in advance, a tombstone): it cannot be charged again."""

    REASON = "ORDER_REFUNDED"
    MESSAGE = "order {order_id} was refunded; it cannot be charged again"
    RECORD_ID = "payment_id"


class OrderAlreadyCharged(OrderEffectRefusal):
    """The order has a charge already: one charge per order."""

    REASON = "ORDER_ALREADY_CHARGED"
    MESSAGE = "order {order_id} was already charged by payment {record_id}"
    RECORD_ID = "payment_id"


class CardDeclined(FailedPrecondition):
    """The card was declined; no payment is left, so the order may be charged later with another token."""

    REASON = "CARD_DECLINED"
    DETAIL = "the card was declined"

    def __init__(self, order_id: str) -> None:
        super().__init__(self.REASON, f"order {order_id}: {self.DETAIL}", {"order_id": order_id})
        self.order_id = order_id


class InsufficientFunds(CardDeclined):
    """The card was declined for insufficient funds."""

    REASON = "INSUFFICIENT_FUNDS"
    DETAIL = "the card has insufficient funds"


# Test tokens that decline, with the refusal each one produces.
DECLINING_TOKENS: dict[str, type[CardDeclined]] = {
    "tok_declined": CardDeclined,
    "tok_insufficient_funds": InsufficientFunds,
}

DEFAULT_PAGE_SIZE = 100


@dataclass(frozen=True)
class Payment:
    """The payment of one order; a tombstone has no amount."""

    payment_id: str
    order_id: str
    status: str
    amount: Money | None
    created_at: float


@dataclass(frozen=True)
class LedgerEntry:
    """One movement of money: a charge or a refund, always a positive amount."""

    entry_id: int
    order_id: str
    kind: str
    amount: Money
    created_at: float


@dataclass(frozen=True)
class LedgerQuery:
    """A validated request for one page of the ledger."""

    order_id: str
    page_size: int
    before_entry_id: int | None


@dataclass(frozen=True)
class LedgerPage:
    """Entries newest first, and the token of the next page ("" on the last one)."""

    entries: list[LedgerEntry]
    next_page_token: str


def _view(row: PaymentRecord) -> Payment:
    amount = None if row.status == TOMBSTONE else Money(row.currency, row.minor_units)
    return Payment(row.payment_id, row.order_id, row.status, amount, row.created_at)


def _entry(row: LedgerEntryRecord) -> LedgerEntry:
    assert row.entry_id is not None  # read back from the table, so the database assigned it
    amount = Money(row.currency, row.minor_units)
    return LedgerEntry(row.entry_id, row.order_id, row.kind, amount, row.created_at)


def _new_payment_id() -> str:
    return "pay_" + uuid.uuid4().hex[:20]


def validate_charge(order_id: str, amount: Money | None, payment_token: str) -> None:
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.money("amount", amount)
    # The rule lives in svckit, so the orchestrator refuses what this service would refuse.
    violations.payment_token("payment_token", payment_token)
    violations.raise_if_any()


def validate_refund(order_id: str, reason: str) -> None:
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.reason("reason", reason)
    violations.raise_if_any()


def validate_order_id(order_id: str) -> None:
    violations = Violations()
    violations.identifier("order_id", order_id)
    violations.raise_if_any()


def parse_ledger_query(order_id: str, page_size: int, page_token: str) -> LedgerQuery:
    """Validate a ListPayments request; every bad field is named in one INVALID_ARGUMENT."""
    violations = Violations()
    if order_id:
        violations.identifier("order_id", order_id)
    violations.page_size("page_size", page_size)
    # The entry id the previous page ended at (see svckit.page_token).
    before_entry_id = violations.sequence_token("page_token", page_token)
    violations.raise_if_any()
    return LedgerQuery(order_id, page_size or DEFAULT_PAGE_SIZE, before_entry_id)


def charge(connection: Connection, order_id: str, amount: Money, payment_token: str) -> Payment:
    """Charge the order once; refuses an order charged already, refunded, or refunded in advance."""
    existing = store.get_payment(connection, order_id)
    if existing is not None:
        refusal = OrderRefunded if existing.status in (REFUNDED, TOMBSTONE) else OrderAlreadyCharged
        raise refusal(order_id, existing.payment_id)
    declined = DECLINING_TOKENS.get(payment_token)
    if declined is not None:
        raise declined(order_id)
    now = time.time()
    row = PaymentRecord(
        order_id=order_id,
        payment_id=_new_payment_id(),
        status=CHARGED,
        currency=amount.currency_code,
        minor_units=amount.minor_units,
        created_at=now,
    )
    # A concurrent charge (or refund) of the same order fails here on the primary key; its
    # transaction is retried and then sees this payment.
    store.insert_payment(connection, row)
    store.append_entry(
        connection,
        LedgerEntryRecord(
            order_id=order_id,
            kind=CHARGE,
            currency=amount.currency_code,
            minor_units=amount.minor_units,
            created_at=now,
        ),
    )
    return _view(row)


def refund(connection: Connection, order_id: str) -> tuple[Payment, bool]:
    """Return the order's charge in full; with no charge, leave a tombstone that refuses a late one.

    The flag is True when this call returned money; refunding twice is a no-op returning the payment.
    """
    existing = store.get_payment(connection, order_id)
    if existing is None:
        tombstone = PaymentRecord(
            order_id=order_id,
            payment_id=_new_payment_id(),
            status=TOMBSTONE,
            currency="",
            minor_units=0,
            created_at=time.time(),
        )
        store.insert_payment(connection, tombstone)
        return _view(tombstone), False
    if existing.status != CHARGED:
        return _view(existing), False
    if not store.set_status_if(connection, order_id, CHARGED, REFUNDED):
        # Another process refunded between our read and the update (PostgreSQL read committed).
        current = store.get_payment(connection, order_id)
        assert current is not None  # payments are never deleted
        return _view(current), False
    store.append_entry(
        connection,
        LedgerEntryRecord(
            order_id=order_id,
            kind=REFUND,
            currency=existing.currency,
            minor_units=existing.minor_units,
            created_at=time.time(),
        ),
    )
    existing.status = REFUNDED
    return _view(existing), True


def get_payment(connection: Connection, order_id: str) -> Payment:
    existing = store.get_payment(connection, order_id)
    if existing is None:
        raise PaymentNotFound(order_id)
    return _view(existing)


def ledger_page(connection: Connection, query: LedgerQuery) -> LedgerPage:
    """One page of the ledger, newest first; the token resumes after the page's last entry."""
    # One row more than the page tells whether another page follows, in the same round trip.
    rows = store.list_entries(connection, query.order_id, query.before_entry_id, query.page_size + 1)
    entries = [_entry(row) for row in rows[: query.page_size]]
    next_page_token = encode_sequence(entries[-1].entry_id) if len(rows) > query.page_size else ""
    return LedgerPage(entries, next_page_token)
