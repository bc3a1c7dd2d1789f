"""Tables of the payment database."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = ["LedgerEntryRow", "PaymentRow"]


class PaymentRow(SQLModel, table=True):
    """The payment (or tombstone) of one order; the primary key makes a second one impossible."""

    __tablename__ = "payment"

    order_id: str = Field(primary_key=True, max_length=64)
    payment_id: str = Field(max_length=40)
    status: str = Field(max_length=16)
    # Empty currency and zero units on a tombstone: nothing was charged.
    currency: str = Field(max_length=3)
    # 64-bit: amounts go up to 10**12 minor units, past PostgreSQL's 32-bit INTEGER.
    minor_units: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: float


class LedgerEntryRow(SQLModel, table=True):
    """One movement of money; an order has at most one CHARGE and one REFUND, which the database enforces."""

    __tablename__ = "ledger_entry"
    # Its index, led by order_id, also serves the per-order ledger listing.
    __table_args__ = (UniqueConstraint("order_id", "kind", name="uq_ledger_entry_order_kind"),)

    entry_id: int | None = Field(default=None, primary_key=True)
    order_id: str = Field(max_length=64)
    kind: str = Field(max_length=8)
    currency: str = Field(max_length=3)
    minor_units: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: float
