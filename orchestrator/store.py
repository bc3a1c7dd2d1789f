"""Orchestrator persistence in SQLAlchemy Core: sagas, history and outbox, batched per transaction."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, not_, or_, select, text, tuple_, update

from orchestrator.engine import Command, Event, Progress, SagaState
from orchestrator.models import (
    SCHEMA_VERSION,
    OutboxRow,
    ReplicaRow,
    SagaEventRow,
    SagaRow,
    SchemaVersionRow,
    SignalRow,
)
from orchestrator.status import IN_FLIGHT_STATUSES, Direction, SagaStatus, effective_status
from svckit.db import Database, Prepared

__all__ = [
    "EventRecord",
    "PendingCommand",
    "SagaFilter",
    "append_events",
    "children_of",
    "claim_due",
    "count_not_ended",
    "ensure_schema",
    "fence",
    "find_by_business_key",
    "find_signal",
    "heartbeat",
    "in_flight_without_definition",
    "insert_saga",
    "insert_signal",
    "leave",
    "list_sagas",
    "load_events",
    "load_pending",
    "load_pendings",
    "load_sagas",
    "needs_attention_by_type",
    "put_command",
    "release_leases",
    "running_hashes",
    "storable",
    "update_sagas",
    "wake",
]

SAGA = SagaRow.__table__  # type: ignore[attr-defined]
EVENT = SagaEventRow.__table__  # type: ignore[attr-defined]
OUTBOX = OutboxRow.__table__  # type: ignore[attr-defined]
SCHEMA = SchemaVersionRow.__table__  # type: ignore[attr-defined]
SIGNAL = SignalRow.__table__  # type: ignore[attr-defined]
REPLICA = ReplicaRow.__table__  # type: ignore[attr-defined]

_SAGA_COLUMNS = tuple(SagaRow.model_fields)
_OUTBOX_COLUMNS = tuple(OutboxRow.model_fields)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer release than this one."""


def ensure_schema(database: Database) -> int:
    """Create the tables on first start and record the schema version; refuse a newer schema."""
    database.create_schema()

    def work(connection: Connection) -> int:
        if database.is_postgres:
            # Two replicas starting on one old database: the second waits, then finds it migrated.
            connection.execute(text("SELECT pg_advisory_xact_lock(7220517)"))
        stored = connection.execute(select(func.max(SCHEMA.c.version))).scalar()
        if stored is None:
            connection.execute(insert(SCHEMA).values(version=SCHEMA_VERSION, applied_at=time.time()))
            return SCHEMA_VERSION
        if stored > SCHEMA_VERSION:
            raise SchemaTooNew(f"database schema is version {stored}; this release knows up to {SCHEMA_VERSION}")
        if stored == 1:
            _migrate_1_to_2(connection)
            connection.execute(insert(SCHEMA).values(version=2, applied_at=time.time()))
            stored = 2
        if stored == 2:
            _migrate_2_to_3(connection)
            connection.execute(insert(SCHEMA).values(version=3, applied_at=time.time()))
            stored = 3
        return int(stored)

    return database.transaction_sync(work)


def _migrate_1_to_2(connection: Connection) -> None:
    """Schema 1 to 2 in one transaction: the saga's new columns, and the outbox keyed by saga and track.

    Sagas stored by schema 1 keep an empty progress, which the engine reads as they always ran:
    their completed steps are the compensatable ones before their step index.
    """
    connection.execute(text("ALTER TABLE saga ADD COLUMN parent_id VARCHAR(40) NOT NULL DEFAULT ''"))
    connection.execute(text("ALTER TABLE saga ADD COLUMN progress VARCHAR NOT NULL DEFAULT ''"))
    connection.execute(text("CREATE INDEX ix_saga_parent ON saga (parent_id)"))
    connection.execute(text("ALTER TABLE outbox RENAME TO outbox_v1"))
    if connection.dialect.name == "postgresql":
        # The old key keeps its name through the rename: free it, so the new table's is outbox_pkey as
        # in a database created at schema 2.
        connection.execute(text("ALTER TABLE outbox_v1 RENAME CONSTRAINT outbox_pkey TO outbox_v1_pkey"))
    connection.execute(text("DROP INDEX ix_outbox_due"))
    OUTBOX.create(connection)
    kept = ", ".join(name for name in _OUTBOX_COLUMNS if name not in ("track", "wait_until"))
    connection.execute(text(f"INSERT INTO outbox ({kept}, track) SELECT {kept}, '' FROM outbox_v1"))
    connection.execute(text("DROP TABLE outbox_v1"))


