"""The one invariant audit: how each order's saga ended, checked against the services' own records."""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from devstack.clients import Clients, gather_bounded, retrying, retrying_or_none
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory
from sagasuite.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from sagasuite.notify.v1 import notify_service_pb2 as notify
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping

# The audit (audit_orders over Orders, giving an AuditResult), the invariants as pure checks
# (check_*) over OrderRecords, and the readers they are filled in by.
__all__ = [
    "OTHER_KEY_SUFFIX",
    "UNREADABLE_LINE",
    "AuditResult",
    "ChildRecord",
    "HistoryEntry",
    "Order",
    "OrderRecord",
    "SendTime",
    "SignalAnswer",
    "SignalPlan",
    "SignalSend",
    "StartAnswer",
    "StartWay",
    "StockLevels",
    "apply_child",
    "apply_saga",
    "audit_orders",
    "check_one_saga_per_order",
    "check_order",
    "check_stock",
    "delivered_early",
    "describe",
    "read_file_sink",
    "read_service_records",
    "status_name",
    "stock_levels",
    "wait_delivered",
    "waits_on_attention",
]

# A duplicate order is also started under its id with this suffix, a key no order has.
OTHER_KEY_SUFFIX = "-again"
# Where read_file_sink counts the lines that are not one notification's JSON (no order id looks like it).
UNREADABLE_LINE = "<unreadable line>"
_ENDED = ("COMPLETED", "COMPENSATED")


