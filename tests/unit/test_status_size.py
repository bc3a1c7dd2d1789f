"""A refusal always fits a client's metadata limit, whatever text its error carries."""

from __future__ import annotations

import base64
import urllib.parse

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from svckit.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    IdempotencyKeyReused,
    InvalidArgument,
    MalformedRequest,
    RetryableError,
    error_from_status,
    status_from_error,
)

# gRPC clients refuse trailers past 8 KiB by default; "well under" leaves room for everything else.
TRAILER_BUDGET = 6 * 1024
HUGE = 1_000_000


def percent_encoded(text: str) -> str:
    """grpc-message as it goes on the wire: printable ASCII but '%' as is, every other byte as %XX."""
    return urllib.parse.quote(text, safe="".join(chr(c) for c in range(0x20, 0x7F) if c != ord("%")))


def trailer_bytes(status: grpc.Status) -> int:
    total = len("grpc-status") + 2 + len("grpc-message") + len(percent_encoded(status.details))
    for key, value in status.trailing_metadata:
        total += len(key) + (len(base64.b64encode(value)) if isinstance(value, bytes) else len(value))
    return total


def rich(status: grpc.Status) -> status_pb2.Status:
    ((_, value),) = status.trailing_metadata
    return status_pb2.Status.FromString(value)


def violations(status: grpc.Status) -> list[error_details_pb2.BadRequest.FieldViolation]:
    (packed,) = rich(status).details
    bad = error_details_pb2.BadRequest()
    assert packed.Unpack(bad)
    return list(bad.field_violations)


class WithForeignDetail(DomainError):
    """A refusal whose handler packed a huge detail of a type no proto here defines."""

    def details(self) -> list[any_pb2.Any]:
        return [any_pb2.Any(type_url="type.googleapis.com/elsewhere.Unknown", value=b"x" * HUGE)]


ERRORS: dict[str, DomainError | RetryableError] = {
    "1 MB value quoted in the reason": InvalidArgument.of("amount.currency_code", f"got {'X' * HUGE!r}"),
    "1 MB field name and newlines": InvalidArgument.of("x" * HUGE, "\n" * HUGE),
    "10,000 violations of 400 KB SKUs": InvalidArgument(
        [FieldViolation(f"items[{i}].sku", "duplicate " + "\u00e9" * 400_000) for i in range(3)]
        + [FieldViolation(f"items[{i}].sku", "is listed twice") for i in range(10_000)]
    ),
    "ErrorInfo with huge metadata": FailedPrecondition(
        "OUT_OF_STOCK", "out of stock " * HUGE, {f"sku_{i}_{'k' * 1000}": "v" * 100_000 for i in range(50)}
    ),
    "ErrorInfo with a huge reason": FailedPrecondition("R" * HUGE, "m" * HUGE),
    "a reused 1 MB key": IdempotencyKeyReused("\u2028" * HUGE),
    "a retryable error": RetryableError("\x00" * HUGE),
    "a lone surrogate": InvalidArgument.of("name\ud800", "bad \udcff" * HUGE),
    "a foreign detail": WithForeignDetail("m" * HUGE),
}


@pytest.mark.parametrize("error", ERRORS.values(), ids=ERRORS.keys())
def test_every_status_fits_the_metadata_limit(error: DomainError | RetryableError) -> None:
    status = status_from_error(error)

    assert trailer_bytes(status) < TRAILER_BUDGET
    assert status.code == error.code
    # The two copies of the message agree, as grpc_status.rpc_status.from_call requires of a client.
    assert rich(status).message == status.details
    assert status.details.endswith("\u2026")
    status.details.encode("utf-8")


@pytest.mark.parametrize(
    "name", ["1 MB value quoted in the reason", "10,000 violations of 400 KB SKUs", "ErrorInfo with huge metadata"]
)
def test_a_replayed_refusal_says_exactly_what_the_first_answer_said(name: str) -> None:
    error = ERRORS[name]
    assert isinstance(error, DomainError)
    first = status_from_error(error)
    # What the idempotency store keeps of a refusal, and how a replay rebuilds it.
    replayed = status_from_error(error_from_status(error.code.value[0], error.message, error.details()))

    assert (replayed.code, replayed.details) == (first.code, first.details)
    assert replayed.trailing_metadata == first.trailing_metadata
    assert trailer_bytes(first) < TRAILER_BUDGET


def test_a_cut_bad_request_keeps_its_leading_violations_each_cut_short() -> None:
    status = status_from_error(ERRORS["10,000 violations of 400 KB SKUs"])

    kept = violations(status)
    assert [v.field for v in kept[:3]] == ["items[0].sku", "items[1].sku", "items[2].sku"]
    assert kept[0].description.startswith("duplicate \u00e9\u00e9") and kept[0].description.endswith("\u2026")
    assert all(len(v.description.encode()) <= 256 for v in kept)
    assert 3 <= len(kept) < 10_003


def test_a_cut_error_info_keeps_its_reason_and_cut_metadata() -> None:
    status = status_from_error(ERRORS["ErrorInfo with huge metadata"])

    (packed,) = rich(status).details
    info = error_details_pb2.ErrorInfo()
    assert packed.Unpack(info)
    assert info.reason == "OUT_OF_STOCK" and info.domain == "sagasuite.dev"
    assert all(value.startswith("vvv") and value.endswith("\u2026") for value in info.metadata.values())


def test_an_ordinary_refusal_is_left_as_it_is() -> None:
    error = InvalidArgument([FieldViolation("order_id", "is required"), FieldViolation("items", "must not be empty")])

    status = status_from_error(error)

    assert status.details == "order_id: is required; items: must not be empty"
    assert [(v.field, v.description) for v in violations(status)] == [
        ("order_id", "is required"),
        ("items", "must not be empty"),
    ]


def test_a_malformed_request_names_its_message() -> None:
    status = status_from_error(MalformedRequest("sagasuite.orchestrator.v1.PlaceOrderRequest"))

    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "the request is not a valid sagasuite.orchestrator.v1.PlaceOrderRequest"
    assert [(v.field, v.description) for v in violations(status)] == [
        ("request", "is not a valid sagasuite.orchestrator.v1.PlaceOrderRequest")
    ]
