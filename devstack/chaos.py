"""The chaos harness: run sagas while processes die and commits fail, then audit the services' own records.

`run_chaos` starts the local stack (or uses a running one) and places a mix of orders (accepted,
declined, out of stock, transiently failing, slow past their call deadline, late past their saga
deadline, and duplicates: one order started four ways at once). Meanwhile it runs its fault plan:
`kill -9` and restart of the orchestrator and of each service (and, on PostgreSQL, of the second
orchestrator replica and of the second instances of the services that run twice on one database),
a kill of each service right after it committed a call whose reply it still holds, and, on
PostgreSQL, COMMITs whose reply a proxy in front of the services' databases loses. Once the last
fault is over it waits for every saga to end and every confirmation to be delivered, then audits
each order against the inventory, payment, shipping and notify services' own records.
`saga chaos` is its command line; it exits non-zero on any violation. docs/chaos.md describes it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from devstack.faultproxy import CommitFault, PgProxy
from devstack.launcher import ManagedProcess
from devstack.orders import order_request
from devstack.stack import LocalStack, StackConfig
from sagasuite.common.v1.common_pb2 import Address
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
from svckit.discovery import SUITE_SERVICES

# The run (ChaosConfig, run_chaos, ChaosReport), the invariants as pure checks (check_*) and the
# readers of the services' records, which the integration tests' audit uses too.
__all__ = [
    "AFTER_COMMIT_HOLD_MS",
    "DEFAULT_MIX",
    "SERVICE_FAULTS",
    "UNREADABLE_LINE",
    "ChaosConfig",
    "ChaosReport",
    "FaultKind",
    "OrderRecord",
    "ServiceStubs",
    "StartAnswer",
    "StartWay",
    "apply_saga",
    "check_one_saga_per_order",
    "check_order",
    "check_stock",
    "read_file_sink",
    "read_service_records",
    "run_chaos",
    "wait_delivered",
]

T = TypeVar("T")

# Kinds of order and their share of the run. Prefixes of the order ids select the fault rules.
DEFAULT_MIX: dict[str, float] = {
    "ok": 0.42,  # plain order: completes unless a fault outlasts its retries
    "declined": 0.10,  # tok_declined: compensated, never charged
    "outofstock": 0.10,  # more than the SKU holds: compensated, never reserved
    "flaky": 0.15,  # transient errors on reserve, charge and confirm, then success
    "slow": 0.10,  # the first CreateShipment reply comes after the call's 2 s deadline
    "late": 0.05,  # every CreateShipment reply is late and the saga's deadline is 3 s: compensated
    # Started four ways at once (PlaceOrder on each replica, StartSaga under its own key and under
    # another one), then once more with another payload: one saga, one effect per service.
    "duplicate": 0.08,
}
LATE_DEADLINE_SECONDS = 3
SERVICES = SUITE_SERVICES
# The forward call of each service, and its step, whose reply is held back after its commit so
# that the service can be killed in between (kind "commitkill", placed by the fault plan itself).
HELD_CALLS = {
    "inventory": ("ReserveStock", "reserve_stock"),
    "payment": ("Charge", "charge_payment"),
    "shipping": ("CreateShipment", "create_shipment"),
    "notify": ("SendConfirmation", "send_confirmation"),
}
# Long enough to see the commit and kill the service, short enough that the reply (of the first
# call, committed plus held) still comes within the step's 2 s call timeout.
AFTER_COMMIT_HOLD_MS = 1200
# FAULTS of each service process when the harness starts the stack (order_contains picks the kinds),
# before the rule that holds back the reply of a "commitkill" order's call (see SERVICE_FAULTS).
_KIND_FAULTS: dict[str, str] = {
    "inventory": (
        "ReserveStock:fail_first=1,code=ABORTED,order_contains=flaky-;"
        # A duplicate's first reservation fails transiently: were a second saga started for the
        # order, that is what made it compensate the first one's stock away.
        "ReserveStock:fail_first=1,code=UNAVAILABLE,order_contains=duplicate-"
    ),
    "payment": "Charge:fail_first=2,order_contains=flaky-",
    "shipping": (
        "CreateShipment:reply_delay_ms=2600,reply_delay_first=1,order_contains=slow-;"
        "CreateShipment:reply_delay_ms=2600,order_contains=late-"
    ),
    "notify": "SendConfirmation:fail_first=2,order_contains=flaky-",
}
SERVICE_FAULTS: dict[str, str] = {
    name: f"{spec};{HELD_CALLS[name][0]}:reply_delay_ms={AFTER_COMMIT_HOLD_MS},reply_delay_first=1,"
    f"order_contains=commitkill-{name}-"
    for name, spec in _KIND_FAULTS.items()
}
# notify delivers to a file the harness reads back (notify_svc/channels.py: DATA_DIR/notifications.jsonl),
# with short leases so a delivery claimed by a killed instance is taken over within seconds.
NOTIFY_ENV = {
    "NOTIFY_CHANNEL": "file",
    "NOTIFY_DELIVERY_TIMEOUT_SECONDS": "2",
    "NOTIFY_DELIVERY_LEASE_SECONDS": "4",
    "NOTIFY_DELIVERY_POLL_SECONDS": "0.5",
    "NOTIFY_DELIVERY_BACKOFF_INITIAL_SECONDS": "0.2",
    "NOTIFY_DELIVERY_BACKOFF_MAX_SECONDS": "2",
}
FILE_SINK_NAME = "notifications.jsonl"
# Where read_file_sink counts the lines that are not one notification's JSON (no order id looks like it).
UNREADABLE_LINE = "<unreadable line>"
OK_LINES = (("BOOK-001", 1), ("TEE-007", 2))
SCARCE_SKU = "RARE-1"
OTHER_KEY_SUFFIX = "-again"
# Codes a client sees while the process it calls is down or restarting.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# The trailing metadata that carries a status's google.rpc details.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
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
_DELIVERY = {
    notify.DELIVERY_STATE_UNSPECIFIED: "UNSPECIFIED",
    notify.DELIVERY_STATE_PENDING: "PENDING",
    notify.DELIVERY_STATE_DELIVERED: "DELIVERED",
    notify.DELIVERY_STATE_FAILED: "FAILED",
}


@dataclass
class ChaosConfig:
    """What to run and what to break."""

    sagas: int = 300
    orchestrator_kills: int = 5
    service_kills: int = 1
    replica_kills: int = 3
    # Rounds of kills right after a commit: each round kills each of after_commit_services (its
    # first instance) while it holds back the reply of a call it has committed.
    after_commit_kills: int = 1
    after_commit_services: tuple[str, ...] = SERVICES
    # PostgreSQL: these services run as two instances on one database, both given to the
    # orchestrator; instance_kills is how many times each second instance is killed.
    second_instances: tuple[str, ...] = ("inventory", "payment")
    instance_kills: int = 1
    # PostgreSQL: COMMITs of these services whose reply a proxy in front of their databases loses
    # (alternately dropping the reply and cutting the connection while the COMMIT is on its way).
    lost_commits: int = 2
    lost_commit_services: tuple[str, ...] = ("inventory", "payment")
    database_url: str = ""
    concurrency: int = 16
    # Sagas placed per second; 0 spreads the placements over the expected span of the faults.
    rate: float = 0.0
    seed: int = 1
    drain_timeout: float = 180.0
    # How long to wait, once every saga has ended, for every recorded confirmation to be delivered.
    delivery_timeout: float = 60.0
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

    def __post_init__(self) -> None:
        for setting in ("after_commit_services", "second_instances", "lost_commit_services"):
            unknown = sorted(set(getattr(self, setting)) - set(SERVICES))
            if unknown:
                raise ValueError(f"{setting}: unknown service {', '.join(unknown)}; known: {', '.join(SERVICES)}")

    @property
    def postgres(self) -> bool:
        return self.database_url.startswith("postgresql")


# -- what the services recorded, and the invariants ------------------------------------------


class StartWay(enum.Enum):
    """The ways a duplicate order is started; all but the last two must find the one saga."""

    PLACE_ORDER = "PlaceOrder"
    PLACE_ORDER_AGAIN = "PlaceOrder again (the other replica on PostgreSQL)"
    START_SAGA = "StartSaga under the order id"
    START_SAGA_OTHER_KEY = "StartSaga under another business key"
    START_SAGA_OTHER_PAYLOAD = "StartSaga under the order id with another payload"


# Each refused way, and the code and detail (ErrorInfo reason or BadRequest field) its refusal must carry.
REFUSALS: dict[StartWay, tuple[str, str]] = {
    StartWay.START_SAGA_OTHER_KEY: ("INVALID_ARGUMENT", "business_key"),
    StartWay.START_SAGA_OTHER_PAYLOAD: ("FAILED_PRECONDITION", "BUSINESS_KEY_CONFLICT"),
}


@dataclass(frozen=True)
class StartAnswer:
    """What one start of an order answered: the saga it found, or the refusal's code and detail."""

    way: StartWay
    saga_id: str = ""
    code: str = ""
    detail: str = ""


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
    # The delivery state of each recorded notification (DELIVERED, PENDING, FAILED...).
    deliveries: list[str] = field(default_factory=list)
    # Lines for this order in the file the notify service delivers to; None when no sink was read.
    sink_lines: int | None = None
    # Duplicates only: every start's answer, and how many OrderSagas ListSagas finds under the
    # order id and under the other business key.
    starts: list[StartAnswer] = field(default_factory=list)
    sagas_for_key: int | None = None
    sagas_for_other_key: int | None = None


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
    problems += _delivery_problems(record)
    problems += _start_problems(record)
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


