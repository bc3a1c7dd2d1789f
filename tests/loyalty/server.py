"""The loyalty service, a participant written as another team would: plain grpcio and sqlite3, none of the suite's code.

Run as a process:

    python tests/loyalty/server.py --port 0 --db loyalty.db [--port-file FILE] [--broken no-replay]

It prints ``READY port=N`` (and writes N to --port-file) once it serves. It honours the participant
contract the orchestrator relies on (docs/participant-contract.md): the ``idempotency-key`` header
replays the stored answer byte for byte and refuses the key with another request
(FAILED_PRECONDITION, reason IDEMPOTENCY_KEY_REUSED); the record commits in the same transaction as
the effect, and concurrent duplicates run once (the write lock is taken before the record is read);
a revocation before its award leaves a tombstone that refuses the late award; a call whose deadline
has passed commits nothing; grpc.health.v1 and server reflection answer.

``--broken`` makes deliberately faulty variants for the conformance kit's own tests:
``no-replay`` keeps no idempotency records (every request runs again), ``ignores-deadline`` waits
out a short deadline and then commits anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import re
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

__all__ = ["BROKEN_MODES", "main"]

BROKEN_MODES = ("no-replay", "ignores-deadline")
IDEMPOTENCY_HEADER = "idempotency-key"
ERROR_DOMAIN = "loyalty.example"
MAX_KEY_LENGTH = 200
MAX_POINTS = 1_000_000
_IDENTIFIER = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_AWARDED, _REVOKED, _TOMBSTONE = "AWARDED", "REVOKED", "TOMBSTONE"
_OK = 0

log = logging.getLogger("loyalty")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    code INTEGER NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS awards (
    order_id TEXT PRIMARY KEY,
    award_id TEXT NOT NULL,
    customer TEXT NOT NULL,
    points INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (
    customer TEXT PRIMARY KEY,
    points INTEGER NOT NULL
);
"""


class Refusal(Exception):
    """A call's refusal as a google.rpc.Status: its code, message and detail messages."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[Message] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []

    @classmethod
    def invalid(cls, violations: list[tuple[str, str]]) -> Refusal:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=name, description=reason)
                for name, reason in violations
            ]
        )
        message = "; ".join(f"{name}: {reason}" for name, reason in violations)
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message, [bad_request])

    @classmethod
    def reasoned(cls, code: grpc.StatusCode, reason: str, message: str, **metadata: str) -> Refusal:
        info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
        return cls(code, message, [info])

    def status(self) -> status_pb2.Status:
        packed = []
        for detail in self.details:
            wrapper = any_pb2.Any()
            wrapper.Pack(detail, deterministic=True)
            packed.append(wrapper)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


def _quote(value: str) -> str:
    """A short prefix of a client's value, for a refusal's message."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _printable(value: str) -> bool:
    return value.isprintable()


