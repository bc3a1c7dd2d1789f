"""The chaos harness: run sagas while processes are killed, then check every invariant from the services' own records.

`run_chaos` starts the local stack (or uses a running one), places a mix of orders (accepted,
declined, out of stock, transiently failing, slow past their call deadline, late past their saga
deadline), and meanwhile `kill -9`s and restarts the orchestrator, then each service (and, on
PostgreSQL, the second of two orchestrator replicas). Once the last process is back it waits for
every saga to end and audits each order against the inventory, payment, shipping and notify
services' own records. `saga chaos` is its command line; it exits non-zero on any violation.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from orchestrator.stack import LocalStack, StackConfig
from sagasuite.common.v1.common_pb2 import Address, LineItem, Money
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.notify.v1 import notify_service_pb2 as notify
from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping
from sagasuite.shipping.v1 import shipping_service_pb2_grpc as shipping_grpc
from svckit.launcher import ManagedProcess

__all__ = [
    "DEFAULT_MIX",
    "SERVICE_FAULTS",
    "ChaosConfig",
    "ChaosReport",
    "OrderRecord",
    "check_order",
    "check_stock",
    "run_chaos",
]

T = TypeVar("T")

# Kinds of order and their share of the run. Prefixes of the order ids select the fault rules.
DEFAULT_MIX: dict[str, float] = {
    "ok": 0.50,  # plain order: completes unless a fault outlasts its retries
    "declined": 0.10,  # tok_declined: compensated, never charged
    "outofstock": 0.10,  # more than the SKU holds: compensated, never reserved
    "flaky": 0.15,  # transient errors on reserve, charge and confirm, then success
    "slow": 0.10,  # the first CreateShipment reply comes after the call's 2 s deadline
    "late": 0.05,  # every CreateShipment reply is late and the saga's deadline is 3 s: compensated
}
LATE_DEADLINE_SECONDS = 3
# FAULTS of each service process when the harness starts the stack (order_contains picks the kinds).
SERVICE_FAULTS: dict[str, str] = {
    "inventory": "ReserveStock:fail_first=1,code=ABORTED,order_contains=flaky-",
    "payment": "Charge:fail_first=2,order_contains=flaky-",
    "shipping": (
        "CreateShipment:reply_delay_ms=2600,reply_delay_first=1,order_contains=slow-;"
        "CreateShipment:reply_delay_ms=2600,order_contains=late-"
    ),
    "notify": "SendConfirmation:fail_first=2,order_contains=flaky-",
}
SERVICES = ("inventory", "payment", "shipping", "notify")
OK_LINES = (("BOOK-001", 1), ("TEE-007", 2))
SCARCE_SKU = "RARE-1"
# Codes a client sees while the process it calls is down or restarting.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]
_STATUS = {
    pb.SAGA_STATUS_RUNNING: "RUNNING",
    pb.SAGA_STATUS_COMPENSATING: "COMPENSATING",
    pb.SAGA_STATUS_PAUSED: "PAUSED",
    pb.SAGA_STATUS_COMPLETED: "COMPLETED",
    pb.SAGA_STATUS_COMPENSATED: "COMPENSATED",
    pb.SAGA_STATUS_NEEDS_ATTENTION: "NEEDS_ATTENTION",
    pb.SAGA_STATUS_TERMINATED: "TERMINATED",
}
_RESERVATION = {
    inventory.RESERVATION_STATUS_RESERVED: "RESERVED",
    inventory.RESERVATION_STATUS_RELEASED: "RELEASED",
    inventory.RESERVATION_STATUS_TOMBSTONE: "TOMBSTONE",
}
_SHIPMENT = {
    shipping.SHIPMENT_STATUS_CREATED: "CREATED",
    shipping.SHIPMENT_STATUS_CANCELLED: "CANCELLED",
    shipping.SHIPMENT_STATUS_TOMBSTONE: "TOMBSTONE",
}


@dataclass
class ChaosConfig:
    """What to run and what to break."""

    sagas: int = 300
    orchestrator_kills: int = 5
    service_kills: int = 1
    replica_kills: int = 3
    database_url: str = ""
    concurrency: int = 16
    # Sagas placed per second; 0 spreads the placements over the expected span of the faults.
    rate: float = 0.0
    seed: int = 1
    drain_timeout: float = 180.0
    # Addresses of a running stack ("orchestrator", "inventory", ...): nothing is started or killed.
    external: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    # A killed process stays down for a random time in this range (s) before it is restarted.
    down_seconds: tuple[float, float] = (0.0, 0.6)
    # Pause between two faults (s), random in this range.
    gap_seconds: tuple[float, float] = (0.3, 1.0)
    # Short leases so a surviving replica takes over a killed one's commands quickly.
    lease_seconds: float = 3.0
    log_level: str = "WARNING"


# -- what the services recorded, and the invariants ------------------------------------------


@dataclass
class OrderRecord:
    """One order: what was asked, how its saga ended, and what each service recorded for it."""

    order_id: str
    kind: str
    items: dict[str, int]
    amount: int
    saga_id: str = ""
    status: str = "NOT_PLACED"
    last_error: str = ""
    # (event type, step) -> times recorded, for StepSucceeded and CompensationSucceeded.
    successes: dict[tuple[str, str], int] = field(default_factory=dict)
    reservation: str | None = None
    reserved_items: dict[str, int] = field(default_factory=dict)
    charges: list[int] = field(default_factory=list)
    refunds: list[int] = field(default_factory=list)
    shipment: str | None = None
    notifications: int = 0


def check_order(record: OrderRecord) -> list[str]:
    """Every invariant one order breaks, as sentences (empty when it is sound)."""
    problems: list[str] = []
    status = record.status
    if status == "NEEDS_ATTENTION":
        if not record.last_error:
            problems.append("needs attention without a reason")
    elif status not in ("COMPLETED", "COMPENSATED"):
        problems.append(f"did not end: {status}")
    problems += [f"{kind} recorded {n} times for {step}" for (kind, step), n in record.successes.items() if n > 1]
    # No duplicated effect, whatever the outcome.
    if len(record.charges) > 1:
        problems.append(f"charged {len(record.charges)} times")
    if len(record.refunds) > 1:
        problems.append(f"refunded {len(record.refunds)} times")
    if record.notifications > 1:
        problems.append(f"{record.notifications} confirmations sent")
    net = sum(record.charges) - sum(record.refunds)
    if status == "COMPLETED":
        if record.reservation != "RESERVED":
            problems.append(f"reservation is {record.reservation}, expected RESERVED")
        elif record.reserved_items != record.items:
            problems.append(f"reserved {record.reserved_items}, ordered {record.items}")
        if len(record.charges) != 1 or record.refunds or net != record.amount:
            problems.append(
                f"payments: {len(record.charges)} charges, {len(record.refunds)} refunds, net {net}; "
                f"expected one charge of {record.amount}"
            )
        if record.shipment != "CREATED":
            problems.append(f"shipment is {record.shipment}, expected CREATED")
        if record.notifications != 1:
            problems.append(f"{record.notifications} confirmations, expected 1")
    elif status == "COMPENSATED":
        if record.reservation == "RESERVED":
            problems.append("stock still reserved")
        if net != 0 or len(record.refunds) != len(record.charges):
            problems.append(f"payments: {len(record.charges)} charges, {len(record.refunds)} refunds, net {net} != 0")
        if record.shipment == "CREATED":
            problems.append("shipment still live")
        if record.notifications:
            problems.append(f"{record.notifications} confirmations for a compensated order")
    # The outcome the business rules allow for each kind.
    if record.kind == "declined":
        if status == "COMPLETED":
            problems.append("a declined card completed an order")
        if record.charges:
            problems.append("a declined card was charged")
    if record.kind == "outofstock":
        if status == "COMPLETED" or record.reservation == "RESERVED":
            problems.append("an order for more than the stock was reserved")
    return problems


StockLevels = dict[str, tuple[int, int]]


def check_stock(before: StockLevels, after: StockLevels, records: Iterable[OrderRecord]) -> list[str]:
    """Stock is conserved: per SKU, available + reserved is unchanged and reserved grew by the held reservations."""
    held: Counter[str] = Counter()
    for record in records:
        if record.reservation == "RESERVED":
            held.update(record.reserved_items)
    problems: list[str] = []
    for sku, (available_before, reserved_before) in sorted(before.items()):
        available_after, reserved_after = after.get(sku, (0, 0))
        if available_after + reserved_after != available_before + reserved_before:
            problems.append(
                f"{sku}: available + reserved went from {available_before + reserved_before} "
                f"to {available_after + reserved_after}"
            )
        if reserved_after - reserved_before != held[sku]:
            problems.append(
                f"{sku}: reserved grew by {reserved_after - reserved_before}, "
                f"but the orders hold {held[sku]} in live reservations"
            )
    return problems


# -- the report ------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    """Sagas, faults, outcomes and every invariant violation of one run."""

    database: str
    sagas: int
    placed: int
    kills: dict[str, int]
    outcomes: dict[str, dict[str, int]]
    violations: list[str]
    drain_seconds: float
    elapsed_seconds: float
    # When the last order was placed, relative to the last fault (negative: before it).
    placed_after_last_fault: float = 0.0
    needs_attention: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "sagas": self.sagas,
            "placed": self.placed,
            "kills": self.kills,
            "outcomes": self.outcomes,
            "violations": len(self.violations),
            "violation_details": self.violations[:100],
            "drain_seconds_after_last_fault": round(self.drain_seconds, 2),
            "last_order_placed_seconds_after_last_fault": round(self.placed_after_last_fault, 2),
            "elapsed_seconds": round(self.elapsed_seconds, 2),
            "needs_attention": self.needs_attention[:100],
            "notes": self.notes,
        }

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        summary = Table(title=f"saga chaos ({self.database})", title_justify="left", show_header=False)
        summary.add_column("what")
        summary.add_column("value", justify="right")
        summary.add_row("sagas placed", f"{self.placed} of {self.sagas}")
        summary.add_row("kills (kill -9)", ", ".join(f"{name} {n}" for name, n in self.kills.items()) or "none")
        summary.add_row("invariant violations", str(len(self.violations)))
        summary.add_row("time to drain after the last fault", f"{self.drain_seconds:.1f} s")
        summary.add_row("last order placed after the last fault", f"{self.placed_after_last_fault:.1f} s")
        summary.add_row("elapsed", f"{self.elapsed_seconds:.1f} s")
        statuses = sorted({s for counts in self.outcomes.values() for s in counts})
        outcomes = Table(title="outcomes by kind of order", title_justify="left")
        outcomes.add_column("kind")
        for status in statuses:
            outcomes.add_column(status, justify="right")
        for kind, counts in self.outcomes.items():
            outcomes.add_row(kind, *(str(counts.get(s, 0)) for s in statuses))
        parts: list[Any] = [summary, outcomes]
        if self.violations:
            parts.append("[bold red]violations:[/]")
            parts += [f"  {line}" for line in self.violations[:50]]
        if self.needs_attention:
            parts.append("needs attention (with their reasons):")
            parts += [f"  {line}" for line in self.needs_attention[:20]]
        parts += [f"note: {note}" for note in self.notes]
        return Group(*parts)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class _Order:
    order_id: str
    kind: str
    request: pb.PlaceOrderRequest


def _plan(config: ChaosConfig, scarce_quantity: int, run: str) -> list[_Order]:
    rng = random.Random(config.seed)
    kinds = list(config.mix)
    weights = [config.mix[k] for k in kinds]
    address = Address(
        recipient_name="Ada Lovelace",
        street="12 Analytical Row",
        city="London",
        postal_code="N1 7AA",
        country_code="GB",
    )
    orders = []
    for index in range(config.sagas):
        kind = rng.choices(kinds, weights)[0]
        order_id = f"{kind}-{run}-{index}"
        lines = [(SCARCE_SKU, scarce_quantity)] if kind == "outofstock" else list(OK_LINES)
        request = pb.PlaceOrderRequest(
            order_id=order_id,
            customer_email="chaos@example.com",
            items=[LineItem(sku=sku, quantity=quantity) for sku, quantity in lines],
            amount=Money(currency_code="USD", minor_units=1000 + index),
            payment_token="tok_declined" if kind == "declined" else "tok_visa",
            shipping_address=address,
            deadline_seconds=LATE_DEADLINE_SECONDS if kind == "late" else 0,
        )
        orders.append(_Order(order_id, kind, request))
    return orders


async def _retrying(call: Callable[[], Awaitable[T]], limit: float = 60.0) -> T:
    """A read or an idempotent start, retried while the process it calls is down."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in _TRANSIENT or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def _bounded(calls: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    slots = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


