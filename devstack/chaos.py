"""The chaos harness: run sagas while processes die and commits fail, then audit the services' own records.

`run_chaos` starts the local stack (or uses a running one) and places a mix of orders (accepted,
declined, out of stock, transiently failing, slow past their call deadline, late past their saga
deadline, duplicates: one order started four ways at once, fraud reviews approved or rejected,
and orders of the harness's own definition that wait on a timer and for a signal), on OrderSaga
v1 and v2 side by side, and sends each review its decision and each signal order its signal:
early, once waiting, or as an orchestrator replica is killed, some twice, some contradicted.
Meanwhile it runs its fault plan:
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
import os
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from devstack.audit import (
    OTHER_KEY_SUFFIX,
    Order,
    OrderRecord,
    SendTime,
    SignalAnswer,
    SignalPlan,
    SignalSend,
    StartAnswer,
    StartWay,
    audit_orders,
    delivered_early,
    stock_levels,
    waits_on_attention,
)
from devstack.clients import TRANSIENT, Clients, retrying, retrying_or_none
from devstack.faultproxy import CommitFault, PgProxy
from devstack.launcher import ManagedProcess
from devstack.orders import order_request
from devstack.stack import LocalStack, StackConfig
from sagasuite.common.v1.common_pb2 import Address
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment
from svckit.discovery import SUITE_SERVICES

# The run: what to break (ChaosConfig), the run itself (run_chaos) and what it found (ChaosReport).
# The invariants it checks, and the readers of the services' records, are devstack.audit's.
__all__ = [
    "AFTER_COMMIT_HOLD_MS",
    "DEFAULT_MIX",
    "SERVICE_FAULTS",
    "ChaosConfig",
    "ChaosReport",
    "FaultKind",
    "run_chaos",
]

# Kinds of order and their share of the run. Prefixes of the order ids select the fault rules.
DEFAULT_MIX: dict[str, float] = {
    "ok": 0.30,  # plain order: completes unless a fault outlasts its retries
    "declined": 0.08,  # tok_declined: compensated, never charged
    "outofstock": 0.08,  # more than the SKU holds: compensated, never reserved
    "flaky": 0.12,  # transient errors on reserve, charge and confirm, then success
    "slow": 0.08,  # the first CreateShipment reply comes after the call's 2 s deadline
    "late": 0.04,  # every CreateShipment reply is late and the saga's deadline is 3 s: compensated
    # Started four ways at once (PlaceOrder on each replica, StartSaga under its own key and under
    # another one), then once more with another payload: one saga, one effect per service.
    "duplicate": 0.08,
    # At or above REVIEW_THRESHOLD: OrderSaga v2 waits for a fraud review, approved or rejected
    # (early, once waiting, or as the orchestrator is killed; some decisions sent twice, some
    # followed by the other decision).
    "approve": 0.08,
    "reject": 0.06,
    # SIGNAL_SAGA_TYPE (devstack/chaos_definitions.py): a timer, then a wait for a signal before the
    # shipment, signalled early, once waiting or at a kill; some signals repeated, some under the
    # same id with another payload, some followed by a second delivery under a new id.
    "signal": 0.08,
}
# The kinds that need the harness's own orchestrator settings (a reviewer's token, the definition).
_OWN_STACK_KINDS = ("approve", "reject", "signal")
# OrderSaga v2's review: orders of REVIEW_THRESHOLD minor units or more wait for it. Far above any
# other order's amount (1000 + its index), so only approve and reject orders are reviewed.
REVIEW_STEP = "fraud_review"
REVIEW_THRESHOLD = 10**9
REVIEWER_ROLE = "reviewer"
# The definition of the signal orders, in devstack/chaos_definitions.py (loaded by the orchestrator).
SIGNAL_SAGA_TYPE = "ChaosSignalSaga"
SIGNAL_WAIT = "go_ahead"
SIGNAL_NAME = "go"
# The payload field whose value the signal saga ships to (the shipment's recipient_name).
RECIPIENT_FIELD = "recipient"
CHAOS_DEFINITIONS = "devstack.chaos_definitions:CHAOS_DEFINITIONS"
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
# The order-id suffix of the orders whose delivery is planned early, and how long their charge takes.
EARLY_SUFFIX = "-early"
EARLY_CHARGE_LATENCY_MS = 400
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
    "payment": (
        "Charge:fail_first=2,order_contains=flaky-;"
        # The charge of an order sent its decision or signal early takes a while, so that what is
        # sent right after the start comes before the saga reaches its wait (v2's review follows
        # the charge's branch at once).
        f"Charge:latency_ms={EARLY_CHARGE_LATENCY_MS},order_contains={EARLY_SUFFIX}"
    ),
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
OK_LINES = (("BOOK-001", 1), ("TEE-007", 2))
SCARCE_SKU = "RARE-1"
# The trailing metadata that carries a status's google.rpc details.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


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
    # The OrderSaga versions PlaceOrder and StartSaga start (ORDER_SAGA_VERSION), taken in turn:
    # the first replica starts on the first, the second replica (PostgreSQL) on the next; a lone
    # replica moves on to the following one at every restart. So v1 and v2 sagas are in flight
    # together, and each one must finish on its version whatever the replica that runs it.
    order_saga_versions: tuple[int, ...] = (2, 1)

    def __post_init__(self) -> None:
        for setting in ("after_commit_services", "second_instances", "lost_commit_services"):
            unknown = sorted(set(getattr(self, setting)) - set(SERVICES))
            if unknown:
                raise ValueError(f"{setting}: unknown service {', '.join(unknown)}; known: {', '.join(SERVICES)}")
        if not self.order_saga_versions or min(self.order_saga_versions) < 1:
            raise ValueError("order_saga_versions: give at least one OrderSaga version, each 1 or more")

    @property
    def postgres(self) -> bool:
        return self.database_url.startswith("postgresql")


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
    # Sagas by "<type> v<version>", child sagas included.
    versions: dict[str, int] = field(default_factory=dict)
    # Child sagas by how they ended.
    children: dict[str, int] = field(default_factory=dict)
    # Per kind of delivery ("approval", "signal"): orders, and how their deliveries went (see _delivery_figures).
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)

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
            "versions": self.versions,
            "children": self.children,
            "deliveries": self.deliveries,
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
        summary.add_row("sagas by definition", counts(self.versions))
        summary.add_row("child sagas", counts(self.children))
        for kind, figures in self.deliveries.items():
            summary.add_row(f"{kind} deliveries", counts(figures))
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


_ADDRESS = Address(
    recipient_name="Ada Lovelace",
    street="12 Analytical Row",
    city="London",
    postal_code="N1 7AA",
    country_code="GB",
)


def _order(
    order_id: str,
    kind: str,
    lines: Sequence[tuple[str, int]],
    amount: int,
    saga_type: str = "OrderSaga",
    signal: SignalPlan | None = None,
) -> Order:
    request = order_request(
        order_id,
        items=lines,
        minor_units=amount,
        token="tok_declined" if kind == "declined" else "tok_visa",
        email="chaos@example.com",
        address=_ADDRESS,
        deadline_seconds=LATE_DEADLINE_SECONDS if kind == "late" else 0,
    )
    return Order(kind, request, saga_type, signal)


# The repeats after the first delivery, taken in turn (each with every SendTime: see _signal_plan).
_APPROVAL_REPEATS: tuple[tuple[SignalSend, ...], ...] = (
    (SignalSend.SAME,),
    (SignalSend.OTHER,),
    (SignalSend.SAME, SignalSend.OTHER),
    (),
)
_SIGNAL_REPEATS: tuple[tuple[SignalSend, ...], ...] = (
    (SignalSend.SAME,),
    (SignalSend.OTHER,),
    (SignalSend.ANOTHER_ID,),
    (SignalSend.SAME, SignalSend.OTHER, SignalSend.ANOTHER_ID),
    (),
)


def _signal_plan(kind: str, order_id: str, turn: int) -> SignalPlan:
    """When the turn-th order of its kind (approve, reject, signal) is sent its decision or signal, and what follows.

    Taken in turn rather than drawn, so that even a short run has every SendTime of every kind,
    each with repeats and conflicting repeats.
    """
    times = list(SendTime)
    when = times[turn % len(times)]
    if kind == "signal":
        return SignalPlan(
            SIGNAL_WAIT,
            approval=False,
            signal=SIGNAL_NAME,
            recipient=f"Recipient of {order_id}",
            when=when,
            repeats=_SIGNAL_REPEATS[turn // len(times) % len(_SIGNAL_REPEATS)],
            by_key=turn % 2 == 1,
        )
    repeats = _APPROVAL_REPEATS[turn // len(times) % len(_APPROVAL_REPEATS)]
    return SignalPlan(REVIEW_STEP, approval=True, approve=kind == "approve", when=when, repeats=repeats)


def _plan(config: ChaosConfig, scarce_quantity: int, run: str) -> list[Order]:
    rng = random.Random(config.seed)
    turns: Counter[str] = Counter()
    mix = {kind: share for kind, share in config.mix.items() if not config.external or kind not in _OWN_STACK_KINDS}
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    orders = []
    for index in range(config.sagas):
        kind = rng.choices(kinds, weights)[0]
        order_id = f"{kind}-{run}-{index}"
        lines = [(SCARCE_SKU, scarce_quantity)] if kind == "outofstock" else list(OK_LINES)
        if kind not in _OWN_STACK_KINDS:
            orders.append(_order(order_id, kind, lines, 1000 + index))
            continue
        plan = _signal_plan(kind, order_id, turns[kind])
        turns[kind] += 1
        if plan.when is SendTime.EARLY:
            order_id += EARLY_SUFFIX
        if kind == "signal":
            orders.append(_order(order_id, kind, lines, 1000 + index, SIGNAL_SAGA_TYPE, plan))
        else:
            orders.append(_order(order_id, kind, lines, REVIEW_THRESHOLD + index, signal=plan))
    return orders


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


async def _committed(clients: Clients, service: str, order_id: str) -> bool:
    """Whether the service has committed the forward call of the order (its effect is in its records)."""
    if service == "inventory":
        return await retrying_or_none(lambda: clients.reservation(order_id, call_timeout=5)) is not None
    if service == "payment":
        entries = await retrying(lambda: clients.ledger(order_id, call_timeout=5))
        return any(entry.kind == payment.LEDGER_ENTRY_KIND_CHARGE for entry in entries)
    if service == "shipping":
        return await retrying_or_none(lambda: clients.shipment(order_id, call_timeout=5)) is not None
    return bool(await retrying(lambda: clients.notifications(order_id, call_timeout=5)))


async def _step_succeeded(clients: Clients, saga_id: str, step: str) -> bool:
    """Whether the orchestrator has recorded the step's success (heard of its committed call), in the
    saga or in one of its children (OrderSaga v2 ships and confirms in its FulfilmentSaga)."""
    saga = await retrying(lambda: clients.saga(saga_id, call_timeout=10))
    if any(e.type == "StepSucceeded" and e.step == step for e in saga.history):
        return True
    for link in saga.children:
        child = await retrying(lambda child_id=link.saga_id: clients.saga(child_id, call_timeout=10))  # type: ignore[misc]
        if any(e.type == "StepSucceeded" and e.step == step for e in child.history):
            return True
    return False


async def _answer(way: StartWay, call: Callable[[], Awaitable[Any]]) -> StartAnswer:
    try:
        response = await retrying(call)
    except grpc.aio.AioRpcError as error:
        return StartAnswer(way, code=error.code().name, detail=_refusal_detail(error))
    return StartAnswer(way, saga_id=str(response.saga_id))


async def _start_every_way(clients: Clients, order: Order) -> list[StartAnswer]:
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
# The orchestrator replicas' process names, the first one first (as Clients.orchestrators has them).
_REPLICAS = ("orchestrator", "orchestrator-2")


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
        self.place: Callable[[Order], Awaitable[str | None]] | None = None
        self.clients: Clients | None = None
        self.run_tag = ""
        # Resolved just before an orchestrator replica is killed, with its index (0 the first, 1
        # the second), or with None once the plan is over: deliveries planned AT_KILL wait on it.
        self._next_kill: asyncio.Future[int | None] | None = None
        self._over = False
        # Each replica's turn in config.order_saga_versions (the second one starts a turn ahead).
        self.version_turns = {name: turn for turn, name in enumerate(_REPLICAS)}

    def version_of(self, replica: str) -> int:
        """The OrderSaga version the replica starts on its current run (ORDER_SAGA_VERSION)."""
        versions = self.config.order_saga_versions
        return versions[self.version_turns[replica] % len(versions)]

    def next_orchestrator_kill(self) -> asyncio.Future[int | None]:
        """Resolves as the next orchestrator replica is about to be killed (its index), or None when none will be."""
        if self._next_kill is None:
            self._next_kill = asyncio.get_running_loop().create_future()
            if self._over:
                self._next_kill.set_result(None)
        return self._next_kill

    def _announce_kill(self, replica: int | None) -> None:
        upcoming, self._next_kill = self._next_kill, None
        if upcoming is not None and not upcoming.done():
            upcoming.set_result(replica)

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
        plan = [fault for faults in rounds for fault in faults if fault is not None]
        if replicas:
            # The last fault kills an orchestrator replica: every delivery planned for a kill
            # (SendTime.AT_KILL) of an order placed meanwhile meets one.
            last = next(i for i, fault in enumerate(plan) if fault is replicas[-1])
            plan.append(plan.pop(last))
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
        try:
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
        finally:
            self._over = True
            self._announce_kill(None)

    async def _kill(self, fault: _Fault, down: float | None = None, why: str = "") -> None:
        if down is None:
            down = self.rng.uniform(*self.config.down_seconds)
        if fault.target == "orchestrator-2" and self.kills[fault.target] % 2 == 1:
            # Every second time, long enough for the other replica to take over its expired leases.
            down = self.config.lease_seconds + 0.5
        if fault.target in _REPLICAS:
            # The deliveries waiting for a kill go out now, and the replica dies a moment later:
            # some are recorded and their answer lost, some never reach it; all are sent again.
            self._announce_kill(_REPLICAS.index(fault.target))
            await asyncio.sleep(self.rng.uniform(0.0, 0.03))
        pids = [process.pid for process in fault.processes]
        for process in fault.processes:
            process.kill()
            self.kills[process.name] += 1
            if process.name in self.version_turns and self.replica is None:
                # The one replica restarts with another ORDER_SAGA_VERSION: a deployment that
                # changes the default while sagas of the other version are in flight. (Two
                # replicas keep theirs: each starts its own version, and runs the other's sagas.)
                self.version_turns[process.name] += 1
                process.env["ORDER_SAGA_VERSION"] = str(self.version_of(process.name))
        await asyncio.sleep(down)
        started = time.monotonic()
        await asyncio.gather(*(asyncio.to_thread(process.restart, 60.0) for process in fault.processes))
        names = ", ".join(f"{p.name} (pid {pid} -> {p.pid})" for p, pid in zip(fault.processes, pids, strict=True))
        versions = "".join(
            f", starting OrderSaga v{self.version_of(p.name)}" for p in fault.processes if p.name in self.version_turns
        )
        self.log(f"kill -9 {names}{why}, down {down:.2f} s, back in {time.monotonic() - started:.2f} s{versions}")

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
            while not await _committed(self.clients, service, order_id):
                if time.monotonic() > deadline:
                    self.misses.append(f"{service}: order {order_id} was not committed within 60 s; not killed")
                    return
                await asyncio.sleep(0.02)
            if others:
                # A held reply comes after AFTER_COMMIT_HOLD_MS; any other one within a moment.
                await asyncio.sleep(0.5)
            # Checked just before the kill: afterwards the resend may be answered at once.
            held = not await _step_succeeded(self.clients, saga_id, step)
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


_StubCall = Callable[["pb_grpc.OrchestratorServiceAsyncStub"], Awaitable[Any]]
# A saga in one of these may still reach the wait a delivery is planned for.
_ON_ITS_WAY = (pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_PAUSED)


class _Deliveries:
    """Sends each order's planned decision or signal at its time (SendTime), then its repeats, keeping every answer.

    A delivery that meets the orchestrator down (UNAVAILABLE and the like) is sent again, the same
    delivery, until it is answered: what a client that does not know whether it was recorded does.
    """

    def __init__(self, clients: Clients, faults: _Faults, token: str) -> None:
        self.clients = clients
        self.faults = faults
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.answers: dict[str, list[SignalAnswer]] = {}

    async def deliver(self, order: Order, saga_id: str) -> None:
        plan = order.signal
        assert plan is not None
        first: pb_grpc.OrchestratorServiceAsyncStub | None = None
        during_kill = False
        if plan.when is SendTime.WAITING:
            await self._until_waiting(saga_id, plan.wait)
        elif plan.when is SendTime.AT_KILL:
            replica = await self.faults.next_orchestrator_kill()
            if replica is not None:
                first, during_kill = self.clients.orchestrators[replica], True
        answers = self.answers.setdefault(order.order_id, [])
        for send in (SignalSend.FIRST, *plan.repeats):
            # The repeats follow the first answer at once: after a kill, while the replica restarts.
            answers.append(await self._send(order, saga_id, send, first, during_kill))
            first = None

    async def _until_waiting(self, saga_id: str, wait: str, limit: float = 120.0) -> None:
        """Until GetSaga shows the saga waiting at `wait`, or it never will (it does not have it, or unwinds)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                saga = await retrying(lambda: self.clients.saga(saga_id, call_timeout=10))
            except grpc.aio.AioRpcError:
                return
            if (
                any(w.step == wait for w in saga.waits)
                or saga.status not in _ON_ITS_WAY
                or wait not in {step.name for step in saga.steps}
            ):
                return
            await asyncio.sleep(0.2)

    def _call(self, order: Order, saga_id: str, send: SignalSend) -> _StubCall:
        plan = order.signal
        assert plan is not None
        if plan.approval:
            # The same decision again comes with another reason: one decision per approval, whatever the reason.
            approve = plan.approve != (send is SignalSend.OTHER)
            reason = "planned by the chaos harness" if send is SignalSend.FIRST else f"sent again ({send.name})"
            decide = pb.DecideApprovalRequest(saga_id=saga_id, step=plan.wait, approve=approve, reason=reason)
            return lambda stub: stub.DecideApproval(decide, timeout=5, metadata=self.metadata)
        payload = struct_pb2.Struct()
        same = send in (SignalSend.FIRST, SignalSend.SAME)
        payload.update({RECIPIENT_FIELD: plan.recipient if same else f"Not {plan.recipient}"})
        signal = pb.SignalSagaRequest(name=plan.signal, signal_id=plan.signal_id(order.order_id, send), payload=payload)
        if plan.by_key:
            signal.saga_type, signal.business_key = order.saga_type, order.order_id
        else:
            signal.saga_id = saga_id
        return lambda stub: stub.SignalSaga(signal, timeout=5)

    async def _send(
        self,
        order: Order,
        saga_id: str,
        send: SignalSend,
        stub: pb_grpc.OrchestratorServiceAsyncStub | None,
        during_kill: bool,
    ) -> SignalAnswer:
        call = self._call(order, saga_id, send)
        target = stub or self.clients.next_orchestrator()
        retried = False
        deadline = time.monotonic() + 60.0
        while True:
            try:
                response = await call(target)
            except grpc.aio.AioRpcError as error:
                if error.code() in TRANSIENT and time.monotonic() < deadline:
                    retried = True
                    await asyncio.sleep(0.05)
                    target = self.clients.next_orchestrator()
                    continue
                code, detail = error.code().name, _refusal_detail(error)
                return SignalAnswer(send, code=code, detail=detail, retried=retried, during_kill=during_kill)
            return SignalAnswer(send, duplicate=bool(response.duplicate), retried=retried, during_kill=during_kill)