def _enum_name(enum_type: Any, value: int, prefix: str) -> str:
    """A protobuf enum value's name without its prefix ("RESERVED"), or the number when it is unknown."""
    try:
        return str(enum_type.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def status_name(status: int) -> str:
    """A saga status as the audit and the tests spell it: "COMPLETED", "NEEDS_ATTENTION", ..."""
    return _enum_name(pb.SagaStatus, status, "SAGA_STATUS_")


def describe(saga: pb.Saga) -> str:
    """The saga and its history, one event a line, for failure messages."""
    lines = [
        f"saga {saga.saga_id} {saga.saga_type} v{saga.definition_version} order {saga.business_key} "
        f"{status_name(saga.status)} {saga.last_error}".rstrip()
    ]
    lines += [
        f"  {e.seq:3d} {e.type:28s} {e.step:18s} #{e.attempt} {e.code} {e.message} [{e.actor}]" for e in saga.history
    ]
    return "\n".join(lines)


# -- what was asked, what the services recorded, and the invariants --------------------------


class SendTime(enum.Enum):
    """When a planned signal or approval decision is first sent."""

    EARLY = "right after the start, before the saga reaches its wait"
    WAITING = "once GetSaga shows the saga waiting for it"
    AT_KILL = "as an orchestrator replica is killed"


class SignalSend(enum.Enum):
    """One delivery of a plan: the first, and the repeats that follow its answer."""

    FIRST = "the first delivery"
    SAME = "the same delivery again"
    OTHER = "another payload (an approval: the other decision) under the same id"
    ANOTHER_ID = "another delivery under a new id"


@dataclass(frozen=True)
class SignalPlan:
    """What an order's saga is sent while it runs: a fraud review's decision, or a signal, and its repeats.

    wait is the node that waits for it. An approval's decision goes by DecideApproval (the same
    decision again is a repeat, the other one a conflict); a signal by SignalSaga, by saga id or by
    type and business key, with recipient as its payload, which the saga ships to.
    """

    wait: str
    approval: bool
    approve: bool = True
    signal: str = ""
    recipient: str = ""
    when: SendTime = SendTime.EARLY
    repeats: tuple[SignalSend, ...] = ()
    by_key: bool = False

    def signal_id(self, order_id: str, send: SignalSend) -> str:
        """The sender's id of a signal delivery (approvals have one per step, chosen by the orchestrator)."""
        return f"{order_id}/{self.signal}/{2 if send is SignalSend.ANOTHER_ID else 1}"


@dataclass(frozen=True)
class SignalAnswer:
    """What one delivery answered after its retries: duplicate or not, or the refusal's code and ErrorInfo reason."""

    sent: SignalSend
    duplicate: bool = False
    code: str = ""
    detail: str = ""
    # A transient error (the orchestrator down) was retried with the same delivery.
    retried: bool = False
    during_kill: bool = False


@dataclass(frozen=True)
class Order:
    """An order as it was asked for: its kind (which of check_order's business rules apply) and its request.

    saga_type is what starts it (OrderSaga through PlaceOrder, or a definition of its own through
    StartSaga); signal, what its saga is sent while it runs.
    """

    kind: str
    request: pb.PlaceOrderRequest
    saga_type: str = "OrderSaga"
    signal: SignalPlan | None = None

    @property
    def order_id(self) -> str:
        return str(self.request.order_id)


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
    # The saga's definition, by GetSaga: its type and version, each node's kind ("call", "timer",
    # "signal", "approval", "child", "parallel") and its history, oldest first.
    saga_type: str = ""
    version: int = 0
    step_kinds: dict[str, str] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    # Its child sagas, each as GetSaga reads it.
    children: list[ChildRecord] = field(default_factory=list)
    # The recipient the shipping service recorded on the order's shipment.
    shipment_recipient: str = ""
    # What the saga was to be sent, and every answer it got.
    plan: SignalPlan | None = None
    answers: list[SignalAnswer] = field(default_factory=list)


@dataclass(frozen=True)
class HistoryEntry:
    """One event of a saga's history, as the checks read it."""

    type: str
    step: str = ""
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class ChildRecord:
    """A child saga of an order's saga, as GetSaga reads it."""

    step: str
    saga_id: str
    saga_type: str
    status: str
    parent_saga_id: str
    last_error: str = ""


def check_order(record: OrderRecord) -> list[str]:
    """Every invariant one order breaks, as sentences (empty when it is sound)."""
    problems: list[str] = []
    status = record.status
    if status == "NEEDS_ATTENTION":
        if not record.last_error:
            problems.append("needs attention without a reason")
    elif status == "RUNNING" and (stuck := waits_on_attention(record)):
        # A parent waits for its child while the child needs attention: both are on record for an operator.
        problems += [
            f"child {child.saga_id} needs attention without a reason" for child in stuck if not child.last_error
        ]
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
    problems += _wait_problems(record)
    problems += _child_problems(record)
    problems += _signal_problems(record)
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


def waits_on_attention(record: OrderRecord) -> list[ChildRecord]:
    """The children in NEEDS_ATTENTION of a saga that is still running (it waits for them, for an operator)."""
    return [child for child in record.children if child.status == "NEEDS_ATTENTION"]


# What ends a wait (a timer, a signal wait, an approval), besides its timeout.
_WAIT_ENDS = {"timer": "TimerFired", "signal": "SignalConsumed", "approval": "ApprovalDecided"}


def _count(record: OrderRecord, event_type: str, step: str) -> int:
    return sum(1 for e in record.history if e.type == event_type and e.step == step)


def _wait_problems(record: OrderRecord) -> list[str]:
    """Each wait and parallel group ends at most once per start; a completed saga went through every one it reached."""
    problems: list[str] = []
    completed = record.status == "COMPLETED"
    for step, kind in record.step_kinds.items():
        skipped = _count(record, "StepSkipped", step) > 0
        if kind in _WAIT_ENDS:
            began = _count(record, "WaitStarted", step)
            ended = _count(record, _WAIT_ENDS[kind], step) + _count(record, "WaitTimedOut", step)
            if ended > began:
                problems.append(f"{kind} {step} ended {ended} times, began {began} times")
            if completed and not skipped and (began == 0 or ended != began):
                problems.append(f"completed, yet {kind} {step} began {began} times and ended {ended} times")
        elif kind == "parallel":
            began, ended = _count(record, "BranchesStarted", step), _count(record, "BranchesCompleted", step)
            if began > 1 or ended > began:
                problems.append(f"parallel group {step}: branches started {began} times, completed {ended} times")
            if completed and not skipped and ended != 1:
                problems.append(f"completed, yet parallel group {step} completed {ended} times")
    return problems


def _child_problems(record: OrderRecord) -> list[str]:
    """One child per child step, its parent the order's saga, ended as its parent did."""
    problems = [
        f"{n} child sagas for step {step}"
        for step, n in Counter(child.step for child in record.children).items()
        if n > 1
    ]
    for child in record.children:
        name = f"child {child.saga_type} {child.saga_id}"
        if child.parent_saga_id != record.saga_id:
            problems.append(f"{name} names parent {child.parent_saga_id!r}, not {record.saga_id}")
        if record.status in _ENDED and child.status != record.status:
            problems.append(f"{name} is {child.status} under a {record.status} saga")
    if record.status == "COMPLETED":
        started = {child.step for child in record.children}
        problems += [
            f"completed without a child saga for step {step}"
            for step, kind in record.step_kinds.items()
            if kind == "child" and step not in started and not _count(record, "StepSkipped", step)
        ]
    return problems


def _received(record: OrderRecord, plan: SignalPlan, send: SignalSend) -> list[int]:
    """Positions in the history of the SignalReceived events of one delivery of the plan.

    The history names a signal's delivery "<signal name> (<signal id>)"; an approval's decision is
    recorded under the approval's step (earlier releases named it "approval:<step> (...)").
    """
    if plan.approval:
        legacy = f"approval:{plan.wait} ("
        return [
            i
            for i, e in enumerate(record.history)
            if e.type == "SignalReceived" and (e.step == plan.wait or e.message.startswith(legacy))
        ]
    named = f"{plan.signal} ({plan.signal_id(record.order_id, send)})"
    return [i for i, e in enumerate(record.history) if e.type == "SignalReceived" and e.message.startswith(named)]


def _consumed(record: OrderRecord, plan: SignalPlan) -> list[HistoryEntry]:
    kind = "ApprovalDecided" if plan.approval else "SignalConsumed"
    return [e for e in record.history if e.type == kind and e.step == plan.wait]


def delivered_early(record: OrderRecord) -> bool:
    """Whether the plan's first delivery was recorded before the saga began its wait, and was consumed."""
    plan = record.plan
    if plan is None:
        return False
    received = _received(record, plan, SignalSend.FIRST)
    began = [i for i, e in enumerate(record.history) if e.type == "WaitStarted" and e.step == plan.wait]
    return bool(received and began and received[0] < began[0] and _consumed(record, plan))


# The answer each repeat must get, by what the first delivery got: recorded (""), or refused because
# the saga had ended (SAGA_ENDED). None: accepted, a duplicate.
_REPEAT_ANSWERS: dict[SignalSend, dict[str, tuple[str, str] | None]] = {
    SignalSend.SAME: {"": None, "SAGA_ENDED": ("FAILED_PRECONDITION", "SAGA_ENDED")},
    SignalSend.OTHER: {
        "": ("FAILED_PRECONDITION", "SIGNAL_ID_REUSED"),
        "SAGA_ENDED": ("FAILED_PRECONDITION", "SAGA_ENDED"),
    },
}
_NOT_AWAITED = ("SIGNAL_NOT_AWAITED", "SAGA_ENDED")


def _signal_problems(record: OrderRecord) -> list[str]:
    """Every delivery answered as it must be, recorded once, consumed at most once, and the saga went its way."""
    plan = record.plan
    if plan is None or not record.step_kinds:
        return []
    what = "decision" if plan.approval else "signal"
    answers = {answer.sent: answer for answer in record.answers}
    first = answers.get(SignalSend.FIRST)
    if first is None:
        return [f"the {what} was never sent"]

    def said(answer: SignalAnswer) -> str:
        return f"{answer.code} {answer.detail}" if answer.code else f"OK duplicate={answer.duplicate}"

    problems: list[str] = []
    if plan.wait not in record.step_kinds:
        # Its definition (OrderSaga v1, say) never waits for it: every delivery is refused, none recorded.
        problems += [
            f"{answer.sent.value} to a saga that never waits for it answered {said(answer)}, not SIGNAL_NOT_AWAITED"
            for answer in record.answers
            if answer.code != "FAILED_PRECONDITION" or answer.detail not in _NOT_AWAITED
        ]
        if _received(record, plan, SignalSend.FIRST):
            problems.append(f"a {what} was recorded for a saga that never waits for it")
        return problems
    recorded = len(_received(record, plan, SignalSend.FIRST))
    # "" when the first delivery was recorded, SAGA_ENDED when the saga had ended before it came
    # (compensated, say: nothing was left to deliver to), anything else is wrong.
    first_outcome = first.detail if first.code else ""
    if not first.code:
        if first.duplicate and not first.retried:
            problems.append(f"{first.sent.value} answered duplicate=true, though it was sent once")
        if recorded != 1:
            problems.append(f"{first.sent.value} was answered OK and recorded {recorded} times")
    elif first.detail != "SAGA_ENDED" or record.status not in _ENDED or recorded:
        problems.append(f"{first.sent.value} answered {said(first)}")
        first_outcome = "wrong"
    for send in plan.repeats if first_outcome != "wrong" else ():
        answer = answers.get(send)
        if answer is None:
            problems.append(f"{send.value} was never sent")
        elif send is SignalSend.ANOTHER_ID:
            again = len(_received(record, plan, send))
            if answer.code and not (answer.detail == "SAGA_ENDED" and not again):
                problems.append(f"{send.value} answered {said(answer)}")
            elif not answer.code and (again != 1 or (answer.duplicate and not answer.retried)):
                problems.append(f"{send.value} answered {said(answer)} and was recorded {again} times")
        else:
            wanted = _REPEAT_ANSWERS[send][first_outcome]
            if wanted is None and (answer.code or not answer.duplicate):
                problems.append(f"{send.value} answered {said(answer)}, expected OK duplicate=True")
            elif wanted is not None and (answer.code, answer.detail) != wanted:
                problems.append(f"{send.value} answered {said(answer)}, expected {wanted[0]} {wanted[1]}")
    consumed = _consumed(record, plan)
    if len(consumed) > 1:
        problems.append(f"{what} for {plan.wait} consumed {len(consumed)} times")
    began = _count(record, "WaitStarted", plan.wait)
    timed_out = _count(record, "WaitTimedOut", plan.wait)
    if not first.code and began and not timed_out and not consumed and record.status in _ENDED:
        problems.append(f"the {what} was recorded and {plan.wait} began, yet the saga ended without consuming it")
    if consumed and plan.approval:
        verdict = "APPROVED" if plan.approve else "REJECTED"
        if consumed[0].code != verdict:
            problems.append(f"{plan.wait} decided {consumed[0].code}, but the decision sent first was {verdict}")
        if consumed[0].code == "REJECTED":
            if record.status == "COMPLETED":
                problems.append(f"{plan.wait} rejected, yet the order completed")
            if record.children or record.shipment is not None:
                problems.append(f"{plan.wait} rejected, yet fulfilment began (shipment {record.shipment})")
    elif consumed:
        first_id = plan.signal_id(record.order_id, SignalSend.FIRST)
        if not consumed[0].message.endswith(f"({first_id})"):
            problems.append(f"consumed {consumed[0].message}, not the first delivery {first_id}")
        # A tombstone (cancelled before any create) has no address; a created shipment, cancelled or not, has.
        if record.shipment in ("CREATED", "CANCELLED") and record.shipment_recipient != plan.recipient:
            problems.append(
                f"shipped to {record.shipment_recipient!r}, not to {plan.recipient!r} as the consumed signal says"
            )
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
    orders: Collection[str],
    placed: Collection[str],
    sagas_by_key: Mapping[str, int],
    *,
    children: Mapping[str, Sequence[str]] | None = None,
    saga_ids: Mapping[str, str] | None = None,
) -> list[str]:
    """One saga per order: each placed order has exactly one saga, and no saga has a key that no order has;
    at most one child saga per order (OrderSaga v2's FulfilmentSaga, under the order id), whose parent
    is the order's saga.

    orders are the run's order ids, placed those whose start returned a saga; sagas_by_key counts the
    run's sagas without a parent (ListSagas, since the run began) by business key; children gives
    the parent ids of the child sagas under each key, and saga_ids the saga each order's start returned.
    """
    problems = [f"order {key}: {n} sagas, expected 1" for key, n in sorted(sagas_by_key.items()) if n > 1]
    problems += [
        f"a saga under business key {key!r}, which no order has" for key in sorted(set(sagas_by_key) - set(orders))
    ]
    problems += [
        f"order {key}: placed, but ListSagas finds no saga for it" for key in sorted(set(placed) - set(sagas_by_key))
    ]
    for key, parents in sorted((children or {}).items()):
        if key not in orders:
            problems.append(f"a child saga under business key {key!r}, which no order has")
            continue
        if len(parents) > 1:
            problems.append(f"order {key}: {len(parents)} child sagas, expected at most 1")
        own = (saga_ids or {}).get(key, "")
        problems += [
            f"order {key}: a child saga of {parent}, not of the order's saga {own}"
            for parent in parents
            if parent != own
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

# -- reading the records ---------------------------------------------------------------------


_SUCCESSES = ("StepSucceeded", "CompensationSucceeded")


def apply_saga(record: OrderRecord, saga: pb.Saga) -> None:
    """Fill in how the order's saga ended, from GetSaga (with its history)."""
    record.saga_id = saga.saga_id
    record.status = status_name(saga.status)
    record.last_error = saga.last_error
    record.saga_type = saga.saga_type
    record.version = saga.definition_version
    record.step_kinds = {step.name: step.kind for step in saga.steps}
    record.history = [HistoryEntry(e.type, e.step, e.code, e.message) for e in saga.history]
    counted = Counter((e.type, e.step) for e in saga.history if e.type in _SUCCESSES)
    record.successes = dict(counted)


def apply_child(record: OrderRecord, step: str, child: pb.Saga) -> None:
    """Add a child saga of the order's saga (GetSaga of the child), its successes named <type>.<step>."""
    record.children.append(
        ChildRecord(
            step, child.saga_id, child.saga_type, status_name(child.status), child.parent_saga_id, child.last_error
        )
    )
    for e in child.history:
        if e.type in _SUCCESSES:
            key = (e.type, f"{child.saga_type}.{e.step}")
            record.successes[key] = record.successes.get(key, 0) + 1


async def read_service_records(clients: Clients, record: OrderRecord) -> None:
    """Fill in what inventory, payment, shipping and notify recorded for the order."""
    oid = record.order_id
    reservation, ledger, shipment, notes = await asyncio.gather(
        retrying_or_none(lambda: clients.reservation(oid, call_timeout=5)),
        retrying(lambda: clients.ledger(oid, call_timeout=5)),
        retrying_or_none(lambda: clients.shipment(oid, call_timeout=5)),
        retrying(lambda: clients.notifications(oid, call_timeout=5)),
    )
    if reservation is not None:
        record.reservation = _enum_name(inventory.ReservationStatus, reservation.status, "RESERVATION_STATUS_")
        reserved: Counter[str] = Counter()
        for line in reservation.items:
            reserved[line.sku] += line.quantity
        record.reserved_items = dict(reserved)
    for entry in ledger:
        if entry.kind == payment.LEDGER_ENTRY_KIND_CHARGE:
            record.charges.append(entry.amount.minor_units)
        elif entry.kind == payment.LEDGER_ENTRY_KIND_REFUND:
            record.refunds.append(entry.amount.minor_units)
    if shipment is not None:
        record.shipment = _enum_name(shipping.ShipmentStatus, shipment.status, "SHIPMENT_STATUS_")
        record.shipment_recipient = shipment.address.recipient_name
    record.notifications = len(notes)
    record.deliveries = [_enum_name(notify.DeliveryState, n.delivery.state, "DELIVERY_STATE_") for n in notes]


async def stock_levels(stub: inventory_grpc.InventoryServiceAsyncStub, skus: Iterable[str]) -> StockLevels:
    """Available and reserved units of each SKU, as the inventory service reports them."""
    request = inventory.GetStockRequest(skus=list(skus))
    response = await retrying(lambda: stub.GetStock(request, timeout=5))
    return {level.sku: (level.available, level.reserved) for level in response.levels}


async def _pending_deliveries(clients: Clients) -> set[str]:
    """Order ids of every notification whose delivery is still PENDING."""
    pending: set[str] = set()
    token = ""
    while True:
        request = notify.ListNotificationsRequest(
            delivery_state=notify.DELIVERY_STATE_PENDING, page_size=500, page_token=token
        )
        page = await retrying(lambda request=request: clients.notify.ListNotifications(request, timeout=10))  # type: ignore[misc]
        pending.update(n.order_id for n in page.notifications)
        token = page.next_page_token
        if not token:
            return pending


async def wait_delivered(clients: Clients, order_ids: Iterable[str], limit: float) -> float | None:
    """Wait until no notification of these orders is PENDING; the seconds it took, or None after limit."""
    wanted = set(order_ids)
    began = time.monotonic()
    while True:
        if not await _pending_deliveries(clients) & wanted:
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


async def _sagas_under(clients: Clients, business_key: str) -> int:
    """How many OrderSagas ListSagas finds under the business key."""
    request = pb.ListSagasRequest(saga_type="OrderSaga", business_key=business_key, page_size=10)
    return len((await retrying(lambda: clients.next_orchestrator().ListSagas(request, timeout=10))).sagas)


async def _sagas_by_key(clients: Clients, since: Timestamp, tag: str) -> tuple[Counter[str], dict[str, list[str]]]:
    """The sagas of every type created since `since` whose business key contains tag: the sagas that
    have no parent counted by key, and the parent ids of the child sagas under each key."""
    roots: Counter[str] = Counter()
    children: dict[str, list[str]] = {}
    token = ""
    while True:
        request = pb.ListSagasRequest(created_after=since, page_size=500, page_token=token)
        page = await retrying(lambda r=request: clients.next_orchestrator().ListSagas(r, timeout=10))  # type: ignore[misc]
        for saga in page.sagas:
            if tag not in saga.business_key:
                continue
            if saga.parent_saga_id:
                children.setdefault(saga.business_key, []).append(saga.parent_saga_id)
            else:
                roots[saga.business_key] += 1
        token = page.next_page_token
        if not token:
            return roots, children


async def _record(
    clients: Clients,
    order: Order,
    saga_id: str,
    starts: Sequence[StartAnswer],
    answers: Sequence[SignalAnswer],
    sink: Counter[str] | None,
) -> OrderRecord:
    """What was asked, how its saga ended and what the services recorded, for one order."""
    items: Counter[str] = Counter()
    for line in order.request.items:
        items[line.sku] += line.quantity
    record = OrderRecord(order.order_id, order.kind, dict(items), order.request.amount.minor_units)
    record.plan, record.answers = order.signal, list(answers)
    if saga_id:
        saga = await retrying(lambda: clients.saga(saga_id, call_timeout=10))
        apply_saga(record, saga)
        for link in saga.children:
            apply_child(record, link.step, await retrying(lambda s=link.saga_id: clients.saga(s, call_timeout=10)))  # type: ignore[misc]
    await read_service_records(clients, record)
    if sink is not None:
        record.sink_lines = sink[order.order_id]
    if starts:
        record.starts = list(starts)
        record.sagas_for_key, record.sagas_for_other_key = await asyncio.gather(
            _sagas_under(clients, order.order_id), _sagas_under(clients, order.order_id + OTHER_KEY_SUFFIX)
        )
    return record


# -- the audit -------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """What the audit read and every invariant it found broken."""

    records: list[OrderRecord]
    # Order id -> what is wrong with that order (only wrong orders are named).
    problems: dict[str, list[str]]
    # What is wrong with the run as a whole: sagas per order, the file sink, stock, deliveries.
    run: list[str]
    # Seconds until no confirmation of the orders was PENDING, or None when some still were.
    delivered_in: float | None

    @property
    def violations(self) -> list[str]:
        """Every broken invariant, one a line, the orders' first."""
        records = {record.order_id: record for record in self.records}
        lines = [
            f"order {order_id} ({records[order_id].kind}, {records[order_id].status}): {problem}"
            for order_id, problems in self.problems.items()
            for problem in problems
        ]
        return lines + self.run


async def audit_orders(
    clients: Clients,
    orders: Sequence[Order],
    saga_ids: Mapping[str, str],
    stock_before: StockLevels,
    *,
    starts: Mapping[str, Sequence[StartAnswer]] | None = None,
    signals: Mapping[str, Sequence[SignalAnswer]] | None = None,
    expected: Mapping[str, int] | None = None,
    attention_allowed: bool = True,
    sink_path: Path | None = None,
    since: Timestamp | None = None,
    key_tag: str = "",
    delivery_limit: float = 60.0,
) -> AuditResult:
    """Check every order, once its saga has ended, against the services' own records (see check_order).

    saga_ids maps an order id to the saga its start returned (an order without one was not placed);
    starts holds every start's answer of the orders started several ways, signals every answer to the
    deliveries of the orders' signal plans (Order.signal); expected maps an order id
    to the status its saga must have ended in; attention_allowed=False makes NEEDS_ATTENTION wrong
    too. First waits up to delivery_limit seconds for the orders' confirmations to be delivered.
    sink_path is the file notify delivers to. With since, one saga per order (check_one_saga_per_order)
    among the sagas created since then whose key contains key_tag. Stock is conserved over the
    SKUs of stock_before, so no other order may touch them meanwhile.
    """
    delivered_in = await wait_delivered(clients, [order.order_id for order in orders], delivery_limit)
    sink = read_file_sink(sink_path) if sink_path is not None else None
    started, signalled = starts or {}, signals or {}
    records = await gather_bounded(
        [
            lambda o=order: _record(  # type: ignore[misc]
                clients,
                o,
                saga_ids.get(o.order_id, ""),
                started.get(o.order_id, ()),
                signalled.get(o.order_id, ()),
                sink,
            )
            for order in orders
        ]
    )
    result = AuditResult(records, {}, [], delivered_in)
    for record in records:
        problems = check_order(record)
        wanted = (expected or {}).get(record.order_id)
        if wanted is not None and record.status != status_name(wanted):
            problems.insert(0, f"ended {record.status}, expected {status_name(wanted)}")
        elif not attention_allowed and record.status not in _ENDED:
            problems.insert(0, f"ended {record.status}, expected COMPLETED or COMPENSATED")
        if problems:
            result.problems[record.order_id] = problems
    if since is not None:
        sagas_by_key, children = await _sagas_by_key(clients, since, key_tag)
        placed = [order_id for order_id, saga_id in saga_ids.items() if saga_id]
        order_ids = [order.order_id for order in orders]
        one_each = check_one_saga_per_order(order_ids, placed, sagas_by_key, children=children, saga_ids=saga_ids)
        result.run += [f"sagas: {problem}" for problem in one_each]
    if sink is not None and sink[UNREADABLE_LINE]:
        result.run.append(f"file sink: {sink[UNREADABLE_LINE]} lines that are not a delivered notification")
    stock_after = await stock_levels(clients.inventory, stock_before)
    result.run += [f"stock: {problem}" for problem in check_stock(stock_before, stock_after, records)]
    if delivered_in is None:
        result.run.append(f"confirmations still PENDING {delivery_limit:.0f} s after the last saga ended")
    return result