class _Clients:
    def __init__(self, addresses: Mapping[str, str], orchestrators: Sequence[str]) -> None:
        self.channels = [grpc.aio.insecure_channel(a, options=_CHANNEL_OPTIONS) for a in orchestrators]
        self.orchestrators = [pb_grpc.OrchestratorServiceStub(c) for c in self.channels]
        opened = {name: grpc.aio.insecure_channel(addresses[name], options=_CHANNEL_OPTIONS) for name in SERVICES}
        self.channels += list(opened.values())
        self.inventory = inventory_grpc.InventoryServiceStub(opened["inventory"])
        self.payment = payment_grpc.PaymentServiceStub(opened["payment"])
        self.shipping = shipping_grpc.ShippingServiceStub(opened["shipping"])
        self.notify = notify_grpc.NotifyServiceStub(opened["notify"])
        self._next = 0

    def orchestrator(self) -> pb_grpc.OrchestratorServiceStub:
        """Replicas in turn, so a call that failed on one is retried on the other."""
        self._next += 1
        return self.orchestrators[self._next % len(self.orchestrators)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def stock(self, skus: Sequence[str]) -> StockLevels:
        response = await _retrying(lambda: self.inventory.GetStock(inventory.GetStockRequest(skus=skus), timeout=5))
        return {level.sku: (level.available, level.reserved) for level in response.levels}


async def _optional(call: Callable[[], Awaitable[T]]) -> T | None:
    try:
        return await _retrying(call)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _record(clients: _Clients, order: _Order, saga_id: str | None) -> OrderRecord:
    items: Counter[str] = Counter()
    for line in order.request.items:
        items[line.sku] += line.quantity
    record = OrderRecord(order.order_id, order.kind, dict(items), order.request.amount.minor_units)
    oid = order.order_id
    saga_call = clients.orchestrator().GetSaga
    saga, reservation, ledger, shipment, notes = await asyncio.gather(
        _retrying(lambda: saga_call(pb.GetSagaRequest(saga_id=saga_id), timeout=10)) if saga_id else _none(),
        _optional(lambda: clients.inventory.GetReservation(inventory.GetReservationRequest(order_id=oid), timeout=5)),
        _retrying(
            lambda: clients.payment.ListPayments(payment.ListPaymentsRequest(order_id=oid, page_size=100), timeout=5)
        ),
        _optional(lambda: clients.shipping.GetShipment(shipping.GetShipmentRequest(order_id=oid), timeout=5)),
        _retrying(lambda: clients.notify.ListNotifications(notify.ListNotificationsRequest(order_id=oid), timeout=5)),
    )
    if saga is not None:
        record.saga_id = saga.saga.saga_id
        record.status = _STATUS.get(saga.saga.status, str(saga.saga.status))
        record.last_error = saga.saga.last_error
        counted = Counter(
            (e.type, e.step) for e in saga.saga.history if e.type in ("StepSucceeded", "CompensationSucceeded")
        )
        record.successes = dict(counted)
    if reservation is not None:
        record.reservation = _RESERVATION.get(reservation.reservation.status, str(reservation.reservation.status))
        reserved: Counter[str] = Counter()
        for line in reservation.reservation.items:
            reserved[line.sku] += line.quantity
        record.reserved_items = dict(reserved)
    for entry in ledger.entries:
        if entry.kind == payment.LEDGER_ENTRY_KIND_CHARGE:
            record.charges.append(entry.amount.minor_units)
        elif entry.kind == payment.LEDGER_ENTRY_KIND_REFUND:
            record.refunds.append(entry.amount.minor_units)
    if shipment is not None:
        record.shipment = _SHIPMENT.get(shipment.shipment.status, str(shipment.shipment.status))
    record.notifications = len(notes.notifications)
    return record


async def _none() -> None:
    return None


class _Faults:
    """Kills and restarts processes one after another, counting what it did."""

    def __init__(self, config: ChaosConfig, stack: LocalStack | None, replica: ManagedProcess | None, log: Any) -> None:
        self.config = config
        self.stack = stack
        self.replica = replica
        self.log = log
        self.rng = random.Random(config.seed + 1)
        self.kills: Counter[str] = Counter()
        self.last_fault_at = time.monotonic()
        self.plan = self._plan()
        self.done = 0
        self._began = time.monotonic()

    def _plan(self) -> list[tuple[str, ManagedProcess]]:
        if self.stack is None or self.stack.orchestrator is None:
            return []
        plan: list[tuple[str, ManagedProcess]] = []
        replica_kills = self.config.replica_kills if self.replica is not None else 0
        for index in range(max(self.config.orchestrator_kills, replica_kills)):
            if index < self.config.orchestrator_kills:
                plan.append(("orchestrator", self.stack.orchestrator))
            if index < replica_kills:
                assert self.replica is not None
                plan.append(("orchestrator-2", self.replica))
        for _ in range(self.config.service_kills):
            plan += [(name, self.stack.services[name]) for name in SERVICES]
        return plan

    def remaining_seconds(self) -> float:
        """How long the faults still to come should take, from how long the ones so far took."""
        if self.done:
            per_fault = (time.monotonic() - self._began) / self.done
        else:
            per_fault = sum(self.config.down_seconds) / 2 + sum(self.config.gap_seconds) / 2 + 1.5
        return (len(self.plan) - self.done) * per_fault

    async def run(self) -> None:
        self._began = time.monotonic()
        for name, process in self.plan:
            await asyncio.sleep(self.rng.uniform(*self.config.gap_seconds))
            down = self.rng.uniform(*self.config.down_seconds)
            if name == "orchestrator-2" and self.kills[name] % 2 == 1:
                # Every second time, long enough for the other replica to take over its expired leases.
                down = self.config.lease_seconds + 0.5
            pid = process.pid
            process.kill()
            self.kills[name] += 1
            await asyncio.sleep(down)
            started = time.monotonic()
            await asyncio.to_thread(process.restart, 60.0)
            self.last_fault_at = time.monotonic()
            self.log(
                f"kill -9 {name} (pid {pid}), down {down:.2f} s, back as pid {process.pid} "
                f"in {self.last_fault_at - started:.2f} s"
            )
            self.done += 1


async def _chaos(
    config: ChaosConfig,
    addresses: Mapping[str, str],
    orchestrators: Sequence[str],
    faults: _Faults,
    log: Any,
) -> ChaosReport:
    clients = _Clients(addresses, orchestrators)
    try:
        scarce = await clients.stock([SCARCE_SKU])
        if SCARCE_SKU in scarce:
            scarce_quantity = min(10_000, sum(scarce[SCARCE_SKU]) + 1)
        else:
            scarce_quantity = 1
        run = uuid.uuid4().hex[:6]
        orders = _plan(config, scarce_quantity, run)
        skus = sorted({line.sku for order in orders for line in order.request.items})
        stock_before = await clients.stock(skus)
        pace = f"{config.rate:g}/s" if config.rate else "a pace spread over the faults"
        log(f"placing {len(orders)} orders at {pace} while {len(faults.plan)} processes are killed in turn")
        saga_ids: dict[str, str] = {}
        failures: list[str] = []
        slots = asyncio.Semaphore(config.concurrency)

        async def place(order: _Order) -> None:
            async with slots:
                try:
                    response = await _retrying(lambda: clients.orchestrator().PlaceOrder(order.request, timeout=5))
                except grpc.aio.AioRpcError as error:
                    failures.append(f"order {order.order_id}: PlaceOrder failed: {error.code().name} {error.details()}")
                    return
                saga_ids[order.order_id] = response.saga_id

        async def placing() -> None:
            tasks = []
            begin = time.monotonic()
            for index, order in enumerate(orders):
                tasks.append(asyncio.create_task(place(order)))
                if config.rate:
                    delay = begin + (index + 1) / config.rate - time.monotonic()
                else:
                    # Spread the orders over the faults still to come, so every fault hits sagas
                    # in flight; once the last process is back, the rest go at once.
                    left = len(orders) - index - 1
                    delay = faults.remaining_seconds() / left if left else 0.0
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*tasks)
            placed.append(time.monotonic())

        started = time.monotonic()
        placed: list[float] = []
        created_after = time.time() - 1
        await asyncio.gather(placing(), faults.run())
        placed_at = placed[0]
        log(f"placed {len(saga_ids)} orders, the last {placed_at - faults.last_fault_at:+.1f} s after the last fault")
        drained_at = await _wait_drained(clients, created_after, config.drain_timeout, log)
        drain = (drained_at or time.monotonic()) - faults.last_fault_at
        log(f"{'drained' if drained_at else 'NOT drained'} {drain:.1f} s after the last fault; auditing")
        records = await _bounded([lambda o=o: _record(clients, o, saga_ids.get(o.order_id)) for o in orders], 32)  # type: ignore[misc]
        stock_after = await clients.stock(skus)
    finally:
        await clients.close()
    violations = list(failures)
    for record in records:
        violations += [f"order {record.order_id} ({record.kind}, {record.status}): {p}" for p in check_order(record)]
    violations += [f"stock: {problem}" for problem in check_stock(stock_before, stock_after, records)]
    if drained_at is None:
        violations.append(f"sagas still in flight {config.drain_timeout:.0f} s after the last fault")
    outcomes: dict[str, dict[str, int]] = {}
    for record in records:
        outcomes.setdefault(record.kind, Counter())[record.status] += 1  # type: ignore[index]
    attention = [f"order {r.order_id}: {r.last_error}" for r in records if r.status == "NEEDS_ATTENTION"]
    return ChaosReport(
        database="postgresql" if config.database_url.startswith("postgresql") else "sqlite",
        sagas=config.sagas,
        placed=len(saga_ids),
        kills=dict(faults.kills),
        outcomes={kind: dict(counts) for kind, counts in sorted(outcomes.items())},
        violations=violations,
        drain_seconds=max(0.0, drain),
        elapsed_seconds=time.monotonic() - started,
        placed_after_last_fault=placed_at - faults.last_fault_at,
        needs_attention=attention,
    )


