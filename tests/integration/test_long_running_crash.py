"""kill -9 of the orchestrator during waits, timers, signals, children and branches, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from devstack.clients import TRANSIENT, retrying_or_none
from devstack.stack import LocalStack
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from tests.integration.saga_audit import log_lines, wait_ended
from tests.integration.test_metrics import Scrape
from tests.orchestrator_helpers import (
    Clients,
    connect,
    definitions_env,
    fresh_postgres_database,
    ledger_kinds,
    new_order_id,
    order_request,
    render,
    start_stack,
    status_name,
    wait_for,
    wait_until,
)

ORCHESTRATOR_ENV = {
    **definitions_env(
        "SIGNALLED_ORDER_SAGA",
        "IMPATIENT_ORDER_SAGA",
        "TIMED_ORDER_SAGA",
        "PARENT_ORDER_SAGA",
        "PATIENT_PARALLEL_ORDER_SAGA",
        "REMINDED_ORDER_SAGA",
    ),
    # OrderSaga v2; orders of BIG minor units wait for a fraud review, of SMALL do not.
    "ORDER_SAGA_VERSION": "2",
    "REVIEW_THRESHOLD": "5000",
    # The waits gauges are refreshed every twelfth outbox-metrics round: every 1.2 s here.
    "METRICS_PORT": "0",
    "OUTBOX_METRICS_INTERVAL_SECONDS": "0.1",
}
SMALL, BIG = 2599, 9000
# Faults pick orders by a fragment of their id, so each test slows only its own orders:
# "crash-branch-": ReserveStock's first call sleeps 1.9 s before its work (v2's call timeout is 2 s; the
#   resend after the restart does not sleep), and Charge commits, then holds its first reply 1.5 s:
#   the test kills once the services have logged both delays of both orders;
# "crash-stop-": ReserveStock sleeps 6 s (PatientParallelOrder allows 20) while the other branch fails
#   (its charge comes after a 2 s timer) or while the saga is paused;
# "crash-ship-": CreateShipment commits, then holds its first reply 1.5 s: the child's pivot on the wire.
FAULTS = {
    "inventory": "ReserveStock:latency_ms=1900,latency_first=1,order_contains=crash-branch-;"
    "ReserveStock:latency_ms=6000,order_contains=crash-stop-",
    "payment": "Charge:reply_delay_ms=1500,reply_delay_first=1,order_contains=crash-branch-",
    "shipping": "CreateShipment:reply_delay_ms=1500,reply_delay_first=1,order_contains=crash-ship-",
}
# LEASE_SECONDS stays 30 s: a saga moves on after a restart only because the restarted replica
# takes back its own leases at once. The limits are generous for a loaded 2-core machine.
WAIT = 120.0

# What the services recorded for an order: (reservation, ledger, shipment, confirmations).
Effects = tuple[str, list[str], str, int]
RESERVED_AND_CHARGED: Effects = ("RESERVED", ["CHARGE"], "NONE", 0)
RELEASED: Effects = ("RELEASED", [], "NONE", 0)
SHIPPED_ORDER: Effects = ("RESERVED", ["CHARGE"], "CREATED", 1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The orchestrator's database: "" for its SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield ""
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_admin_url")) as url:
        yield url


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    data_dir = tmp_path_factory.mktemp("long-running-crash")
    running = start_stack(data_dir, faults=FAULTS, orchestrator_env=ORCHESTRATOR_ENV, database_url=database_url)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(stack) as opened:
        yield opened


# -- driving the stack ------------------------------------------------------------------------


def kill(stack: LocalStack) -> None:
    """SIGKILL: the orchestrator gets no chance to finish a call, a commit or a lease."""
    assert stack.orchestrator is not None
    stack.orchestrator.kill()


async def restart(stack: LocalStack) -> None:
    """Start it again on its port, under the same replica id: it takes back its own leases at once."""
    assert stack.orchestrator is not None
    await asyncio.to_thread(stack.orchestrator.restart)


async def crash_and_restart(stack: LocalStack) -> None:
    kill(stack)
    await restart(stack)


async def start(clients: Clients, saga_type: str, order_id: str, **order: object) -> str:
    request = order_request(order_id, **order)  # type: ignore[arg-type]
    packed = pb.StartSagaRequest(saga_type=saga_type, business_key=order_id)
    packed.input.Pack(request)
    return (await clients.orchestrator.StartSaga(packed, timeout=10)).saga_id


def payment_signal(saga_id: str, signal_id: str, token: str = "tok_visa") -> pb.SignalSagaRequest:
    """SignalledOrder's payment_ok; its charge uses the token of the payload."""
    body = struct_pb2.Struct()
    body.update({"token": token})
    return pb.SignalSagaRequest(saga_id=saga_id, name="payment_ok", signal_id=signal_id, payload=body)


