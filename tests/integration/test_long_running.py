"""Long-running sagas on real processes, SQLite and PostgreSQL: signals, approvals, timers, children, branches."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from devstack.stack import LocalStack
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from tests.grpc_helpers import error_reason
from tests.orchestrator_helpers import (
    Clients,
    connect,
    definitions_env,
    fresh_postgres_database,
    ledger_kinds,
    new_order_id,
    order_request,
    refused,
    render,
    start_stack,
    status_name,
    wait_for,
)

ENDED = ("COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED")
DEFINITIONS = definitions_env(
    "SIGNALLED_ORDER_SAGA",
    "IMPATIENT_ORDER_SAGA",
    "TIMED_ORDER_SAGA",
    "PARALLEL_ORDER_SAGA",
    "PARENT_ORDER_SAGA",
    "FAILING_WAIT_ORDER_SAGA",
    "PATIENT_PARENT_SAGA",
)
# OrderSaga v2 with a low review threshold: the tests' orders of 50.00 or more wait for a review.
V2_ENV = {**DEFINITIONS, "ORDER_SAGA_VERSION": "2", "REVIEW_THRESHOLD": "5000"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    data_dir: Path = tmp_path_factory.mktemp(f"long-running-{request.param}")
    with contextlib.ExitStack() as resources:
        database_url = ""
        if request.param == "postgresql":
            database_url = resources.enter_context(
                fresh_postgres_database(request.getfixturevalue("postgres_admin_url"))
            )
        running = start_stack(data_dir, orchestrator_env=V2_ENV, database_url=database_url)
        resources.callback(running.stop)
        yield running


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(stack) as opened:
        yield opened


async def start(clients: Clients, saga_type: str, order_id: str, **order: object) -> str:
    request = order_request(order_id, **order)  # type: ignore[arg-type]
    packed = pb.StartSagaRequest(saga_type=saga_type, business_key=order_id)
    packed.input.Pack(request)
    return (await clients.orchestrator.StartSaga(packed)).saga_id


def signal(saga_id: str, signal_id: str, **payload: str) -> pb.SignalSagaRequest:
    body = struct_pb2.Struct()
    body.update(payload)
    return pb.SignalSagaRequest(saga_id=saga_id, name="payment_ok", signal_id=signal_id, payload=body)


def types(saga: pb.Saga) -> list[str]:
    return [event.type for event in saga.history]


def waiting_on(step: str) -> Callable[[pb.Saga], bool]:
    return lambda saga: any(wait.step == step for wait in saga.waits)


# -- signals ------------------------------------------------------------------------------------


async def test_an_early_signal_is_kept_and_consumed_when_the_wait_begins(clients: Clients) -> None:
    order_id = new_order_id("early")
    saga_id = await start(clients, "SignalledOrder", order_id)
    # Sent while the saga still cools off, before its wait began.
    answer = await clients.orchestrator.SignalSaga(signal(saga_id, "sig-1", token="tok_visa"))
    assert not answer.duplicate
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    kinds = types(saga)
    # The signal wait's own start: the cool-off timer's WaitStarted may come before the signal or after it.
    wait_began = next(i for i, e in enumerate(saga.history) if e.type == "WaitStarted" and e.step == "await_payment")
    assert kinds.index("SignalReceived") < wait_began < kinds.index("SignalConsumed"), render(saga)
    assert kinds.count("SignalConsumed") == 1
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]


async def test_a_signal_id_is_one_delivery(clients: Clients) -> None:
    order_id = new_order_id("dup")
    saga_id = await start(clients, "SignalledOrder", order_id)
    await wait_for(clients, saga_id, waiting_on("await_payment"))
    first = await clients.orchestrator.SignalSaga(signal(saga_id, "sig-1", token="tok_visa"))
    again = await clients.orchestrator.SignalSaga(signal(saga_id, "sig-1", token="tok_visa"))
    assert again.duplicate and again.received_at == first.received_at and again.saga_id == saga_id
    error = await refused(clients.orchestrator.SignalSaga(signal(saga_id, "sig-1", token="tok_other")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "SIGNAL_ID_REUSED"
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert types(saga).count("SignalReceived") == 1 and types(saga).count("SignalConsumed") == 1
    # By type and business key too; an ended saga takes no more signals.
    by_key = pb.SignalSagaRequest(
        saga_type="SignalledOrder", business_key=order_id, name="payment_ok", signal_id="sig-2"
    )
    error = await refused(clients.orchestrator.SignalSaga(by_key))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "SAGA_ENDED"


async def test_signals_nobody_waits_for_are_refused_with_a_reason(clients: Clients) -> None:
    saga_id = await start(clients, "SignalledOrder", new_order_id("unawaited"))
    request = pb.SignalSagaRequest(saga_id=saga_id, name="never_awaited", signal_id="x-1")
    error = await refused(clients.orchestrator.SignalSaga(request))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "SIGNAL_NOT_AWAITED"
    assert "payment_ok" in (error.details() or "")
    missing = pb.SignalSagaRequest(saga_type="SignalledOrder", business_key="no-such-order", name="payment_ok",
                                   signal_id="x-2")  # fmt: skip
    error = await refused(clients.orchestrator.SignalSaga(missing))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await clients.orchestrator.SignalSaga(signal(saga_id, "x-3", token="tok_visa"))
    await wait_for(clients, saga_id, ENDED)


async def test_a_wait_that_times_out_compensates(clients: Clients) -> None:
    order_id = new_order_id("impatient")
    saga_id = await start(clients, "ImpatientOrder", order_id)
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert "WaitTimedOut" in types(saga) and "timed out" in saga.last_error
    reservation = await clients.reservation(order_id)
    assert reservation.status == inventory_pb.RESERVATION_STATUS_RELEASED


# -- timers -------------------------------------------------------------------------------------


async def test_a_timer_fires_once_across_a_kill(stack: LocalStack, clients: Clients) -> None:
    order_id = new_order_id("timer-kill")
    saga_id = await start(clients, "TimedOrder", order_id)
    saga = await wait_for(clients, saga_id, waiting_on("cool_off"))
    assert saga.waits[0].kind == "timer" and saga.waits[0].HasField("until")
    assert stack.orchestrator is not None
    stack.orchestrator.kill()
    await asyncio.to_thread(stack.orchestrator.restart)
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert types(saga).count("TimerFired") == 1
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]


async def test_pause_holds_a_timer_and_it_fires_on_resume(clients: Clients) -> None:
    order_id = new_order_id("timer-pause")
    saga_id = await start(clients, "TimedOrder", order_id)
    await wait_for(clients, saga_id, waiting_on("cool_off"))
    await clients.orchestrator.PauseSaga(pb.PauseSagaRequest(saga_id=saga_id, reason="hold"))
    held = await clients.saga(saga_id)
    assert "held" in held.waits[0].description, render(held)
    # Until well past the timer's wake-up time (3 s after it began), paused: it must not fire.
    wake = held.waits[0].since.ToDatetime(tzinfo=datetime.UTC).timestamp() + 3.0
    while time.time() < wake + 0.5:
        assert "TimerFired" not in types(await clients.saga(saga_id))
        await asyncio.sleep(0.2)
    saga = await clients.saga(saga_id)
    assert status_name(saga.status) == "PAUSED" and "TimerFired" not in types(saga), render(saga)
    await clients.orchestrator.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id))
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    kinds = types(saga)
    assert kinds.index("SagaResumed") < kinds.index("TimerFired"), render(saga)


# -- parallel branches --------------------------------------------------------------------------


async def test_a_failed_branch_stops_the_others_and_compensation_follows_the_documented_order(
    clients: Clients,
) -> None:
    order_id = new_order_id("parallel")
    saga_id = await start(clients, "ParallelOrder", order_id, token="tok_declined")
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    succeeded = [e.step for e in saga.history if e.type == "StepSucceeded"]
    compensated = [e.step for e in saga.history if e.type == "CompensationSucceeded"]
    # One step per branch: branches in reverse order of their last completion.
    assert sorted(succeeded) == ["create_shipment", "reserve_stock"], render(saga)
    assert compensated == list(reversed(succeeded)), render(saga)
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    assert (await clients.shipment(order_id)).status == shipping_pb.SHIPMENT_STATUS_CANCELLED
    assert ledger_kinds(await clients.ledger(order_id)) == []


async def test_order_saga_v2_runs_its_branches_review_and_child(clients: Clients) -> None:
    small = new_order_id("v2-small")
    saga = await wait_for(clients, await clients.place(order_request(small, minor_units=2599)), ENDED)
    assert (status_name(saga.status), saga.definition_version) == ("COMPLETED", 2), render(saga)
    assert "StepSkipped" in types(saga) and "BranchesCompleted" in types(saga)
    (child,) = saga.children
    assert child.saga_type == "FulfilmentSaga" and status_name(child.status) == "COMPLETED"
    child_view = await clients.saga(child.saga_id)
    assert child_view.parent_saga_id == saga.saga_id
    # A listing links both ways too.
    listed = await clients.orchestrator.ListSagas(pb.ListSagasRequest(business_key=small))
    by_type = {s.saga_type: s for s in listed.sagas}
    assert by_type["FulfilmentSaga"].parent_saga_id == saga.saga_id
    assert [c.saga_id for c in by_type["OrderSaga"].children] == [child.saga_id]
    assert len(await clients.notifications(small)) == 1

    big = new_order_id("v2-big")
    saga_id = await clients.place(order_request(big, minor_units=9000))
    saga = await wait_for(clients, saga_id, waiting_on("fraud_review"))
    assert saga.waits[0].kind == "approval" and saga.waits[0].signal == "reviewer"
    decided = await clients.orchestrator.DecideApproval(
        pb.DecideApprovalRequest(saga_id=saga_id, step="fraud_review", approve=True, reason="known customer")
    )
    assert not decided.duplicate
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    decision = next(e for e in saga.history if e.type == "ApprovalDecided")
    assert (decision.code, decision.actor) == ("APPROVED", "operator")
    again = await clients.orchestrator.DecideApproval(
        pb.DecideApprovalRequest(saga_id=saga_id, step="fraud_review", approve=True)
    )
    assert again.duplicate


async def test_a_rejected_review_compensates_both_branches(clients: Clients) -> None:
    order_id = new_order_id("v2-reject")
    saga_id = await clients.place(order_request(order_id, minor_units=9000))
    await wait_for(clients, saga_id, waiting_on("fraud_review"))
    await clients.orchestrator.DecideApproval(
        pb.DecideApprovalRequest(saga_id=saga_id, step="fraud_review", approve=False, reason="stolen card")
    )
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert "stolen card" in saga.last_error and not saga.children
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE", "REFUND"]
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    error = await refused(
        clients.orchestrator.DecideApproval(
            pb.DecideApprovalRequest(saga_id=saga_id, step="fraud_review", approve=True)
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "SIGNAL_ID_REUSED"


# -- child sagas --------------------------------------------------------------------------------


async def test_a_completed_child_is_compensated_whole_by_its_parent(clients: Clients) -> None:
    order_id = new_order_id("parent")
    saga_id = await start(clients, "ParentOrder", order_id, token="tok_declined")
    saga = await wait_for(clients, saga_id, lambda s: bool(s.children))
    child_id = saga.children[0].saga_id
    child = await wait_for(clients, child_id, waiting_on("await_pickup"))
    assert child.parent_saga_id == saga_id
    picked = pb.SignalSagaRequest(saga_id=child_id, name="picked_up", signal_id="pickup-1")
    await clients.orchestrator.SignalSaga(picked)
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    child = await clients.saga(child_id)
    assert status_name(child.status) == "COMPENSATED", render(child)
    compensated = [e.step for e in saga.history if e.type == "CompensationSucceeded"]
    assert compensated == ["shipping", "reserve_stock"], render(saga)
    assert (await clients.shipment(order_id)).status == shipping_pb.SHIPMENT_STATUS_CANCELLED
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED


async def test_pause_and_terminate_reach_the_child(clients: Clients) -> None:
    order_id = new_order_id("parent-stop")
    saga_id = await start(clients, "ParentOrder", order_id)
    saga = await wait_for(clients, saga_id, lambda s: bool(s.children))
    child_id = saga.children[0].saga_id
    await wait_for(clients, child_id, waiting_on("await_pickup"))
    await clients.orchestrator.PauseSaga(pb.PauseSagaRequest(saga_id=saga_id, reason="look"))
    child = await wait_for(clients, child_id, lambda s: status_name(s.status) == "PAUSED")
    await clients.orchestrator.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id))
    child = await wait_for(clients, child_id, lambda s: status_name(s.status) == "RUNNING")
    await clients.orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason="customer left"))
    child = await wait_for(clients, child_id, ENDED)
    assert status_name(child.status) == "TERMINATED", render(child)
    terminated = next(e for e in child.history if e.type == "SagaTerminated")
    assert saga_id in terminated.message and terminated.actor == "operator"


async def test_cancel_compensates_a_saga_waiting_for_its_review(clients: Clients) -> None:
    order_id = new_order_id("v2-cancel")
    saga_id = await clients.place(order_request(order_id, minor_units=9000))
    await wait_for(clients, saga_id, waiting_on("fraud_review"))
    await clients.orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id, reason="customer asked"))
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE", "REFUND"]


async def test_retry_of_a_failed_wait_waits_again(clients: Clients) -> None:
    order_id = new_order_id("wait-retry")
    saga_id = await start(clients, "FailingWaitOrder", order_id)
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "NEEDS_ATTENTION" and "timed out" in saga.last_error, render(saga)
    await clients.orchestrator.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id))
    saga = await wait_for(clients, saga_id, waiting_on("await_payment"))
    assert types(saga).count("WaitStarted") == 2, render(saga)
    await clients.orchestrator.SignalSaga(signal(saga_id, "after-retry", token="tok_visa"))
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]


async def test_cancel_unwinds_a_waiting_child_and_is_refused_past_the_childs_pivot(clients: Clients) -> None:
    order_id = new_order_id("cancel-child")
    saga_id = await start(clients, "PatientParent", order_id)
    saga = await wait_for(clients, saga_id, lambda s: bool(s.children))
    child_id = saga.children[0].saga_id
    await wait_for(clients, child_id, waiting_on("await_stock_check"))
    await clients.orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id, reason="changed mind"))
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    child = await wait_for(clients, child_id, ENDED)
    assert status_name(child.status) == "COMPENSATED", render(child)
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    error = await refused(clients.shipment(order_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND

    # A child past its own pivot (its shipment made) is not cancelled with its parent.
    shipped = new_order_id("cancel-shipped")
    saga_id = await start(clients, "ParentOrder", shipped)
    saga = await wait_for(clients, saga_id, lambda s: bool(s.children))
    await wait_for(clients, saga.children[0].saga_id, waiting_on("await_pickup"))
    error = await refused(clients.orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id, reason="too late")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert "pivot" in (error.details() or "")
    await clients.orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason="clean up"))


def test_wait_payload_reaches_later_steps() -> None:
    """A request builder reads a consumed signal's payload (SagaContext.signal): checked without a stack."""
    from tests.integration.saga_definitions_for_tests import SIGNALLED_ORDER_SAGA

    definition = SIGNALLED_ORDER_SAGA
    body = struct_pb2.Struct()
    body.update({"token": "tok_from_signal"})
    context = definition.context(
        "s-1", order_request("o-1").SerializeToString(), {"await_payment": body.SerializeToString()}
    )
    charge = definition.step_by_name["charge_payment"]
    assert charge.action.build_request(context).payment_token == "tok_from_signal"  # type: ignore[union-attr]
    assert json.loads(json.dumps(context.signal("await_payment"))) == {"token": "tok_from_signal"}
