"""Payment persistence: Core statements prepared once, one round trip per row touched.

Rows travel as plain dataclasses, not SQLModel table objects: building one of those costs more
(about 150 us) than the statement that reads or writes it. The SQLModel classes in
`payment_svc.models` remain the schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Table, bindparam, insert, select, update

from payment_svc.models import LedgerEntryRow, PaymentRow
from svckit.db import Prepared, record_columns

__all__ = [
    "LedgerEntryRecord",
    "PaymentRecord",
    "append_entry",
    "get_payment",
    "insert_payment",
    "list_entries",
    "set_status_if",
]


@dataclass(slots=True)
class PaymentRecord:
    """A row of the payment table (see PaymentRow)."""

    order_id: str
    payment_id: str
    status: str
    currency: str
    minor_units: int
    created_at: float


@dataclass(slots=True)
class LedgerEntryRecord:
    """A row of the ledger_entry table (see LedgerEntryRow); entry_id is None until inserted."""

    order_id: str
    kind: str
    currency: str
    minor_units: int
    created_at: float
    entry_id: int | None = None


_PAYMENT: Table = PaymentRow.__table__  # type: ignore[attr-defined]
_LEDGER: Table = LedgerEntryRow.__table__  # type: ignore[attr-defined]
_PAYMENT_FIELDS = record_columns(PaymentRecord, _PAYMENT)
_LEDGER_FIELDS = record_columns(LedgerEntryRecord, _LEDGER)
_LEDGER_INSERTED = tuple(name for name in _LEDGER_FIELDS if name != "entry_id")

_GET_PAYMENT = Prepared(
    select(*[_PAYMENT.c[name] for name in _PAYMENT_FIELDS]).where(_PAYMENT.c.order_id == bindparam("order_id"))
)
_INSERT_PAYMENT = Prepared(insert(_PAYMENT).values({name: bindparam(name) for name in _PAYMENT_FIELDS}))
_SET_STATUS_IF = Prepared(
    update(_PAYMENT)
    .where(_PAYMENT.c.order_id == bindparam("order_id"), _PAYMENT.c.status == bindparam("expected"))
    .values(status=bindparam("status"))
)
# inline(): no RETURNING of the generated entry_id, which nothing reads.
_APPEND_ENTRY = Prepared(insert(_LEDGER).values({name: bindparam(name) for name in _LEDGER_INSERTED}).inline())


def _list_entries_statement(by_order: bool, before: bool) -> Prepared:
    query = select(*[_LEDGER.c[name] for name in _LEDGER_FIELDS])
    if by_order:
        query = query.where(_LEDGER.c.order_id == bindparam("order_id"))
    if before:
        query = query.where(_LEDGER.c.entry_id < bindparam("before_entry_id"))
    # Both bound: a literal limit or offset would be a parameter Prepared is never given.
    return Prepared(query.order_by(_LEDGER.c.entry_id.desc()).limit(bindparam("limit")).offset(bindparam("offset")))


# One statement per combination of filters, keyed (by order, before an entry).
_LIST_ENTRIES = {(o, b): _list_entries_statement(o, b) for o in (False, True) for b in (False, True)}


def get_payment(connection: Connection, order_id: str) -> PaymentRecord | None:
    row = _GET_PAYMENT.execute(connection, {"order_id": order_id}).fetchone()
    return PaymentRecord(*row) if row else None


def insert_payment(connection: Connection, row: PaymentRecord) -> None:
    """Insert the order's payment; a concurrent insert for the same order loses on the primary key."""
    _INSERT_PAYMENT.execute(connection, {name: getattr(row, name) for name in _PAYMENT_FIELDS})


def set_status_if(connection: Connection, order_id: str, expected: str, status: str) -> bool:
    """Move the payment from expected to status; False when another transaction moved it first."""
    params = {"order_id": order_id, "expected": expected, "status": status}
    return int(_SET_STATUS_IF.execute(connection, params).rowcount) == 1


def append_entry(connection: Connection, row: LedgerEntryRecord) -> None:
    _APPEND_ENTRY.execute(connection, {name: getattr(row, name) for name in _LEDGER_INSERTED})


def list_entries(
    connection: Connection, order_id: str, before_entry_id: int | None, limit: int
) -> list[LedgerEntryRecord]:
    """Up to limit entries, newest first, older than before_entry_id when given; one order's when set."""
    statement = _LIST_ENTRIES[(bool(order_id), before_entry_id is not None)]
    params = {"order_id": order_id, "before_entry_id": before_entry_id, "limit": limit, "offset": 0}
    return [LedgerEntryRecord(*row) for row in statement.execute(connection, params).fetchall()]
