"""The floor: the order saga's four calls made directly against the services, with keys and deadlines, no orchestrator.

It is what any orchestrator must add to: the same requests the order saga sends, to the same
service processes, one after the other, each with an idempotency key and a 2 s deadline (the
saga's step timeout), and nothing recorded anywhere but in the services' own databases. Its
channels are opened once and reused, as the orchestrator's are.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from bench.targets import CHANNEL_OPTIONS, COMPLETED, SagaTiming, bench_order
from orchestrator.sagas.order import REASON
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.notify.v1 import notify_service_pb2 as notify
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping
from svckit.idempotency_key import IDEMPOTENCY_HEADER, step_key

__all__ = ["STEP_TIMEOUT", "FloorTarget"]

STEP_TIMEOUT = 2.0


def _method(
    channel: grpc.aio.Channel, path: str, response: type[Message] | None = None
) -> grpc.aio.UnaryUnaryMultiCallable[Message, Any]:
    """A unary call of path; its response decoded as `response`, or left as bytes without one."""
    return channel.unary_unary(
        path,
        request_serializer=lambda message: message.SerializeToString(deterministic=True),
        response_deserializer=response.FromString if response is not None else None,
    )


class FloorTarget:
    """Reserve, charge, ship, confirm: four keyed calls with deadlines; on a refusal the earlier ones are undone."""

    name = "floor (4 calls)"
    has_start = False

    def __init__(self, addresses: Mapping[str, str], pids: Mapping[str, int]) -> None:
        self._addresses = dict(addresses)
        self._pids = dict(pids)
        self._channels: list[grpc.aio.Channel] = []

    async def open(self) -> None:
        channels = {
            name: grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            for name, address in self._addresses.items()
        }
        self._channels = list(channels.values())
        self._reserve = _method(channels["inventory"], "/sagasuite.inventory.v1.InventoryService/ReserveStock")
        self._release = _method(channels["inventory"], "/sagasuite.inventory.v1.InventoryService/ReleaseStock")
        self._charge = _method(channels["payment"], "/sagasuite.payment.v1.PaymentService/Charge")
        self._refund = _method(channels["payment"], "/sagasuite.payment.v1.PaymentService/Refund")
        self._ship = _method(
            channels["shipping"],
            "/sagasuite.shipping.v1.ShippingService/CreateShipment",
            shipping.CreateShipmentResponse,
        )
        self._confirm = _method(channels["notify"], "/sagasuite.notify.v1.NotifyService/SendConfirmation")

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)

    def processes(self) -> dict[str, int]:
        return dict(self._pids)

    async def run_one(self, order_id: str, due: float) -> SagaTiming:
        order = bench_order(order_id)
        saga_id = uuid.uuid4().hex

        def key(step: str, direction: str = "action") -> tuple[tuple[str, str]]:
            return ((IDEMPOTENCY_HEADER, step_key(saga_id, step, direction)),)

        await self._reserve(
            inventory.ReserveStockRequest(order_id=order.order_id, items=order.items),
            timeout=STEP_TIMEOUT,
            metadata=key("reserve_stock"),
        )
        try:
            await self._charge(
                payment.ChargeRequest(order_id=order.order_id, amount=order.amount, payment_token=order.payment_token),
                timeout=STEP_TIMEOUT,
                metadata=key("charge_payment"),
            )
        except grpc.aio.AioRpcError:
            await self._undo(order.order_id, key, charged=False)
            raise
        try:
            shipment = await self._ship(
                shipping.CreateShipmentRequest(
                    order_id=order.order_id, address=order.shipping_address, items=order.items
                ),
                timeout=STEP_TIMEOUT,
                metadata=key("create_shipment"),
            )
        except grpc.aio.AioRpcError:
            await self._undo(order.order_id, key, charged=True)
            raise
        summary = notify.OrderSummary(
            items=order.items, amount=order.amount, tracking_number=shipment.shipment.tracking_number
        )
        await self._confirm(
            notify.SendConfirmationRequest(order_id=order.order_id, recipient=order.customer_email, summary=summary),
            timeout=STEP_TIMEOUT,
            metadata=key("send_confirmation"),
        )
        ended = time.perf_counter()
        return SagaTiming(due, ended, ended, COMPLETED)

    async def _undo(self, order_id: str, key, *, charged: bool) -> None:  # type: ignore[no-untyped-def]
        # Not measured (the bench's orders never fail); here so the floor is a correct saga.
        if charged:
            await self._refund(
                payment.RefundRequest(order_id=order_id, reason=REASON),
                timeout=STEP_TIMEOUT,
                metadata=key("charge_payment", "compensation"),
            )
        await self._release(
            inventory.ReleaseStockRequest(order_id=order_id, reason=REASON),
            timeout=STEP_TIMEOUT,
            metadata=key("reserve_stock", "compensation"),
        )
