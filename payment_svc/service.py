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
    "LedgerEntry",
    "LedgerPage",
    "LedgerQuery",
    "Payment",
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
# Test tokens that decline, with the refusal reason and message each one produces.
DECLINING_TOKENS: dict[str, tuple[str, str]] = {
    "tok_declined": ("CARD_DECLINED", "the card was declined"),
    "tok_insufficient_funds": ("INSUFFICIENT_FUNDS", "the card has insufficient funds"),
}

DEFAULT_PAGE_SIZE = 100
# A page token is the entry id the previous page ended at; 18 digits stay inside a signed 64-bit integer.
_MAX_TOKEN_DIGITS = 18
_BAD_PAGE_TOKEN = "is not a token returned by a previous page"


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
    before_entry_id: int | None = None
    if page_token:
        # isascii() too: str.isdigit() accepts digits such as "²" that int() refuses.
        if not (page_token.isascii() and page_token.isdigit()) or len(page_token) > _MAX_TOKEN_DIGITS:
            violations.add("page_token", _BAD_PAGE_TOKEN)
        elif int(page_token) < 1:
            violations.add("page_token", _BAD_PAGE_TOKEN)
        else:
            before_entry_id = int(page_token)
    violations.raise_if_any()
    return LedgerQuery(order_id, page_size or DEFAULT_PAGE_SIZE, before_entry_id)


def charge(connection: Connection, order_id: str, amount: Money, payment_token: str) -> Payment:
    """Charge the order once; refuses an order charged already, refunded, or refunded in advance."""
    existing = store.get_payment(connection, order_id)
    if existing is not None:
        if existing.status in (REFUNDED, TOMBSTONE):
            raise FailedPrecondition(
                "ORDER_REFUNDED",
                f"order {order_id} was refunded; it cannot be charged again",
                {"order_id": order_id, "payment_id": existing.payment_id},
            )
        raise FailedPrecondition(
            "ORDER_ALREADY_CHARGED",
            f"order {order_id} was already charged by payment {existing.payment_id}",
            {"order_id": order_id, "payment_id": existing.payment_id},
        )
    declined = DECLINING_TOKENS.get(payment_token)
    if declined is not None:
        reason, message = declined
        raise FailedPrecondition(reason, f"order {order_id}: {message}", {"order_id": order_id})
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
        raise NotFound("PAYMENT_NOT_FOUND", f"order {order_id} has no payment", {"order_id": order_id})
    return _view(existing)


def ledger_page(connection: Connection, query: LedgerQuery) -> LedgerPage:
    """One page of the ledger, newest first; the token resumes after the page's last entry."""
    # One row more than the page tells whether another page follows, in the same round trip.
    rows = store.list_entries(connection, query.order_id, query.before_entry_id, query.page_size + 1)
    entries = [_entry(row) for row in rows[: query.page_size]]
    next_page_token = str(entries[-1].entry_id) if len(rows) > query.page_size else ""
    return LedgerPage(entries, next_page_token)
