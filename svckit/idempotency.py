"""Idempotency records that commit in the same transaction as the effect they guard."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from sqlalchemy import Column, Connection, LargeBinary, bindparam, delete, insert, select
from sqlmodel import Field, SQLModel

from svckit.db import Database, Prepared, savepoint
from svckit.errors import DeadlineExceeded, DomainError, IdempotencyKeyReused, error_from_status

__all__ = ["IdempotencyRecord", "IdempotencyStore", "IdempotentResult"]

ResponseT = TypeVar("ResponseT", bound=Message)

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
        """
        request_hash = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()

        def work(connection: Connection) -> IdempotentResult[ResponseT]:
            row = _SELECT.execute(connection, {"key": key}).fetchone()
            if row is not None:
                return _replay(key, method, request_hash, row, response_type)
            refusal: DomainError | None = None
            try:
                # A savepoint, so a refusal raised halfway leaves none of the effect's writes.
                with savepoint(connection):
                    response = effect(connection)
            except DomainError as error:
                refusal = error
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
                return IdempotentResult(_Refusal(refusal), replayed=False)  # type: ignore[arg-type]
            return IdempotentResult(response, replayed=False)

        result = await self._database.transaction(work)
        if isinstance(result.response, _Refusal):
            raise result.response.error
        return result

    async def delete_expired(self) -> int:
        """Forget records older than the retention; returns how many were deleted."""
        cutoff = time.time() - self._retention_seconds

        def work(connection: Connection) -> int:
            return connection.execute(delete(_TABLE).where(_TABLE.c.created_at < cutoff)).rowcount

        return await self._database.transaction(work)


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