def _delivery_problems(record: OrderRecord) -> list[str]:
    """A recorded confirmation is delivered (the outbox's promise), and at most once at the file sink."""
    problems = [
        f"confirmation recorded but its delivery is {state}" for state in record.deliveries if state != "DELIVERED"
    ]
    if record.sink_lines is not None:
        if record.sink_lines > 1:
            problems.append(f"confirmation delivered {record.sink_lines} times at the file sink")
        delivered = record.deliveries.count("DELIVERED")
        if delivered and not record.sink_lines:
            problems.append("confirmation DELIVERED by notify's account but absent from the file sink")
        if record.sink_lines and not record.notifications:
            problems.append("a confirmation at the file sink that notify has no record of")
    return problems


def _start_problems(record: OrderRecord) -> list[str]:
    """Every start of a duplicate found the one saga or was refused as it must be; ListSagas shows one saga."""
    problems: list[str] = []
    for answer in record.starts:
        refusal = REFUSALS.get(answer.way)
        if refusal is None:
            if answer.code:
                problems.append(f"{answer.way.value} failed: {answer.code} {answer.detail}")
            elif answer.saga_id != record.saga_id:
                problems.append(f"{answer.way.value} gave saga {answer.saga_id}, not the order's saga {record.saga_id}")
        elif not answer.code:
            problems.append(f"{answer.way.value} was accepted (saga {answer.saga_id}); it must be refused")
        elif (answer.code, answer.detail) != refusal:
            problems.append(
                f"{answer.way.value} refused with {answer.code} {answer.detail}, expected {refusal[0]} {refusal[1]}"
            )
    if record.sagas_for_key is not None and record.sagas_for_key != 1:
        problems.append(f"{record.sagas_for_key} sagas under the order id, expected 1")
    if record.sagas_for_other_key:
        problems.append(f"ListSagas finds {record.sagas_for_other_key} under the other business key, expected none")
    return problems