async def _wait_drained(clients: _Clients, created_after: float, limit: float, log: Any) -> float | None:
    """Poll until no saga created since the run began is in flight; the monotonic time then, or None."""
    from google.protobuf.timestamp_pb2 import Timestamp

    since = Timestamp()
    since.FromNanoseconds(int(created_after * 1e9))
    request = pb.ListSagasRequest(
        statuses=[pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_COMPENSATING, pb.SAGA_STATUS_PAUSED],
        created_after=since,
        page_size=1,
    )
    deadline = time.monotonic() + limit
    found = pb.ListSagasResponse()
    while time.monotonic() < deadline:
        found = await _retrying(lambda: clients.orchestrator().ListSagas(request, timeout=10))
        if not found.sagas:
            return time.monotonic()
        await asyncio.sleep(0.1)
    log("sagas still in flight, e.g. " + (found.sagas[0].saga_id if found.sagas else "?"))
    return None


def run_chaos(config: ChaosConfig, log: Callable[[str], Any] = print) -> ChaosReport:
    """Start the stack (unless config.external), run the sagas under faults, audit, stop; returns the report."""
    with ExitStack() as scope:
        replica: ManagedProcess | None = None
        stack: LocalStack | None = None
        if config.external:
            addresses = dict(config.external)
            orchestrators = [addresses["orchestrator"]]
        else:
            data_dir = config.data_dir or Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="saga-chaos-")))
            stack = LocalStack(
                StackConfig(
                    data_dir,
                    orchestrator_database_url=config.database_url,
                    service_env={name: {"FAULTS": spec} for name, spec in SERVICE_FAULTS.items()},
                    orchestrator_env={"LEASE_SECONDS": str(config.lease_seconds)},
                    common_env={"LOG_LEVEL": config.log_level},
                )
            )
            scope.callback(stack.stop)
            stack.start()
            orchestrators = [stack.address]
            if config.database_url.startswith("postgresql") and config.replica_kills > 0:
                replica = stack.add_orchestrator("orchestrator-2")
                scope.callback(replica.stop)
                orchestrators.append(replica.address)
            addresses = {name: process.address for name, process in stack.services.items()}
        faults = _Faults(config, stack, replica, log)
        report = asyncio.run(_chaos(config, addresses, orchestrators, faults, log))
    if config.external:
        report.notes.append(
            "external stack: no process was killed; kinds flaky/slow/late need the harness's FAULTS "
            "(orchestrator.chaos.SERVICE_FAULTS) on the services, and stock conservation assumes no other traffic"
        )
    return report
