"""The demo: start the local stack, place orders that show each outcome (two decided with `saga approve` and
`saga reject`), print their sagas and the order's child saga, stop."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console

from devstack.orders import DEMO_ADDRESS, UNIT_PRICE_MINOR, order_request
from devstack.stack import LocalStack, StackConfig
from sagactl.render import (
    saga_bars,
    saga_children,
    saga_header,
    saga_steps,
    saga_timeline,
    saga_waits,
    status_name,
)
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

__all__ = ["DEMO_ADDRESS", "REVIEW_THRESHOLD", "DemoOrder", "demo_order", "demo_orders", "run_demo"]

# The payment service fails the first two charges of any order whose id contains this text.
TRANSIENT_MARK = "transient"
DEMO_FAULTS = {"payment": {"FAULTS": f"Charge:fail_first=2,order_contains={TRANSIENT_MARK}"}}
# The demo shows OrderSaga v2 at the orchestrator's default review threshold (in minor units), whatever
# the environment it runs in says.
REVIEW_THRESHOLD = 100_000
DEMO_ORCHESTRATOR_ENV = {"ORDER_SAGA_VERSION": "2", "REVIEW_THRESHOLD": str(REVIEW_THRESHOLD)}
# The fewest books (29.99 EUR each) whose order reaches the threshold: 34, 1,019.66 EUR.
REVIEWED_QUANTITY = -(-REVIEW_THRESHOLD // UNIT_PRICE_MINOR)  # rounded up
# The name the demo's operator token stands for: the history records it as the decider.
OPERATOR = "demo"
# How long the demo waits for a saga to reach its review, or to end.
WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class DemoOrder:
    """One demo order: what it shows, and the decision the demo makes on its fraud review, if any."""

    label: str
    request: pb.PlaceOrderRequest
    # The status the saga ends in.
    outcome: str
    # "approve" or "reject" with the reason given, for an order that waits for its review.
    decision: tuple[str, str] | None = None


def demo_order(
    order_id: str, *, token: str = "tok_visa", sku: str = "BOOK-001", quantity: int = 1
) -> pb.PlaceOrderRequest:
    return order_request(
        order_id, items=[(sku, quantity)], minor_units=UNIT_PRICE_MINOR * quantity, currency="EUR", token=token
    )


def demo_orders(run_id: str) -> list[DemoOrder]:
    reviewed = f"{REVIEWED_QUANTITY * UNIT_PRICE_MINOR / 100:,.2f} EUR"
    declined = demo_order(f"demo-{run_id}-declined", token="tok_declined")
    return [
        DemoOrder("succeeds", demo_order(f"demo-{run_id}-ok"), "COMPLETED"),
        DemoOrder("declined at payment, compensated", declined, "COMPENSATED"),
        DemoOrder("transient payment failure, retried", demo_order(f"demo-{run_id}-{TRANSIENT_MARK}"), "COMPLETED"),
        DemoOrder("out of stock", demo_order(f"demo-{run_id}-oos", sku="RARE-1", quantity=5), "COMPENSATED"),
        DemoOrder(
            f"{reviewed}: fraud review, approved",
            demo_order(f"demo-{run_id}-approved", quantity=REVIEWED_QUANTITY),
            "COMPLETED",
            ("approve", "verified by phone"),
        ),
        DemoOrder(
            f"{reviewed}: fraud review, rejected",
            demo_order(f"demo-{run_id}-rejected", quantity=REVIEWED_QUANTITY),
            "COMPENSATED",
            ("reject", "card reported stolen"),
        ),
    ]


class _Demo:
    """The demo's calls to a running stack, and what it prints of them."""

    def __init__(self, address: str, token: str, console: Console) -> None:
        self.address = address
        self.token = token
        self.console = console
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.OrchestratorServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def get(self, saga_id: str) -> pb.Saga:
        return self.stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10).saga

    def follow(self, saga_id: str, until_review: bool = False) -> pb.Saga:
        """The saga once it has ended (or needs attention), or once its fraud review waits: no polling."""
        stream = self.stub.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id), timeout=WAIT_SECONDS)
        try:
            for response in stream:
                if until_review and response.event.type == "WaitStarted" and response.event.step == "fraud_review":
                    break
        except grpc.RpcError as error:
            # Not there in time: the saga is shown as it stands, and the demo fails on its status.
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel() unannotated
        return self.get(saga_id)

    def run_cli(self, *args: str) -> bool:
        """Run `saga ARGS` as a user would, with the demo's operator token; print the command and its output."""
        self.console.print(f"$ saga {shlex.join(args)}", style="bold", soft_wrap=True, markup=False)
        env = {
            **os.environ,
            "SAGA_ADDRESS": self.address,
            "SAGA_TOKEN": self.token,
            "COLUMNS": str(self.console.width),
        }
        env.pop("SAGA_CA_FILE", None)
        done = subprocess.run(
            [sys.executable, "-m", "sagactl.main", *args], env=env, capture_output=True, text=True, check=False
        )
        self.console.print((done.stdout + done.stderr).rstrip(), soft_wrap=True, markup=False, highlight=False)
        return done.returncode == 0

    def decide(self, saga: pb.Saga, decision: tuple[str, str]) -> None:
        self.console.print(saga_waits(saga))
        command, reason = decision
        self.run_cli(command, saga.saga_id, "--reason", reason)

    def show(self, label: str, saga: pb.Saga) -> None:
        self.console.rule(f"{label}: {status_name(saga.status)}")
        self.console.print(saga_header(saga))
        self.console.print(saga_steps(saga))
        self.console.print(saga_timeline(saga))
        self.console.print(saga_bars(saga))
        for link in saga.children:
            child = self.get(link.saga_id)
            self.console.print()
            self.console.print(f"child saga, started by step {link.step}:", style="bold")
            self.console.print(saga_children(saga))
            self.console.print(saga_header(child))
            self.console.print(saga_timeline(child))