def check_one_saga_per_order(
    orders: Collection[str], placed: Collection[str], sagas_by_key: Mapping[str, int]
) -> list[str]:
    """One saga per order: each placed order has exactly one saga, and no saga has a key that no order has.

    orders are the run's order ids, placed those whose start returned a saga; sagas_by_key counts the
    run's OrderSagas (ListSagas by type, since the run began) by business key.
    """
    problems = [f"order {key}: {n} sagas, expected 1" for key, n in sorted(sagas_by_key.items()) if n > 1]
    problems += [
        f"a saga under business key {key!r}, which no order has" for key in sorted(set(sagas_by_key) - set(orders))
    ]
    problems += [
        f"order {key}: placed, but ListSagas finds no saga for it" for key in sorted(set(placed) - set(sagas_by_key))
    ]
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


# -- reading the records ---------------------------------------------------------------------


class ServiceStubs(Protocol):
    """Stubs of the four services, as the harness and the integration tests' audit both hold them."""

    inventory: inventory_grpc.InventoryServiceAsyncStub
    payment: payment_grpc.PaymentServiceAsyncStub
    shipping: shipping_grpc.ShippingServiceAsyncStub
    notify: notify_grpc.NotifyServiceAsyncStub


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


async def _optional(call: Callable[[], Awaitable[T]]) -> T | None:
    try:
        return await _retrying(call)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _bounded(calls: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    slots = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


def apply_saga(record: OrderRecord, saga: pb.Saga) -> None:
    """Fill in how the order's saga ended, from GetSaga (with its history)."""
    record.saga_id = saga.saga_id
    record.status = _STATUS.get(saga.status, str(saga.status))
    record.last_error = saga.last_error
    counted = Counter((e.type, e.step) for e in saga.history if e.type in ("StepSucceeded", "CompensationSucceeded"))
    record.successes = dict(counted)


async def read_service_records(stubs: ServiceStubs, record: OrderRecord) -> None:
    """Fill in what inventory, payment, shipping and notify recorded for the order."""
    oid = record.order_id
    reservation, ledger, shipment, notes = await asyncio.gather(
        _optional(lambda: stubs.inventory.GetReservation(inventory.GetReservationRequest(order_id=oid), timeout=5)),
        _retrying(
            lambda: stubs.payment.ListPayments(payment.ListPaymentsRequest(order_id=oid, page_size=100), timeout=5)
        ),
        _optional(lambda: stubs.shipping.GetShipment(shipping.GetShipmentRequest(order_id=oid), timeout=5)),
        _retrying(
            lambda: stubs.notify.ListNotifications(
                notify.ListNotificationsRequest(order_id=oid, page_size=100), timeout=5
            )
        ),
    )
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
    record.deliveries = [_DELIVERY.get(n.delivery.state, str(n.delivery.state)) for n in notes.notifications]


async def _pending_deliveries(stub: notify_grpc.NotifyServiceAsyncStub) -> set[str]:
    """Order ids of every notification whose delivery is still PENDING."""
    pending: set[str] = set()
    token = ""
    while True:
        request = notify.ListNotificationsRequest(
            delivery_state=notify.DELIVERY_STATE_PENDING, page_size=500, page_token=token
        )
        page = await _retrying(lambda request=request: stub.ListNotifications(request, timeout=10))  # type: ignore[misc]
        pending.update(n.order_id for n in page.notifications)
        token = page.next_page_token
        if not token:
            return pending


async def wait_delivered(
    stub: notify_grpc.NotifyServiceAsyncStub, order_ids: Iterable[str], limit: float
) -> float | None:
    """Wait until no notification of these orders is PENDING; the seconds it took, or None after limit."""
    wanted = set(order_ids)
    began = time.monotonic()
    while True:
        if not await _pending_deliveries(stub) & wanted:
            return time.monotonic() - began
        if time.monotonic() - began > limit:
            return None
        await asyncio.sleep(0.2)


def read_file_sink(path: Path) -> Counter[str]:
    """Lines per order id in the JSON-lines file notify's file channel appends to (torn lines under UNREADABLE_LINE)."""
    lines: Counter[str] = Counter()
    try:
        with open(path, encoding="utf-8", errors="replace") as sink:
            for line in sink:
                try:
                    lines[str(json.loads(line)["order_id"])] += 1
                except (ValueError, KeyError, TypeError):
                    lines[UNREADABLE_LINE] += 1
    except FileNotFoundError:
        pass
    return lines


# -- the report ------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    """Sagas, faults, outcomes and every invariant violation of one run."""

    database: str
    sagas: int
    placed: int
    # kill -9 by process name, whatever the fault that killed it.
    kills: dict[str, int]
    outcomes: dict[str, dict[str, int]]
    violations: list[str]
    drain_seconds: float
    elapsed_seconds: float
    # Kills right after a commit, by service, and how many of them hit while the reply was held.
    after_commit_kills: dict[str, int] = field(default_factory=dict)
    after_commit_kills_while_held: int = 0
    # COMMITs whose reply was lost (PostgreSQL), by the way it was lost.
    lost_commits: dict[str, int] = field(default_factory=dict)
    # Orders started four ways at once.
    duplicates: int = 0
    # Services that ran as two instances on one database.
    two_instances: list[str] = field(default_factory=list)
    # Seconds from the end of the last saga until every confirmation was delivered.
    delivery_seconds: float = 0.0
    # PostgreSQL's deadlock counter of each service's database (pg_stat_database), once the stack stopped.
    deadlocks: dict[str, int] = field(default_factory=dict)
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
            "after_commit_kills": self.after_commit_kills,
            "after_commit_kills_while_held": self.after_commit_kills_while_held,
            "lost_commits": self.lost_commits,
            "duplicates": self.duplicates,
            "two_instances": self.two_instances,
            "deadlocks": self.deadlocks,
            "outcomes": self.outcomes,
            "violations": len(self.violations),
            "violation_details": self.violations[:100],
            "drain_seconds_after_last_fault": round(self.drain_seconds, 2),
            "delivery_seconds_after_drain": round(self.delivery_seconds, 2),
            "last_order_placed_seconds_after_last_fault": round(self.placed_after_last_fault, 2),
            "elapsed_seconds": round(self.elapsed_seconds, 2),
            "needs_attention": self.needs_attention[:100],
            "notes": self.notes,
        }

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        def counts(values: Mapping[str, int]) -> str:
            return ", ".join(f"{name} {n}" for name, n in values.items()) or "none"

        summary = Table(title=f"saga chaos ({self.database})", title_justify="left", show_header=False)
        summary.add_column("what")
        summary.add_column("value", justify="right")
        summary.add_row("sagas placed", f"{self.placed} of {self.sagas}")
        summary.add_row("kills (kill -9)", counts(self.kills))
        held = f" ({self.after_commit_kills_while_held} while the reply was held)" if self.after_commit_kills else ""
        summary.add_row("of which right after a commit", counts(self.after_commit_kills) + held)
        summary.add_row("lost COMMIT replies", counts(self.lost_commits))
        summary.add_row("orders started four ways at once", str(self.duplicates))
        summary.add_row("two instances on one database", ", ".join(self.two_instances) or "none")
        if self.deadlocks:
            summary.add_row("deadlocks in the services' databases", counts(self.deadlocks))
        summary.add_row("invariant violations", str(len(self.violations)))
        summary.add_row("time to drain after the last fault", f"{self.drain_seconds:.1f} s")
        summary.add_row("then, until every confirmation was delivered", f"{self.delivery_seconds:.1f} s")
        summary.add_row("last order placed after the last fault", f"{self.placed_after_last_fault:.1f} s")
        summary.add_row("elapsed", f"{self.elapsed_seconds:.1f} s")
        statuses = sorted({s for counts in self.outcomes.values() for s in counts})
        outcomes = Table(title="outcomes by kind of order", title_justify="left")
        outcomes.add_column("kind")
        for status in statuses:
            outcomes.add_column(status, justify="right")
        for kind, by_status in self.outcomes.items():
            outcomes.add_row(kind, *(str(by_status.get(s, 0)) for s in statuses))
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


