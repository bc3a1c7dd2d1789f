"""DBOS as a peer: the order saga as a DBOS workflow of four steps (and three compensations), run inside the bench.

DBOS is a library, not a server: workflows run in the process that starts them and checkpoint
every step to its system database (a SQLite file here, or PostgreSQL with `--db`). So its engine
CPU is counted in the "bench client" row. Needs the bench extra: `pip install '.[bench]'`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from bench.targets import CHANNEL_OPTIONS, PeerUnavailable, SagaTiming, bench_order
from orchestrator.sagas.order import REASON
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.notify.v1 import notify_service_pb2 as notify
from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as shipping_grpc
from svckit.idempotency_key import IDEMPOTENCY_HEADER

__all__ = ["DbosPeer", "DbosTarget"]

_REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
}
_stubs: dict[str, Any] = {}


class Refused(Exception):
    """A business refusal: not retried, the saga compensates."""


def _retryable(error: BaseException) -> bool:
    return not isinstance(error, Refused)


def _register() -> Any:
    """Define the workflow and its steps with DBOS (once per process); returns the workflow."""
    from dbos import DBOS

    async def keyed(service: str, method: str, request: Any, step: str, direction: str = "action") -> Any:
        key = f"{DBOS.workflow_id}/{step}/{direction}"
        try:
            return await getattr(_stubs[service], method)(request, timeout=2.0, metadata=((IDEMPOTENCY_HEADER, key),))
        except grpc.aio.AioRpcError as error:
            if error.code() in _REFUSED:
                raise Refused(f"{error.code().name}: {error.details()}") from None
            raise

    def order(order_id: str) -> Any:
        return bench_order(order_id)

    retry = {"retries_allowed": True, "interval_seconds": 0.05, "max_attempts": 5, "should_retry": _retryable}
    undo_retry = {"retries_allowed": True, "interval_seconds": 0.05, "max_attempts": 20}

    @DBOS.step(name="reserve_stock", **retry)  # type: ignore[arg-type]
    async def reserve_stock(order_id: str) -> None:
        o = order(order_id)
        request = inventory.ReserveStockRequest(order_id=order_id, items=o.items)
        await keyed("inventory", "ReserveStock", request, "reserve_stock")

    @DBOS.step(name="release_stock", **undo_retry)  # type: ignore[arg-type]
    async def release_stock(order_id: str) -> None:
        request = inventory.ReleaseStockRequest(order_id=order_id, reason=REASON)
        await keyed("inventory", "ReleaseStock", request, "reserve_stock", "compensation")

    @DBOS.step(name="charge_payment", **retry)  # type: ignore[arg-type]
    async def charge_payment(order_id: str) -> None:
        o = order(order_id)
        request = payment.ChargeRequest(order_id=order_id, amount=o.amount, payment_token=o.payment_token)
        await keyed("payment", "Charge", request, "charge_payment")

    @DBOS.step(name="refund_payment", **undo_retry)  # type: ignore[arg-type]
    async def refund_payment(order_id: str) -> None:
        request = payment.RefundRequest(order_id=order_id, reason=REASON)
        await keyed("payment", "Refund", request, "charge_payment", "compensation")

    @DBOS.step(name="create_shipment", **retry)  # type: ignore[arg-type]
    async def create_shipment(order_id: str) -> str:
        o = order(order_id)
        request = shipping.CreateShipmentRequest(order_id=order_id, address=o.shipping_address, items=o.items)
        response = await keyed("shipping", "CreateShipment", request, "create_shipment")
        return str(response.shipment.tracking_number)

    @DBOS.step(name="cancel_shipment", **undo_retry)  # type: ignore[arg-type]
    async def cancel_shipment(order_id: str) -> None:
        request = shipping.CancelShipmentRequest(order_id=order_id, reason=REASON)
        await keyed("shipping", "CancelShipment", request, "create_shipment", "compensation")

    @DBOS.step(name="send_confirmation", retries_allowed=True, interval_seconds=0.1, max_attempts=10)
    async def send_confirmation(order_id: str, tracking: str) -> None:
        o = order(order_id)
        summary = notify.OrderSummary(items=o.items, amount=o.amount, tracking_number=tracking)
        request = notify.SendConfirmationRequest(order_id=order_id, recipient=o.customer_email, summary=summary)
        await keyed("notify", "SendConfirmation", request, "send_confirmation")

    @DBOS.workflow(name="order_saga")
    async def order_saga(order_id: str) -> str:
        undo: list[Any] = []
        try:
            undo.append(release_stock)
            await reserve_stock(order_id)
            undo.append(refund_payment)
            await charge_payment(order_id)
            undo.append(cancel_shipment)
            tracking = await create_shipment(order_id)
        except Exception:
            for compensation in reversed(undo):
                await compensation(order_id)
            return "COMPENSATED"
        await send_confirmation(order_id, tracking)
        return "COMPLETED"

    return order_saga


class DbosTarget:
    """DBOS.start_workflow_async (start latency: the workflow is durably recorded), then its result."""

    name = "dbos"
    has_start = True

    def __init__(self, data_dir: Path, database_url: str, addresses: Mapping[str, str], pids: Mapping[str, int]):
        self._data_dir = Path(data_dir)
        self._database_url = database_url
        self._addresses = dict(addresses)
        self._pids = dict(pids)
        self._workflow: Any = None
        self._channels: list[grpc.aio.Channel] = []
        self.notes: list[str] = []

    async def open(self) -> None:
        from importlib.metadata import version

        from dbos import DBOS

        channels = {n: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for n, a in self._addresses.items()}
        self._channels = list(channels.values())
        _stubs.update(
            inventory=inventory_grpc.InventoryServiceStub(channels["inventory"]),
            payment=payment_grpc.PaymentServiceStub(channels["payment"]),
            shipping=shipping_grpc.ShippingServiceStub(channels["shipping"]),
            notify=notify_grpc.NotifyServiceStub(channels["notify"]),
        )
        self._data_dir.mkdir(parents=True, exist_ok=True)
        url = self._database_url.replace("+psycopg", "") or f"sqlite:///{self._data_dir / 'dbos.sqlite'}"
        self._workflow = _register()
        DBOS(
            config={
                "name": "order-saga-bench",
                "system_database_url": url,
                "log_level": "WARNING",
            }
        )
        DBOS.launch()
        where = "PostgreSQL" if url.startswith("postgresql") else "a SQLite file"
        self.notes.append(f"DBOS {version('dbos')}: in the bench process (its CPU is the bench client's), on {where}")

    async def close(self) -> None:
        from dbos import DBOS

        DBOS.destroy(destroy_registry=True)
        for channel in self._channels:
            await channel.close(None)
        _stubs.clear()

    def processes(self) -> dict[str, int]:
        return dict(self._pids)

    async def calibrate(self, order_id: str) -> None:
        await self.run_one(f"dbos-{order_id}", time.perf_counter())

    async def run_one(self, order_id: str, due: float) -> SagaTiming:
        from dbos import DBOS, SetWorkflowID

        with SetWorkflowID(order_id):
            handle = await DBOS.start_workflow_async(self._workflow, order_id)
        accepted = time.perf_counter()
        outcome = await handle.get_result()
        return SagaTiming(due, accepted, time.perf_counter(), str(outcome))


class DbosPeer:
    """DBOS's target group: its engine runs in the bench process, launched by the target's open() and destroyed by
    its close(), so its background threads run only during its own phases."""

    name = "dbos"

    def __init__(self, data_dir: Path, database_url: str) -> None:
        self._data_dir = Path(data_dir)
        self._database_url = database_url
        self._addresses: dict[str, str] = {}
        self._pids: dict[str, int] = {}
        self._target: DbosTarget | None = None
        self.notes: list[str] = []

    def prepare(self) -> None:
        try:
            import dbos  # noqa: F401
        except ImportError:
            raise PeerUnavailable("dbos: dbos is not installed: pip install '.[bench]'") from None

    def bind(self, service_addresses: Mapping[str, str], service_pids: Mapping[str, int]) -> None:
        self._addresses = dict(service_addresses)
        self._pids = dict(service_pids)

    def start(self) -> list[DbosTarget]:
        self._target = DbosTarget(self._data_dir, self._database_url, self._addresses, self._pids)
        return [self._target]

    def stop(self) -> None:
        if self._target is not None:
            self.notes.extend(self._target.notes)
        self._target = None