def _delivery_figures(records: Iterable[OrderRecord]) -> dict[str, dict[str, int]]:
    """Per kind of delivery: orders, deliveries sent, early ones, ones during a kill, answers and consumptions."""
    figures: dict[str, Counter[str]] = {}
    for record in records:
        plan = record.plan
        if plan is None:
            continue
        counts = figures.setdefault("approval" if plan.approval else "signal", Counter())
        counts["orders"] += 1
        counts["sent"] += len(record.answers)
        counts["early"] += delivered_early(record)
        counts["during a kill"] += sum(answer.during_kill for answer in record.answers)
        counts["retried"] += sum(answer.retried for answer in record.answers)
        counts["duplicate"] += sum(answer.duplicate for answer in record.answers)
        counts.update(answer.detail or answer.code for answer in record.answers if answer.code)
        ends = "ApprovalDecided" if plan.approval else "SignalConsumed"
        counts.update(e.code.lower() for e in record.history if e.type == ends and e.step == plan.wait)
    return {kind: dict(sorted(counts.items())) for kind, counts in sorted(figures.items())}


def _outcome_kind(record: OrderRecord) -> str:
    """The row of the outcome table: the kind of order, and "v1" for an OrderSaga that ran on v1."""
    return f"{record.kind} v1" if record.saga_type == "OrderSaga" and record.version == 1 else record.kind