def decision(saga_id: str, step: str, approve: bool) -> pb.DecideApprovalRequest:
    return pb.DecideApprovalRequest(saga_id=saga_id, step=step, approve=approve, reason="crash test")


def seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def clock_past(moment: float) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return time.time() > moment

    return probe


def exists(read: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[bool]]:
    """A probe: the service has a record (its read is not NOT_FOUND)."""

    async def probe() -> bool:
        return await retrying_or_none(read, WAIT) is not None

    return probe


# -- reading what happened --------------------------------------------------------------------


def count(saga: pb.Saga, event_type: str, step: str = "") -> int:
    return sum(1 for e in saga.history if e.type == event_type and (not step or e.step == step))


def waiting_on(step: str) -> Callable[[pb.Saga], bool]:
    return lambda saga: any(wait.step == step for wait in saga.waits)


def step_states(saga: pb.Saga) -> dict[str, str]:
    return {step.name: step.state for step in saga.steps}


def each_effect_once(saga: pb.Saga) -> None:
    """No step succeeded twice, forward or back, by the orchestrator's own account."""
    for kind in ("StepSucceeded", "CompensationSucceeded"):
        steps = [e.step for e in saga.history if e.type == kind]
        assert len(steps) == len(set(steps)), f"{kind} twice for a step:\n{render(saga)}"


async def effects(clients: Clients, order_id: str) -> Effects:
    """What inventory, payment, shipping and notify recorded for the order."""
    reservation = await retrying_or_none(lambda: clients.reservation(order_id, call_timeout=5))
    shipment = await retrying_or_none(lambda: clients.shipment(order_id, call_timeout=5))
    reservation_status = "NONE"
    if reservation is not None:
        reservation_status = inventory_pb.ReservationStatus.Name(reservation.status).removeprefix("RESERVATION_STATUS_")
    shipment_status = "NONE"
    if shipment is not None:
        shipment_status = shipping_pb.ShipmentStatus.Name(shipment.status).removeprefix("SHIPMENT_STATUS_")
    ledger = ledger_kinds(await clients.ledger(order_id, call_timeout=5))
    return reservation_status, ledger, shipment_status, len(await clients.notifications(order_id, call_timeout=5))


async def sagas_of(clients: Clients, saga_type: str, business_key: str) -> list[pb.Saga]:
    request = pb.ListSagasRequest(saga_type=saga_type, business_key=business_key, page_size=10)
    return list((await clients.orchestrator.ListSagas(request, timeout=10)).sagas)


def calls(stack: LocalStack, service: str, method: str, key: str, *fragments: str) -> list[str]:
    """The service's log lines of calls of method under the idempotency key."""
    return log_lines(stack.services[service].log_path, f"method={method} key={key} ", *fragments)


def applied(stack: LocalStack, service: str, method: str, key: str) -> int:
    """How many calls under the key did the work (answered OK, not replayed from the stored answer)."""
    return sum(1 for line in calls(stack, service, method, key, "code=OK") if " replayed" not in line)


async def ended(clients: Clients, saga_ids: Sequence[str]) -> dict[str, pb.Saga]:
    return await wait_ended(clients.orchestrator, saga_ids, WAIT)


# -- 1. during a wait -------------------------------------------------------------------------


