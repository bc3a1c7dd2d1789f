"""Helpers for tests that drive a real orchestrator stack: requests, stubs, bounded polling and history views."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from devstack.launcher import ManagedProcess
from devstack.orders import order_request
from devstack.stack import LocalStack, StackConfig
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

__all__ = [
    "DEFINITIONS_MODULE",
    "OPERATOR_TOKEN",
    "BearerAuth",
    "Clients",
    "connect",
    "definitions_env",
    "events",
    "fresh_postgres_database",
    "frozen",
    "ledger_kinds",
    "new_order_id",
    "order_request",
    "refused",
    "render",
    "start_stack",
    "status_name",
    "wait_for",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS_MODULE = "tests.integration.saga_definitions_for_tests"
# Operator calls need a bearer token (orchestrator/auth.py): every test stack accepts this one, as "operator".
OPERATOR_TOKEN = "operator-token-for-tests-0123456789"
WAIT_SECONDS = 30.0


def new_order_id(prefix: str) -> str:
    """A fresh order id; the prefix lets a FAULTS rule (order_contains=...) pick the order out."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextmanager
def fresh_postgres_database(admin_url: str) -> Iterator[str]:
    """An empty PostgreSQL database for a whole test module, dropped afterwards."""
    import sqlalchemy

    name = f"sagasuite_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def definitions_env(*attributes: str) -> dict[str, str]:
    """Orchestrator environment that loads the named definitions of DEFINITIONS_MODULE besides its own."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": python_path, "SAGA_DEFINITIONS": ",".join(f"{DEFINITIONS_MODULE}:{a}" for a in attributes)}


def start_stack(
    data_dir: Path,
    *,
    faults: dict[str, str] | None = None,
    orchestrator_env: dict[str, str] | None = None,
    database_url: str = "",
) -> LocalStack:
    """A started local stack; faults maps a service name to its FAULTS spec; SQLite unless database_url."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    config = StackConfig(
        data_dir,
        orchestrator_database_url=database_url,
        service_env={name: {"FAULTS": spec} for name, spec in (faults or {}).items()},
        # PYTHONPATH lets the orchestrator import test definitions named in SAGA_DEFINITIONS.
        orchestrator_env={
            "PYTHONPATH": python_path,
            "OPERATOR_TOKENS": f"operator:{OPERATOR_TOKEN}",
            **(orchestrator_env or {}),
        },
    )
    return LocalStack(config).start()


@contextmanager
def frozen(process: ManagedProcess) -> Iterator[None]:
    """SIGSTOP a process for the block, SIGCONT after: a saga whose step calls it cannot move past
    that step until the block ends (the calls time out and are retried for about 20 s), however busy
    the machine is."""
    assert process.popen is not None and process.is_running(), f"{process.name} is not running"
    process.popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.popen.send_signal(signal.SIGCONT)


@dataclass
class Clients:
    """Stubs for the orchestrator and for each service's own read API (their ledgers)."""

    stack: LocalStack
    orchestrator: pb_grpc.OrchestratorServiceAsyncStub
    inventory: inventory_grpc.InventoryServiceAsyncStub
    payment: payment_grpc.PaymentServiceAsyncStub
    shipping: shipping_grpc.ShippingServiceAsyncStub
    notify: notify_grpc.NotifyServiceAsyncStub

    async def saga(self, saga_id: str) -> pb.Saga:
        return (await self.orchestrator.GetSaga(pb.GetSagaRequest(saga_id=saga_id))).saga

    async def place(self, request: pb.PlaceOrderRequest) -> str:
        response = await self.orchestrator.PlaceOrder(request)
        assert response.created
        return response.saga_id

    async def reservation(self, order_id: str) -> inventory_pb.Reservation:
        request = inventory_pb.GetReservationRequest(order_id=order_id)
        return (await self.inventory.GetReservation(request)).reservation

    async def payment_of(self, order_id: str) -> payment_pb.Payment:
        return (await self.payment.GetPayment(payment_pb.GetPaymentRequest(order_id=order_id))).payment

    async def ledger(self, order_id: str) -> list[payment_pb.LedgerEntry]:
        request = payment_pb.ListPaymentsRequest(order_id=order_id, page_size=500)
        return list((await self.payment.ListPayments(request)).entries)

    async def shipment(self, order_id: str) -> shipping_pb.Shipment:
        return (await self.shipping.GetShipment(shipping_pb.GetShipmentRequest(order_id=order_id))).shipment

    async def notifications(self, order_id: str) -> list[notify_pb.Notification]:
        request = notify_pb.ListNotificationsRequest(order_id=order_id, page_size=100)
        return list((await self.notify.ListNotifications(request)).notifications)

    async def stock(self, sku: str) -> inventory_pb.StockLevel:
        (level,) = (await self.inventory.GetStock(inventory_pb.GetStockRequest(skus=[sku]))).levels
        return level