async def _chaos(
    config: ChaosConfig,
    addresses: Mapping[str, str],
    orchestrators: Sequence[str],
    faults: _Faults,
    sink_path: Path | None,
    log: Any,
    token: str = "",
) -> ChaosReport:
    async with Clients(addresses, orchestrators) as clients:
        scarce = await stock_levels(clients.inventory, [SCARCE_SKU])
        if SCARCE_SKU in scarce:
            scarce_quantity = min(10_000, sum(scarce[SCARCE_SKU]) + 1)
        else:
            scarce_quantity = 1
        run = uuid.uuid4().hex[:6]
        orders = _plan(config, scarce_quantity, run)
        skus = sorted({line.sku for order in orders for line in order.request.items})
        stock_before = await stock_levels(clients.inventory, skus)
        pace = f"{config.rate:g}/s" if config.rate else "a pace spread over the faults"
        log(f"placing {len(orders)} orders at {pace} while the fault plan runs {len(faults.plan)} faults")
        saga_ids: dict[str, str] = {}
        starts: dict[str, list[StartAnswer]] = {}
        failures: list[str] = []
        slots = asyncio.Semaphore(config.concurrency)
        deliveries = _Deliveries(clients, faults, token)
        senders: list[asyncio.Task[None]] = []

        async def start(order: Order) -> Any:
            if order.saga_type == "OrderSaga":
                # A fraud review is v2's: its orders go to a replica that starts v2 while there is one
                # (on SQLite, one that starts v1 refuses their decisions, which is checked too).
                reviewing = [
                    stub
                    for name, stub in zip(_REPLICAS, clients.orchestrators, strict=False)
                    if order.signal is not None and faults.version_of(name) >= 2
                ]
                return await retrying(
                    lambda: (reviewing[0] if reviewing else clients.next_orchestrator()).PlaceOrder(
                        order.request, timeout=5
                    )
                )
            packed = any_pb2.Any()
            packed.Pack(order.request)
            request = pb.StartSagaRequest(saga_type=order.saga_type, business_key=order.order_id, input=packed)
            return await retrying(lambda: clients.next_orchestrator().StartSaga(request, timeout=5))

        async def place(order: Order) -> str | None:
            if order.kind == "duplicate":
                answers = await _start_every_way(clients, order)
                starts[order.order_id] = answers
                found = [answer.saga_id for answer in answers if answer.saga_id]
                if found:
                    saga_ids[order.order_id] = found[0]
                return saga_ids.get(order.order_id)
            try:
                response = await start(order)
            except grpc.aio.AioRpcError as error:
                call = "PlaceOrder" if order.saga_type == "OrderSaga" else f"StartSaga({order.saga_type})"
                failures.append(f"order {order.order_id}: {call} failed: {error.code().name} {error.details()}")
                return None
            saga_ids[order.order_id] = response.saga_id
            if order.signal is not None:
                senders.append(asyncio.create_task(deliveries.deliver(order, str(response.saga_id))))
            return str(response.saga_id)

        async def place_in_turn(order: Order) -> None:
            async with slots:
                await place(order)

        async def place_for_a_fault(order: Order) -> str | None:
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
        await asyncio.gather(*senders)
        log(f"sent {sum(map(len, deliveries.answers.values()))} approval decisions and signals to {len(senders)} sagas")
        drained_at = await _wait_drained(clients, since, config.drain_timeout, log)
        drain = (drained_at or time.monotonic()) - faults.last_fault_at
        log(f"{'drained' if drained_at else 'NOT drained'} {drain:.1f} s after the last fault; waiting for deliveries")
        audit = await audit_orders(
            clients,
            orders,
            saga_ids,
            stock_before,
            starts=starts,
            signals=deliveries.answers,
            sink_path=sink_path,
            since=since,
            key_tag=f"-{run}-",
            delivery_limit=config.delivery_timeout,
        )
        delivered = "delivered" if audit.delivered_in is not None else "NOT all delivered"
        log(f"confirmations {delivered}; audited {len(audit.records)} orders")
    violations = failures + audit.violations
    violations += [f"fault plan: {miss}" for miss in faults.misses]
    if drained_at is None:
        violations.append(f"sagas still in flight {config.drain_timeout:.0f} s after the last fault")
    outcomes: dict[str, Counter[str]] = {}
    for record in audit.records:
        outcomes.setdefault(_outcome_kind(record), Counter())[record.status] += 1
    attention = [f"order {r.order_id}: {r.last_error}" for r in audit.records if r.status == "NEEDS_ATTENTION"]
    attention += [
        f"order {r.order_id}: waits for its child {child.saga_id}, which needs attention: {child.last_error}"
        for r in audit.records
        if r.status == "RUNNING"
        for child in waits_on_attention(r)
    ]
    versions = Counter(f"{r.saga_type} v{r.version}" for r in audit.records if r.saga_type)
    children = Counter(f"{child.saga_type} {child.status}" for r in audit.records for child in r.children)
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
        delivery_seconds=audit.delivered_in or 0.0,
        placed_after_last_fault=placed_at - faults.last_fault_at,
        needs_attention=attention,
        versions=dict(sorted(versions.items())),
        children=dict(sorted(children.items())),
        deliveries=_delivery_figures(audit.records),
    )


