"""Helpers for orchestrator crash tests: place orders through restarts, wait for sagas, audit the services' records."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from devstack.chaos import OrderRecord, apply_saga, check_order, check_stock, read_service_records, wait_delivered
from devstack.stack import LocalStack
from sagactl.demo import DEMO_ADDRESS
from sagasuite.common.v1.common_pb2 import LineItem, Money
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as shipping_grpc

__all__ = [
    "AMOUNT_MINOR",
    "COMPENSATED",
    "COMPLETED",
    "LINES",
    "SKUS",
    "TOKENS",
    "Clients",
    "StockLevels",
    "audit",
    "describe",
    "log_lines",
    "open_channel",
    "order_request",
    "place_order",
    "stock_levels",
    "wait_ended",
]

COMPLETED: int = pb.SAGA_STATUS_COMPLETED
COMPENSATED: int = pb.SAGA_STATUS_COMPENSATED
# Statuses after which a saga makes no progress without an operator: waiting stops there.
_STOPPED = {COMPLETED, COMPENSATED, pb.SAGA_STATUS_TERMINATED, pb.SAGA_STATUS_NEEDS_ATTENTION}
# The payment token that makes an order complete, or fail at the charge and be compensated.
TOKENS = {COMPLETED: "tok_visa", COMPENSATED: "tok_declined"}
_MOVING = [pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_COMPENSATING, pb.SAGA_STATUS_PAUSED]
# Codes a client sees while an orchestrator replica is down or restarting.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}

LINES = (LineItem(sku="BOOK-001", quantity=1), LineItem(sku="TEE-007", quantity=2))
SKUS = tuple(sorted({line.sku for line in LINES}))
AMOUNT_MINOR = 4250
# Reconnect quickly once a killed process is back on its port (gRPC's default backoff starts at 1 s).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]

StockLevels = dict[str, tuple[int, int]]
T = TypeVar("T")


def open_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)


def order_request(order_id: str, token: str = "tok_visa") -> pb.PlaceOrderRequest:
    return pb.PlaceOrderRequest(
        order_id=order_id,
        customer_email="ada@example.com",
        items=LINES,
        amount=Money(currency_code="USD", minor_units=AMOUNT_MINOR),
        payment_token=token,
        shipping_address=DEMO_ADDRESS,
    )


@dataclass
class Clients:
    """Stubs for the orchestrator and the four services of one stack, on channels that reconnect fast."""

    orchestrator: pb_grpc.OrchestratorServiceStub
    inventory: inventory_grpc.InventoryServiceStub
    payment: payment_grpc.PaymentServiceStub
    shipping: shipping_grpc.ShippingServiceStub
    notify: notify_grpc.NotifyServiceStub
    channels: list[grpc.aio.Channel]

    @classmethod
    def of(cls, stack: LocalStack, orchestrator_address: str | None = None) -> Clients:
        addresses = [orchestrator_address or stack.address] + [
            stack.services[name].address for name in ("inventory", "payment", "shipping", "notify")
        ]
        channels = [open_channel(address) for address in addresses]
        return cls(
            pb_grpc.OrchestratorServiceStub(channels[0]),
            inventory_grpc.InventoryServiceStub(channels[1]),
            payment_grpc.PaymentServiceStub(channels[2]),
            shipping_grpc.ShippingServiceStub(channels[3]),
            notify_grpc.NotifyServiceStub(channels[4]),
            channels,
        )

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)


async def _bounded(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = 32) -> list[T]:
    """Run the calls concurrently, at most limit at a time, keeping their order."""
    slots = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


async def place_order(stub: pb_grpc.OrchestratorServiceStub, request: pb.PlaceOrderRequest, limit: float = 30.0) -> str:
    """PlaceOrder, retried while the orchestrator is down: the order id dedups, so a retry finds the same saga."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            response = await stub.PlaceOrder(request, timeout=5)
            return str(response.saga_id)
        except grpc.aio.AioRpcError as error:
            if error.code() not in _TRANSIENT or loop.time() > deadline:
                raise
        await asyncio.sleep(0.05)


def describe(saga: pb.Saga) -> str:
    """A saga and its history, one event per line, for failure messages."""
    lines = [f"saga {saga.saga_id} order {saga.business_key} {pb.SagaStatus.Name(saga.status)} {saga.last_error}"]
    lines += [f"  {e.seq:3} {e.type} {e.step} #{e.attempt} {e.code} {e.message}" for e in saga.history]
    return "\n".join(lines)


async def _get_saga(stub: pb_grpc.OrchestratorServiceStub, saga_id: str) -> pb.Saga | None:
    try:
        return (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=5)).saga
    except grpc.aio.AioRpcError as error:
        if error.code() in _TRANSIENT:
            return None
        raise


