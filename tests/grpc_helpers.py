"""Helpers for tests that talk to real servers: metadata, and reading rich error details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["bad_request_fields", "error_reason", "keyed"]


def keyed(key: str) -> tuple[tuple[str, str], ...]:
    return (("idempotency-key", key),)


def _status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            return status_pb2.Status.FromString(value)
    return None


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The field names of a google.rpc.BadRequest carried by an INVALID_ARGUMENT status."""
    status = _status(error)
    fields: list[str] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason of a refusal, or "" when none is attached."""
    status = _status(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""
