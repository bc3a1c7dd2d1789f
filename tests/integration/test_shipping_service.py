"""The shipping service as a real process: idempotency, one shipment per order, tombstones, deadlines."""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.launcher import ManagedProcess
from sagasuite.common.v1.common_pb2 import Address, LineItem
from sagasuite.shipping.v1 import shipping_service_pb2 as pb
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as pb_grpc
from tests.grpc_helpers import bad_request_fields, call_logged, error_reason, keyed

SERVICE_NAME = "sagasuite.shipping.v1.ShippingService"
TRACKING_NUMBER = re.compile(r"SS[A-Z0-9]{12}")
ADDRESS = Address(
    recipient_name="Ada Lovelace",
    street="12 St James's Square",
    city="London",
    postal_code="SW1Y 4JH",
    country_code="GB",
)
DEFAULT_LINES = (("LAMP-3", 2), ("MUG-1", 1))


def unique(prefix: str) -> str:
    """An order id or key no other test uses: the process is shared by the whole module."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_request(
    order_id: str, *lines: tuple[str, int], address: Address | None = ADDRESS
) -> pb.CreateShipmentRequest:
    request = pb.CreateShipmentRequest(
        order_id=order_id, items=[LineItem(sku=s, quantity=q) for s, q in (lines or DEFAULT_LINES)]
    )
    if address is not None:
        request.address.CopyFrom(address)
    return request


def with_address(**fields: str) -> Callable[[str], pb.CreateShipmentRequest]:
    """A request builder whose address differs from ADDRESS in the given fields."""

    def build(order_id: str) -> pb.CreateShipmentRequest:
        address = Address()
        address.CopyFrom(ADDRESS)
        for name, value in fields.items():
            setattr(address, name, value)
        return create_request(order_id, address=address)

    return build


@pytest.fixture(scope="module")
def shipping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """One process for the tests that leave it running; each of them uses its own order ids and keys."""
    base: Path = tmp_path_factory.mktemp("shipping")
    env = {"PORT": "0", "HOST": "127.0.0.1", "DATA_DIR": str(base / "data"), "LOG_LEVEL": "INFO"}
    process = ManagedProcess("shipping_svc", "shipping_svc", env, base / "logs").start()
    yield process
    process.stop(timeout=5)


@pytest.fixture
async def stub(shipping):  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(shipping.address) as channel:
        yield pb_grpc.ShippingServiceStub(channel)


async def assert_no_shipment(stub: pb_grpc.ShippingServiceAsyncStub, order_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(missing.value) == "SHIPMENT_NOT_FOUND"


async def test_health_and_reflection(shipping) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(shipping.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert SERVICE_NAME in names
        assert "grpc.health.v1.Health" in names


async def test_create_then_replay_returns_the_same_shipment_and_tracking_number(stub) -> None:  # type: ignore[no-untyped-def]
    order_id, key = unique("order"), unique("k")
    request = create_request(order_id)
    first = await stub.CreateShipment(request, metadata=keyed(key))
    again = await stub.CreateShipment(request, metadata=keyed(key))
    assert first == again
    shipment = first.shipment
    assert shipment.status == pb.SHIPMENT_STATUS_CREATED
    assert TRACKING_NUMBER.fullmatch(shipment.tracking_number), shipment.tracking_number
    assert shipment.shipment_id and shipment.order_id == order_id
    assert shipment.address == ADDRESS
    assert [(i.sku, i.quantity) for i in shipment.items] == list(DEFAULT_LINES)
    stored = await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert stored.shipment == shipment


async def test_twenty_concurrent_identical_calls_make_one_shipment(stub) -> None:  # type: ignore[no-untyped-def]
    order_id, key = unique("burst"), unique("burst")
    request = create_request(order_id)
    responses = await asyncio.gather(*(stub.CreateShipment(request, metadata=keyed(key)) for _ in range(20)))
    assert len({(r.shipment.shipment_id, r.shipment.tracking_number) for r in responses}) == 1
    stored = await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert stored.shipment == responses[0].shipment


async def test_same_key_other_payload_is_refused(stub) -> None:  # type: ignore[no-untyped-def]
    order_id, key = unique("order"), unique("k")
    created = await stub.CreateShipment(create_request(order_id), metadata=keyed(key))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateShipment(create_request(order_id, ("LAMP-3", 9)), metadata=keyed(key))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "IDEMPOTENCY_KEY_REUSED"
    assert "idempotency-key" in (refused.value.details() or "")
    stored = await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert stored.shipment == created.shipment


async def test_missing_key_is_invalid_argument_and_changes_nothing(stub) -> None:  # type: ignore[no-untyped-def]
    order_id = unique("order")
    for call in (
        stub.CreateShipment(create_request(order_id)),
        stub.CancelShipment(pb.CancelShipmentRequest(order_id=order_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(refused.value) == ["idempotency-key"]
        assert "idempotency-key" in (refused.value.details() or "")
    await assert_no_shipment(stub, order_id)


async def test_second_shipment_for_an_order_is_refused(stub) -> None:  # type: ignore[no-untyped-def]
    order_id = unique("order")
    created = await stub.CreateShipment(create_request(order_id), metadata=keyed(unique("k")))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateShipment(create_request(order_id), metadata=keyed(unique("k")))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "ORDER_ALREADY_SHIPPED"
    assert created.shipment.shipment_id in (refused.value.details() or "")
    stored = await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert stored.shipment == created.shipment


async def test_concurrent_creates_with_different_keys_make_one_shipment(stub: pb_grpc.ShippingServiceAsyncStub) -> None:
    order_id = unique("race")

    async def attempt(n: int) -> str | None:
        try:
            response = await stub.CreateShipment(create_request(order_id), metadata=keyed(f"{order_id}/{n}"))
            return response.shipment.shipment_id
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            assert error_reason(error) == "ORDER_ALREADY_SHIPPED"
            return None

    winners = [w for w in await asyncio.gather(*(attempt(n) for n in range(15))) if w]
    assert len(winners) == 1
    stored = await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert stored.shipment.shipment_id == winners[0]


async def test_cancel_after_create_is_idempotent_and_refuses_a_new_shipment(stub) -> None:  # type: ignore[no-untyped-def]
    order_id, cancel_key = unique("order"), unique("x")
    created = await stub.CreateShipment(create_request(order_id), metadata=keyed(unique("k")))
    cancel = pb.CancelShipmentRequest(order_id=order_id, reason="payment failed")
    cancelled = await stub.CancelShipment(cancel, metadata=keyed(cancel_key))
    assert cancelled.was_created
    assert cancelled.shipment.status == pb.SHIPMENT_STATUS_CANCELLED
    assert cancelled.shipment.tracking_number == created.shipment.tracking_number
    assert await stub.CancelShipment(cancel, metadata=keyed(cancel_key)) == cancelled
    again = await stub.CancelShipment(cancel, metadata=keyed(unique("x")))
    assert not again.was_created and again.shipment == cancelled.shipment
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateShipment(create_request(order_id), metadata=keyed(unique("k")))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "ORDER_CANCELLED"


async def test_cancel_before_create_leaves_tombstone_refusing_late_create(stub) -> None:  # type: ignore[no-untyped-def]
    order_id, create_key = unique("order"), unique("k")
    cancelled = await stub.CancelShipment(pb.CancelShipmentRequest(order_id=order_id), metadata=keyed(unique("x")))
    assert not cancelled.was_created
    tombstone = cancelled.shipment
    assert tombstone.status == pb.SHIPMENT_STATUS_TOMBSTONE
    assert not tombstone.HasField("address") and not tombstone.items and not tombstone.tracking_number
    for _ in range(2):  # the refusal is stored with the key: the same call replays it
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateShipment(create_request(order_id), metadata=keyed(create_key))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(refused.value) == "ORDER_CANCELLED"
    stored = await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert stored.shipment == tombstone


async def test_concurrent_cancels_cancel_once(stub) -> None:  # type: ignore[no-untyped-def]
    order_id = unique("order")
    await stub.CreateShipment(create_request(order_id), metadata=keyed(unique("k")))
    responses = await asyncio.gather(
        *(
            stub.CancelShipment(pb.CancelShipmentRequest(order_id=order_id), metadata=keyed(unique("x")))
            for _ in range(10)
        )
    )
    assert sum(r.was_created for r in responses) == 1
    assert {r.shipment.status for r in responses} == {pb.SHIPMENT_STATUS_CANCELLED}


def _many_lines(count: int) -> list[tuple[str, int]]:
    return [(f"S{i}", 1) for i in range(count)]


BAD_CREATES: list[tuple[str, Callable[[str], pb.CreateShipmentRequest], str]] = [
    ("empty-order", lambda o: create_request(""), "order_id"),
    ("long-order", lambda o: create_request("o" * 65), "order_id"),
    ("odd-order", lambda o: create_request("bad id!"), "order_id"),
    ("no-address", lambda o: create_request(o, address=None), "address"),
    ("no-recipient", with_address(recipient_name=""), "address.recipient_name"),
    ("blank-street", with_address(street="   "), "address.street"),
    ("long-city", with_address(city="c" * 201), "address.city"),
    ("no-postcode", with_address(postal_code=""), "address.postal_code"),
    ("no-country", with_address(country_code=""), "address.country_code"),
    ("lower-country", with_address(country_code="gb"), "address.country_code"),
    ("long-country", with_address(country_code="GBR"), "address.country_code"),
    ("no-items", lambda o: pb.CreateShipmentRequest(order_id=o, address=ADDRESS), "items"),
    ("zero-quantity", lambda o: create_request(o, ("LAMP-3", 0)), "items[0].quantity"),
    ("negative-quantity", lambda o: create_request(o, ("LAMP-3", -2)), "items[0].quantity"),
    ("huge-quantity", lambda o: create_request(o, ("LAMP-3", 10_001)), "items[0].quantity"),
    ("empty-sku", lambda o: create_request(o, ("", 1)), "items[0].sku"),
    ("long-sku", lambda o: create_request(o, ("s" * 65, 1)), "items[0].sku"),
    ("repeated-sku", lambda o: create_request(o, ("LAMP-3", 1), ("LAMP-3", 1)), "items[1].sku"),
    ("too-many-items", lambda o: create_request(o, *_many_lines(101)), "items"),
]


@pytest.mark.parametrize(("build", "field"), [c[1:] for c in BAD_CREATES], ids=[c[0] for c in BAD_CREATES])
async def test_bad_create_is_invalid_argument_naming_the_field(stub, build, field) -> None:  # type: ignore[no-untyped-def]
    order_id, key = unique("bad"), unique("bad")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateShipment(build(order_id), metadata=keyed(key))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(refused.value)
    assert field in (refused.value.details() or "")
    await assert_no_shipment(stub, order_id)
    # Nothing was recorded under the key either: it still works for a valid request.
    created = await stub.CreateShipment(create_request(order_id), metadata=keyed(key))
    assert created.shipment.status == pb.SHIPMENT_STATUS_CREATED


BAD_CANCELS: list[tuple[str, Callable[[str], pb.CancelShipmentRequest], str]] = [
    ("empty-order", lambda o: pb.CancelShipmentRequest(order_id=""), "order_id"),
    ("long-order", lambda o: pb.CancelShipmentRequest(order_id="o" * 65), "order_id"),
    ("odd-order", lambda o: pb.CancelShipmentRequest(order_id="bad id!"), "order_id"),
    ("long-reason", lambda o: pb.CancelShipmentRequest(order_id=o, reason="r" * 201), "reason"),
]


@pytest.mark.parametrize(("build", "field"), [c[1:] for c in BAD_CANCELS], ids=[c[0] for c in BAD_CANCELS])
async def test_bad_cancel_is_invalid_argument_naming_the_field(stub, build, field) -> None:  # type: ignore[no-untyped-def]
    order_id, key = unique("bad"), unique("bad")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CancelShipment(build(order_id), metadata=keyed(key))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(refused.value)
    assert field in (refused.value.details() or "")
    await assert_no_shipment(stub, order_id)  # no tombstone was left


@pytest.mark.parametrize("order_id", ["", "o" * 65, "bad id!"], ids=["empty", "long", "odd"])
async def test_bad_get_is_invalid_argument_naming_the_field(stub, order_id) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetShipment(pb.GetShipmentRequest(order_id=order_id))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["order_id"]
    assert "order_id" in (refused.value.details() or "")


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("idempotency-key", "k" * 201),), "at most 200"),
        ((("idempotency-key-bin", "clé".encode()),), "ASCII"),
    ],
    ids=["too-long", "binary"],
)
async def test_bad_idempotency_key_is_refused(stub, metadata, reason) -> None:  # type: ignore[no-untyped-def]
    order_id = unique("order")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateShipment(create_request(order_id), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (refused.value.details() or "")
    await assert_no_shipment(stub, order_id)


async def test_call_past_its_deadline_leaves_no_effect(start_process) -> None:  # type: ignore[no-untyped-def]
    slow = start_process("shipping_svc", FAULTS="CreateShipment:latency_ms=400")
    async with grpc.aio.insecure_channel(slow.address) as channel:
        stub = pb_grpc.ShippingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            await stub.CreateShipment(create_request("order-late"), metadata=keyed("d-1"), timeout=0.2)
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await call_logged(slow, "CreateShipment", "d-1")  # the server has finished (and rolled back) its work
        await assert_no_shipment(stub, "order-late")
        # Nothing was recorded under the key: a retry with time to spare does the work.
        created = await stub.CreateShipment(create_request("order-late"), metadata=keyed("d-1"), timeout=5)
        assert created.shipment.status == pb.SHIPMENT_STATUS_CREATED


async def test_sigterm_drains_in_flight_calls(start_process) -> None:  # type: ignore[no-untyped-def]
    slow = start_process("shipping_svc", FAULTS="CreateShipment:latency_ms=2000")
    async with grpc.aio.insecure_channel(slow.address) as channel:
        stub = pb_grpc.ShippingServiceStub(channel)
        await assert_no_shipment(stub, "order-drain")
        in_flight = asyncio.ensure_future(
            stub.CreateShipment(create_request("order-drain"), metadata=keyed("t-1"), timeout=30)
        )
        # Calls on one connection reach the server in order: once a later one is answered, the slow
        # one (2 s long) is being served.
        await assert_no_shipment(stub, "order-drain-probe")
        slow.popen.send_signal(signal.SIGTERM)
        response = await in_flight
        assert response.shipment.status == pb.SHIPMENT_STATUS_CREATED
    assert await asyncio.to_thread(slow.popen.wait, 30) == 0


async def test_store_on_postgresql_makes_one_shipment_per_order(start_process, postgres_url) -> None:  # type: ignore[no-untyped-def]
    first = start_process("shipping_svc", name="shipping-a", DATABASE_URL=postgres_url)
    second = start_process("shipping_svc", name="shipping-b", DATABASE_URL=postgres_url)
    async with grpc.aio.insecure_channel(first.address) as a, grpc.aio.insecure_channel(second.address) as b:
        stubs = [pb_grpc.ShippingServiceStub(a), pb_grpc.ShippingServiceStub(b)]

        async def attempt(n: int) -> str | None:
            try:
                response = await stubs[n % 2].CreateShipment(create_request("pg-race"), metadata=keyed(f"pg-{n}"))
                return response.shipment.shipment_id
            except grpc.aio.AioRpcError as error:
                assert error_reason(error) == "ORDER_ALREADY_SHIPPED", error.details()
                return None

        winners = [w for w in await asyncio.gather(*(attempt(n) for n in range(10))) if w]
        assert len(winners) == 1
        stored = await stubs[1].GetShipment(pb.GetShipmentRequest(order_id="pg-race"))
        assert stored.shipment.shipment_id == winners[0]

        request = create_request("pg-dup")
        responses = await asyncio.gather(
            *(stubs[n % 2].CreateShipment(request, metadata=keyed("pg-dup")) for n in range(20))
        )
        assert len({(r.shipment.shipment_id, r.shipment.tracking_number) for r in responses}) == 1

        cancels = await asyncio.gather(
            *(
                stubs[n % 2].CancelShipment(pb.CancelShipmentRequest(order_id="pg-dup"), metadata=keyed(f"pg-x{n}"))
                for n in range(10)
            )
        )
        assert sum(r.was_created for r in cancels) == 1

        # A cancel racing a create for a fresh order: whichever wins, the outcome is consistent.
        async def create_or_refusal(order_id: str) -> str:
            try:
                await stubs[0].CreateShipment(create_request(order_id), metadata=keyed(f"{order_id}/create"))
                return "CREATED"
            except grpc.aio.AioRpcError as error:
                return error_reason(error)

        for n in range(5):
            order_id = f"pg-both-{n}"
            created, cancelled = await asyncio.gather(
                create_or_refusal(order_id),
                stubs[1].CancelShipment(pb.CancelShipmentRequest(order_id=order_id), metadata=keyed(f"{order_id}/x")),
            )
            if created == "CREATED":
                assert cancelled.was_created and cancelled.shipment.status == pb.SHIPMENT_STATUS_CANCELLED
            else:
                assert created == "ORDER_CANCELLED"
                assert cancelled.shipment.status == pb.SHIPMENT_STATUS_TOMBSTONE