def _migrate_2_to_3(connection: Connection) -> None:
    """Schema 2 to 3: the hashes a saga started with; sagas stored before keep empty ones."""
    connection.execute(text("ALTER TABLE saga ADD COLUMN contract_hash VARCHAR(64) NOT NULL DEFAULT ''"))
    connection.execute(text("ALTER TABLE saga ADD COLUMN definition_hash VARCHAR(64) NOT NULL DEFAULT ''"))


def running_hashes(connection: Connection, saga_type: str, version: int) -> dict[tuple[str, str], int]:
    """(contract hash, definition hash) → count of the sagas not ended that run on a definition version."""
    rows = connection.execute(
        select(SAGA.c.contract_hash, SAGA.c.definition_hash, func.count())
        .where(
            SAGA.c.saga_type == saga_type,
            SAGA.c.version == version,
            SAGA.c.status.in_(_WAITING_STATUSES),
        )
        .group_by(SAGA.c.contract_hash, SAGA.c.definition_hash)
    ).all()
    return {(row[0], row[1]): int(row[2]) for row in rows}


# -- sagas ---------------------------------------------------------------------------------


def _encode_results(results: dict[str, bytes]) -> str:
    return json.dumps({name: base64.b64encode(payload).decode() for name, payload in results.items()})


def _decode_results(text: str) -> dict[str, bytes]:
    return {name: base64.b64decode(payload) for name, payload in json.loads(text).items()}