class _Violations:
    """Every bad field of one request, refused together."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def identifier(self, name: str, value: str) -> None:
        if not value:
            self.found.append((name, "is required"))
        elif not _IDENTIFIER.match(value):
            self.found.append((name, f"must be 1-64 letters, digits, '-', '_', '.', ':'; got {_quote(value)}"))

    def text(self, name: str, value: str, limit: int, *, required: bool) -> None:
        if required and not value:
            self.found.append((name, "is required"))
        elif len(value) > limit:
            self.found.append((name, f"must be at most {limit} characters"))
        elif not _printable(value):
            self.found.append((name, "must not contain control characters"))

    def raise_if_any(self) -> None:
        if self.found:
            raise Refusal.invalid(self.found)


class _Malformed:
    """What the tolerant deserializer returns for bytes that are not a valid request."""


def _tolerant(message_type: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    def decode(raw: bytes) -> Message | _Malformed:
        try:
            request = message_type.FromString(raw)
        except (DecodeError, ValueError, RecursionError):
            return _Malformed()
        # Nothing beyond the contract is hashed or stored.
        request.DiscardUnknownFields()
        return request

    return decode


def _idempotency_key(context: grpc.ServicerContext) -> str:
    values = dict(context.invocation_metadata())
    if IDEMPOTENCY_HEADER + "-bin" in values:
        raise Refusal.invalid([(IDEMPOTENCY_HEADER, "must be printable ASCII text, not a binary header")])
    key = values.get(IDEMPOTENCY_HEADER, "")
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not key:
        raise Refusal.invalid([(IDEMPOTENCY_HEADER, "metadata header is required on this mutating call")])
    if len(key) > MAX_KEY_LENGTH:
        raise Refusal.invalid([(IDEMPOTENCY_HEADER, f"must be at most {MAX_KEY_LENGTH} characters")])
    if not key.isascii() or not key.isprintable():
        raise Refusal.invalid([(IDEMPOTENCY_HEADER, "must be printable ASCII text")])
    return key


class _Database:
    """One SQLite file in WAL mode, a connection per server thread, transactions taken with the write lock."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun and ended here, explicitly.
        return sqlite3.connect(self._path, timeout=30.0, isolation_level=None, check_same_thread=False)

    def connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
        return connection

    @contextmanager
    def write_transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: the write lock first, so a duplicate waits and then reads the record, never runs twice."""
        connection = self.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        finally:
            if connection.in_transaction:
                connection.execute("ROLLBACK")


def _deadline_passed(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class LoyaltyService:
    """The three methods; the two mutating ones go through one idempotent funnel."""

    def __init__(self, database: _Database, messages: ModuleType, broken: str = "") -> None:
        self._database = database
        self._pb = messages
        self._broken = broken

    # The funnel: key, record and effect in one transaction.

    def _keyed(
        self,
        method: str,
        request: Message,
        context: grpc.ServicerContext,
        effect: Callable[[sqlite3.Connection], Message],
    ) -> bytes:
        key = _idempotency_key(context)
        request_hash = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        if self._broken != "ignores-deadline" and _deadline_passed(context):
            raise Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed before the work started")
        replay = self._broken != "no-replay"
        with self._database.write_transaction() as connection:
            if replay:
                row = connection.execute(
                    "SELECT method, request_hash, code, payload FROM idempotency WHERE key = ?", (key,)
                ).fetchone()
                if row is not None:
                    return _replayed(key, method, request_hash, row)
            outcome: Refusal | None = None
            code: int
            payload: bytes
            connection.execute("SAVEPOINT effect")
            try:
                response = effect(connection)
            except Refusal as refusal:
                # A refusal leaves none of the effect's writes, but is recorded, so a resend gets it again.
                connection.execute("ROLLBACK TO effect")
                connection.execute("RELEASE effect")
                code, payload, outcome = refusal.code.value[0], refusal.status().SerializeToString(), refusal
            else:
                connection.execute("RELEASE effect")
                code, payload = _OK, response.SerializeToString(deterministic=True)
            if replay:
                connection.execute(
                    "INSERT INTO idempotency (key, method, request_hash, code, payload, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (key, method, request_hash, code, payload, time.time()),
                )
            if self._broken == "ignores-deadline":
                _wait_out_a_short_deadline(context)
            elif _deadline_passed(context):
                raise Refusal(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed before the work committed"
                )
            connection.execute("COMMIT")
        if outcome is not None:
            raise outcome
        return payload

    # The methods.

    def award_points(self, request: Any, context: grpc.ServicerContext) -> bytes:
        violations = _Violations()
        violations.identifier("order_id", request.order_id)
        violations.text("customer", request.customer, 254, required=True)
        if not 1 <= request.points <= MAX_POINTS:
            violations.found.append(("points", f"must be between 1 and {MAX_POINTS:,}; got {request.points}"))
        violations.raise_if_any()
        return self._keyed("AwardPoints", request, context, lambda c: self._award(c, request))

    def revoke_points(self, request: Any, context: grpc.ServicerContext) -> bytes:
        violations = _Violations()
        violations.identifier("order_id", request.order_id)
        violations.text("reason", request.reason, 200, required=False)
        violations.raise_if_any()
        return self._keyed("RevokePoints", request, context, lambda c: self._revoke(c, request))

    def get_award(self, request: Any, context: grpc.ServicerContext) -> bytes:
        violations = _Violations()
        violations.identifier("order_id", request.order_id)
        violations.raise_if_any()
        connection = self._database.connection()
        row = _award_row(connection, request.order_id)
        if row is None:
            raise Refusal.reasoned(
                grpc.StatusCode.NOT_FOUND,
                "AWARD_NOT_FOUND",
                f"order {request.order_id} has no award",
                order_id=request.order_id,
            )
        award = self._award_pb(request.order_id, row)
        response: Message = self._pb.GetAwardResponse(award=award, balance=_balance(connection, row[1]))
        return response.SerializeToString(deterministic=True)

    # The domain: one award per order, and revocations that may come first.

    def _award(self, connection: sqlite3.Connection, request: Any) -> Message:
        existing = _award_row(connection, request.order_id)
        if existing is not None:
            award_id, _, _, status = existing
            if status == _AWARDED:
                raise Refusal.reasoned(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "ORDER_ALREADY_AWARDED",
                    f"order {request.order_id} was already awarded points by award {award_id}",
                    order_id=request.order_id,
                    award_id=award_id,
                )
            raise Refusal.reasoned(
                grpc.StatusCode.FAILED_PRECONDITION,
                "ORDER_REVOKED",
                f"order {request.order_id} had its points revoked; it cannot be awarded again",
                order_id=request.order_id,
                award_id=award_id,
            )
        award_id = "awd_" + uuid.uuid4().hex[:20]
        connection.execute(
            "INSERT INTO awards (order_id, award_id, customer, points, status, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (request.order_id, award_id, request.customer, request.points, _AWARDED, time.time()),
        )
        connection.execute(
            "INSERT INTO balances (customer, points) VALUES (?, ?) "
            "ON CONFLICT (customer) DO UPDATE SET points = points + excluded.points",
            (request.customer, request.points),
        )
        award = self._award_pb(request.order_id, (award_id, request.customer, request.points, _AWARDED))
        response: Message = self._pb.AwardPointsResponse(award=award, balance=_balance(connection, request.customer))
        return response

    def _revoke(self, connection: sqlite3.Connection, request: Any) -> Message:
        existing = _award_row(connection, request.order_id)
        if existing is None:
            row = ("awd_" + uuid.uuid4().hex[:20], "", 0, _TOMBSTONE)
            connection.execute(
                "INSERT INTO awards (order_id, award_id, customer, points, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (request.order_id, *row, time.time()),
            )
            response: Message = self._pb.RevokePointsResponse(
                award=self._award_pb(request.order_id, row), was_awarded=False
            )
            return response
        award_id, customer, points, status = existing
        if status != _AWARDED:
            # Revoked already, or a tombstone: a no-op that reports the award as it stands.
            response = self._pb.RevokePointsResponse(
                award=self._award_pb(request.order_id, existing), balance=_balance(connection, customer)
            )
            return response
        connection.execute("UPDATE awards SET status = ? WHERE order_id = ?", (_REVOKED, request.order_id))
        connection.execute("UPDATE balances SET points = points - ? WHERE customer = ?", (points, customer))
        response = self._pb.RevokePointsResponse(
            award=self._award_pb(request.order_id, (award_id, customer, points, _REVOKED)),
            was_awarded=True,
            balance=_balance(connection, customer),
        )
        return response

    def _award_pb(self, order_id: str, row: tuple[str, str, int, str]) -> Message:
        award_id, customer, points, status = row
        award: Message = self._pb.Award(
            award_id=award_id,
            order_id=order_id,
            customer=customer,
            points=points,
            status=self._pb.AwardStatus.Value(f"AWARD_STATUS_{status}"),
        )
        return award


def _award_row(connection: sqlite3.Connection, order_id: str) -> tuple[str, str, int, str] | None:
    row: tuple[str, str, int, str] | None = connection.execute(
        "SELECT award_id, customer, points, status FROM awards WHERE order_id = ?", (order_id,)
    ).fetchone()
    return row


def _balance(connection: sqlite3.Connection, customer: str) -> int:
    if not customer:
        return 0
    row = connection.execute("SELECT points FROM balances WHERE customer = ?", (customer,)).fetchone()
    return int(row[0]) if row else 0


def _replayed(key: str, method: str, request_hash: str, row: tuple[str, str, int, bytes]) -> bytes:
    """The stored answer of key: its response bytes, or its refusal raised again with the same status bytes."""
    stored_method, stored_hash, code, payload = row
    if stored_method != method or stored_hash != request_hash:
        raise Refusal.reasoned(
            grpc.StatusCode.FAILED_PRECONDITION,
            "IDEMPOTENCY_KEY_REUSED",
            f"idempotency-key {_quote(key)} was already used with a different request",
            idempotency_key=key[:100],
        )
    if code == _OK:
        return bytes(payload)
    raise _StoredRefusal(status_pb2.Status.FromString(bytes(payload)))


class _StoredRefusal(Exception):
    """A recorded refusal, answered again as it was first sent."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _wait_out_a_short_deadline(context: grpc.ServicerContext) -> None:
    """The ignores-deadline variant: slow work that outlasts a short deadline, then commits all the same."""
    remaining = context.time_remaining()
    if remaining is not None and remaining < 1.0:
        time.sleep(max(0.0, remaining) + 0.02)