async def test_kill_during_a_signal_wait_an_approval_and_a_timeout(stack: LocalStack, clients: Clients) -> None:
    signalled, reviewed, impatient = (new_order_id(f"crash-{kind}") for kind in ("wait", "review", "impatient"))
    signalled_id = await start(clients, "SignalledOrder", signalled)
    reviewed_id = await clients.place(order_request(reviewed, minor_units=BIG))
    await wait_for(clients, signalled_id, waiting_on("await_payment"), within=WAIT)
    await wait_for(clients, reviewed_id, waiting_on("fraud_review"), within=WAIT)
    # A wait of one second: killed while it waits, down until it has timed out.
    impatient_id = await start(clients, "ImpatientOrder", impatient)
    parked = await wait_for(clients, impatient_id, lambda s: count(s, "WaitStarted") == 1, within=WAIT)
    kill(stack)
    times_out = seconds(next(e.at for e in parked.history if e.type == "WaitStarted")) + 1.0
    await wait_until(clock_past(times_out + 0.2), "the impatient wait's timeout", within=WAIT)
    await restart(stack)

    first = await clients.orchestrator.SignalSaga(payment_signal(signalled_id, "pay-1"), timeout=10)
    assert not first.duplicate
    await clients.orchestrator.DecideApproval(decision(reviewed_id, "fraud_review", True), timeout=10)
    sagas = await ended(clients, [signalled_id, reviewed_id, impatient_id])

    saga = sagas[signalled_id]
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert (count(saga, "SignalReceived"), count(saga, "SignalConsumed")) == (1, 1), render(saga)
    assert await effects(clients, signalled) == RESERVED_AND_CHARGED
    again = await clients.orchestrator.SignalSaga(payment_signal(signalled_id, "pay-1"), timeout=10)
    assert again.duplicate and again.received_at == first.received_at

    saga = sagas[reviewed_id]
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert count(saga, "ApprovalDecided") == 1, render(saga)
    assert await effects(clients, reviewed) == SHIPPED_ORDER
    assert len(await sagas_of(clients, "FulfilmentSaga", reviewed)) == 1

    saga = sagas[impatient_id]
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert (count(saga, "WaitTimedOut"), count(saga, "CompensationSucceeded", "reserve_stock")) == (1, 1)
    assert await effects(clients, impatient) == RELEASED
    assert applied(stack, "inventory", "ReleaseStock", f"{impatient_id}/reserve_stock/compensation") == 1
    for saga in sagas.values():
        each_effect_once(saga)


# -- 2. as timers fire ------------------------------------------------------------------------