def saga_from_row(row: Any) -> SagaState:
    """A saga from a Core row, or from a tuple of the saga table's columns in declaration order."""
    m = row._mapping if hasattr(row, "_mapping") else dict(zip(_SAGA_COLUMNS, row, strict=True))
    return SagaState(
        saga_id=m["saga_id"],
        saga_type=m["saga_type"],
        version=m["version"],
        business_key=m["business_key"],
        input=bytes(m["input"]),
        status=SagaStatus(m["status"]),
        deadline_at=m["deadline_at"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        paused=bool(m["paused"]),
        cancel_requested=bool(m["cancel_requested"]),
        step_index=m["step_index"],
        compensations=[int(i) for i in m["compensations"].split(",") if i],
        results=_decode_results(m["results"]),
        last_error=m["last_error"],
        trace_context=m["trace_context"],
        event_seq=m["event_seq"],
        ended_at=m["ended_at"],
        parent_id=m["parent_id"],
        progress=Progress.from_json(m["progress"]),
        contract_hash=m["contract_hash"],
        definition_hash=m["definition_hash"],
    )


def storable(text: str) -> str:
    """Text PostgreSQL can hold: a NUL (which a participant's error message may carry) becomes U+FFFD."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _mutable_values(saga: SagaState) -> dict[str, Any]:
    return {
        "status": saga.status,
        "paused": saga.paused,
        "cancel_requested": saga.cancel_requested,
        "step_index": saga.step_index,
        "compensations": ",".join(str(i) for i in saga.compensations),
        "results": _encode_results(saga.results),
        "last_error": storable(saga.last_error[:2000]),
        "event_seq": saga.event_seq,
        "updated_at": saga.updated_at,
        "ended_at": saga.ended_at,
        "progress": "" if saga.progress.legacy else saga.progress.to_json(),
    }


_INSERT_SAGA = Prepared(insert(SAGA).values({name: bindparam(name) for name in _SAGA_COLUMNS}))


def insert_saga(connection: Connection, saga: SagaState, input_hash: str) -> None:
    _INSERT_SAGA.execute(
        connection,
        {
            "saga_id": saga.saga_id,
            "saga_type": saga.saga_type,
            "version": saga.version,
            "business_key": saga.business_key,
            "input": saga.input,
            "input_hash": input_hash,
            "trace_context": saga.trace_context,
            "deadline_at": saga.deadline_at,
            "parent_id": saga.parent_id,
            "created_at": saga.created_at,
            "contract_hash": saga.contract_hash,
            "definition_hash": saga.definition_hash,
            **_mutable_values(saga),
        },
    )


_UPDATE_SAGA = Prepared(
    update(SAGA)
    .where(SAGA.c.saga_id == bindparam("key_saga_id"))
    .values(
        {name: bindparam(name) for name in _mutable_values(SagaState("", "", 0, "", b"", SagaStatus.RUNNING, 0, 0, 0))}
    )
)
_SELECT_SAGA = select(*[SAGA.c[name] for name in _SAGA_COLUMNS]).where(SAGA.c.saga_id == bindparam("saga_id"))
_LOAD_SAGA = Prepared(_SELECT_SAGA)
# Row locks keep two replicas from recording transitions of one saga at once on PostgreSQL.
_LOAD_SAGA_FOR_UPDATE = Prepared(_SELECT_SAGA.with_for_update())
# PostgreSQL only: saga_id = ANY(array), a list bound as one array parameter.
_SELECT_SAGAS_ANY = (
    select(*[SAGA.c[name] for name in _SAGA_COLUMNS])
    .where(SAGA.c.saga_id == func.any(bindparam("saga_ids")))
    .order_by(SAGA.c.saga_id)
)
_LOAD_SAGAS_ANY = Prepared(_SELECT_SAGAS_ANY)
_LOAD_SAGAS_ANY_FOR_UPDATE = Prepared(_SELECT_SAGAS_ANY.with_for_update())
_FIND_BY_BUSINESS_KEY = Prepared(
    select(*[SAGA.c[name] for name in _SAGA_COLUMNS]).where(
        SAGA.c.saga_type == bindparam("saga_type"), SAGA.c.business_key == bindparam("business_key")
    )
)


def update_sagas(connection: Connection, sagas: Iterable[SagaState]) -> None:
    _UPDATE_SAGA.executemany(connection, [{"key_saga_id": saga.saga_id, **_mutable_values(saga)} for saga in sagas])


def load_sagas(connection: Connection, saga_ids: Iterable[str], *, for_update: bool = False) -> dict[str, SagaState]:
    """The sagas of saga_ids that exist; with for_update, row-locked in ascending id order."""
    ids = list(saga_ids)
    if len(ids) > 1 and connection.dialect.name == "postgresql":
        # One statement (one round trip) for the batch: ORDER BY is applied before FOR UPDATE, so
        # the rows are still locked in ascending id order, as two replicas' batches need.
        statement = _LOAD_SAGAS_ANY_FOR_UPDATE if for_update else _LOAD_SAGAS_ANY
        rows = statement.execute(connection, {"saga_ids": sorted(set(ids))}).fetchall()
        return {row[0]: saga_from_row(row) for row in rows}
    statement = _LOAD_SAGA_FOR_UPDATE if for_update else _LOAD_SAGA
    sagas = {}
    for saga_id in ids:
        row = statement.execute(connection, {"saga_id": saga_id}).fetchone()
        if row is not None:
            sagas[saga_id] = saga_from_row(row)
    return sagas


def find_by_business_key(connection: Connection, saga_type: str, business_key: str) -> tuple[SagaState, str] | None:
    row = _FIND_BY_BUSINESS_KEY.execute(connection, {"saga_type": saga_type, "business_key": business_key}).fetchone()
    if row is None:
        return None
    return saga_from_row(row), row[_SAGA_COLUMNS.index("input_hash")]


_WAITING_STATUSES = (*sorted(IN_FLIGHT_STATUSES), SagaStatus.NEEDS_ATTENTION)


def in_flight_without_definition(
    connection: Connection, known: set[tuple[str, int]], *, for_update: bool = False
) -> list[SagaState]:
    """Sagas that have not ended (needing attention included) whose (type, version) is not in known, oldest first."""
    conditions: list[Any] = [SAGA.c.status.in_(_WAITING_STATUSES)]
    if known:
        conditions.append(
            not_(or_(*[and_(SAGA.c.saga_type == name, SAGA.c.version == version) for name, version in sorted(known)]))
        )
    query = select(SAGA).where(*conditions).order_by(SAGA.c.created_at, SAGA.c.saga_id)
    if for_update:
        query = query.with_for_update()
    return [saga_from_row(row) for row in connection.execute(query)]


def count_not_ended(connection: Connection, definitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """How many sagas of each (type, version) have not ended."""
    counts: dict[tuple[str, int], int] = {}
    for name, version in definitions:
        query = select(func.count()).where(
            SAGA.c.saga_type == name, SAGA.c.version == version, SAGA.c.status.in_(_WAITING_STATUSES)
        )
        counts[(name, version)] = int(connection.execute(query).scalar() or 0)
    return counts


@dataclass(frozen=True)
class SagaFilter:
    """What ListSagas and the stats may filter on; empty fields do not filter."""

    statuses: tuple[str, ...] = ()
    include_paused: bool = False
    saga_type: str = ""
    business_key: str = ""
    created_after: float | None = None
    created_before: float | None = None
    saga_id_prefix: str = ""
    business_key_prefix: str = ""
    # (saga type, version, step indexes) whose node has the name asked for; None: no such filter.
    at_steps: tuple[tuple[str, int, tuple[int, ...]], ...] | None = None
    error_code: str = ""


def _where(saga_filter: SagaFilter) -> list[Any]:
    conditions: list[Any] = []
    status_conditions: list[Any] = []
    if saga_filter.statuses:
        status_conditions.append(and_(SAGA.c.status.in_(saga_filter.statuses), SAGA.c.paused.is_(False)))
    if saga_filter.include_paused:
        status_conditions.append(SAGA.c.paused.is_(True))
    if status_conditions:
        conditions.append(or_(*status_conditions))
    if saga_filter.saga_type:
        conditions.append(SAGA.c.saga_type == saga_filter.saga_type)
    if saga_filter.business_key:
        conditions.append(SAGA.c.business_key == saga_filter.business_key)
    if saga_filter.created_after is not None:
        conditions.append(SAGA.c.created_at >= saga_filter.created_after)
    if saga_filter.created_before is not None:
        conditions.append(SAGA.c.created_at < saga_filter.created_before)
    if saga_filter.saga_id_prefix:
        conditions.append(SAGA.c.saga_id.startswith(saga_filter.saga_id_prefix, autoescape=True))
    if saga_filter.business_key_prefix:
        conditions.append(SAGA.c.business_key.startswith(saga_filter.business_key_prefix, autoescape=True))
    if saga_filter.at_steps is not None:
        at = [
            and_(SAGA.c.saga_type == name, SAGA.c.version == version, SAGA.c.step_index.in_(indexes))
            for name, version, indexes in saga_filter.at_steps
        ]
        conditions.append(or_(*at) if at else text("1 = 0"))
    if saga_filter.error_code:
        # last_error reads "<step>: <CODE>: <message>" after a failed call (engine.py).
        conditions.append(SAGA.c.last_error.contains(f": {saga_filter.error_code}:", autoescape=True))
    return conditions


def list_sagas(
    connection: Connection, saga_filter: SagaFilter, limit: int, after: tuple[float, str] | None
) -> list[SagaState]:
    """Newest first; after is the (created_at, saga_id) of the last saga of the previous page."""
    conditions = _where(saga_filter)
    if after is not None:
        created_at, saga_id = after
        conditions.append(
            or_(SAGA.c.created_at < created_at, and_(SAGA.c.created_at == created_at, SAGA.c.saga_id < saga_id))
        )
    query = select(SAGA).where(*conditions).order_by(SAGA.c.created_at.desc(), SAGA.c.saga_id.desc()).limit(limit)
    return [saga_from_row(row) for row in connection.execute(query)]


def count_by_status(connection: Connection, created_after: float | None) -> dict[str, int]:
    conditions = [SAGA.c.created_at >= created_after] if created_after is not None else []
    query = select(SAGA.c.status, SAGA.c.paused, func.count()).where(*conditions).group_by(SAGA.c.status, SAGA.c.paused)
    counts: dict[str, int] = {}
    for status, paused, count in connection.execute(query):
        label = effective_status(status, bool(paused))
        counts[label] = counts.get(label, 0) + int(count)
    return counts


def completion_latencies(connection: Connection, created_after: float | None, limit: int = 10_000) -> list[float]:
    """Completion times of the most recently ended sagas: percentiles over a recent window stay cheap."""
    conditions = [SAGA.c.ended_at.is_not(None)]
    if created_after is not None:
        conditions.append(SAGA.c.created_at >= created_after)
    query = select(SAGA.c.ended_at - SAGA.c.created_at).where(*conditions).order_by(SAGA.c.ended_at.desc()).limit(limit)
    return [float(value) for value in connection.execute(query).scalars()]


def oldest_with_status(
    connection: Connection, statuses: Iterable[str], created_after: float | None = None
) -> SagaState | None:
    """The oldest saga in one of statuses (paused or not), created at or after created_after when given."""
    conditions = [SAGA.c.status.in_(list(statuses))]
    if created_after is not None:
        conditions.append(SAGA.c.created_at >= created_after)
    row = connection.execute(select(SAGA).where(*conditions).order_by(SAGA.c.created_at).limit(1)).first()
    return saga_from_row(row) if row else None


# -- history -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One history entry as read back (or as just written, from its insert row)."""

    saga_id: str
    seq: int
    at: float
    type: str
    step: str
    attempt: int
    code: str
    message: str
    duration_ms: float
    actor: str


EVENT_FIELDS = tuple(field.name for field in dataclasses.fields(EventRecord))
_LOAD_EVENTS = Prepared(
    select(*[EVENT.c[name] for name in EVENT_FIELDS])
    .where(EVENT.c.saga_id == bindparam("saga_id"), EVENT.c.seq > bindparam("after_seq"))
    .order_by(EVENT.c.seq)
)


def append_events(saga: SagaState, events: Sequence[Event], rows: list[dict[str, Any]]) -> None:
    """Number the events after the saga's last one and add them to rows for one batched insert."""
    for event in events:
        saga.event_seq += 1
        rows.append(
            {
                "saga_id": saga.saga_id,
                "seq": saga.event_seq,
                "at": event.at,
                "type": event.type,
                "step": event.step,
                "attempt": event.attempt,
                "code": event.code,
                "message": storable(event.message[:2000]),
                "duration_ms": round(event.duration_ms, 3),
                "actor": event.actor,
            }
        )


_INSERT_EVENT = Prepared(insert(EVENT).values({name: bindparam(name) for name in EVENT_FIELDS}))


def insert_events(connection: Connection, rows: list[dict[str, Any]]) -> None:
    _INSERT_EVENT.executemany(connection, rows)


def load_events(connection: Connection, saga_id: str, after_seq: int = 0) -> list[EventRecord]:
    rows = _LOAD_EVENTS.execute(connection, {"saga_id": saga_id, "after_seq": after_seq}).fetchall()
    return [EventRecord(*row) for row in rows]


# -- outbox --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingCommand:
    """A saga's outbox row: the command and who holds it."""

    command: Command
    lease_owner: str | None
    lease_expires_at: float

    @property
    def handed_out(self) -> bool:
        """Whether a dispatcher took it once, so its call may have gone out."""
        return self.lease_owner is not None

    def in_flight(self, now: float) -> bool:
        return self.lease_owner is not None and self.lease_expires_at > now


def _command_from_row(row: Any) -> Command:
    m = row._mapping if hasattr(row, "_mapping") else dict(zip(_OUTBOX_COLUMNS, row, strict=True))
    return Command(
        saga_id=m["saga_id"],
        step_index=m["step_index"],
        direction=Direction(m["direction"]),
        attempt=m["attempt"],
        first_attempt_at=m["first_attempt_at"],
        uncertain=bool(m["uncertain"]),
        due_at=m["due_at"],
        track=m["track"],
        wait_until=m["wait_until"],
    )


_PUT_COMMAND = Prepared(insert(OUTBOX).values({name: bindparam(name) for name in _OUTBOX_COLUMNS}))
_FENCE = Prepared(
    delete(OUTBOX).where(
        OUTBOX.c.saga_id == bindparam("saga_id"),
        OUTBOX.c.track == bindparam("track"),
        OUTBOX.c.lease_owner == bindparam("lease_owner"),
        OUTBOX.c.step_index == bindparam("step_index"),
        OUTBOX.c.direction == bindparam("direction"),
        OUTBOX.c.attempt == bindparam("attempt"),
    )
)
_LOAD_PENDING = Prepared(
    select(*[OUTBOX.c[name] for name in _OUTBOX_COLUMNS])
    .where(OUTBOX.c.saga_id == bindparam("saga_id"))
    .order_by(OUTBOX.c.track)
)
_DELETE_COMMANDS = Prepared(delete(OUTBOX).where(OUTBOX.c.saga_id == bindparam("saga_id")))
_DELETE_COMMAND = Prepared(
    delete(OUTBOX).where(OUTBOX.c.saga_id == bindparam("saga_id"), OUTBOX.c.track == bindparam("track"))
)
_WAKE = Prepared(
    update(OUTBOX)
    .where(
        OUTBOX.c.saga_id == bindparam("saga_id"),
        OUTBOX.c.wait_until.is_not(None),
        OUTBOX.c.due_at.is_not(None),
        or_(OUTBOX.c.lease_owner.is_(None), OUTBOX.c.lease_expires_at < bindparam("now")),
    )
    .values(due_at=bindparam("now"))
)


def put_command(connection: Connection, command: Command, lease_owner: str | None, lease_expires_at: float) -> None:
    _PUT_COMMAND.execute(
        connection,
        {
            "saga_id": command.saga_id,
            "step_index": command.step_index,
            "direction": command.direction,
            "attempt": command.attempt,
            "first_attempt_at": command.first_attempt_at,
            "uncertain": command.uncertain,
            "due_at": command.due_at,
            "lease_owner": lease_owner,
            "lease_expires_at": lease_expires_at,
            "created_at": time.time(),
            "track": command.track,
            "wait_until": command.wait_until,
        },
    )


def fence(connection: Connection, command: Command, lease_owner: str) -> bool:
    """Remove the command if this owner still holds it: only the holder may record its outcome."""
    params = {
        "saga_id": command.saga_id,
        "track": command.track,
        "lease_owner": lease_owner,
        "step_index": command.step_index,
        "direction": command.direction,
        "attempt": command.attempt,
    }
    return int(_FENCE.execute(connection, params).rowcount) == 1


def load_pendings(connection: Connection, saga_id: str) -> dict[str, PendingCommand]:
    """Every pending command of a saga, by track ("" is the main one)."""
    pendings: dict[str, PendingCommand] = {}
    for row in _LOAD_PENDING.execute(connection, {"saga_id": saga_id}).fetchall():
        values = dict(zip(_OUTBOX_COLUMNS, row, strict=True))
        command = _command_from_row(row)
        pendings[command.track] = PendingCommand(command, values["lease_owner"], values["lease_expires_at"])
    return pendings


def load_pending(connection: Connection, saga_id: str) -> PendingCommand | None:
    """The main track's pending command, or the first branch's when the main track has none."""
    pendings = load_pendings(connection, saga_id)
    return pendings.get("") or next(iter(pendings.values()), None)


def delete_command(connection: Connection, saga_id: str, track: str | None = None) -> None:
    """Withdraw a saga's pending command on one track, or on every track."""
    if track is None:
        _DELETE_COMMANDS.execute(connection, {"saga_id": saga_id})
    else:
        _DELETE_COMMAND.execute(connection, {"saga_id": saga_id, "track": track})


def wake(connection: Connection, saga_id: str, now: float) -> int:
    """Make a saga's waits due now (a signal came, a child ended): each looks at itself when claimed."""
    return int(_WAKE.execute(connection, {"saga_id": saga_id, "now": now}).rowcount)


# -- signals and children ------------------------------------------------------------------

_FIND_SIGNAL = Prepared(
    select(SIGNAL.c.name, SIGNAL.c.payload_hash, SIGNAL.c.received_at).where(
        SIGNAL.c.saga_id == bindparam("saga_id"), SIGNAL.c.signal_id == bindparam("signal_id")
    )
)
_INSERT_SIGNAL = Prepared(
    insert(SIGNAL).values(
        {name: bindparam(name) for name in ("saga_id", "signal_id", "name", "payload_hash", "received_at", "actor")}
    )
)


def find_signal(connection: Connection, saga_id: str, signal_id: str) -> tuple[str, str, float] | None:
    """The (name, payload hash, received at) of a delivered signal, by its sender's id."""
    row = _FIND_SIGNAL.execute(connection, {"saga_id": saga_id, "signal_id": signal_id}).fetchone()
    return (row[0], row[1], float(row[2])) if row is not None else None


def insert_signal(
    connection: Connection, saga_id: str, signal_id: str, name: str, payload_hash: str, received_at: float, actor: str
) -> None:
    _INSERT_SIGNAL.execute(
        connection,
        {
            "saga_id": saga_id,
            "signal_id": signal_id,
            "name": name,
            "payload_hash": payload_hash,
            "received_at": received_at,
            "actor": actor,
        },
    )


def children_of(connection: Connection, parent_id: str) -> list[SagaState]:
    query = select(SAGA).where(SAGA.c.parent_id == parent_id).order_by(SAGA.c.created_at, SAGA.c.saga_id)
    return [saga_from_row(row) for row in connection.execute(query)]


def claim_due(
    connection: Connection,
    owner: str,
    now: float,
    lease_seconds: float,
    limit: int,
    *,
    skip_locked: bool,
    silent_since: float | None = None,
) -> list[tuple[Command, SagaState]]:
    """Lease up to limit due commands nobody holds, whose lease expired, or (with silent_since) whose
    holder's last heartbeat is older than silent_since: a dead replica's work is taken over at once.

    Taking a live lease is safe because the holder's writes are fenced (`fence` checks the owner) and
    a call it may still have on the wire carries the same idempotency key as the new one.
    """
    holder_free = [OUTBOX.c.lease_owner.is_(None), OUTBOX.c.lease_expires_at < now]
    if silent_since is not None:
        silent = select(REPLICA.c.replica_id).where(REPLICA.c.heartbeat_at < silent_since)
        holder_free.append(OUTBOX.c.lease_owner.in_(silent))
    claimable = and_(OUTBOX.c.due_at <= now, or_(*holder_free))
    # Rows, not sagas: a saga's other tracks (a branch not due, a wait held by a pause) stay as they are.
    candidates = select(OUTBOX.c.saga_id, OUTBOX.c.track).where(claimable).order_by(OUTBOX.c.due_at).limit(limit)
    if skip_locked:
        candidates = candidates.with_for_update(skip_locked=True)
    claimed = connection.execute(
        update(OUTBOX)
        .where(tuple_(OUTBOX.c.saga_id, OUTBOX.c.track).in_(candidates), claimable)
        .values(lease_owner=owner, lease_expires_at=now + lease_seconds)
        .returning(*OUTBOX.c)
    ).all()
    if not claimed:
        return []
    sagas = load_sagas(connection, [row.saga_id for row in claimed])
    return [(_command_from_row(row), sagas[row.saga_id]) for row in claimed if row.saga_id in sagas]


def heartbeat(connection: Connection, replica_id: str, now: float, *, forget_before: float | None = None) -> None:
    """Record that a replica is alive; with forget_before, forget replicas silent since then that hold no lease."""
    updated = connection.execute(
        update(REPLICA).where(REPLICA.c.replica_id == replica_id).values(heartbeat_at=now)
    ).rowcount
    if not updated:
        connection.execute(insert(REPLICA).values(replica_id=replica_id, heartbeat_at=now, started_at=now))
    if forget_before is None:
        return
    held = select(OUTBOX.c.lease_owner).where(OUTBOX.c.lease_owner.is_not(None))
    connection.execute(
        delete(REPLICA).where(REPLICA.c.heartbeat_at < forget_before, REPLICA.c.replica_id.not_in(held))
    )


def leave(connection: Connection, replica_id: str) -> None:
    """A replica that stops: it holds no lease any more, and no heartbeat is expected from it."""
    connection.execute(delete(REPLICA).where(REPLICA.c.replica_id == replica_id))


def release_leases(connection: Connection, owner: str) -> int:
    """Give up every lease of owner, so the commands are claimed again at once."""
    return connection.execute(
        update(OUTBOX).where(OUTBOX.c.lease_owner == owner).values(lease_owner=None, lease_expires_at=0.0)
    ).rowcount


def waits_by_step(connection: Connection) -> list[tuple[str, int, int, int, float]]:
    """Pending waits grouped by (saga type, version, step index): their count and the oldest one's start."""
    query = (
        select(SAGA.c.saga_type, SAGA.c.version, OUTBOX.c.step_index, func.count(), func.min(OUTBOX.c.first_attempt_at))
        .select_from(OUTBOX.join(SAGA, SAGA.c.saga_id == OUTBOX.c.saga_id))
        .where(OUTBOX.c.wait_until.is_not(None))
        .group_by(SAGA.c.saga_type, SAGA.c.version, OUTBOX.c.step_index)
    )
    return [(str(t), int(v), int(i), int(n), float(m)) for t, v, i, n, m in connection.execute(query)]


def needs_attention_by_type(connection: Connection) -> dict[str, int]:
    """How many sagas wait in NEEDS_ATTENTION, by type: a range of ix_saga_status_created, never a scan of the table.

    A saga in NEEDS_ATTENTION is never paused (the engine clears the flag), so its stored status is what it reports.
    """
    query = (
        select(SAGA.c.saga_type, func.count())
        .where(SAGA.c.status == SagaStatus.NEEDS_ATTENTION)
        .group_by(SAGA.c.saga_type)
    )
    return {str(saga_type): int(count) for saga_type, count in connection.execute(query)}


def outbox_depth(connection: Connection, now: float) -> tuple[int, float]:
    """How many commands are due now, and the age in seconds of the oldest due one."""
    count, oldest = connection.execute(
        select(func.count(), func.min(OUTBOX.c.due_at)).where(OUTBOX.c.due_at <= now)
    ).one()
    return int(count), (now - oldest) if oldest is not None else 0.0
