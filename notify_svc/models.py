"""Tables of the notification database: the notifications and their delivery outbox."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer
from sqlmodel import Field, SQLModel

__all__ = ["DeliveryRow", "NotificationRow"]


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


class DeliveryRow(SQLModel, table=True):
    """The delivery outbox: one row per notification, inserted in the transaction that records it.

    due_at is when a deliverer may next claim the row: its next attempt, or while an attempt is
    under way the expiry of that attempt's lease, so a crashed deliverer's rows come due again
    by themselves. It is NULL once the row is DELIVERED or FAILED, which keeps finished rows out
    of the claim index's range.
    """

    __tablename__ = "notification_delivery"
    __table_args__ = (Index("ix_notification_delivery_due", "due_at"),)

    notification_id: str = Field(primary_key=True, max_length=40, foreign_key="notification.notification_id")
    state: str = Field(max_length=12)
    attempts: int = 0
    due_at: float | None = None
    # The claim (deliverer and claim number) of the attempt under way; NULL between attempts.
    lease_owner: str | None = Field(default=None, max_length=100)
    # True when an earlier attempt may have delivered without recording it (its deliverer died or
    # it timed out): the next attempt first asks the channel whether the notification arrived.
    uncertain: bool = False
    last_error: str = Field(default="", max_length=500)
    delivered_at: float | None = None
