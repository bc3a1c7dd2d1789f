"""Tables of the notification database."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer
from sqlmodel import Field, SQLModel

__all__ = ["NotificationRow"]


class NotificationRow(SQLModel, table=True):
    """The confirmation sent for one order; seq orders the rows newest first for stable paging."""

    __tablename__ = "notification"

    # An integer primary key is the autoincrement column both databases agree on: BIGSERIAL on
    # PostgreSQL (a 32-bit SERIAL runs out within months at full load), and on SQLite plain
    # INTEGER, which aliases the 64-bit rowid (BIGINT would not).
    seq: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    notification_id: str = Field(max_length=40, unique=True)
    order_id: str = Field(max_length=64, unique=True)
    recipient: str = Field(max_length=254)
    channel: str = Field(max_length=16)
    body: str
    sent_at: float
