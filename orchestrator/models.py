"""Tables of the orchestrator database: sagas, their append-only history, the outbox, signals and the schema version."""

from __future__ import annotations

from sqlalchemy import Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

__all__ = ["SCHEMA_VERSION", "OutboxRow", "ReplicaRow", "SagaEventRow", "SagaRow", "SchemaVersionRow", "SignalRow"]

# 2: several outbox rows per saga (tracks), waits (wait_until), child links, progress, signals.
# 3: the contract and definition hashes a saga started with; replica heartbeats.
SCHEMA_VERSION = 3


class SchemaVersionRow(SQLModel, table=True):
    """The schema version this database was created or migrated to."""

    __tablename__ = "schema_version"

    version: int = Field(primary_key=True)
    applied_at: float


class SagaRow(SQLModel, table=True):
    """One saga: where it stands, its stored input and the stored results of its steps."""

    __tablename__ = "saga"
    __table_args__ = (
        UniqueConstraint("saga_type", "business_key", name="uq_saga_business_key"),
        Index("ix_saga_status_created", "status", "created_at"),
        Index("ix_saga_created", "created_at"),
        Index("ix_saga_parent", "parent_id"),
    )

    saga_id: str = Field(primary_key=True, max_length=40)
    saga_type: str = Field(max_length=100)
    version: int
    business_key: str = Field(max_length=200)
    input: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    input_hash: str = Field(max_length=64)
    status: str = Field(max_length=20)
    paused: bool = False
    cancel_requested: bool = False
    step_index: int = 0
    # Steps still to compensate, as comma-separated indexes in the order they will run.
    compensations: str = ""
    # Stored step results as a JSON object of step name to base64 response bytes.
    results: str = "{}"
    last_error: str = ""
    trace_context: str = ""
    event_seq: int = 0
    deadline_at: float
    created_at: float
    updated_at: float
    ended_at: float | None = None
    # The saga that started this one as its child ("" for a saga started by a client).
    parent_id: str = Field(default="", max_length=40)
    # Completions, skips, branches, kept signals and children as JSON ("" for a saga stored by schema 1).
    progress: str = ""
    # sha256 of the contract (descriptor set) and of the definition it started on ("" for Python
    # definitions and sagas stored before schema 3); a load that changes either is refused while it runs.
    contract_hash: str = Field(default="", max_length=64)
    definition_hash: str = Field(default="", max_length=64)


class SagaEventRow(SQLModel, table=True):
    """One entry of a saga's append-only history."""

    __tablename__ = "saga_event"
    __table_args__ = (UniqueConstraint("saga_id", "seq", name="uq_saga_event_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    saga_id: str = Field(max_length=40)
    seq: int
    at: float
    type: str = Field(max_length=40)
    step: str = Field(default="", max_length=100)
    attempt: int = 0
    code: str = Field(default="", max_length=40)
    message: str = ""
    duration_ms: float = 0.0
    actor: str = Field(default="orchestrator", max_length=100)


class OutboxRow(SQLModel, table=True):
    """The command a saga must send next on one track: the main one (""), or a branch of a parallel group.

    A wait (timer, signal, approval, child) is a row too: wait_until is when it fires or times out, and
    due_at when it is next looked at. due_at is NULL while the saga is paused. A dispatcher owns the
    row while its lease runs.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "due_at"),)

    saga_id: str = Field(primary_key=True, max_length=40)
    track: str = Field(default="", primary_key=True, max_length=12)
    step_index: int
    direction: str = Field(max_length=12)
    attempt: int
    first_attempt_at: float
    # True once an attempt ended without a known outcome, so the step may have taken effect.
    uncertain: bool = False
    due_at: float | None = None
    lease_owner: str | None = Field(default=None, max_length=100)
    lease_expires_at: float = 0.0
    created_at: float
    wait_until: float | None = None


class ReplicaRow(SQLModel, table=True):
    """One orchestrator replica and when it last said it was alive: a silent one's leases are taken over."""

    __tablename__ = "replica"

    replica_id: str = Field(primary_key=True, max_length=200)
    heartbeat_at: float
    started_at: float


class SignalRow(SQLModel, table=True):
    """One signal delivered to a saga, by its sender's id: a repeat is the same delivery."""

    __tablename__ = "saga_signal"

    saga_id: str = Field(primary_key=True, max_length=40)
    signal_id: str = Field(primary_key=True, max_length=200)
    # A SignalSaga name (64 at most), or "approval:" and an approval step's name (100 at most).
    name: str = Field(max_length=120)
    payload_hash: str = Field(max_length=64)
    received_at: float
    actor: str = Field(default="", max_length=100)
