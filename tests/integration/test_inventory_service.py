"""The inventory service as a real process: idempotency, no oversell, tombstones, bad input, deadlines."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sagasuite.common.v1.common_pb2 import LineItem
from sagasuite.inventory.v1 import inventory_service_pb2 as pb
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as pb_grpc
from tests.grpc_helpers import bad_request_fields, call_logged, error_reason, keyed


def reserve_request(order_id: str, *lines: tuple[str, int]) -> pb.ReserveStockRequest:
    return pb.ReserveStockRequest(order_id=order_id, items=[LineItem(sku=s, quantity=q) for s, q in lines])


@pytest.fixture
def inventory(start_process):  # type: ignore[no-untyped-def]
    return start_process("inventory_svc")


@pytest.fixture
async def stub(inventory):  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(inventory.address) as channel:
        yield pb_grpc.InventoryServiceStub(channel)


async def stock_of(stub: pb_grpc.InventoryServiceAsyncStub, sku: str) -> pb.StockLevel:
    response = await stub.GetStock(pb.GetStockRequest(skus=[sku]))
    return response.levels[0]


async def test_health_and_reflection(inventory) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(inventory.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="sagasuite.inventory.v1.InventoryService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "sagasuite.inventory.v1.InventoryService" in names
        assert "grpc.health.v1.Health" in names


async def test_reserve_then_replay_executes_once(stub) -> None:  # type: ignore[no-untyped-def]
    before = await stock_of(stub, "LAMP-3")
    request = reserve_request("order-1", ("LAMP-3", 2))
    first = await stub.ReserveStock(request, metadata=keyed("k-1"))
    again = await stub.ReserveStock(request, metadata=keyed("k-1"))
    assert first == again
    assert first.reservation.status == pb.RESERVATION_STATUS_RESERVED
    after = await stock_of(stub, "LAMP-3")
    assert (after.available, after.reserved) == (before.available - 2, before.reserved + 2)


async def test_twenty_concurrent_identical_calls_make_one_effect(stub) -> None:  # type: ignore[no-untyped-def]
    before = await stock_of(stub, "LAMP-3")
    request = reserve_request("order-burst", ("LAMP-3", 3))
    responses = await asyncio.gather(*(stub.ReserveStock(request, metadata=keyed("burst")) for _ in range(20)))
    assert len({r.reservation.reservation_id for r in responses}) == 1
    after = await stock_of(stub, "LAMP-3")
    assert after.available == before.available - 3


async def test_same_key_other_payload_is_refused(stub) -> None:  # type: ignore[no-untyped-def]
    await stub.ReserveStock(reserve_request("order-2", ("LAMP-3", 1)), metadata=keyed("k-2"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReserveStock(reserve_request("order-2", ("LAMP-3", 5)), metadata=keyed("k-2"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "IDEMPOTENCY_KEY_REUSED"
    assert "idempotency-key" in (refused.value.details() or "")


async def test_missing_key_is_invalid_argument_and_changes_nothing(stub) -> None:  # type: ignore[no-untyped-def]
    before = await stock_of(stub, "LAMP-3")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReserveStock(reserve_request("order-3", ("LAMP-3", 1)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["idempotency-key"]
    assert await stock_of(stub, "LAMP-3") == before


async def test_concurrent_reservations_never_exceed_stock(stub) -> None:  # type: ignore[no-untyped-def]
    async def attempt(n: int) -> bool:
        try:
            await stub.ReserveStock(reserve_request(f"rare-{n}", ("RARE-1", 1)), metadata=keyed(f"rare-{n}"))
            return True
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(error) == "OUT_OF_STOCK"
            return False

    outcomes = await asyncio.gather(*(attempt(n) for n in range(15)))
    assert sum(outcomes) == 1
    level = await stock_of(stub, "RARE-1")
    assert (level.available, level.reserved) == (0, 1)


async def test_reservation_is_all_or_nothing(stub) -> None:  # type: ignore[no-untyped-def]
    before = await stock_of(stub, "LAMP-3")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReserveStock(reserve_request("order-4", ("LAMP-3", 1), ("RARE-1", 2)), metadata=keyed("k-4"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "OUT_OF_STOCK"
    assert await stock_of(stub, "LAMP-3") == before
    # The refusal is stored with the key: the same call replays it.
    with pytest.raises(grpc.aio.AioRpcError) as replayed:
        await stub.ReserveStock(reserve_request("order-4", ("LAMP-3", 1), ("RARE-1", 2)), metadata=keyed("k-4"))
    assert error_reason(replayed.value) == "OUT_OF_STOCK"


async def test_release_returns_stock_and_is_idempotent(stub) -> None:  # type: ignore[no-untyped-def]
    before = await stock_of(stub, "LAMP-3")
    await stub.ReserveStock(reserve_request("order-5", ("LAMP-3", 4)), metadata=keyed("r-5"))
    released = await stub.ReleaseStock(pb.ReleaseStockRequest(order_id="order-5"), metadata=keyed("x-5"))
    assert released.was_reserved and released.reservation.status == pb.RESERVATION_STATUS_RELEASED
    again = await stub.ReleaseStock(pb.ReleaseStockRequest(order_id="order-5"), metadata=keyed("x-5b"))
    assert not again.was_reserved
    assert await stock_of(stub, "LAMP-3") == before


async def test_release_before_reserve_leaves_tombstone_refusing_late_reserve(stub) -> None:  # type: ignore[no-untyped-def]
    released = await stub.ReleaseStock(pb.ReleaseStockRequest(order_id="order-6"), metadata=keyed("x-6"))
    assert not released.was_reserved
    assert released.reservation.status == pb.RESERVATION_STATUS_TOMBSTONE
    before = await stock_of(stub, "LAMP-3")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReserveStock(reserve_request("order-6", ("LAMP-3", 1)), metadata=keyed("r-6"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "ORDER_RELEASED"
    assert await stock_of(stub, "LAMP-3") == before


BAD_RESERVATIONS = [
    (reserve_request("", ("LAMP-3", 1)), "order_id"),
    (reserve_request("o" * 65, ("LAMP-3", 1)), "order_id"),
    (reserve_request("bad id!", ("LAMP-3", 1)), "order_id"),
    (reserve_request("order-b"), "items"),
    (reserve_request("order-b", ("LAMP-3", 0)), "items[0].quantity"),
    (reserve_request("order-b", ("LAMP-3", -2)), "items[0].quantity"),
    (reserve_request("order-b", ("", 1)), "items[0].sku"),
    (reserve_request("order-b", ("LAMP-3", 1), ("LAMP-3", 1)), "items[1].sku"),
    (reserve_request("order-b", *[(f"S{i}", 1) for i in range(101)]), "items"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_RESERVATIONS)
async def test_bad_reservation_is_invalid_argument_naming_the_field(stub, request_, field) -> None:  # type: ignore[no-untyped-def]
    before = await stub.GetStock(pb.GetStockRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReserveStock(request_, metadata=keyed("bad-" + field))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(refused.value)
    assert field in (refused.value.details() or "")
    assert await stub.GetStock(pb.GetStockRequest()) == before
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetReservation(pb.GetReservationRequest(order_id="order-b"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_sku_is_a_recorded_refusal_that_the_same_key_replays(stub) -> None:  # type: ignore[no-untyped-def]
    # Whether a SKU exists is a fact of the store, not of the request: it is refused NOT_FOUND with a
    # reason and recorded under the key, so the same request with the same key gets the same answer.
    before = await stub.GetStock(pb.GetStockRequest())
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReserveStock(reserve_request("order-u", ("NOPE-9", 1)), metadata=keyed("unknown-sku"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(refused.value) == "UNKNOWN_SKU"
    assert await stub.GetStock(pb.GetStockRequest()) == before
    with pytest.raises(grpc.aio.AioRpcError) as listed:
        await stub.GetStock(pb.GetStockRequest(skus=["NOPE-9"]))
    assert listed.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(listed.value) == "UNKNOWN_SKU"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("idempotency-key", "k" * 201),), "at most 200"),
        ((("idempotency-key-bin", "clé".encode()),), "ASCII"),
    ],
)
async def test_bad_idempotency_key_is_refused(stub, metadata, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReserveStock(reserve_request("order-7", ("LAMP-3", 1)), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (refused.value.details() or "")


async def test_call_past_its_deadline_leaves_no_effect(start_process) -> None:  # type: ignore[no-untyped-def]
    slow = start_process("inventory_svc", FAULTS="ReserveStock:latency_ms=400")
    async with grpc.aio.insecure_channel(slow.address) as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        before = await stock_of(stub, "LAMP-3")
        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            await stub.ReserveStock(reserve_request("order-8", ("LAMP-3", 1)), metadata=keyed("d-8"), timeout=0.2)
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await call_logged(slow, "ReserveStock", "d-8")  # the server has finished (and rolled back) its work
        assert await stock_of(stub, "LAMP-3") == before
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetReservation(pb.GetReservationRequest(order_id="order-8"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_sigterm_drains_in_flight_calls(start_process) -> None:  # type: ignore[no-untyped-def]
    slow = start_process("inventory_svc", FAULTS="ReserveStock:latency_ms=2000")
    async with grpc.aio.insecure_channel(slow.address) as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        await stub.GetStock(pb.GetStockRequest())
        in_flight = asyncio.ensure_future(
            stub.ReserveStock(reserve_request("order-9", ("LAMP-3", 1)), metadata=keyed("t-9"), timeout=30)
        )
        # Calls on one connection reach the server in order: once a later one is answered, the slow
        # one (2 s long) is being served.
        await stub.GetStock(pb.GetStockRequest())
        slow.popen.send_signal(signal.SIGTERM)
        response = await in_flight
        assert response.reservation.status == pb.RESERVATION_STATUS_RESERVED
    assert await asyncio.to_thread(slow.popen.wait, 30) == 0


async def test_store_on_postgresql_prevents_oversell_and_double_effects(start_process, postgres_url) -> None:  # type: ignore[no-untyped-def]
    first = start_process("inventory_svc", name="inventory-a", DATABASE_URL=postgres_url)
    second = start_process("inventory_svc", name="inventory-b", DATABASE_URL=postgres_url)
    async with grpc.aio.insecure_channel(first.address) as a, grpc.aio.insecure_channel(second.address) as b:
        stubs = [pb_grpc.InventoryServiceStub(a), pb_grpc.InventoryServiceStub(b)]

        async def attempt(n: int) -> bool:
            try:
                await stubs[n % 2].ReserveStock(reserve_request(f"pg-{n}", ("RARE-1", 1)), metadata=keyed(f"pg-{n}"))
                return True
            except grpc.aio.AioRpcError as error:
                assert error_reason(error) == "OUT_OF_STOCK", error.details()
                return False

        assert sum(await asyncio.gather(*(attempt(n) for n in range(10)))) == 1
        request = reserve_request("pg-dup", ("LAMP-3", 1))
        responses = await asyncio.gather(
            *(stubs[n % 2].ReserveStock(request, metadata=keyed("pg-dup")) for n in range(20))
        )
        assert len({r.reservation.reservation_id for r in responses}) == 1
        level = await stock_of(stubs[0], "LAMP-3")
        assert level.reserved == 1
