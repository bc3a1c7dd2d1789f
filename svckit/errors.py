"""Two error families, converted to gRPC statuses only at the transport edge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "CommitOutcomeUnknown",
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "DomainError",
    "FailedPrecondition",
    "FieldViolation",
    "IdempotencyKeyReused",
    "InvalidArgument",
    "MalformedRequest",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryableError",
    "TransactionConflict",
    "Unauthenticated",
    "abort_call",
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
        # From the texts as clipped for the details, so a replay rebuilt from them says the same.
        super().__init__(
            "; ".join(
                f"{_clip(v.field, _MAX_DETAIL_TEXT_BYTES)}: {_clip(v.reason, _MAX_DETAIL_TEXT_BYTES)}"
                for v in violations
            )
        )

    @classmethod
    def of(cls, field_name: str, reason: str) -> InvalidArgument:
        return cls([FieldViolation(field_name, reason)])

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(v.field, _MAX_DETAIL_TEXT_BYTES), description=_clip(v.reason, _MAX_DETAIL_TEXT_BYTES)
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request, deterministic=True)
        return [packed]


class MalformedRequest(InvalidArgument):
    """The request bytes do not decode as the method's request message (not protobuf, truncated, bad UTF-8...)."""

    def __init__(self, message_name: str) -> None:
        super().__init__([FieldViolation("request", f"is not a valid {message_name}")])
        self.message_name = message_name
        self.message = f"the request is not a valid {message_name}"
        self.args = (self.message,)


@dataclass
class _ReasonedError(DomainError):
    """A refusal with a machine-readable reason carried as google.rpc.ErrorInfo."""

    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def details(self) -> list[any_pb2.Any]:
        metadata = {
            _clip(key, _MAX_DETAIL_TEXT_BYTES): _clip(value, _MAX_DETAIL_TEXT_BYTES)
            for key, value in self.metadata.items()
        }
        info = error_details_pb2.ErrorInfo(
            reason=_clip(self.reason, _MAX_DETAIL_TEXT_BYTES), domain=DOMAIN, metadata=metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info, deterministic=True)
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


class ResourceExhausted(_ReasonedError):
    """A limit of this process is reached (a refusal of now, not of the request): retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


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


class DatabaseUnavailable(RetryableError):
    """The database could not be reached, or the connection broke before the work committed: nothing was applied."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"the database is unavailable; nothing was applied, retry later ({cause})")
        self.cause = cause


class CommitOutcomeUnknown(RetryableError):
    """The connection broke while the work was committing: it may or may not have been applied."""

    def __init__(self, cause: str) -> None:
        super().__init__(
            "the commit's outcome is unknown (the database connection broke during COMMIT); "
            f"retry with the same idempotency key ({cause})"
        )
        self.cause = cause


