"""Request bytes that are not a valid message, unknown fields and huge refusals, against all five real servers."""

from __future__ import annotations

import base64
import contextlib
import re
import sqlite3
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from devstack.launcher import ManagedProcess
from devstack.otlp_receiver import KIND_SERVER, OtlpReceiver, ReceivedSpan
from devstack.stack import LocalStack
from sagasuite.common.v1.common_pb2 import LineItem
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.notify.v1 import notify_service_pb2 as notify_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from tests.grpc_helpers import bad_request_fields, keyed, trailers
from tests.orchestrator_helpers import (
    Clients,
    connect,
    new_order_id,
    order_request,
    refused,
    render,
    start_stack,
    status_name,
    wait_for,
)

CONTRACTS: dict[str, ServiceDescriptor] = {
    "orchestrator": pb.DESCRIPTOR.services_by_name["OrchestratorService"],
    "inventory": inventory_pb.DESCRIPTOR.services_by_name["InventoryService"],
    "payment": payment_pb.DESCRIPTOR.services_by_name["PaymentService"],
    "shipping": shipping_pb.DESCRIPTOR.services_by_name["ShippingService"],
    "notify": notify_pb.DESCRIPTOR.services_by_name["NotifyService"],
}
# Every server also serves these, and a client reaches them the same way.
STANDARD = [
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
PROBLEM_LINE = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b")
CALL_TIMEOUT = 30.0
# gRPC clients refuse trailers past 8 KiB by default.
METADATA_LIMIT = 8 * 1024


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _invalid_utf8(message: Descriptor, depth: int = 0) -> bytes | None:
    """Bytes that set a string field (the first one found, nested if need be) to invalid UTF-8."""
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return _tag(field.number, 2) + b"\x02\xc3\x28"
    for field in message.fields:
        if field.message_type is not None and depth < 3:
            inner = _invalid_utf8(field.message_type, depth + 1)
            if inner is not None:
                return _tag(field.number, 2) + _varint(len(inner)) + inner
    return None


MALFORMED: dict[str, Callable[[Descriptor], bytes | None]] = {
    "not protobuf": lambda _: b"\xff\xff\xff\xff",
    "truncated field": lambda _: b"\x0a\x10abc",
    "truncated varint": lambda _: b"\x08\xff\xff",
    "invalid UTF-8 in a string": _invalid_utf8,
    "groups nested 200 deep": lambda _: b"\x0b" * 200 + b"\x0c" * 200,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = start_stack(tmp_path_factory.mktemp("malformed"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(stack) as connected:
        yield connected


async def _call_raw(channel: grpc.aio.Channel, method: MethodDescriptor, path: str, body: bytes) -> None:
    """One call with body sent as it is (no serializer), reading the answer as raw bytes."""
    if method.client_streaming and method.server_streaming:
        async for _ in channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
            iter([body]), timeout=CALL_TIMEOUT
        ):
            pass
    elif method.client_streaming:
        await channel.stream_unary(path, request_serializer=None, response_deserializer=None)(
            iter([body]), timeout=CALL_TIMEOUT
        )
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
            body, timeout=CALL_TIMEOUT
        ):
            pass
    else:
        await channel.unary_unary(path, request_serializer=None, response_deserializer=None)(body, timeout=CALL_TIMEOUT)


def _log_since(process: ManagedProcess, offset: int) -> str:
    with open(process.log_path, "rb") as log_file:
        log_file.seek(offset)
        return log_file.read().decode(errors="replace")


def _trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    safe = "".join(chr(c) for c in range(0x20, 0x7F) if c != ord("%"))
    total = len(urllib.parse.quote(error.details() or "", safe=safe))
    for key, value in trailers(error):
        total += len(key) + (len(base64.b64encode(value)) if isinstance(value, bytes) else len(value))
    return total


@pytest.mark.parametrize("name", list(CONTRACTS))
async def test_malformed_bytes_are_refused_on_every_method(stack: LocalStack, clients: Clients, name: str) -> None:
    assert set(stack.processes()) == set(CONTRACTS)  # every server of the stack is tried
    process = stack.processes()[name]
    offset = process.log_path.stat().st_size
    answers: dict[str, list[str]] = {}
    async with grpc.aio.insecure_channel(process.address) as channel:
        for service in [CONTRACTS[name], *STANDARD]:
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                for kind, build in MALFORMED.items():
                    body = build(method.input_type)
                    if body is None:
                        continue  # no string field to spoil
                    error = await refused(_call_raw(channel, method, path, body))
                    expected = f"the request is not a valid {method.input_type.full_name}"
                    answer = f"{error.code().name} {error.details()!r}"
                    answers.setdefault(answer, []).append(f"{method.name}: {kind}")
                    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, expected), (
                        f"{path} with {kind}: {answer}"
                    )
                    assert bad_request_fields(error) == ["request"], f"{path} with {kind}"
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
        assert checked.status == health_pb2.HealthCheckResponse.SERVING

    # Still working: a normal order goes through every service and completes.
    saga_id = await clients.place(order_request(new_order_id(f"after-malformed-{name}")))
    saga = await wait_for(clients, saga_id, ["COMPLETED"])
    assert status_name(saga.status) == "COMPLETED", render(saga)

    log = _log_since(process, offset)
    problems = [line for line in log.splitlines() if PROBLEM_LINE.search(line)]
    assert not problems, "\n".join(problems[:20])
    assert "code=INVALID_ARGUMENT" in log and "request is not a valid" in log


def _with_unknown_fields(message: Message, size: int) -> None:
    """Add an unknown length-delimited field (number 1000) of size bytes to message."""
    message.MergeFromString(_tag(1000, 2) + _varint(size) + b"u" * size)


def _unknown_field_count(message: Message) -> int:
    """Unknown fields in message and in every message nested in it."""
    count = len(unknown_fields.UnknownFieldSet(message))
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for nested in value if field.is_repeated else [value]:
                count += _unknown_field_count(nested)
    return count


def _stored_input(stack: LocalStack | None, saga_id: str) -> bytes:
    """The saga's input as the orchestrator stored it, read from its SQLite file."""
    assert stack is not None and stack.orchestrator is not None
    (database,) = Path(stack.orchestrator.env["DATA_DIR"]).glob("*.db")
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        (row,) = connection.execute("SELECT input FROM saga WHERE saga_id = ?", (saga_id,)).fetchall()
    return bytes(row[0])


async def test_unknown_fields_are_neither_stored_nor_forwarded(clients: Clients) -> None:
    order_id = new_order_id("unknown-fields")
    clean = order_request(order_id)
    padded = pb.PlaceOrderRequest()
    padded.CopyFrom(clean)
    _with_unknown_fields(padded, 256 * 1024)
    for item in padded.items:
        _with_unknown_fields(item, 16 * 1024)
    _with_unknown_fields(padded.amount, 1024)
    _with_unknown_fields(padded.shipping_address, 1024)
    assert _unknown_field_count(padded) == 5 and padded.ByteSize() > 256 * 1024

    response = await clients.orchestrator.PlaceOrder(padded, timeout=CALL_TIMEOUT)
    assert response.created

    saga = await wait_for(clients, response.saga_id, ["COMPLETED"])
    # Every request to the services is built from this stored input.
    stored_bytes = _stored_input(clients.stack, response.saga_id)
    stored = pb.PlaceOrderRequest.FromString(stored_bytes)
    assert _unknown_field_count(stored) == 0 and stored == clean, render(saga)
    assert len(stored_bytes) < 2048
    # The same order without the padding is the same order, not a conflicting one.
    again = await clients.orchestrator.PlaceOrder(clean, timeout=CALL_TIMEOUT)
    assert (again.saga_id, again.created) == (response.saga_id, False)


async def test_unknown_fields_inside_a_packed_input_are_not_stored(clients: Clients) -> None:
    order_id = new_order_id("unknown-in-any")
    clean = order_request(order_id)
    padded = pb.PlaceOrderRequest()
    padded.CopyFrom(clean)
    _with_unknown_fields(padded, 64 * 1024)
    _with_unknown_fields(padded.items[0], 1024)
    packed = any_pb2.Any()
    packed.Pack(padded)
    request = pb.StartSagaRequest(saga_type="OrderSaga", business_key=order_id, input=packed)

    response = await clients.orchestrator.StartSaga(request, timeout=CALL_TIMEOUT)

    stored = pb.PlaceOrderRequest.FromString(_stored_input(clients.stack, response.saga_id))
    assert _unknown_field_count(stored) == 0 and stored == clean
    await wait_for(clients, response.saga_id, ["COMPLETED"])


async def test_a_service_keeps_no_unknown_fields_in_what_it_hashes(clients: Clients) -> None:
    order_id = new_order_id("unknown-at-inventory")
    clean = inventory_pb.ReserveStockRequest(order_id=order_id, items=[LineItem(sku="BOOK-001", quantity=1)])
    padded = inventory_pb.ReserveStockRequest()
    padded.CopyFrom(clean)
    _with_unknown_fields(padded, 64 * 1024)
    _with_unknown_fields(padded.items[0], 1024)
    key = keyed(f"{order_id}/reserve/action")

    first = await clients.inventory.ReserveStock(padded, metadata=key, timeout=CALL_TIMEOUT)
    # The recorded request is the clean one: the same key with the clean request replays it.
    replay = await clients.inventory.ReserveStock(clean, metadata=key, timeout=CALL_TIMEOUT)
    assert replay == first
    reservation = await clients.reservation(order_id)
    assert _unknown_field_count(reservation) == 0


async def test_a_refusal_quoting_a_huge_value_still_reaches_the_client(clients: Clients) -> None:
    huge_type_url = "type.googleapis.com/" + "x" * 900_000
    request = pb.StartSagaRequest(
        saga_type="OrderSaga", business_key=new_order_id("huge"), input=any_pb2.Any(type_url=huge_type_url)
    )

    error = await refused(clients.orchestrator.StartSaga(request, timeout=CALL_TIMEOUT))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code().name} {(error.details() or '')[:300]!r}"
    assert "input" in bad_request_fields(error)
    assert _trailer_bytes(error) < METADATA_LIMIT - 2048


