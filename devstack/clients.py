"""One set of channels to a stack's orchestrator replicas and four services, with the reads the tools make."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from devstack.stack import LocalStack
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.notify.v1 import notify_service_pb2 as notify_pb
from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as shipping_grpc
from svckit.discovery import SUITE_SERVICES

__all__ = [
    "RECONNECT_FAST",
    "TRANSIENT",
    "Clients",
    "gather_bounded",
    "open_channel",
    "retrying",
    "retrying_or_none",
]

T = TypeVar("T")

# Reconnect quickly once a killed process is back on its port (gRPC's default backoff starts at 1 s).
RECONNECT_FAST = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]
# Codes a client sees while the process it calls is down or restarting.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def open_channel(address: str, interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    """A plaintext channel to one process that reconnects fast after a restart."""
    return grpc.aio.insecure_channel(address, options=RECONNECT_FAST, interceptors=list(interceptors) or None)


async def retrying(call: Callable[[], Awaitable[T]], limit: float = 60.0) -> T:
    """A read or an idempotent start, retried while the process it calls is down (up to limit seconds)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in TRANSIENT or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def retrying_or_none(call: Callable[[], Awaitable[T]], limit: float = 60.0) -> T | None:
    """A read retried as by `retrying`; None when what it reads is NOT_FOUND."""
    try:
        return await retrying(call, limit)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def gather_bounded(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = 32) -> list[T]:
    """Run the calls concurrently, at most limit at a time, keeping their order."""
    slots = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


class Clients:
    """Stubs to the orchestrator's replicas and to each service, one channel per address.

    `orchestrator` is the first replica; `next_orchestrator()` takes the replicas in turn, so a read
    retried after one failed goes to the other. The reads below are plain calls (no retry): wrap
    them in `retrying` where the process may be down. Open it in the event loop that uses it.
    """

    def __init__(
        self,
        services: Mapping[str, str],
        orchestrators: Sequence[str],
        *,
        orchestrator_interceptors: Sequence[Any] = (),
        stack: LocalStack | None = None,
    ) -> None:
        if not orchestrators:
            raise ValueError("orchestrators: at least one address is needed")
        self.stack = stack
        self.channels = [open_channel(address, orchestrator_interceptors) for address in orchestrators]
        self.orchestrators = [pb_grpc.OrchestratorServiceStub(channel) for channel in self.channels]
        opened = {name: open_channel(services[name]) for name in SUITE_SERVICES}
        self.channels += opened.values()
        self.inventory: inventory_grpc.InventoryServiceAsyncStub = inventory_grpc.InventoryServiceStub(
            opened["inventory"]
        )
        self.payment: payment_grpc.PaymentServiceAsyncStub = payment_grpc.PaymentServiceStub(opened["payment"])
        self.shipping: shipping_grpc.ShippingServiceAsyncStub = shipping_grpc.ShippingServiceStub(opened["shipping"])
        self.notify: notify_grpc.NotifyServiceAsyncStub = notify_grpc.NotifyServiceStub(opened["notify"])
        self._turn = 0

    @classmethod
    def of(
        cls, stack: LocalStack, *, orchestrators: Sequence[str] = (), orchestrator_interceptors: Sequence[Any] = ()
    ) -> Clients:
        """Clients of a started local stack: its first orchestrator unless `orchestrators` names replicas."""
        services = {name: process.address for name, process in stack.services.items()}
        return cls(
            services,
            orchestrators or [stack.address],
            orchestrator_interceptors=orchestrator_interceptors,
            stack=stack,
        )

    @property
    def orchestrator(self) -> pb_grpc.OrchestratorServiceAsyncStub:
        return self.orchestrators[0]

    def next_orchestrator(self) -> pb_grpc.OrchestratorServiceAsyncStub:
        """The replicas in turn."""
        self._turn += 1
        return self.orchestrators[self._turn % len(self.orchestrators)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the orchestrator ------------------------------------------------------------------------

    async def saga(self, saga_id: str, *, call_timeout: float | None = None) -> pb.Saga:
        """The saga with its history."""
        return (await self.next_orchestrator().GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=call_timeout)).saga

    async def place(self, request: pb.PlaceOrderRequest, *, call_timeout: float | None = None) -> str:
        """PlaceOrder for an order that has no saga yet; the new saga's id."""
        response = await self.next_orchestrator().PlaceOrder(request, timeout=call_timeout)
        if not response.created:
            raise AssertionError(f"order {request.order_id} already had saga {response.saga_id}")
        return str(response.saga_id)

    # -- what each service recorded for an order (NOT_FOUND when it recorded nothing) -------------

    async def reservation(self, order_id: str, *, call_timeout: float | None = None) -> inventory_pb.Reservation:
        request = inventory_pb.GetReservationRequest(order_id=order_id)
        return (await self.inventory.GetReservation(request, timeout=call_timeout)).reservation

    async def stock(self, sku: str, *, call_timeout: float | None = None) -> inventory_pb.StockLevel:
        request = inventory_pb.GetStockRequest(skus=[sku])
        (level,) = (await self.inventory.GetStock(request, timeout=call_timeout)).levels
        return level

    async def payment_of(self, order_id: str, *, call_timeout: float | None = None) -> payment_pb.Payment:
        request = payment_pb.GetPaymentRequest(order_id=order_id)
        return (await self.payment.GetPayment(request, timeout=call_timeout)).payment

    async def ledger(self, order_id: str, *, call_timeout: float | None = None) -> list[payment_pb.LedgerEntry]:
        """Every charge and refund of the order."""
        request = payment_pb.ListPaymentsRequest(order_id=order_id, page_size=500)
        return list((await self.payment.ListPayments(request, timeout=call_timeout)).entries)

    async def shipment(self, order_id: str, *, call_timeout: float | None = None) -> shipping_pb.Shipment:
        request = shipping_pb.GetShipmentRequest(order_id=order_id)
        return (await self.shipping.GetShipment(request, timeout=call_timeout)).shipment

    async def notifications(self, order_id: str, *, call_timeout: float | None = None) -> list[notify_pb.Notification]:
        """Every confirmation recorded for the order, each with its delivery state."""
        request = notify_pb.ListNotificationsRequest(order_id=order_id, page_size=100)
        return list((await self.notify.ListNotifications(request, timeout=call_timeout)).notifications)