# The bases are generic only in grpc-stubs (subscripting them at run time raises).
class BearerAuth(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds `authorization: Bearer <token>` to every call of the channel it is installed on."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


@asynccontextmanager
async def connect(
    stack: LocalStack, token: str = OPERATOR_TOKEN, interceptors: Sequence[Any] = ()
) -> AsyncIterator[Clients]:
    """One channel per process, opened in the running test's event loop; orchestrator calls carry
    `token` and go through `interceptors` (a tracing client's, say)."""
    orchestrator_interceptors: list[Any] = [*interceptors, *([BearerAuth(token)] if token else [])]
    channels = {
        name: grpc.aio.insecure_channel(
            process.address, interceptors=orchestrator_interceptors if name == "orchestrator" else None
        )
        for name, process in stack.processes().items()
    }
    try:
        yield Clients(
            stack,
            pb_grpc.OrchestratorServiceStub(channels["orchestrator"]),
            inventory_grpc.InventoryServiceStub(channels["inventory"]),
            payment_grpc.PaymentServiceStub(channels["payment"]),
            shipping_grpc.ShippingServiceStub(channels["shipping"]),
            notify_grpc.NotifyServiceStub(channels["notify"]),
        )
    finally:
        for channel in channels.values():
            await channel.close(None)


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def status_name(status: int) -> str:
    return pb.SagaStatus.Name(status).removeprefix("SAGA_STATUS_")


def render(saga: pb.Saga) -> str:
    """The saga and its history, one event a line, for failure messages."""
    lines = [f"saga {saga.saga_id} {saga.saga_type} v{saga.definition_version} {status_name(saga.status)}"]
    lines += [
        f"  {e.seq:3d} {e.type:28s} {e.step:18s} #{e.attempt} {e.code} {e.message} [{e.actor}]" for e in saga.history
    ]
    return "\n".join(lines)


def events(saga: pb.Saga, *types: str) -> list[tuple[str, str, str]]:
    """(type, step, code) of the history events, of the given types when any are named."""
    return [(e.type, e.step, e.code) for e in saga.history if not types or e.type in types]


def ledger_kinds(entries: Iterable[payment_pb.LedgerEntry]) -> list[str]:
    """Ledger entry kinds oldest first, as "CHARGE" / "REFUND"."""
    ordered = sorted(entries, key=lambda entry: entry.entry_id)
    return [payment_pb.LedgerEntryKind.Name(e.kind).removeprefix("LEDGER_ENTRY_KIND_") for e in ordered]


async def wait_for(
    clients: Clients,
    saga_id: str,
    condition: Callable[[pb.Saga], bool] | Iterable[str],
    *,
    within: float = WAIT_SECONDS,
) -> pb.Saga:
    """Poll GetSaga until condition holds (or the status is one of the named ones); fail with the history."""
    if callable(condition):
        check = condition
    else:
        wanted = set(condition)

        def check(saga: pb.Saga) -> bool:
            return status_name(saga.status) in wanted

    deadline = time.monotonic() + within
    while True:
        saga = await clients.saga(saga_id)
        if check(saga):
            return saga
        if time.monotonic() > deadline:
            orchestrator = clients.stack.orchestrator
            log = orchestrator.log_tail(15) if orchestrator else ""
            pytest.fail(f"saga did not reach the expected state in {within:.0f}s:\n{render(saga)}\n{log}")
        await asyncio.sleep(0.05)


async def wait_until(probe: Callable[[], Awaitable[bool]], what: str, *, within: float = WAIT_SECONDS) -> None:
    """Poll probe until it returns True; fail naming what was awaited."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)
