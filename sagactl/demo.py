"""The demo: start the local stack, place four orders that show each outcome, print their sagas, stop."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import grpc
from rich.console import Console

from devstack.orders import DEMO_ADDRESS, UNIT_PRICE_MINOR, order_request
from devstack.stack import LocalStack, StackConfig
from sagactl.render import saga_bars, saga_header, saga_timeline, status_name
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

__all__ = ["DEMO_ADDRESS", "demo_order", "demo_orders", "run_demo"]

# The payment service fails the first two charges of any order whose id contains this text.
TRANSIENT_MARK = "transient"
DEMO_FAULTS = {"payment": {"FAULTS": f"Charge:fail_first=2,order_contains={TRANSIENT_MARK}"}}


def demo_order(
    order_id: str, *, token: str = "tok_visa", sku: str = "BOOK-001", quantity: int = 1
) -> pb.PlaceOrderRequest:
    return order_request(
        order_id, items=[(sku, quantity)], minor_units=UNIT_PRICE_MINOR * quantity, currency="EUR", token=token
    )


def demo_orders(run_id: str) -> list[tuple[str, pb.PlaceOrderRequest]]:
    return [
        ("succeeds", demo_order(f"demo-{run_id}-ok")),
        ("declined at payment, compensated", demo_order(f"demo-{run_id}-declined", token="tok_declined")),
        ("transient payment failure, retried", demo_order(f"demo-{run_id}-{TRANSIENT_MARK}")),
        ("out of stock", demo_order(f"demo-{run_id}-oos", sku="RARE-1", quantity=5)),
    ]


async def _follow(stub: pb_grpc.OrchestratorServiceAsyncStub, saga_id: str) -> pb.Saga:
    async for _ in stub.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id), timeout=60):
        pass
    return (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10)).saga


async def _place_and_show(address: str, console: Console) -> list[pb.Saga]:
    run_id = time.strftime("%H%M%S")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        placed = []
        for label, order in demo_orders(run_id):
            response = await stub.PlaceOrder(order, timeout=10)
            console.print(f"placed [bold]{order.order_id}[/] ({label}) → saga {response.saga_id}")
            placed.append((label, response.saga_id))
        sagas = await asyncio.gather(*(_follow(stub, saga_id) for _, saga_id in placed))
    for (label, _), saga in zip(placed, sagas, strict=True):
        console.rule(f"{label}: {status_name(saga.status)}")
        console.print(saga_header(saga))
        console.print(saga_timeline(saga))
        console.print(saga_bars(saga))
    return list(sagas)


def run_demo(data_dir: Path, console: Console | None = None) -> list[pb.Saga]:
    """Run the whole demo in data_dir (wiped first) and return the four finished sagas."""
    console = console or Console()
    shutil.rmtree(data_dir, ignore_errors=True)
    console.print(f"starting the local stack in {data_dir} (SQLite files, static discovery)...")
    with LocalStack(StackConfig(data_dir, service_env=DEMO_FAULTS)) as stack:
        for name, process in stack.processes().items():
            console.print(f"  {name:<13} 127.0.0.1:{process.port}  pid {process.pid}")
        sagas = asyncio.run(_place_and_show(stack.address, console))
        console.print("stopping the stack...")
    console.print(f"done; logs and databases are in {data_dir}")
    return sagas
