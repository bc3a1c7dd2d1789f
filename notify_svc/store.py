"""Notification persistence: Core statements prepared once, one round trip per row touched.

Rows travel as plain dataclasses, not SQLModel table objects: building one of those costs more
(about 150 us) than the statement that reads or writes it. `notify_svc.models` remains the schema.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    Connection,
    Integer,
    Table,
    bindparam,
    false,
    insert,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from notify_svc.models import DeliveryRow, NotificationRow
from svckit.db import Prepared, record_columns

__all__ = [
    "ClaimedDelivery",
    "DeliveryFailure",
    "DeliveryRecord",
    "NotificationRecord",
    "claim_due",
    "get_by_order",
    "insert_delivery",
    "insert_if_absent",
    "mark_delivered",
    "newest_first",
    "record_failures",
]


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


@dataclass(slots=True)
class DeliveryRecord:
    """What ListNotifications shows of a delivery row (see DeliveryRow)."""

    state: str
    attempts: int
    last_error: str
    delivered_at: float | None
    due_at: float | None


@dataclass(slots=True)
class ClaimedDelivery:
    """A notification a deliverer has just claimed: attempts counts the attempt it is about to make."""

    notification: NotificationRecord
    attempts: int
    uncertain: bool


@dataclass(slots=True)
class DeliveryFailure:
    """The outcome of a failed attempt, written only if its claim still holds the row."""

    notification_id: str
    claim: str
    state: str
    due_at: float | None
    last_error: str
    uncertain: bool


_NOTIFICATION: Table = NotificationRow.__table__  # type: ignore[attr-defined]
_DELIVERY: Table = DeliveryRow.__table__  # type: ignore[attr-defined]
# The order statements select and insert columns in; a record is built from a row by position.
_FIELDS = record_columns(NotificationRecord, _NOTIFICATION)
_INSERTED = tuple(name for name in _FIELDS if name != "seq")
_NOTIFICATION_COLUMNS = [_NOTIFICATION.c[name] for name in _FIELDS]
_DELIVERY_COLUMNS = [_DELIVERY.c[name] for name in ("state", "attempts", "last_error", "delivered_at", "due_at")]
_JOINED = _NOTIFICATION.outerjoin(_DELIVERY, _DELIVERY.c.notification_id == _NOTIFICATION.c.notification_id)


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
_GET_BY_ORDER = Prepared(select(*_NOTIFICATION_COLUMNS).where(_NOTIFICATION.c.order_id == bindparam("order_id")))
# Every value is a bound parameter: Prepared passes only the parameters it is given by name.
_INSERT_DELIVERY = Prepared(insert(_DELIVERY).values({column.name: bindparam(column.name) for column in _DELIVERY.c}))


def _newest_first_statement(by_order: bool, before: bool, by_state: bool) -> Prepared:
    query = select(*_NOTIFICATION_COLUMNS, *_DELIVERY_COLUMNS).select_from(_JOINED)
    if by_order:
        query = query.where(_NOTIFICATION.c.order_id == bindparam("order_id"))
    if before:
        query = query.where(_NOTIFICATION.c.seq < bindparam("before_seq"))
    if by_state:
        query = query.where(_DELIVERY.c.state == bindparam("state"))
    # Both bound: a literal limit or offset would be a parameter Prepared is never given.
    return Prepared(query.order_by(_NOTIFICATION.c.seq.desc()).limit(bindparam("limit")).offset(bindparam("offset")))


# One statement per combination of filters, keyed (by order, before a sequence number, by state).
_NEWEST_FIRST = {
    (o, b, s): _newest_first_statement(o, b, s) for o in (False, True) for b in (False, True) for s in (False, True)
}

# The oldest due rows, locked so that a concurrent claim on PostgreSQL skips them instead of
# waiting; SQLite has one writer at a time and renders no FOR UPDATE.
_DUE = (
    select(_DELIVERY.c.notification_id)
    .where(_DELIVERY.c.due_at <= bindparam("now"))
    .order_by(_DELIVERY.c.due_at)
    .limit(bindparam("limit"))
    .offset(bindparam("offset"))
    .with_for_update(skip_locked=True)
)
_CLAIM = Prepared(
    update(_DELIVERY)
    .where(
        _DELIVERY.c.notification_id.in_(_DUE.scalar_subquery()),
        # Checked again on the row itself, so a row another claim took meanwhile is not taken twice.
        _DELIVERY.c.due_at <= bindparam("now"),
    )
    .values(
        due_at=bindparam("lease_until"),
        lease_owner=bindparam("claim"),
        attempts=_DELIVERY.c.attempts + literal_column("1", Integer),
        # A row still held by a claim when it comes due again is one whose deliverer died or
        # stalled mid-attempt: that attempt may have delivered.
        uncertain=or_(_DELIVERY.c.uncertain, _DELIVERY.c.lease_owner.is_not(None)),
    )
)
# The rows of one claim: the claim wrote lease_until into due_at, so the due index finds them.
_CLAIMED = Prepared(
    select(*_NOTIFICATION_COLUMNS, _DELIVERY.c.attempts, _DELIVERY.c.uncertain)
    .select_from(_NOTIFICATION.join(_DELIVERY, _DELIVERY.c.notification_id == _NOTIFICATION.c.notification_id))
    .where(_DELIVERY.c.due_at == bindparam("lease_until"), _DELIVERY.c.lease_owner == bindparam("claim"))
)
# A delivery that happened is recorded whoever holds the row now; a later claim's failure is
# then fenced out, since that claim no longer holds it.
_MARK_DELIVERED = Prepared(
    update(_DELIVERY)
    .where(_DELIVERY.c.notification_id == bindparam("notification_id"), _DELIVERY.c.state == bindparam("pending"))
    .values(
        state=bindparam("delivered"),
        due_at=null(),
        lease_owner=null(),
        uncertain=false(),
        delivered_at=bindparam("delivered_at"),
    )
)
_RECORD_FAILURE = Prepared(
    update(_DELIVERY)
    .where(_DELIVERY.c.notification_id == bindparam("notification_id"), _DELIVERY.c.lease_owner == bindparam("claim"))
    .values(
        state=bindparam("state"),
        due_at=bindparam("due_at"),
        lease_owner=null(),
        uncertain=bindparam("uncertain"),
        last_error=bindparam("last_error"),
    )
)


def insert_if_absent(connection: Connection, row: NotificationRecord) -> bool:
    """Insert the order's notification unless the order has one; True when this call inserted it.

    ON CONFLICT DO NOTHING waits for a concurrent writer of the same order and then yields to
    it, so the fresh path is one statement and the loser never sees a unique-key error.
    """
    statement = _INSERT_IF_ABSENT[connection.dialect.name]
    cursor = statement.execute(connection, {name: getattr(row, name) for name in _INSERTED})
    return cursor.fetchone() is not None


def insert_delivery(connection: Connection, notification_id: str, state: str, due_at: float) -> None:
    """Queue a notification for delivery: its outbox row, in the transaction that records it."""
    _INSERT_DELIVERY.execute(
        connection,
        {
            "notification_id": notification_id,
            "state": state,
            "attempts": 0,
            "due_at": due_at,
            "lease_owner": None,
            "uncertain": False,
            "last_error": "",
            "delivered_at": None,
        },
    )


def get_by_order(connection: Connection, order_id: str) -> NotificationRecord | None:
    row = _GET_BY_ORDER.execute(connection, {"order_id": order_id}).fetchone()
    return NotificationRecord(*row) if row else None


def newest_first(
    connection: Connection, order_id: str, before_seq: int | None, state: str | None, limit: int
) -> list[tuple[NotificationRecord, DeliveryRecord | None]]:
    """Up to limit notifications with their delivery (None when untracked), newest first.

    Only rows with seq below before_seq when it is set, of one order when order_id is set, and
    whose delivery is in state when that is set.
    """
    statement = _NEWEST_FIRST[(bool(order_id), before_seq is not None, state is not None)]
    params = {"order_id": order_id, "before_seq": before_seq, "state": state, "limit": limit, "offset": 0}
    width = len(_FIELDS)
    return [
        (NotificationRecord(*row[:width]), DeliveryRecord(*row[width:]) if row[width] is not None else None)
        for row in statement.execute(connection, params).fetchall()
    ]


def claim_due(connection: Connection, claim: str, now: float, lease_until: float, limit: int) -> list[ClaimedDelivery]:
    """Claim up to limit rows due by now, oldest first, until lease_until; claim names this claim."""
    _CLAIM.execute(connection, {"now": now, "limit": limit, "offset": 0, "lease_until": lease_until, "claim": claim})
    rows = _CLAIMED.execute(connection, {"lease_until": lease_until, "claim": claim}).fetchall()
    width = len(_FIELDS)
    return [ClaimedDelivery(NotificationRecord(*row[:width]), row[width], bool(row[width + 1])) for row in rows]


def mark_delivered(connection: Connection, delivered: Sequence[tuple[str, float]], *, pending: str, state: str) -> None:
    """Record (notification id, delivered at) pairs as delivered, moving them from pending to state."""
    rows = [
        {"notification_id": notification_id, "delivered_at": at, "pending": pending, "delivered": state}
        for notification_id, at in delivered
    ]
    _MARK_DELIVERED.executemany(connection, rows)


def record_failures(connection: Connection, failures: Sequence[DeliveryFailure]) -> None:
    """Record failed attempts; one whose claim no longer holds its row changes nothing."""
    rows = [
        {
            "notification_id": failure.notification_id,
            "claim": failure.claim,
            "state": failure.state,
            "due_at": failure.due_at,
            "uncertain": failure.uncertain,
            "last_error": failure.last_error,
        }
        for failure in failures
    ]
    _RECORD_FAILURE.executemany(connection, rows)