async def _moving(stub: pb_grpc.OrchestratorServiceStub) -> set[str] | None:
    """Ids of every saga still running, compensating or paused (one cheap listing); None while unreachable."""
    moving: set[str] = set()
    token = ""
    try:
        while True:
            page = await stub.ListSagas(
                pb.ListSagasRequest(statuses=_MOVING, page_size=500, page_token=token), timeout=5
            )
            moving.update(saga.saga_id for saga in page.sagas)
            token = page.next_page_token
            if not token:
                return moving
    except grpc.aio.AioRpcError as error:
        if error.code() in _TRANSIENT:
            return None
        raise


async def wait_ended(
    stub: pb_grpc.OrchestratorServiceStub, saga_ids: Sequence[str], limit: float = 30.0
) -> dict[str, pb.Saga]:
    """Wait until every saga has stopped (ended or needs attention) and return them with their histories.

    Polls ListSagas rather than each saga, so waiting costs the orchestrator little; fails with the
    histories of some stuck sagas after limit seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    wanted = set(saga_ids)
    while True:
        moving = await _moving(stub)
        if moving is not None and not moving & wanted:
            found = await _bounded([lambda s=saga_id: _get_saga(stub, s) for saga_id in saga_ids])  # type: ignore[misc]
            if all(saga is not None and saga.status in _STOPPED for saga in found):
                return {saga.saga_id: saga for saga in found if saga is not None}
        if loop.time() > deadline:
            stuck = sorted(moving & wanted) if moving is not None else sorted(wanted)
            shown = [await _get_saga(stub, saga_id) for saga_id in stuck[:3]]
            details = "\n".join(describe(s) if s else "(orchestrator unreachable)" for s in shown)
            pytest.fail(f"{len(stuck)} of {len(saga_ids)} sagas did not end within {limit:.0f}s, e.g.:\n{details}")
        await asyncio.sleep(0.2)


async def stock_levels(stub: inventory_grpc.InventoryServiceStub) -> StockLevels:
    response = await stub.GetStock(inventory.GetStockRequest(skus=SKUS), timeout=5)
    return {level.sku: (level.available, level.reserved) for level in response.levels}


async def _record(clients: Clients, order_id: str, saga: pb.Saga) -> OrderRecord:
    """The order as the chaos harness audits it: its saga and every service's records of it."""
    items: Counter[str] = Counter()
    for line in LINES:
        items[line.sku] += line.quantity
    record = OrderRecord(order_id, "ok", dict(items), AMOUNT_MINOR)
    apply_saga(record, saga)
    await read_service_records(clients, record)
    return record


async def audit(
    clients: Clients,
    sagas: Mapping[str, pb.Saga],
    stock_before: StockLevels,
    expected: Mapping[str, int] | None = None,
    delivery_limit: float = 60.0,
) -> None:
    """Check every ended saga against each service's own records, with the chaos harness's invariants.

    sagas maps order id to the ended saga (with history); expected maps order id to the status it
    must have ended in. Every order must have ended COMPLETED or COMPENSATED, with one effect per
    service and, once delivered (waited for, up to delivery_limit seconds), one confirmation per
    completed order. Stock: the SKUs' available + reserved is unchanged and the reserved count grew
    by exactly the live reservations (no other order may touch these SKUs meanwhile).
    """
    order_ids = list(sagas)
    await wait_delivered(clients.notify, order_ids, delivery_limit)
    records = await _bounded([lambda o=order_id: _record(clients, o, sagas[o]) for order_id in order_ids])  # type: ignore[misc]
    failures: list[str] = []
    for record in records:
        saga = sagas[record.order_id]
        problems = check_order(record)
        wanted = (expected or {}).get(record.order_id)
        if saga.status not in (COMPLETED, COMPENSATED):
            problems.insert(0, f"ended {pb.SagaStatus.Name(saga.status)}")
        elif wanted is not None and saga.status != wanted:
            problems.insert(0, f"ended {pb.SagaStatus.Name(saga.status)}, expected {pb.SagaStatus.Name(wanted)}")
        if problems:
            failures.append(f"order {record.order_id}: " + "; ".join(problems) + "\n" + describe(saga))
    assert not failures, f"{len(failures)} of {len(sagas)} orders are wrong:\n" + "\n".join(failures[:5])
    stock_after = await stock_levels(clients.inventory)
    problems = check_stock(stock_before, stock_after, records)
    assert not problems, "stock is not conserved:\n" + "\n".join(problems)


def log_lines(path: Path, *fragments: str) -> list[str]:
    """Lines of a process log that contain every fragment."""
    return [line for line in path.read_text(errors="replace").splitlines() if all(f in line for f in fragments)]