async def test_a_service_refusal_quoting_huge_skus_still_reaches_the_client(clients: Clients) -> None:
    sku = "S" * 400_000
    request = inventory_pb.ReserveStockRequest(
        order_id=new_order_id("huge-sku"), items=[LineItem(sku=sku, quantity=1), LineItem(sku=sku, quantity=1)]
    )

    error = await refused(clients.inventory.ReserveStock(request, metadata=keyed("huge-sku"), timeout=CALL_TIMEOUT))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code().name} {(error.details() or '')[:300]!r}"
    assert any(field.startswith("items") for field in bad_request_fields(error))
    assert _trailer_bytes(error) < METADATA_LIMIT - 2048


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


async def test_a_traced_server_refuses_malformed_bytes_inside_its_server_span(
    start_process: Callable[..., ManagedProcess], receiver: OtlpReceiver
) -> None:
    """The tracing interceptor wraps the guard: the refusal is recorded on the call's own span."""
    nowhere = {f"{name.upper()}_ADDR": "127.0.0.1:1" for name in ("inventory", "payment", "shipping", "notify")}
    orchestrator = start_process(
        "orchestrator", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="50", **nowhere
    )
    service = CONTRACTS["orchestrator"]
    paths = [f"/{service.full_name}/{name}" for name in ("PlaceOrder", "WatchSaga")]
    async with grpc.aio.insecure_channel(orchestrator.address) as channel:
        for path in paths:
            method = service.methods_by_name[path.rsplit("/", 1)[1]]
            error = await refused(_call_raw(channel, method, path, b"\xff\xff\xff\xff"))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {error.code().name} {error.details()!r}"
        # A well-formed stream still runs through both wrappers: an unknown saga is NOT_FOUND.
        unknown = pb.WatchSagaRequest(saga_id=uuid.uuid4().hex).SerializeToString()
        watch = await refused(_call_raw(channel, service.methods_by_name["WatchSaga"], paths[1], unknown))
        assert watch.code() == grpc.StatusCode.NOT_FOUND, f"{watch.code().name} {watch.details()!r}"

    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]

    def refused_spans(spans: list[ReceivedSpan]) -> bool:
        return all(
            any(
                s.name == path and s.kind == KIND_SERVER and s.attributes.get("rpc.grpc.status_code") == invalid
                for s in spans
            )
            for path in paths
        )

    receiver.wait_for(refused_spans, timeout=30, what="server spans with INVALID_ARGUMENT")
    log = _log_since(orchestrator, 0)
    assert not [line for line in log.splitlines() if PROBLEM_LINE.search(line)]