# Few enough sagas in flight to look at each: are they parents held by a child that needs attention?
_FEW_IN_FLIGHT = 20


async def _held_for_an_operator(clients: Clients, saga_id: str) -> bool:
    """Whether the saga only waits for children that need attention (it waits as long as they do)."""
    saga = await retrying(lambda: clients.saga(saga_id, call_timeout=10))
    stuck = {link.saga_id for link in saga.children if link.status == pb.SAGA_STATUS_NEEDS_ATTENTION}
    return (
        saga.status == pb.SAGA_STATUS_RUNNING
        and bool(saga.waits)
        and all(wait.kind == "child" and wait.child_saga_id in stuck for wait in saga.waits)
    )


async def _wait_drained(clients: Clients, since: Timestamp, limit: float, log: Any) -> float | None:
    """Poll until no saga created since the run began is in flight; the monotonic time then, or None.

    A parent that waits for a child in NEEDS_ATTENTION (OrderSaga v2 for its FulfilmentSaga) stays
    RUNNING for an operator, as its child does: it does not hold the drain up.
    """
    request = pb.ListSagasRequest(
        statuses=[pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_COMPENSATING, pb.SAGA_STATUS_PAUSED],
        created_after=since,
        page_size=_FEW_IN_FLIGHT,
    )
    deadline = time.monotonic() + limit
    found = pb.ListSagasResponse()
    looked_at = 0.0
    while time.monotonic() < deadline:
        found = await retrying(lambda: clients.next_orchestrator().ListSagas(request, timeout=10))
        if not found.sagas:
            return time.monotonic()
        if not found.next_page_token and time.monotonic() - looked_at > 2.0:
            looked_at = time.monotonic()
            held = [await _held_for_an_operator(clients, saga.saga_id) for saga in found.sagas]
            if all(held):
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