async def test_kill_as_twenty_timers_fire(stack: LocalStack, clients: Clients) -> None:
    order_ids = [new_order_id("crash-timer") for _ in range(20)]

    async def staggered(index: int, order_id: str) -> str:
        # 50 ms apart: the timers come due over about a second, a few at each poll of the outbox.
        await asyncio.sleep(index * 0.05)
        return await start(clients, "TimedOrder", order_id)

    saga_ids = list(await asyncio.gather(*(staggered(i, order_id) for i, order_id in enumerate(order_ids))))
    # A saga may be past its timer by the time it is looked at: read when each timer began, all at once.
    begun = await asyncio.gather(
        *(wait_for(clients, s, lambda saga: count(saga, "WaitStarted") == 1, within=WAIT) for s in saga_ids)
    )
    wake_times = sorted(
        seconds(next(e.at for e in saga.history if e.type == "WaitStarted")) + 3.0 for saga in begun
    )  # TimedOrder's cool_off lasts 3 s
    # Kill when the middle one is due: the earlier ones have fired, the next are being claimed or fired.
    await wait_until(clock_past(wake_times[len(wake_times) // 2]), "the middle timer's wake-up time", within=WAIT)
    killed_at = time.time()
    await crash_and_restart(stack)

    sagas = await ended(clients, saga_ids)
    fired_at = []
    for order_id, saga_id in zip(order_ids, saga_ids, strict=True):
        saga = sagas[saga_id]
        assert status_name(saga.status) == "COMPLETED", render(saga)
        assert count(saga, "TimerFired") == 1, render(saga)
        each_effect_once(saga)
        assert await effects(clients, order_id) == RESERVED_AND_CHARGED, order_id
        fired_at.append(seconds(next(e.at for e in saga.history if e.type == "TimerFired")))
    # The later timers were not yet due at the kill: they fired on the restarted replica.
    before_kill = sum(1 for at in fired_at if at < killed_at)
    assert before_kill < len(fired_at), f"all {before_kill} timers fired before the kill: it came too late"


# -- 3. while signals are recorded ------------------------------------------------------------


async def test_kill_while_signals_are_recorded(stack: LocalStack, clients: Clients) -> None:
    # Every fifth signal's token is declined: that saga compensates.
    tokens = {new_order_id("crash-signal"): "tok_declined" if i % 5 == 0 else "tok_visa" for i in range(20)}
    order_ids = list(tokens)
    started = await asyncio.gather(*(start(clients, "SignalledOrder", order_id) for order_id in order_ids))
    saga_ids = dict(zip(order_ids, started, strict=True))
    for saga_id in saga_ids.values():
        await wait_for(clients, saga_id, waiting_on("await_payment"), within=WAIT)

    answered = 0
    failed_calls = 0

    def request(order_id: str) -> pb.SignalSagaRequest:
        return payment_signal(saga_ids[order_id], f"pay-{order_id}", tokens[order_id])

    async def deliver(index: int, order_id: str) -> pb.SignalSagaResponse:
        """As a client should: a call that failed UNAVAILABLE is sent again with the same signal_id."""
        nonlocal answered, failed_calls
        await asyncio.sleep(index * 0.1)  # spread over 2 s, so signals are sent before, during and after the kill
        deadline = time.monotonic() + WAIT
        while True:
            try:
                answer = await clients.orchestrator.SignalSaga(request(order_id), timeout=10)
                answered += 1
                return answer
            except grpc.aio.AioRpcError as error:
                if error.code() not in TRANSIENT or time.monotonic() > deadline:
                    raise
                failed_calls += 1
            await asyncio.sleep(0.05)

    async def five_answered() -> bool:
        return answered >= 5

    async def killer() -> None:
        await wait_until(five_answered, "five signals answered", within=WAIT)
        await crash_and_restart(stack)

    answers, _ = await asyncio.gather(
        asyncio.gather(*(deliver(i, order_id) for i, order_id in enumerate(order_ids))), killer()
    )
    assert failed_calls, "no SignalSaga call met the kill"
    for order_id, answer in zip(order_ids, answers, strict=True):
        again = await clients.orchestrator.SignalSaga(request(order_id), timeout=10)
        assert again.duplicate and again.received_at == answer.received_at, order_id

    sagas = await ended(clients, list(saga_ids.values()))
    for order_id, saga_id in saga_ids.items():
        saga = sagas[saga_id]
        declined = tokens[order_id] == "tok_declined"
        assert status_name(saga.status) == ("COMPENSATED" if declined else "COMPLETED"), render(saga)
        assert (count(saga, "SignalReceived"), count(saga, "SignalConsumed")) == (1, 1), render(saga)
        each_effect_once(saga)
        assert await effects(clients, order_id) == (RELEASED if declined else RESERVED_AND_CHARGED), order_id


# -- 4. with a child in flight ----------------------------------------------------------------


async def test_kill_with_children_waiting_and_a_child_pivot_on_the_wire(stack: LocalStack, clients: Clients) -> None:
    kept, undone, shipped = new_order_id("crash-parent"), new_order_id("crash-parent"), new_order_id("crash-ship")
    # ParentOrders whose ShippingChild shipped and waits for its pickup; the declined one will compensate it.
    parents = {
        kept: await start(clients, "ParentOrder", kept),
        undone: await start(clients, "ParentOrder", undone, token="tok_declined"),
    }
    children: dict[str, str] = {}
    for order_id, parent_id in parents.items():
        parent = await wait_for(clients, parent_id, lambda s: bool(s.children), within=WAIT)
        children[order_id] = parent.children[0].saga_id
        await wait_for(clients, children[order_id], waiting_on("await_pickup"), within=WAIT)
    # OrderSaga v2: its FulfilmentSaga's shipment is committed with the reply held back: kill there
    # at once (the shipping log below shows that the call was on the wire).
    shipped_id = await clients.place(order_request(shipped))
    await wait_until(exists(functools.partial(clients.shipment, shipped, call_timeout=5)), "the shipment", within=WAIT)
    await crash_and_restart(stack)
    fulfilment_id = (await clients.saga(shipped_id)).children[0].saga_id

    for order_id, child_id in children.items():
        pickup = pb.SignalSagaRequest(saga_id=child_id, name="picked_up", signal_id=f"pickup-{order_id}")
        await clients.orchestrator.SignalSaga(pickup, timeout=10)
    sagas = await ended(clients, [*parents.values(), *children.values(), shipped_id, fulfilment_id])
    for saga in sagas.values():
        each_effect_once(saga)
    for order_id, parent_status, order_effects in (
        (kept, "COMPLETED", ("RESERVED", ["CHARGE"], "CREATED", 0)),
        (undone, "COMPENSATED", ("RELEASED", [], "CANCELLED", 0)),
    ):
        parent, child = sagas[parents[order_id]], sagas[children[order_id]]
        assert status_name(parent.status) == parent_status, render(parent)
        assert status_name(child.status) == parent_status, render(child)
        assert (count(parent, "ChildStarted"), count(child, "SignalConsumed")) == (1, 1), render(parent)
        assert await effects(clients, order_id) == order_effects, order_id
        assert [s.saga_id for s in await sagas_of(clients, "ShippingChild", order_id)] == [children[order_id]]

    parent, child = sagas[shipped_id], sagas[fulfilment_id]
    assert (status_name(parent.status), status_name(child.status)) == ("COMPLETED", "COMPLETED"), render(parent)
    assert count(parent, "ChildStarted") == 1, render(parent)
    assert await effects(clients, shipped) == SHIPPED_ORDER
    assert [s.saga_id for s in await sagas_of(clients, "FulfilmentSaga", shipped)] == [fulfilment_id]
    key = f"{fulfilment_id}/create_shipment/action"
    # The call on the wire died with the orchestrator after its effect; the resend was answered from the record.
    assert calls(stack, "shipping", "CreateShipment", key, "code=CANCELLED"), "the shipment was not on the wire"
    assert applied(stack, "shipping", "CreateShipment", key) == 0
    assert calls(stack, "shipping", "CreateShipment", key, "code=OK", "replayed")


# -- 5. with branches in flight ---------------------------------------------------------------


async def test_kill_with_both_branches_of_order_saga_v2_on_the_wire(stack: LocalStack, clients: Clients) -> None:
    small, big = new_order_id("crash-branch"), new_order_id("crash-branch")
    placed = await asyncio.gather(
        clients.place(order_request(small, minor_units=SMALL)), clients.place(order_request(big, minor_units=BIG))
    )
    saga_ids = dict(zip((small, big), placed, strict=True))

    # Each charge is committed with its reply held back, each reserve sleeps before its work: kill
    # there at once (the services' logs below show that both calls were on the wire).
    async def both_on_the_wire() -> bool:
        # Read from the faults' own log lines, written as each delay starts: every reserve sleeps before
        # its work, and every charge has committed and holds its reply.
        inventory, payment = stack.services["inventory"].log_path, stack.services["payment"].log_path
        return all(
            log_lines(inventory, "injected latency: ReserveStock,", f"key {saga_id}/reserve_stock/action,")
            and log_lines(payment, "injected reply delay: Charge,", f"key {saga_id}/charge_payment/action,")
            for saga_id in saga_ids.values()
        )

    await wait_until(both_on_the_wire, "both branches on the wire", within=WAIT)
    await crash_and_restart(stack)
    # The big order waits for its review after the branches: rejected, it compensates both.
    await wait_for(clients, saga_ids[big], waiting_on("fraud_review"), within=WAIT)
    await clients.orchestrator.DecideApproval(decision(saga_ids[big], "fraud_review", False), timeout=10)
    sagas = await ended(clients, list(saga_ids.values()))

    saga = sagas[saga_ids[small]]
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert await effects(clients, small) == SHIPPED_ORDER
    assert len(await sagas_of(clients, "FulfilmentSaga", small)) == 1
    saga = sagas[saga_ids[big]]
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert await effects(clients, big) == ("RELEASED", ["CHARGE", "REFUND"], "NONE", 0)
    assert not await sagas_of(clients, "FulfilmentSaga", big)
    for step in ("reserve_stock", "charge_payment"):
        assert count(saga, "CompensationSucceeded", step) == 1, render(saga)
    for compensation, step in (("ReleaseStock", "reserve_stock"), ("Refund", "charge_payment")):
        service = "inventory" if step == "reserve_stock" else "payment"
        assert applied(stack, service, compensation, f"{saga_ids[big]}/{step}/compensation") == 1
    for saga_id in saga_ids.values():
        each_effect_once(sagas[saga_id])
        reserve_key, charge_key = f"{saga_id}/reserve_stock/action", f"{saga_id}/charge_payment/action"
        # The reserve died before its work and was done by the resend; the charge was done once, then replayed.
        assert calls(stack, "inventory", "ReserveStock", reserve_key, "code=CANCELLED"), "reserve not on the wire"
        assert applied(stack, "inventory", "ReserveStock", reserve_key) == 1
        assert calls(stack, "payment", "Charge", charge_key, "code=CANCELLED"), "the charge reply was not held"
        assert applied(stack, "payment", "Charge", charge_key) == 0
        assert calls(stack, "payment", "Charge", charge_key, "code=OK", "replayed")


async def test_kill_while_a_branch_is_on_the_wire_after_another_failed(stack: LocalStack, clients: Clients) -> None:
    order_id = new_order_id("crash-stop")
    saga_id = await start(clients, "PatientParallelOrder", order_id, token="tok_declined")
    # The charge branch is declined while the reserve sleeps 6 s before its work: the group stops
    # with that call on the wire. Kill then.
    saga = await wait_for(clients, saga_id, lambda s: count(s, "BranchesStopping") == 1, within=WAIT)
    assert step_states(saga)["reserve_stock"] == "running", render(saga)
    await crash_and_restart(stack)

    saga = (await ended(clients, [saga_id]))[saga_id]
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    each_effect_once(saga)
    compensated = [e.step for e in saga.history if e.type == "CompensationSucceeded"]
    assert sorted(compensated) == ["create_shipment", "reserve_stock"], render(saga)
    assert await effects(clients, order_id) == ("RELEASED", [], "CANCELLED", 0)
    key = f"{saga_id}/reserve_stock"
    assert calls(stack, "inventory", "ReserveStock", f"{key}/action", "code=CANCELLED"), "reserve not on the wire"
    assert applied(stack, "inventory", "ReleaseStock", f"{key}/compensation") == 1
    assert applied(stack, "shipping", "CancelShipment", f"{saga_id}/create_shipment/compensation") == 1


async def test_a_paused_timer_stays_held_across_a_kill(stack: LocalStack, clients: Clients) -> None:
    order_id = new_order_id("crash-stop")
    saga_id = await start(clients, "PatientParallelOrder", order_id)
    # Paused while its reserve sleeps on the wire (6 s) and its settle timer (2 s) has not fired.
    await clients.orchestrator.PauseSaga(pb.PauseSagaRequest(saga_id=saga_id, reason="hold"), timeout=10)
    saga = await wait_for(clients, saga_id, lambda s: count(s, "StepSucceeded", "create_shipment") == 1, within=WAIT)
    assert status_name(saga.status) == "PAUSED" and count(saga, "TimerFired") == 0, render(saga)
    assert step_states(saga)["reserve_stock"] == "running", render(saga)
    kill(stack)
    wake = seconds(next(e.at for e in saga.history if e.type == "WaitStarted")) + 2.0
    await wait_until(clock_past(wake + 0.2), "the held timer's wake-up time", within=WAIT)
    await restart(stack)

    # The reserve on the wire at the kill is sent again and recorded; the held timer stays held.
    saga = await wait_for(clients, saga_id, lambda s: count(s, "StepSucceeded", "reserve_stock") == 1, within=WAIT)
    assert status_name(saga.status) == "PAUSED", render(saga)
    await clients.orchestrator.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id), timeout=10)
    saga = (await ended(clients, [saga_id]))[saga_id]
    assert status_name(saga.status) == "COMPLETED", render(saga)
    each_effect_once(saga)
    assert await effects(clients, order_id) == ("RESERVED", ["CHARGE"], "CREATED", 0)
    kinds = [e.type for e in saga.history]
    assert kinds.count("TimerFired") == 1 and kinds.index("SagaResumed") < kinds.index("TimerFired"), render(saga)


# -- metrics of waiting sagas -----------------------------------------------------------------


async def test_waiting_gauges_reminders_and_signal_delivery_metrics(stack: LocalStack, clients: Clients) -> None:
    orchestrator = stack.processes()["orchestrator"]
    signalled = [new_order_id("metrics-signal") for _ in range(2)]
    signalled_ids = [await start(clients, "SignalledOrder", order_id) for order_id in signalled]
    reviewed_id = await clients.place(order_request(new_order_id("metrics-review"), minor_units=BIG))
    reminded_id = await start(clients, "RemindedOrder", new_order_id("metrics-remind"))
    for saga_id in signalled_ids:
        await wait_for(clients, saga_id, waiting_on("await_payment"), within=WAIT)
    await wait_for(clients, reviewed_id, waiting_on("fraud_review"), within=WAIT)
    await wait_for(clients, reminded_id, waiting_on("go_ahead"), within=WAIT)

    def gauges_show(signals: int, approvals: int) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            scrape = Scrape(orchestrator)
            oldest = scrape.value("sagasuite_oldest_approval_age_seconds")
            return (
                scrape.value("sagasuite_sagas_waiting", kind="signal") == signals
                and scrape.value("sagasuite_sagas_waiting", kind="approval") == approvals
                and scrape.value("sagasuite_approvals_pending") == approvals
                and (oldest > 0 if approvals else oldest == 0)
            )

        return probe

    # Every other test of this module ends its sagas: these are the only waits.
    await wait_until(gauges_show(2, 2), "two signal waits and two approvals in the gauges", within=WAIT)

    async def reminded() -> bool:
        reminders = Scrape(orchestrator).value(
            "sagasuite_approval_reminders_total", saga_type="RemindedOrder", step="go_ahead"
        )
        return reminders == 1

    await wait_until(reminded, "the reminder of go_ahead (remind_after 1 s)", within=WAIT)
    assert count(await clients.saga(reminded_id), "ApprovalReminder") == 1
    assert log_lines(orchestrator.log_path, "WARNING", f"saga {reminded_id} ", "approval go_ahead still waits: ")

    def delivered(saga_type: str) -> float:
        return Scrape(orchestrator).value("sagasuite_signal_delivery_seconds_count", saga_type=saga_type)

    before = {saga_type: delivered(saga_type) for saga_type in ("SignalledOrder", "OrderSaga", "RemindedOrder")}
    for index, saga_id in enumerate(signalled_ids):
        await clients.orchestrator.SignalSaga(payment_signal(saga_id, f"metrics-{index}"), timeout=10)
    await clients.orchestrator.DecideApproval(decision(reviewed_id, "fraud_review", True), timeout=10)
    await clients.orchestrator.DecideApproval(decision(reminded_id, "go_ahead", True), timeout=10)
    sagas = await ended(clients, [*signalled_ids, reviewed_id, reminded_id])
    assert all(status_name(saga.status) == "COMPLETED" for saga in sagas.values()), [
        render(saga) for saga in sagas.values() if status_name(saga.status) != "COMPLETED"
    ]
    grown = {saga_type: delivered(saga_type) - count_before for saga_type, count_before in before.items()}
    assert grown == {"SignalledOrder": 2, "OrderSaga": 1, "RemindedOrder": 1}
    await wait_until(gauges_show(0, 0), "no waits left in the gauges", within=WAIT)
