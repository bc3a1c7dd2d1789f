"""The one invariant audit: ended sagas checked against each service's own records with the chaos harness's checks."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from devstack.chaos import (
    OrderRecord,
    ServiceStubs,
    StockLevels,
    apply_saga,
    check_order,
    check_stock,
    read_service_records,
    wait_delivered,
)
from sagasuite.common.v1.common_pb2 import LineItem
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["AuditResult", "audit_orders", "describe", "stock_levels"]

T = TypeVar("T")
_ACCEPTED_ENDS = (pb.SAGA_STATUS_COMPLETED, pb.SAGA_STATUS_COMPENSATED)


@dataclass
class AuditResult:
    """What the audit found: one line per wrong order (with its saga's history) and per stock problem."""

    orders: list[str] = field(default_factory=list)
    stock: list[str] = field(default_factory=list)


def describe(saga: pb.Saga) -> str:
    """A saga and its history, one event per line, for failure messages."""
    lines = [f"saga {saga.saga_id} order {saga.business_key} {pb.SagaStatus.Name(saga.status)} {saga.last_error}"]
    lines += [f"  {e.seq:3} {e.type} {e.step} #{e.attempt} {e.code} {e.message}" for e in saga.history]
    return "\n".join(lines)


async def stock_levels(stub: inventory_grpc.InventoryServiceAsyncStub, skus: Iterable[str]) -> StockLevels:
    """Available and reserved units of each SKU, as the inventory service reports them."""
    response = await stub.GetStock(inventory.GetStockRequest(skus=list(skus)), timeout=5)
    return {level.sku: (level.available, level.reserved) for level in response.levels}


async def _bounded(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = 32) -> list[T]:
    """Run the calls concurrently, at most limit at a time, keeping their order."""
    slots = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


async def audit_orders(
    stubs: ServiceStubs,
    sagas: Mapping[str, pb.Saga],
    stock_before: StockLevels,
    *,
    lines: Sequence[LineItem],
    amount_minor: int,
    expected: Mapping[str, int] | None = None,
    delivery_limit: float = 60.0,
) -> AuditResult:
    """Check every ended saga of orders of `lines` for `amount_minor` against each service's own records.

    sagas maps order id to the ended saga (with history); expected maps order id to the status it
    must have ended in. Every order must have ended COMPLETED or COMPENSATED, with one effect per
    service and, once delivered (waited for, up to delivery_limit seconds), one confirmation per
    completed order. Stock: the SKUs' available + reserved is unchanged and the reserved count grew
    by exactly the live reservations (no other order may touch these SKUs meanwhile).
    """
    items: Counter[str] = Counter()
    for line in lines:
        items[line.sku] += line.quantity

    async def record_of(order_id: str) -> OrderRecord:
        record = OrderRecord(order_id, "ok", dict(items), amount_minor)
        apply_saga(record, sagas[order_id])
        await read_service_records(stubs, record)
        return record

    order_ids = list(sagas)
    await wait_delivered(stubs.notify, order_ids, delivery_limit)
    records = await _bounded([lambda o=order_id: record_of(o) for order_id in order_ids])  # type: ignore[misc]
    result = AuditResult()
    for record in records:
        saga = sagas[record.order_id]
        problems = check_order(record)
        wanted = (expected or {}).get(record.order_id)
        if saga.status not in _ACCEPTED_ENDS:
            problems.insert(0, f"ended {pb.SagaStatus.Name(saga.status)}")
        elif wanted is not None and saga.status != wanted:
            problems.insert(0, f"ended {pb.SagaStatus.Name(saga.status)}, expected {pb.SagaStatus.Name(wanted)}")
        if problems:
            result.orders.append(f"order {record.order_id}: " + "; ".join(problems) + "\n" + describe(saga))
    if not result.orders:
        stock_after = await stock_levels(stubs.inventory, items)
        result.stock = check_stock(stock_before, stock_after, records)
    return result
