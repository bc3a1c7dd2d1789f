"""Notification persistence as SQLAlchemy Core statements: one round trip per row touched."""

from __future__ import annotations

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from notify_svc.models import NotificationRow

__all__ = ["get_by_order", "insert_if_absent", "newest_first"]

_NOTIFICATION = NotificationRow.__table__  # type: ignore[attr-defined]


def insert_if_absent(connection: Connection, row: NotificationRow) -> bool:
    """Insert the order's notification unless the order has one; True when this call inserted it.

    ON CONFLICT DO NOTHING waits for a concurrent writer of the same order and then yields to
    it, so the fresh path is one statement and the loser never sees a unique-key error.
    """
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(_NOTIFICATION)
        .values(**row.model_dump(exclude={"seq"}))
        .on_conflict_do_nothing(index_elements=["order_id"])
        # RETURNING, not rowcount: SQLAlchemy adds its own RETURNING for the autoincrement key
        # on PostgreSQL, and the driver's rowcount is then not the number of rows inserted.
        .returning(_NOTIFICATION.c.seq)
    )
    return connection.execute(statement).first() is not None


def get_by_order(connection: Connection, order_id: str) -> NotificationRow | None:
    row = connection.execute(select(_NOTIFICATION).where(_NOTIFICATION.c.order_id == order_id)).first()
    return NotificationRow(**row._mapping) if row else None


def newest_first(connection: Connection, order_id: str, before_seq: int | None, limit: int) -> list[NotificationRow]:
    """Up to limit rows with seq below before_seq (all when None), of one order when order_id is set."""
    query = select(_NOTIFICATION).order_by(_NOTIFICATION.c.seq.desc()).limit(limit)
    if order_id:
        query = query.where(_NOTIFICATION.c.order_id == order_id)
    if before_seq is not None:
        query = query.where(_NOTIFICATION.c.seq < before_seq)
    return [NotificationRow(**row._mapping) for row in connection.execute(query)]