class TransactionConflict(RetryableError):
    """The work kept colliding with concurrent transactions (deadlock, lock timeout); nothing was applied."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, cause: str) -> None:
        super().__init__(f"the work kept conflicting with concurrent transactions; nothing was applied ({cause})")
        self.cause = cause


def status_from_error(error: DomainError | RetryableError) -> grpc.Status:
    """The grpc.Status (code, message and packed details) that carries an error to a client.

    The message and the details are bounded here, whatever the error holds, so that the status
    always fits the client's metadata limit (see _MAX_MESSAGE_WIRE_BYTES).
    """
    details = error.details() if isinstance(error, DomainError) else []
    message = _clip(error.message, _MAX_MESSAGE_WIRE_BYTES, _wire_size)
    status = status_pb2.Status(code=error.code.value[0], message=message, details=_bounded_details(details))
    return rpc_status.to_status(status)


async def abort_call(context: grpc.aio.ServicerContext[Any, Any], error: DomainError | RetryableError) -> None:
    """End a call with the status of error, for handlers the rpc wrapper does not wrap (streams); always raises."""
    failure = status_from_error(error)
    await context.abort(failure.code, failure.details, failure.trailing_metadata)


# A status travels in trailers: the message twice (grpc-message, percent-encoded, and inside
# grpc-status-details-bin, base64) and the details once. Clients refuse trailers past 8 KiB by default
# (16 KiB at most), and a refusal that cannot arrive reaches them as RESOURCE_EXHAUSTED instead. With
# these bounds the trailers stay under 6 KiB: 1,536 + 4/3 * (1,536 + 1,536 + a few tag bytes).
_MAX_MESSAGE_WIRE_BYTES = 1536
_MAX_DETAILS_BYTES = 1536
_MAX_DETAIL_TEXT_BYTES = 256
_ELLIPSIS = "\u2026"


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


# grpc-message is percent-encoded: these bytes go as they are, every other one as %XX.
_WIRE_SAFE_BYTES = bytes(byte for byte in range(0x20, 0x7F) if byte != ord("%"))


def _wire_size(text: str) -> int:
    """Bytes of text as grpc-message."""
    encoded = text.encode("utf-8", "replace")
    return len(encoded) + 2 * len(encoded.translate(None, _WIRE_SAFE_BYTES))


def _clip(text: str, limit: int, size: Callable[[str], int] = _utf8_size) -> str:
    """text if it fits in limit bytes as measured by size, else its longest prefix that fits with an ellipsis.

    Also valid UTF-8 either way (a lone surrogate becomes "?"), since a status message must be.
    """
    if len(text) <= limit and size(text) <= limit:
        return text.encode("utf-8", "replace").decode("utf-8")
    budget = limit - size(_ELLIPSIS)
    used = 0
    cut = 0
    # Every character is at least one byte, so no more than limit + 1 characters are ever looked at.
    for index, char in enumerate(text):
        used += size(char)
        if used <= budget:
            cut = index + 1
        elif used > limit:
            return text[:cut].encode("utf-8", "replace").decode("utf-8") + _ELLIPSIS
    return text.encode("utf-8", "replace").decode("utf-8")


def _bounded_details(details: list[any_pb2.Any]) -> list[any_pb2.Any]:
    """The details, each text clipped and trailing list elements or details dropped, within _MAX_DETAILS_BYTES."""
    if sum(packed.ByteSize() for packed in details) <= _MAX_DETAILS_BYTES:
        return details
    bounded: list[any_pb2.Any] = []
    room = _MAX_DETAILS_BYTES
    for packed in details:
        detail = _unpacked(packed)
        if detail is None:
            continue  # a type this process cannot read, and too big to pass on unread
        _clip_texts(detail)
        # The Any wrapper costs its type_url and a few tag and length bytes around the value.
        _drop_trailing_elements(detail, room - len(packed.type_url) - 16)
        repacked = any_pb2.Any()
        repacked.Pack(detail, deterministic=True)
        if repacked.ByteSize() + 4 > room:
            break
        bounded.append(repacked)
        room -= repacked.ByteSize() + 4
    return bounded


def _unpacked(packed: any_pb2.Any) -> Message | None:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(packed.TypeName())
        message_class = message_factory.GetMessageClass(descriptor)
    except KeyError:
        return None
    detail: Message = message_class()
    return detail if packed.Unpack(detail) else None


def _clip_texts(detail: Message) -> None:
    """Clip every string of a detail message, nested messages and map keys and values included."""
    for descriptor, value in detail.ListFields():
        if descriptor.type == FieldDescriptor.TYPE_STRING:
            if descriptor.is_repeated:
                value[:] = [_clip(text, _MAX_DETAIL_TEXT_BYTES) for text in value]
            else:
                setattr(detail, descriptor.name, _clip(value, _MAX_DETAIL_TEXT_BYTES))
        elif _is_map(descriptor):
            entry_type = descriptor.message_type
            assert entry_type is not None  # a map field's type is its entry message
            if entry_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for entry in value.values():
                    _clip_texts(entry)
                continue
            entries = list(value.items())
            value.clear()
            for key, entry in entries:
                clipped_key = _clip(key, _MAX_DETAIL_TEXT_BYTES) if isinstance(key, str) else key
                value[clipped_key] = _clip(entry, _MAX_DETAIL_TEXT_BYTES) if isinstance(entry, str) else entry
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            for nested in value if descriptor.is_repeated else [value]:
                _clip_texts(nested)


def _drop_trailing_elements(detail: Message, budget: int) -> None:
    """Keep of each list in detail (BadRequest's violations, say) the leading elements that fit in budget."""
    if detail.ByteSize() <= budget:
        return
    lists = [(field_, value) for field_, value in detail.ListFields() if field_.is_repeated]
    rest = type(detail)()
    rest.CopyFrom(detail)
    for field_, _ in lists:
        rest.ClearField(field_.name)
    used = rest.ByteSize()
    for field_, value in lists:
        if _is_map(field_):
            if not all(isinstance(entry, str | int | float | bool) for entry in value.values()):
                continue  # a map of messages is kept whole, or the detail dropped whole below
            # In key order: a map has none of its own, and a replay must keep the same entries.
            entries = sorted(value.items())
            value.clear()
            for key, entry in entries:
                cost = _element_size(key) + _element_size(entry) + 10
                if used + cost > budget:
                    break
                used += cost
                value[key] = entry
            continue
        kept = 0
        for element in value:
            cost = _element_size(element) + 6
            if used + cost > budget:
                break
            used += cost
            kept += 1
        del value[kept:]


def _element_size(element: object) -> int:
    """About what element costs in a detail, tags and length prefixes aside; checked again after packing."""
    if isinstance(element, Message):
        return element.ByteSize()
    return _utf8_size(element) if isinstance(element, str) else 10


def _is_map(field_: FieldDescriptor) -> bool:
    return field_.message_type is not None and field_.message_type.GetOptions().map_entry


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
