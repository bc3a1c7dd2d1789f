"""Keyed effects: a mutating RPC written as its effect, run once per key with its record in one transaction."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from sqlalchemy import Column, Connection, LargeBinary, bindparam, delete, func, insert, literal_column, select
from sqlmodel import Field, SQLModel

from svckit.db import Database, KeyBusy, Prepared, key_lock_id, may_wait_for_locks
from svckit.errors import DeadlineExceeded, DomainError, FailedPrecondition, IdempotencyKeyReused, error_from_status
from svckit.server import CallContext, RpcServer, rpc

__all__ = [
    "Effect",
    "IdempotencyRecord",
    "IdempotencyStore",
    "IdempotentResult",
    "KeyedServicer",
    "OrderEffectRefusal",
    "keyed",
]

ResponseT = TypeVar("ResponseT", bound=Message)
RequestT = TypeVar("RequestT", bound=Message)

Effect: TypeAlias = Callable[[Connection], ResponseT]
"""What a keyed call does: the change, made on the call's connection, and the response that reports it."""

_OK = 0


class IdempotencyRecord(SQLModel, table=True):
    """The outcome of one mutating call, keyed by the caller's idempotency key."""

    __tablename__ = "idempotency_record"

    key: str = Field(primary_key=True, max_length=200)
    method: str = Field(max_length=100)
    request_hash: str = Field(max_length=64)
    code: int
    response: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: float = Field(index=True)


_TABLE = IdempotencyRecord.__table__  # type: ignore[attr-defined]
_SELECT = Prepared(
    select(_TABLE.c.method, _TABLE.c.request_hash, _TABLE.c.code, _TABLE.c.response).where(
        _TABLE.c.key == bindparam("key")
    )
)
_INSERT = Prepared(insert(_TABLE).values({c.name: bindparam(c.name) for c in _TABLE.c}))
# PostgreSQL, inside a batch: try the call's lock and read its record in the one round trip the read
# costs anyway; the outer join yields a row (and so tries the lock) whether or not a record exists.
_ONE_ROW = select(literal_column("1").label("one")).subquery("one_row")
_TRY_LOCK_AND_SELECT = Prepared(
    select(
        func.pg_try_advisory_xact_lock(bindparam("lock")),
        _TABLE.c.method,
        _TABLE.c.request_hash,
        _TABLE.c.code,
        _TABLE.c.response,
    ).select_from(_ONE_ROW.outerjoin(_TABLE, _TABLE.c.key == bindparam("key")))
)
# Alone, waiting is safe: the lock comes first, so the read after it sees what its holder committed.
_LOCK = Prepared(select(func.pg_advisory_xact_lock(bindparam("lock"))))


@dataclass(frozen=True)
class IdempotentResult(Generic[ResponseT]):
    """A response and whether it was replayed from an earlier call with the same key."""

    response: ResponseT
    replayed: bool


class IdempotencyStore:
    """Runs an effect at most once per key: the effect and its record commit together."""

    def __init__(self, database: Database, retention_seconds: float) -> None:
        self._database = database
        self._retention_seconds = retention_seconds
        self._locks = database.is_postgres

    async def execute(
        self,
        key: str,
        method: str,
        request: Message,
        effect: Callable[[Connection], ResponseT],
        response_type: type[ResponseT],
        deadline: float | None = None,
    ) -> IdempotentResult[ResponseT]:
        """Replay the stored outcome of key, or run effect and store its outcome in one transaction.

        deadline is a time.monotonic() instant; work that reaches it is rolled back, not committed.
        When the connection breaks during COMMIT this raises CommitOutcomeUnknown (retryable): the
        effect may have committed, and a retry with the same key settles it, replaying the stored
        outcome if it did and running the effect if it did not.
        """
        request_hash = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        # On PostgreSQL, where several processes may serve the same order at once (a resend after a
        # timeout, a compensation racing its action), a call first takes its order's lock (else its
        # key's): a duplicate waits, outside any batch, and then replays instead of running twice.
        order_id = getattr(request, "order_id", "")
        lock_name = f"order/{order_id}" if isinstance(order_id, str) and order_id else f"key/{key}"
        lock = key_lock_id(lock_name)

        def work(connection: Connection, refused: DomainError | None = None) -> IdempotentResult[ResponseT] | _Refusal:
            # Checked before the effect too: a call whose caller has gone must not take locks or do
            # work (a queued batch, a retry after a deadlock) only to be rolled back.
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the caller's deadline passed before the work started")
            row = self._claim_and_read(connection, key, lock, lock_name)
            if row is not None:
                return _replay(key, method, request_hash, row, response_type)
            refusal = refused
            if refusal is None:
                # No savepoint around the effect (two round trips on PostgreSQL, for every call) to
                # undo the writes of the rare one refused halfway: a refusal undoes the whole unit
                # instead, and only its record is written, in a new transaction (below).
                try:
                    response = effect(connection)
                except DomainError as error:
                    raise _RefusedMidway(error) from error
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the caller's deadline passed before the work committed")
            if refusal is not None:
                stored = status_pb2.Status(code=refusal.code.value[0], message=refusal.message)
                stored.details.extend(refusal.details())
                code, payload = refusal.code.value[0], stored.SerializeToString()
            else:
                code, payload = _OK, response.SerializeToString(deterministic=True)
            _INSERT.execute(
                connection,
                {
                    "key": key,
                    "method": method,
                    "request_hash": request_hash,
                    "code": code,
                    "response": payload,
                    "created_at": time.time(),
                },
            )
            if refusal is not None:
                # The refusal is recorded; raising after the insert would roll it back, so the
                # caller raises it once the transaction has committed.
                return _Refusal(refusal)
            return IdempotentResult(response, replayed=False)

        try:
            result = await self._database.transaction(work)
        except _RefusedMidway as refused:
            # Nothing of the refused run was applied: the state is what the effect saw, so its
            # refusal stands, as if recorded then. The record is written under the call's lock, once
            # it has read that no duplicate of the call recorded meanwhile (which it then replays).
            result = await self._database.transaction(functools.partial(work, refused=refused.error))
        if isinstance(result, _Refusal):
            raise result.error
        return result

    def _claim_and_read(
        self, connection: Connection, key: str, lock: int, lock_name: str
    ) -> tuple[str, str, int, bytes] | None:
        """The stored record of key, once this transaction holds the call's lock (PostgreSQL)."""
        # A DBAPI cursor's rows are untyped; _SELECT's columns are (method, request_hash, code, response).
        row: tuple[str, str, int, bytes] | None
        if not self._locks:
            row = _SELECT.execute(connection, {"key": key}).fetchone()
            return row
        if may_wait_for_locks(connection):
            _LOCK.execute(connection, {"lock": lock})
            row = _SELECT.execute(connection, {"key": key}).fetchone()
            return row
        # Inside a batch a wait could close a cycle with another process's batch: try, and if the
        # lock is taken run again alone after the batch (the database layer does that for KeyBusy).
        claimed, method, request_hash, code, response = _TRY_LOCK_AND_SELECT.execute(
            connection, {"lock": lock, "key": key}
        ).fetchone()
        if not claimed:
            raise KeyBusy(lock_name)
        return None if method is None else (method, request_hash, code, response)

    async def delete_expired(self) -> int:
        """Forget records older than the retention; returns how many were deleted."""
        cutoff = time.time() - self._retention_seconds

        def work(connection: Connection) -> int:
            return connection.execute(delete(_TABLE).where(_TABLE.c.created_at < cutoff)).rowcount

        return await self._database.transaction(work)


