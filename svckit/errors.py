"""Two error families, converted to gRPC statuses only at the transport edge."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "DeadlineExceeded",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "IdempotencyKeyReused",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RetryableError",
    "Unauthenticated",
    "error_from_status",
    "status_from_error",
]

DOMAIN = "sagasuite.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request and why it is bad."""

    field: str
    reason: str


class DomainError(Exception):
    """A terminal refusal: retrying the same request cannot succeed."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        """The google.rpc detail messages carried with the status."""
        return []


class InvalidArgument(DomainError):
    """The request is malformed; names every bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.reason}" for v in violations))

    @classmethod
    def of(cls, field_name: str, reason: str) -> InvalidArgument:
        return cls([FieldViolation(field_name, reason)])

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed]


@dataclass
class _ReasonedError(DomainError):
    """A refusal with a machine-readable reason carried as google.rpc.ErrorInfo."""

    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]


class FailedPrecondition(_ReasonedError):
    """A domain refusal: out of stock, card declined, order cancelled."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class IdempotencyKeyReused(FailedPrecondition):
    """The idempotency key was already used for a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(
            "IDEMPOTENCY_KEY_REUSED",
            f"idempotency-key {key!r} was already used with a different request",
            {"idempotency_key": key},
        )


class NotFound(_ReasonedError):
    """The thing asked for does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(_ReasonedError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(_ReasonedError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(_ReasonedError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


class RetryableError(Exception):
    """A transient failure: the same request may succeed later."""

    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class DeadlineExceeded(RetryableError):
    """The caller's deadline passed before the work could commit."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_from_error(error: DomainError | RetryableError) -> grpc.Status:
    """The grpc.Status (code, message and packed details) that carries an error to a client."""
    details = error.details() if isinstance(error, DomainError) else []
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(code_number: int, message: str, details: list[any_pb2.Any]) -> DomainError:
    """Rebuild a stored refusal so that a replay answers with the same status and details."""
    code = _CODE_BY_NUMBER.get(code_number, grpc.StatusCode.FAILED_PRECONDITION)
    for packed in details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            cls: type[_ReasonedError] = {
                grpc.StatusCode.NOT_FOUND: NotFound,
                grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
                grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
                grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
            }.get(code, FailedPrecondition)
            return cls(info.reason, message, dict(info.metadata))
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            return InvalidArgument([FieldViolation(v.field, v.description) for v in bad.field_violations])
    return FailedPrecondition("UNKNOWN_REFUSAL", message)