_ADDRESS = Address(
    recipient_name="Ada Lovelace",
    street="12 Analytical Row",
    city="London",
    postal_code="N1 7AA",
    country_code="GB",
)


def _order(order_id: str, kind: str, lines: Sequence[tuple[str, int]], amount: int) -> _Order:
    request = order_request(
        order_id,
        items=lines,
        minor_units=amount,
        token="tok_declined" if kind == "declined" else "tok_visa",
        email="chaos@example.com",
        address=_ADDRESS,
        deadline_seconds=LATE_DEADLINE_SECONDS if kind == "late" else 0,
    )
    return _Order(order_id, kind, request)


def _plan(config: ChaosConfig, scarce_quantity: int, run: str) -> list[_Order]:
    rng = random.Random(config.seed)
    kinds = list(config.mix)
    weights = [config.mix[k] for k in kinds]
    orders = []
    for index in range(config.sagas):
        kind = rng.choices(kinds, weights)[0]
        lines = [(SCARCE_SKU, scarce_quantity)] if kind == "outofstock" else list(OK_LINES)
        orders.append(_order(f"{kind}-{run}-{index}", kind, lines, 1000 + index))
    return orders


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

    def orchestrator(self) -> pb_grpc.OrchestratorServiceAsyncStub:
        """Replicas in turn, so a call that failed on one is retried on the other."""
        self._next += 1
        return self.orchestrators[self._next % len(self.orchestrators)]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)

    async def stock(self, skus: Sequence[str]) -> StockLevels:
        response = await _retrying(lambda: self.inventory.GetStock(inventory.GetStockRequest(skus=skus), timeout=5))
        return {level.sku: (level.available, level.reserved) for level in response.levels}

    async def sagas_under(self, business_key: str) -> int:
        request = pb.ListSagasRequest(saga_type="OrderSaga", business_key=business_key, page_size=10)
        return len((await _retrying(lambda: self.orchestrator().ListSagas(request, timeout=10))).sagas)

    async def sagas_by_key(self, since: Timestamp, tag: str) -> Counter[str]:
        """The OrderSagas created since `since` whose business key contains tag, counted by key."""
        found: Counter[str] = Counter()
        token = ""
        while True:
            request = pb.ListSagasRequest(saga_type="OrderSaga", created_after=since, page_size=500, page_token=token)
            page = await _retrying(lambda r=request: self.orchestrator().ListSagas(r, timeout=10))  # type: ignore[misc]
            found.update(saga.business_key for saga in page.sagas if tag in saga.business_key)
            token = page.next_page_token
            if not token:
                return found

    async def committed(self, service: str, order_id: str) -> bool:
        """Whether the service has committed the forward call of the order (its effect is in its records)."""
        if service == "inventory":
            request = inventory.GetReservationRequest(order_id=order_id)
            return await _optional(lambda: self.inventory.GetReservation(request, timeout=5)) is not None
        if service == "payment":
            ledger = payment.ListPaymentsRequest(order_id=order_id, page_size=10)
            entries = (await _retrying(lambda: self.payment.ListPayments(ledger, timeout=5))).entries
            return any(entry.kind == payment.LEDGER_ENTRY_KIND_CHARGE for entry in entries)
        if service == "shipping":
            request_shipment = shipping.GetShipmentRequest(order_id=order_id)
            return await _optional(lambda: self.shipping.GetShipment(request_shipment, timeout=5)) is not None
        notes = notify.ListNotificationsRequest(order_id=order_id, page_size=10)
        return bool((await _retrying(lambda: self.notify.ListNotifications(notes, timeout=5))).notifications)

    async def step_succeeded(self, saga_id: str, step: str) -> bool:
        saga = await _retrying(lambda: self.orchestrator().GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10))
        return any(e.type == "StepSucceeded" and e.step == step for e in saga.saga.history)