def _handler(
    method: str, behaviour: Callable[[Any, grpc.ServicerContext], bytes], request_type: type[Message]
) -> grpc.RpcMethodHandler[Any, bytes]:
    """A unary handler whose response goes out as the bytes behaviour returns (a replay as it was stored)."""

    def handle(request: Message | _Malformed, context: grpc.ServicerContext) -> bytes:
        failure: status_pb2.Status
        started = time.perf_counter()
        try:
            if isinstance(request, _Malformed):
                raise Refusal.invalid([("request", f"is not a valid {request_type.DESCRIPTOR.full_name}")])
            answer = behaviour(request, context)
            log.info("method=%s code=OK ms=%.1f", method, (time.perf_counter() - started) * 1000)
            return answer
        except Refusal as refusal:
            failure = refusal.status()
        except _StoredRefusal as stored:
            failure = stored.status
        except sqlite3.OperationalError as error:
            # A lock held too long, a full disk: nothing committed, and a retry may succeed.
            failure = Refusal(
                grpc.StatusCode.UNAVAILABLE, f"the database is unavailable; nothing was applied, retry later ({error})"
            ).status()
        except Exception:
            reference = uuid.uuid4().hex[:12]
            log.exception("method=%s code=INTERNAL ref=%s", method, reference)
            failure = Refusal(grpc.StatusCode.INTERNAL, f"internal error, reference {reference}").status()
        log.info(
            "method=%s code=%s ms=%.1f %s",
            method,
            _CODE_NAMES.get(failure.code, str(failure.code)),
            (time.perf_counter() - started) * 1000,
            failure.message,
        )
        context.abort_with_status(rpc_status.to_status(failure))
        raise AssertionError("abort_with_status returns only by raising")

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=_tolerant(request_type), response_serializer=bytes
    )


_CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}


def _generated_modules(stubs_dir: str) -> ModuleType:
    """The loyalty messages module: compiled from loyalty.proto by the sibling build.py, or from --stubs."""
    spec = importlib.util.spec_from_file_location("loyalty_build", Path(__file__).with_name("build.py"))
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # a dataclass module must be importable while it is defined
    spec.loader.exec_module(build)
    if stubs_dir:
        out_dir = Path(stubs_dir)
        built = build.LoyaltyBuild(
            out_dir, out_dir / "loyalty_pb2.py", out_dir / "loyalty_pb2_grpc.py", out_dir / "loyalty.binpb"
        )
        messages: ModuleType = build.import_loyalty(built)[0]
        return messages
    # Compiled for this process alone: once imported, the generated files are not needed any more.
    with tempfile.TemporaryDirectory(prefix="loyalty-stubs-") as scratch:
        messages = build.import_loyalty(build.build_loyalty(Path(scratch)))[0]
    return messages


def _announce(port: int, port_file: str) -> None:
    if port_file:
        # Written whole, then renamed: a reader never sees half a number.
        partial = f"{port_file}.partial"
        Path(partial).write_text(f"{port}\n")
        os.replace(partial, port_file)
    print(f"READY port={port}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The loyalty service (a participant outside the suite).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--db", required=True, help="the SQLite file")
    parser.add_argument("--port-file", default="", help="also write the bound port to this file")
    parser.add_argument("--stubs", default="", help="a folder tests/loyalty/build.py compiled into (else compiled now)")
    parser.add_argument("--broken", choices=BROKEN_MODES, default="", help="a deliberately faulty variant")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to drain in-flight calls on SIGTERM")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)

    messages = _generated_modules(options.stubs)
    service_name = messages.DESCRIPTOR.services_by_name["LoyaltyService"].full_name
    service = LoyaltyService(_Database(Path(options.db)), messages, options.broken)
    handlers = {
        "AwardPoints": _handler("AwardPoints", service.award_points, messages.AwardPointsRequest),
        "RevokePoints": _handler("RevokePoints", service.revoke_points, messages.RevokePointsRequest),
        "GetAward": _handler("GetAward", service.get_award, messages.GetAwardRequest),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.workers), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((service_name, health_name, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(f"{options.host}:{options.port}")
    except RuntimeError as error:
        print(f"loyalty: cannot listen on {options.host}:{options.port}: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    try:
        for name in (service_name, ""):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        broken = f" (broken: {options.broken})" if options.broken else ""
        log.info("serving %s on port %d%s", service_name, port, broken)
        _announce(port, options.port_file)
        stop.wait()
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(options.grace).wait()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
