"""Notification persistence: Core statements prepared once, one round trip per row touched.

Rows travel as a plain dataclass, not a SQLModel table object: building one of those costs more
(about 150 us) than the statement that reads or writes it. `notify_svc.models.NotificationRow`
remains the schema.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Table, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite

from notify_svc.models import NotificationRow
from svckit.db import Prepared, record_columns

__all__ = ["NotificationRecord", "get_by_order", "insert_if_absent", "newest_first"]


@dataclass(slots=True)
class NotificationRecord:
    """A row of the notification table (see NotificationRow); seq is None until inserted."""

    notification_id: str
    order_id: str
    recipient: str
    channel: str
    body: str
    sent_at: float
    seq: int | None = None


_NOTIFICATION: Table = NotificationRow.__table__  # type: ignore[attr-defined]
# The order statements select and insert columns in; a record is built from a row by position.
_FIELDS = record_columns(NotificationRecord, _NOTIFICATION)
_INSERTED = tuple(name for name in _FIELDS if name != "seq")


def _insert_if_absent_statement(new_insert: Callable[[Table], postgresql.Insert | sqlite.Insert]) -> Prepared:
    # RETURNING, not rowcount, tells whether the row went in; the same on both databases.
    return Prepared(
        new_insert(_NOTIFICATION)
        .values({name: bindparam(name) for name in _INSERTED})
        .on_conflict_do_nothing(index_elements=["order_id"])
        .returning(_NOTIFICATION.c.seq)
    )


# ON CONFLICT is dialect-specific SQL: one statement per database, keyed by dialect name.
_INSERT_IF_ABSENT = {
    "postgresql": _insert_if_absent_statement(postgresql.insert),
    "sqlite": _insert_if_absent_statement(sqlite.insert),
}
_GET_BY_ORDER = Prepared(
    select(*[_NOTIFICATION.c[name] for name in _FIELDS]).where(_NOTIFICATION.c.order_id == bindparam("order_id"))
)


def _newest_first_statement(by_order: bool, before: bool) -> Prepared:
    query = select(*[_NOTIFICATION.c[name] for name in _FIELDS])
    if by_order:
        query = query.where(_NOTIFICATION.c.order_id == bindparam("order_id"))
    if before:
        query = query.where(_NOTIFICATION.c.seq < bindparam("before_seq"))
    # Both bound: a literal limit or offset would be a parameter Prepared is never given.
    return Prepared(query.order_by(_NOTIFICATION.c.seq.desc()).limit(bindparam("limit")).offset(bindparam("offset")))


# One statement per combination of filters, keyed (by order, before a sequence number).
_NEWEST_FIRST = {(o, b): _newest_first_statement(o, b) for o in (False, True) for b in (False, True)}


def insert_if_absent(connection: Connection, row: NotificationRecord) -> bool:
    """Insert the order's notification unless the order has one; True when this call inserted it.

    ON CONFLICT DO NOTHING waits for a concurrent writer of the same order and then yields to
    it, so the fresh path is one statement and the loser never sees a unique-key error.
    """
    statement = _INSERT_IF_ABSENT[connection.dialect.name]
    cursor = statement.execute(connection, {name: getattr(row, name) for name in _INSERTED})
    return cursor.fetchone() is not None


def get_by_order(connection: Connection, order_id: str) -> NotificationRecord | None:
    row = _GET_BY_ORDER.execute(connection, {"order_id": order_id}).fetchone()
    return NotificationRecord(*row) if row else None


def newest_first(connection: Connection, order_id: str, before_seq: int | None, limit: int) -> list[NotificationRecord]:
    """Up to limit rows with seq below before_seq (all when None), of one order when order_id is set."""
    statement = _NEWEST_FIRST[(bool(order_id), before_seq is not None)]
    params = {"order_id": order_id, "before_seq": before_seq, "limit": limit, "offset": 0}
    return [NotificationRecord(*row) for row in statement.execute(connection, params).fetchall()]
