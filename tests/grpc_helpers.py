"""Helpers for tests that talk to real servers: metadata, rich error details, and the servers' call log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from devstack.launcher import ManagedProcess

__all__ = ["bad_request_fields", "call_logged", "error_reason", "keyed", "trailers"]


def keyed(key: str) -> tuple[tuple[str, str], ...]:
    return (("idempotency-key", key),)


def trailers(error: grpc.aio.AioRpcError) -> list[tuple[str, str | bytes]]:
    """The trailing metadata of a failed call, as (key, value) pairs."""
    # A grpc.aio.Metadata of pairs at run time; grpc-stubs types it as a tuple of opaque _Metadatum.
    pairs: Iterable[tuple[str, str | bytes]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    return list(pairs)


def _status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in trailers(error):
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:  # type: ignore[attr-defined]  # not in grpc-stubs
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
            reason: str = info.reason  # google.rpc ships no type information
            return reason
    return ""


async def call_logged(process: ManagedProcess, method: str, key: str, *, within: float = 30.0) -> str:
    """Wait until the server has logged the end of a call (its `method=... key=... code=...` line,
    written whatever the outcome, a missed deadline included) and return that line."""
    deadline = time.monotonic() + within
    while True:
        for line in process.log_path.read_text(errors="replace").splitlines():
            if f"method={method} " in line and f"key={key} " in line and " code=" in line:
                return line
        if time.monotonic() > deadline:
            pytest.fail(f"{process.name} logged no end of {method} with key {key} in {within:.0f}s")
        await asyncio.sleep(0.05)
