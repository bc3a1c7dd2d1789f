"""Helpers for orchestrator crash tests: place orders through restarts, wait for sagas, audit the services' records."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import pytest

from devstack import orders
from devstack.audit import Order, StockLevels, audit_orders, describe
from devstack.audit import stock_levels as audit_stock_levels
from devstack.clients import TRANSIENT, Clients, gather_bounded, open_channel, retrying
from sagasuite.common.v1.common_pb2 import LineItem
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

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

LINES = (LineItem(sku="BOOK-001", quantity=1), LineItem(sku="TEE-007", quantity=2))
SKUS = tuple(sorted({line.sku for line in LINES}))
AMOUNT_MINOR = 4250


def order_request(order_id: str, token: str = "tok_visa") -> pb.PlaceOrderRequest:
    return orders.order_request(
        order_id, items=[(line.sku, line.quantity) for line in LINES], minor_units=AMOUNT_MINOR, token=token
    )


async def place_order(
    stub: pb_grpc.OrchestratorServiceAsyncStub, request: pb.PlaceOrderRequest, limit: float = 30.0
) -> str:
    """PlaceOrder, retried while the orchestrator is down: the order id dedups, so a retry finds the same saga."""
    response = await retrying(lambda: stub.PlaceOrder(request, timeout=5), limit)
    return str(response.saga_id)


async def _get_saga(stub: pb_grpc.OrchestratorServiceAsyncStub, saga_id: str) -> pb.Saga | None:
    try:
        return (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=5)).saga
    except grpc.aio.AioRpcError as error:
        if error.code() in TRANSIENT:
            return None
        raise


async def _moving(stub: pb_grpc.OrchestratorServiceAsyncStub) -> set[str] | None:
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
        if error.code() in TRANSIENT:
            return None
        raise


async def wait_ended(
    stub: pb_grpc.OrchestratorServiceAsyncStub, saga_ids: Sequence[str], limit: float = 30.0
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
            found = await gather_bounded([lambda s=saga_id: _get_saga(stub, s) for saga_id in saga_ids])  # type: ignore[misc]
            if all(saga is not None and saga.status in _STOPPED for saga in found):
                return {saga.saga_id: saga for saga in found if saga is not None}
        if loop.time() > deadline:
            stuck = sorted(moving & wanted) if moving is not None else sorted(wanted)
            shown = [await _get_saga(stub, saga_id) for saga_id in stuck[:3]]
            details = "\n".join(describe(s) if s else "(orchestrator unreachable)" for s in shown)
            pytest.fail(f"{len(stuck)} of {len(saga_ids)} sagas did not end within {limit:.0f}s, e.g.:\n{details}")
        await asyncio.sleep(0.2)


async def stock_levels(stub: inventory_grpc.InventoryServiceAsyncStub) -> StockLevels:
    return await audit_stock_levels(stub, SKUS)


async def audit(
    clients: Clients,
    sagas: Mapping[str, pb.Saga],
    stock_before: StockLevels,
    expected: Mapping[str, int] | None = None,
    delivery_limit: float = 60.0,
) -> None:
    """Assert devstack's invariant audit finds nothing wrong with these orders (order id -> ended saga)
    of LINES for AMOUNT_MINOR, which alone touched SKUS meanwhile; none may need attention."""
    found = await audit_orders(
        clients,
        [Order("ok", order_request(order_id)) for order_id in sagas],
        {order_id: saga.saga_id for order_id, saga in sagas.items()},
        stock_before,
        expected=expected,
        attention_allowed=False,
        delivery_limit=delivery_limit,
    )
    wrong = [f"order {o}: " + "; ".join(p) + "\n" + describe(sagas[o]) for o, p in found.problems.items()]
    assert not wrong, f"{len(found.problems)} of {len(sagas)} orders are wrong:\n" + "\n".join(wrong[:5])
    assert not found.run, "\n".join(found.run)


def log_lines(path: Path, *fragments: str) -> list[str]:
    """Lines of a process log that contain every fragment."""
    return [line for line in path.read_text(errors="replace").splitlines() if all(f in line for f in fragments)]