def _orchestrator_env(config: ChaosConfig, token: str) -> dict[str, str]:
    """The first replica's settings (the second one's are the same but for ORDER_SAGA_VERSION)."""
    # The harness's own definition is imported from the repository root, where devstack is.
    root = str(Path(__file__).resolve().parents[1])
    return {
        "LEASE_SECONDS": str(config.lease_seconds),
        "ORDER_SAGA_VERSION": str(config.order_saga_versions[0]),
        "REVIEW_THRESHOLD": str(REVIEW_THRESHOLD),
        "REVIEW_ROLE": REVIEWER_ROLE,
        "OPERATOR_TOKENS": f"chaos-reviewer:{token}:{REVIEWER_ROLE}",
        "SAGA_DEFINITIONS": CHAOS_DEFINITIONS,
        "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH", "")))),
    }


def run_chaos(config: ChaosConfig, log: Callable[[str], Any] = print) -> ChaosReport:
    """Start the stack (unless config.external), run the sagas under faults, audit, stop; returns the report."""
    deadlocks: dict[str, int] = {}
    two_instances: list[str] = []
    # The reviewer's token, which decides the fraud reviews; of this run only.
    token = "" if config.external else uuid.uuid4().hex
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
                    orchestrator_env=_orchestrator_env(config, token),
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
                versions = config.order_saga_versions
                replica = stack.add_orchestrator(_REPLICAS[1], {"ORDER_SAGA_VERSION": str(versions[1 % len(versions)])})
                scope.callback(replica.stop)
                orchestrators.append(replica.address)
            addresses = {name: process.address for name, process in stack.services.items()}
            sink_path = Path(stack.services["notify"].env["DATA_DIR"]) / FILE_SINK_NAME
        faults = _Faults(config, stack, replica, proxy, log)
        report = asyncio.run(_chaos(config, addresses, orchestrators, faults, sink_path, log, token))
    report.deadlocks = deadlocks
    report.two_instances = two_instances
    if config.external:
        report.notes.append(
            "external stack: no process was killed; kinds flaky/slow/late/duplicate need the harness's FAULTS "
            "(devstack.chaos.SERVICE_FAULTS) on the services, stock conservation assumes no other traffic, "
            f"the file sink is not read, and no {'/'.join(_OWN_STACK_KINDS)} order was placed (they need a "
            "reviewer's token and the harness's own definition, devstack/chaos_definitions.py)"
        )
    elif not config.postgres:
        report.notes.append("SQLite: no second instances and no lost COMMIT replies (both need PostgreSQL)")
    return report