def _refusal_detail(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a refusal, else its BadRequest fields, else its message."""
    metadata: Iterable[tuple[str, Any]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    for key, value in metadata:
        if key != _STATUS_DETAILS_KEY:
            continue
        fields: list[str] = []
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason: str = info.reason  # google.rpc ships no type information
                return reason
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields += [violation.field for violation in bad.field_violations]
        if fields:
            return ",".join(fields)
    return (error.details() or "")[:120]


async def _answer(way: StartWay, call: Callable[[], Awaitable[Any]]) -> StartAnswer:
    try:
        response = await _retrying(call)
    except grpc.aio.AioRpcError as error:
        return StartAnswer(way, code=error.code().name, detail=_refusal_detail(error))
    return StartAnswer(way, saga_id=str(response.saga_id))


async def _start_every_way(clients: _Clients, order: _Order) -> list[StartAnswer]:
    """Start one order four ways at once (through both replicas when there are two), then with another payload."""
    first, second = clients.orchestrators[0], clients.orchestrators[-1]
    request = order.request
    packed = any_pb2.Any()
    packed.Pack(request)

    def start_saga(
        stub: pb_grpc.OrchestratorServiceAsyncStub, key: str, body: any_pb2.Any
    ) -> Callable[[], Awaitable[Any]]:
        start = pb.StartSagaRequest(saga_type="OrderSaga", business_key=key, input=body)
        return lambda: stub.StartSaga(start, timeout=5)

    answers = list(
        await asyncio.gather(
            _answer(StartWay.PLACE_ORDER, lambda: first.PlaceOrder(request, timeout=5)),
            _answer(StartWay.PLACE_ORDER_AGAIN, lambda: second.PlaceOrder(request, timeout=5)),
            _answer(StartWay.START_SAGA, start_saga(second, order.order_id, packed)),
            _answer(StartWay.START_SAGA_OTHER_KEY, start_saga(first, order.order_id + OTHER_KEY_SUFFIX, packed)),
        )
    )
    # Only once the saga exists: were this one first, the order would run on its payload.
    changed = pb.PlaceOrderRequest()
    changed.CopyFrom(request)
    changed.amount.minor_units += 1
    other_payload = any_pb2.Any()
    other_payload.Pack(changed)
    answers.append(await _answer(StartWay.START_SAGA_OTHER_PAYLOAD, start_saga(first, order.order_id, other_payload)))
    return answers


async def _record(clients: _Clients, order: _Order, saga_id: str | None, sink: Counter[str] | None) -> OrderRecord:
    items: Counter[str] = Counter()
    for line in order.request.items:
        items[line.sku] += line.quantity
    record = OrderRecord(order.order_id, order.kind, dict(items), order.request.amount.minor_units)
    if saga_id:
        saga_call = clients.orchestrator().GetSaga
        found = await _retrying(lambda: saga_call(pb.GetSagaRequest(saga_id=saga_id), timeout=10))
        apply_saga(record, found.saga)
    await read_service_records(clients, record)
    if sink is not None:
        record.sink_lines = sink[order.order_id]
    return record


class FaultKind(enum.Enum):
    """What one entry of the fault plan does."""

    KILL = "kill -9, then restart"
    KILL_AFTER_COMMIT = "kill -9 right after a commit whose reply is held, then restart"
    LOST_COMMIT = "a COMMIT whose reply is lost"


@dataclass
class _Fault:
    kind: FaultKind
    # The process name (KILL), the service (KILL_AFTER_COMMIT) or the way the reply is lost (LOST_COMMIT).
    target: str
    processes: list[ManagedProcess] = field(default_factory=list)


# Orders a kill after a commit may place before one's call reaches the instance that holds replies.
_AFTER_COMMIT_ORDERS = 20


class _Faults:
    """Runs the fault plan, one fault after another, counting what it did."""

    def __init__(
        self,
        config: ChaosConfig,
        stack: LocalStack | None,
        replica: ManagedProcess | None,
        proxy: PgProxy | None,
        log: Any,
    ) -> None:
        self.config = config
        self.stack = stack
        self.replica = replica
        self.proxy = proxy
        self.log = log
        self.rng = random.Random(config.seed + 1)
        self.kills: Counter[str] = Counter()
        self.after_commit: Counter[str] = Counter()
        self.held = 0
        self.lost: Counter[str] = Counter()
        self.last_fault_at = time.monotonic()
        self.plan = self._plan()
        self.done = 0
        self._began = time.monotonic()
        self.misses: list[str] = []
        # Set by the run: places one order of the fault plan's own and returns its saga id.
        self.place: Callable[[_Order], Awaitable[str | None]] | None = None
        self.clients: _Clients | None = None
        self.run_tag = ""

    def _plan(self) -> list[_Fault]:
        stack = self.stack
        if stack is None or stack.orchestrator is None:
            return []
        config = self.config
        replicas: list[_Fault] = []
        replica_kills = config.replica_kills if self.replica is not None else 0
        for index in range(max(config.orchestrator_kills, replica_kills)):
            if index < config.orchestrator_kills:
                replicas.append(_Fault(FaultKind.KILL, "orchestrator", [stack.orchestrator]))
            if index < replica_kills:
                assert self.replica is not None
                replicas.append(_Fault(FaultKind.KILL, "orchestrator-2", [self.replica]))
        services = [
            _Fault(FaultKind.KILL, name, [stack.services[name]])
            for _ in range(config.service_kills)
            for name in SERVICES
        ]
        after_commit = [
            _Fault(FaultKind.KILL_AFTER_COMMIT, name, [stack.services[name]])
            for _ in range(config.after_commit_kills)
            for name in config.after_commit_services
        ]
        instances = [
            _Fault(FaultKind.KILL, process.name, [process])
            for _ in range(config.instance_kills)
            for name in SERVICES
            for process in stack.instances[name][1:]
        ]
        lost: list[_Fault] = []
        if self.proxy is not None:
            ways = itertools.cycle((CommitFault.DROP_COMMIT_REPLY, CommitFault.CUT_DURING_COMMIT))
            lost = [_Fault(FaultKind.LOST_COMMIT, next(ways).value) for _ in range(config.lost_commits)]
        # Interleaved, so that each kind of fault meets sagas in flight and the others' aftermath.
        rounds = itertools.zip_longest(replicas, services, after_commit, instances, lost)
        return [fault for faults in rounds for fault in faults if fault is not None]

    def remaining_seconds(self) -> float:
        """How long the faults still to come should take, from how long the ones so far took."""
        if self.done:
            per_fault = (time.monotonic() - self._began) / self.done
        else:
            per_fault = sum(self.config.down_seconds) / 2 + sum(self.config.gap_seconds) / 2 + 1.5
        return (len(self.plan) - self.done) * per_fault

    async def run(self) -> None:
        self._began = time.monotonic()
        for index, fault in enumerate(self.plan):
            await asyncio.sleep(self.rng.uniform(*self.config.gap_seconds))
            if fault.kind is FaultKind.KILL:
                await self._kill(fault)
            elif fault.kind is FaultKind.KILL_AFTER_COMMIT:
                await self._kill_after_commit(fault, index)
            else:
                await self._lose_commit(fault)
            self.last_fault_at = time.monotonic()
            self.done += 1

    async def _kill(self, fault: _Fault, down: float | None = None, why: str = "") -> None:
        if down is None:
            down = self.rng.uniform(*self.config.down_seconds)
        if fault.target == "orchestrator-2" and self.kills[fault.target] % 2 == 1:
            # Every second time, long enough for the other replica to take over its expired leases.
            down = self.config.lease_seconds + 0.5
        pids = [process.pid for process in fault.processes]
        for process in fault.processes:
            process.kill()
            self.kills[process.name] += 1
        await asyncio.sleep(down)
        started = time.monotonic()
        await asyncio.gather(*(asyncio.to_thread(process.restart, 60.0) for process in fault.processes))
        names = ", ".join(f"{p.name} (pid {pid} -> {p.pid})" for p, pid in zip(fault.processes, pids, strict=True))
        self.log(f"kill -9 {names}{why}, down {down:.2f} s, back in {time.monotonic() - started:.2f} s")

    async def _kill_after_commit(self, fault: _Fault, index: int) -> None:
        """Place an order whose reply the service holds after its commit, and kill the service in between.

        Only the first instance holds such replies. When the service has a second instance, the call
        may go there instead: its answer then reaches the orchestrator at once, nothing is killed,
        and another order is placed (the orchestrator turns from instance to instance, call by call).
        The restarted instance, or the other one, answers the resend from the stored outcome.
        """
        assert self.place is not None and self.clients is not None and self.stack is not None
        service = fault.target
        method, step = HELD_CALLS[service]
        others = len(self.stack.instances[service]) > 1
        for attempt in range(_AFTER_COMMIT_ORDERS):
            order_id = f"commitkill-{service}-{self.run_tag}-{index}-{attempt}"
            order = _order(order_id, "commitkill", OK_LINES, 5000 + 10 * index + attempt)
            saga_id = await self.place(order)
            if saga_id is None:
                return
            deadline = time.monotonic() + 60.0
            while not await self.clients.committed(service, order_id):
                if time.monotonic() > deadline:
                    self.misses.append(f"{service}: order {order_id} was not committed within 60 s; not killed")
                    return
                await asyncio.sleep(0.02)
            if others:
                # A held reply comes after AFTER_COMMIT_HOLD_MS; any other one within a moment.
                await asyncio.sleep(0.5)
            # Checked just before the kill: afterwards the resend may be answered at once.
            held = not await self.clients.step_succeeded(saga_id, step)
            if others and not held:
                continue
            await self._kill(fault, down=0.0, why=f" right after it committed {method} of order {order_id}")
            self.after_commit[service] += 1
            self.held += held
            return
        self.misses.append(
            f"{service}: {_AFTER_COMMIT_ORDERS} orders in a row went to another instance; not killed after a commit"
        )

    async def _lose_commit(self, fault: _Fault) -> None:
        assert self.proxy is not None
        before = self.proxy.commits_tripped
        self.proxy.arm(CommitFault(fault.target))
        if await asyncio.to_thread(self.proxy.wait_tripped, before + 1, 30.0):
            self.lost[fault.target] += 1
            self.log(f"lost a COMMIT's reply ({fault.target})")
        else:
            self.proxy.disarm()
            self.misses.append(f"no COMMIT went through the proxy within 30 s to meet {fault.target}")


async def _chaos(
    config: ChaosConfig,
    addresses: Mapping[str, str],
    orchestrators: Sequence[str],
    faults: _Faults,
    sink_path: Path | None,
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
        log(f"placing {len(orders)} orders at {pace} while the fault plan runs {len(faults.plan)} faults")
        saga_ids: dict[str, str] = {}
        starts: dict[str, list[StartAnswer]] = {}
        failures: list[str] = []
        slots = asyncio.Semaphore(config.concurrency)

        async def place(order: _Order) -> str | None:
            if order.kind == "duplicate":
                answers = await _start_every_way(clients, order)
                starts[order.order_id] = answers
                found = [answer.saga_id for answer in answers if answer.saga_id]
                if found:
                    saga_ids[order.order_id] = found[0]
                return saga_ids.get(order.order_id)
            try:
                response = await _retrying(lambda: clients.orchestrator().PlaceOrder(order.request, timeout=5))
            except grpc.aio.AioRpcError as error:
                failures.append(f"order {order.order_id}: PlaceOrder failed: {error.code().name} {error.details()}")
                return None
            saga_ids[order.order_id] = response.saga_id
            return str(response.saga_id)

        async def place_in_turn(order: _Order) -> None:
            async with slots:
                await place(order)

        async def place_for_a_fault(order: _Order) -> str | None:
            orders.append(order)
            return await place(order)

        faults.place, faults.clients, faults.run_tag = place_for_a_fault, clients, run

        async def placing() -> None:
            tasks = []
            begin = time.monotonic()
            planned = list(orders)
            for index, order in enumerate(planned):
                tasks.append(asyncio.create_task(place_in_turn(order)))
                if config.rate:
                    delay = begin + (index + 1) / config.rate - time.monotonic()
                else:
                    # Spread the orders over the faults still to come, so every fault hits sagas
                    # in flight; once the last process is back, the rest go at once.
                    left = len(planned) - index - 1
                    delay = faults.remaining_seconds() / left if left else 0.0
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*tasks)
            placed.append(time.monotonic())

        started = time.monotonic()
        placed: list[float] = []
        since = Timestamp()
        since.FromNanoseconds(int((time.time() - 1) * 1e9))
        await asyncio.gather(placing(), faults.run())
        placed_at = placed[0]
        log(f"placed {len(saga_ids)} orders, the last {placed_at - faults.last_fault_at:+.1f} s after the last fault")
        drained_at = await _wait_drained(clients, since, config.drain_timeout, log)
        drain = (drained_at or time.monotonic()) - faults.last_fault_at
        log(f"{'drained' if drained_at else 'NOT drained'} {drain:.1f} s after the last fault; waiting for deliveries")
        delivered_in = await wait_delivered(clients.notify, [o.order_id for o in orders], config.delivery_timeout)
        log(f"confirmations {'delivered' if delivered_in is not None else 'NOT all delivered'}; auditing")
        sink = read_file_sink(sink_path) if sink_path is not None else None
        records = await _bounded(
            [lambda o=o: _record(clients, o, saga_ids.get(o.order_id), sink) for o in orders],  # type: ignore[misc]
            32,
        )
        duplicates = [record for record in records if record.order_id in starts]
        keys = [key for record in duplicates for key in (record.order_id, record.order_id + OTHER_KEY_SUFFIX)]
        counted = await _bounded([lambda k=key: clients.sagas_under(k) for key in keys], 32)  # type: ignore[misc]
        for record, under_key, under_other_key in zip(duplicates, counted[::2], counted[1::2], strict=True):
            record.starts = starts[record.order_id]
            record.sagas_for_key, record.sagas_for_other_key = under_key, under_other_key
        sagas_by_key = await clients.sagas_by_key(since, f"-{run}-")
        stock_after = await clients.stock(skus)
    finally:
        await clients.close()
    violations = list(failures)
    for record in records:
        violations += [f"order {record.order_id} ({record.kind}, {record.status}): {p}" for p in check_order(record)]
    order_ids = [order.order_id for order in orders]
    violations += [f"sagas: {problem}" for problem in check_one_saga_per_order(order_ids, saga_ids, sagas_by_key)]
    if sink is not None and sink[UNREADABLE_LINE]:
        violations.append(f"file sink: {sink[UNREADABLE_LINE]} lines that are not a delivered notification")
    violations += [f"stock: {problem}" for problem in check_stock(stock_before, stock_after, records)]
    violations += [f"fault plan: {miss}" for miss in faults.misses]
    if drained_at is None:
        violations.append(f"sagas still in flight {config.drain_timeout:.0f} s after the last fault")
    if delivered_in is None:
        violations.append(f"confirmations still PENDING {config.delivery_timeout:.0f} s after the last saga ended")
    outcomes: dict[str, Counter[str]] = {}
    for record in records:
        outcomes.setdefault(record.kind, Counter())[record.status] += 1
    attention = [f"order {r.order_id}: {r.last_error}" for r in records if r.status == "NEEDS_ATTENTION"]
    return ChaosReport(
        database="postgresql" if config.postgres else "sqlite",
        sagas=len(orders),
        placed=len(saga_ids),
        kills=dict(faults.kills),
        outcomes={kind: dict(counts) for kind, counts in sorted(outcomes.items())},
        violations=violations,
        drain_seconds=max(0.0, drain),
        elapsed_seconds=time.monotonic() - started,
        after_commit_kills=dict(faults.after_commit),
        after_commit_kills_while_held=faults.held,
        lost_commits=dict(faults.lost),
        duplicates=len(starts),
        delivery_seconds=delivered_in or 0.0,
        placed_after_last_fault=placed_at - faults.last_fault_at,
        needs_attention=attention,
    )


async def _wait_drained(clients: _Clients, since: Timestamp, limit: float, log: Any) -> float | None:
    """Poll until no saga created since the run began is in flight; the monotonic time then, or None."""
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


class _ServiceDatabases:
    """On PostgreSQL, one fresh database per service beside the orchestrator's, dropped after the run."""

    def __init__(self, database_url: str, run: str) -> None:
        import sqlalchemy

        self._base = sqlalchemy.make_url(database_url)
        stem = (self._base.database or "saga")[:40]
        self.names = {name: f"{stem}_chaos_{run}_{name}" for name in SERVICES}
        self._admin = sqlalchemy.create_engine(self._base, isolation_level="AUTOCOMMIT")

    def url(self, service: str) -> str:
        return self._base.set(database=self.names[service]).render_as_string(hide_password=False)

    @property
    def server(self) -> tuple[str, int]:
        return self._base.host or "127.0.0.1", self._base.port or 5432

    def create(self) -> None:
        with self._admin.connect() as connection:
            for name in self.names.values():
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def deadlocks(self) -> dict[str, int]:
        """pg_stat_database's deadlock count per service database, once their clients have gone."""
        import sqlalchemy

        found: dict[str, int] = {}
        with self._admin.connect() as connection:
            others = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d")
            deadlocks = sqlalchemy.text("SELECT deadlocks FROM pg_stat_database WHERE datname = :d")
            for service, name in self.names.items():
                # A backend's counters reach pg_stat_database when it exits; the stack has just stopped.
                deadline = time.monotonic() + 15
                while connection.execute(others, {"d": name}).scalar_one() and time.monotonic() < deadline:
                    time.sleep(0.1)
                connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
                found[service] = int(connection.execute(deadlocks, {"d": name}).scalar_one() or 0)
        return found

    def drop(self) -> None:
        with self._admin.connect() as connection:
            for name in self.names.values():
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin.dispose()


def run_chaos(config: ChaosConfig, log: Callable[[str], Any] = print) -> ChaosReport:
    """Start the stack (unless config.external), run the sagas under faults, audit, stop; returns the report."""
    deadlocks: dict[str, int] = {}
    two_instances: list[str] = []
    with ExitStack() as scope:
        replica: ManagedProcess | None = None
        stack: LocalStack | None = None
        proxy: PgProxy | None = None
        sink_path: Path | None = None
        if config.external:
            addresses = dict(config.external)
            orchestrators = [addresses["orchestrator"]]
        else:
            data_dir = config.data_dir or Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="saga-chaos-")))
            service_env = {name: {"FAULTS": spec} for name, spec in SERVICE_FAULTS.items()}
            service_env["notify"].update(NOTIFY_ENV)
            instances: dict[str, int] = {}
            instance_env: dict[str, dict[str, str]] = {}
            if config.postgres:
                databases = _ServiceDatabases(config.database_url, uuid.uuid4().hex[:6])
                databases.create()

                def read_deadlocks_then_drop() -> None:
                    try:
                        deadlocks.update(databases.deadlocks())
                    finally:
                        databases.drop()

                scope.callback(read_deadlocks_then_drop)
                if config.lost_commits > 0 and config.lost_commit_services:
                    proxy = PgProxy(*databases.server).start()
                    scope.callback(proxy.close)
                for name in SERVICES:
                    url = databases.url(name)
                    if proxy is not None and name in config.lost_commit_services:
                        url = proxy.url(url)
                    service_env[name]["DATABASE_URL"] = url
                instances = {name: 2 for name in config.second_instances}
                # A second instance does not hold replies back, so a kill after a commit leaves
                # the other instance to answer the resend from the shared database.
                instance_env = {f"{name}-2": {"FAULTS": _KIND_FAULTS[name]} for name in config.second_instances}
                two_instances = list(config.second_instances)
            stack = LocalStack(
                StackConfig(
                    data_dir,
                    orchestrator_database_url=config.database_url,
                    service_env=service_env,
                    orchestrator_env={"LEASE_SECONDS": str(config.lease_seconds)},
                    common_env={"LOG_LEVEL": config.log_level},
                    instances=instances,
                    instance_env=instance_env,
                )
            )
            scope.callback(stack.stop)
            stack.start()
            orchestrators = [stack.address]
            if config.postgres:
                # Two replicas on one database, the way PostgreSQL is meant to be run: duplicates
                # are started on both at once, and replica_kills kill the second one.
                replica = stack.add_orchestrator("orchestrator-2")
                scope.callback(replica.stop)
                orchestrators.append(replica.address)
            addresses = {name: process.address for name, process in stack.services.items()}
            sink_path = Path(stack.services["notify"].env["DATA_DIR"]) / FILE_SINK_NAME
        faults = _Faults(config, stack, replica, proxy, log)
        report = asyncio.run(_chaos(config, addresses, orchestrators, faults, sink_path, log))
    report.deadlocks = deadlocks
    report.two_instances = two_instances
    if config.external:
        report.notes.append(
            "external stack: no process was killed; kinds flaky/slow/late/duplicate need the harness's FAULTS "
            "(devstack.chaos.SERVICE_FAULTS) on the services, stock conservation assumes no other traffic, "
            "and the file sink is not read"
        )
    elif not config.postgres:
        report.notes.append("SQLite: no second instances and no lost COMMIT replies (both need PostgreSQL)")
    return report