class _RefusedMidway(Exception):
    """The effect refused the call, perhaps after writing: the unit is undone, and the refusal recorded alone."""

    def __init__(self, error: DomainError) -> None:
        super().__init__(str(error))
        self.error = error


class _Refusal:
    """Carries a recorded refusal out of the transaction so it commits before being raised."""

    def __init__(self, error: DomainError) -> None:
        self.error = error


def _replay(
    key: str, method: str, request_hash: str, row: tuple[str, str, int, bytes], response_type: type[ResponseT]
) -> IdempotentResult[ResponseT]:
    stored_method, stored_hash, code, payload = row
    if stored_method != method or stored_hash != request_hash:
        raise IdempotencyKeyReused(key)
    if code == _OK:
        return IdempotentResult(response_type.FromString(bytes(payload)), replayed=True)
    status = status_pb2.Status.FromString(bytes(payload))
    details: list[any_pb2.Any] = list(status.details)
    raise error_from_status(status.code, status.message, details)


class _ServiceParts(Protocol):
    """What a servicer takes from its service process (a svckit.process.ServiceProcess)."""

    database: Database
    idempotency: IdempotencyStore
    rpc_server: RpcServer


class KeyedServicer:
    """Base of a service's servicer: what rpc() reports to, the store keyed() runs effects through, the database."""

    def __init__(self, process: _ServiceParts) -> None:
        self.rpc_server = process.rpc_server
        self.idempotency = process.idempotency
        self.database = process.database


ServicerT = TypeVar("ServicerT", bound=KeyedServicer)


def keyed(
    response_type: type[ResponseT], *, committed: Callable[[ServicerT], None] | None = None
) -> Callable[[Callable[[ServicerT, RequestT], Effect[ResponseT]]], Callable[..., Awaitable[Any]]]:
    """Wrap a servicer method written as its effect into a mutating rpc() whose effect runs once per key.

    The method is called as method(self, request): it validates the request (a refusal raised there
    takes no lock and leaves no record) and returns the Effect, which self.idempotency runs in one
    transaction with its record, or does not run when the key replays. committed(self) follows an
    effect this call ran and committed, never a replay or a refusal.
    """

    def decorate(method: Callable[[ServicerT, RequestT], Effect[ResponseT]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def handler(servicer: ServicerT, request: RequestT, call: CallContext) -> ResponseT:
            effect = method(servicer, request)
            result = await servicer.idempotency.execute(
                call.idempotency_key, call.method, request, effect, response_type, call.deadline
            )
            call.replayed = result.replayed
            if committed is not None and not result.replayed:
                committed(servicer)
            return result.response

        return rpc(mutating=True)(handler)

    return decorate


class OrderEffectRefusal(FailedPrecondition):
    """A refusal of an effect an order has once: it was applied already under another key, or compensated.

    One subclass per condition sets REASON, MESSAGE (formatted with order_id and record_id, the id
    of the order's record) and RECORD_ID, the ErrorInfo metadata name of that id when it is given.
    """

    REASON: ClassVar[str]
    MESSAGE: ClassVar[str]
    RECORD_ID: ClassVar[str | None] = None

    def __init__(self, order_id: str, record_id: str) -> None:
        metadata = {"order_id": order_id}
        if self.RECORD_ID is not None:
            metadata[self.RECORD_ID] = record_id
        super().__init__(self.REASON, self.MESSAGE.format(order_id=order_id, record_id=record_id), metadata)
        self.order_id = order_id
        self.record_id = record_id
