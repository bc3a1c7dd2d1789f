"""Payment persistence as SQLAlchemy Core statements: one round trip per row touched."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select, update

from payment_svc.models import LedgerEntryRow, PaymentRow

__all__ = ["append_entry", "get_payment", "insert_payment", "list_entries", "set_status_if"]

_PAYMENT = PaymentRow.__table__  # type: ignore[attr-defined]
_LEDGER = LedgerEntryRow.__table__  # type: ignore[attr-defined]


def get_payment(connection: Connection, order_id: str) -> PaymentRow | None:
    row = connection.execute(select(_PAYMENT).where(_PAYMENT.c.order_id == order_id)).first()
    return PaymentRow(**row._mapping) if row else None


def insert_payment(connection: Connection, row: PaymentRow) -> None:
    """Insert the order's payment; a concurrent insert for the same order loses on the primary key."""
    connection.execute(insert(_PAYMENT).values(**row.model_dump()))


def set_status_if(connection: Connection, order_id: str, expected: str, status: str) -> bool:
    """Move the payment from expected to status; False when another transaction moved it first."""
    result = connection.execute(
        update(_PAYMENT).where(_PAYMENT.c.order_id == order_id, _PAYMENT.c.status == expected).values(status=status)
    )
    return result.rowcount == 1


def append_entry(connection: Connection, row: LedgerEntryRow) -> None:
    connection.execute(insert(_LEDGER).values(**row.model_dump(exclude={"entry_id"})))


def list_entries(
    connection: Connection, order_id: str, before_entry_id: int | None, limit: int
) -> list[LedgerEntryRow]:
    """Up to limit entries, newest first, older than before_entry_id when given; one order's when set."""
    query = select(_LEDGER).order_by(_LEDGER.c.entry_id.desc()).limit(limit)
    if order_id:
        query = query.where(_LEDGER.c.order_id == order_id)
    if before_entry_id is not None:
        query = query.where(_LEDGER.c.entry_id < before_entry_id)
    return [LedgerEntryRow(**row._mapping) for row in connection.execute(query)]