def _place_and_show(address: str, token: str, console: Console) -> list[tuple[DemoOrder, pb.Saga]]:
    run_id = time.strftime("%H%M%S")
    demo = _Demo(address, token, console)
    try:
        orders = demo_orders(run_id)
        placed = []
        for order in orders:
            response = demo.stub.PlaceOrder(order.request, timeout=10)
            console.print(f"placed [bold]{order.request.order_id}[/] → saga {response.saga_id}")
            console.print(f"  {order.label}", style="dim")
            placed.append(response.saga_id)
        for order, saga_id in zip(orders, placed, strict=True):
            if order.decision is None:
                continue
            console.rule(f"{order.request.order_id} waits for its fraud review")
            saga = demo.follow(saga_id, until_review=True)
            if saga.waits:
                demo.decide(saga, order.decision)
            else:
                console.print(f"saga {saga_id} is {status_name(saga.status)}: it waits for no review", style="red")
        ended = [(order, demo.follow(saga_id)) for order, saga_id in zip(orders, placed, strict=True)]
        for order, saga in ended:
            demo.show(order.label, saga)
    finally:
        demo.close()
    return ended


def run_demo(data_dir: Path, console: Console | None = None) -> list[tuple[DemoOrder, pb.Saga]]:
    """Run the whole demo in data_dir (wiped first); returns each order with its saga as it ended."""
    console = console or Console()
    shutil.rmtree(data_dir, ignore_errors=True)
    console.print(f"starting the local stack in {data_dir} (SQLite files, static discovery, OrderSaga v2)...")
    # A token of this run only: the approvals need an operator's, and the stack stops at the end.
    token = secrets.token_urlsafe(24)
    orchestrator_env = {**DEMO_ORCHESTRATOR_ENV, "OPERATOR_TOKENS": f"{OPERATOR}:{token}"}
    with LocalStack(StackConfig(data_dir, service_env=DEMO_FAULTS, orchestrator_env=orchestrator_env)) as stack:
        for name, process in stack.processes().items():
            console.print(f"  {name:<13} 127.0.0.1:{process.port}  pid {process.pid}")
        console.print(
            f"orders of {REVIEW_THRESHOLD / 100:,.2f} EUR or more wait for a fraud review; the demo decides "
            f"them with `saga approve` and `saga reject` as operator {OPERATOR!r}"
        )
        ended = _place_and_show(stack.address, token, console)
        console.print("stopping the stack...")
    console.print(f"done; logs and databases are in {data_dir}")
    return ended
