"""Operating sagas on real processes and PostgreSQL: pause, cancel, terminate, retry, watch, list, stats, versions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, timestamp_pb2

from devstack.stack import LocalStack
from sagasuite.common.v1.common_pb2 import Money
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from tests.grpc_helpers import bad_request_fields, error_reason
from tests.orchestrator_helpers import (
    DEFINITIONS_MODULE,
    Clients,
    connect,
    events,
    fresh_postgres_database,
    frozen,
    ledger_kinds,
    new_order_id,
    order_request,
    refused,
    render,
    start_stack,
    status_name,
    wait_for,
    wait_until,
)

FAULTS = {
    # Orders marked "slow-" spend a second in ReserveStock: long enough to be caught running.
    "inventory": "ReserveStock:latency_ms=1000,order_contains=slow-",
    "notify": (
        # Past the pivot and retrying for a few seconds.
        "SendConfirmation:fail_first=5,order_contains=confirm-retrying;"
        # Refused once, non-retryably: the saga needs attention, and a retry then goes through.
        "SendConfirmation:fail_first=1,code=FAILED_PRECONDITION,order_contains=confirm-once"
    ),
}
GIFT_CARD = f"{DEFINITIONS_MODULE}:GIFT_CARD_SAGA"
ORDER_V2 = f"{DEFINITIONS_MODULE}:ORDER_SAGA_V2"
ENDED = ("COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED")
V1_STEPS = ["reserve_stock", "charge_payment", "create_shipment", "send_confirmation"]
V2_STEPS = ["charge_payment", "reserve_stock", "create_shipment", "send_confirmation"]
# Longer than several dispatcher polls (0.2 s): long enough for a held saga to have moved if it could.
QUIET_SECONDS = 0.6


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str) -> Iterator[LocalStack]:
    """The orchestrator keeps its sagas in PostgreSQL here (the saga tests use its SQLite default)."""
    with fresh_postgres_database(postgres_admin_url) as database_url:
        running = start_stack(
            tmp_path_factory.mktemp("operations"),
            faults=FAULTS,
            orchestrator_env={"SAGA_DEFINITIONS": GIFT_CARD},
            database_url=database_url,
        )
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    assert stack.orchestrator is not None
    if stack.orchestrator.env.get("SAGA_DEFINITIONS") != GIFT_CARD:
        # A test before this one deployed another definition version: go back to the module's own.
        restart_orchestrator(stack, GIFT_CARD)
    async with connect(stack) as connected:
        yield connected


def restart_orchestrator(stack: LocalStack, definitions: str) -> None:
    """Deploy: stop the orchestrator gracefully, start it again on the same port and database."""
    assert stack.orchestrator is not None
    stack.orchestrator.stop()
    stack.orchestrator.env["SAGA_DEFINITIONS"] = definitions
    # PlaceOrder starts the deployed test version (3) when it is loaded, else v1.
    stack.orchestrator.env["ORDER_SAGA_VERSION"] = "3" if ORDER_V2 in definitions else "1"
    stack.orchestrator.restart()


def has_event(type_: str, step: str = "") -> Callable[[pb.Saga], bool]:
    return lambda saga: any(e.type == type_ and (not step or e.step == step) for e in saga.history)


def types(saga: pb.Saga) -> list[str]:
    return [e.type for e in saga.history]


def succeeded_steps(saga: pb.Saga) -> list[str]:
    return [e.step for e in saga.history if e.type == "StepSucceeded"]


async def assert_refused(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    error = await refused(call)
    assert error.code() == code, error.details()
    assert error_reason(error) == reason, error.details()
    return error


async def assert_no_payment(clients: Clients, order_id: str) -> None:
    error = await refused(clients.payment_of(order_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert await clients.ledger(order_id) == []


def pause(saga_id: str, reason: str = "") -> pb.PauseSagaRequest:
    return pb.PauseSagaRequest(saga_id=saga_id, reason=reason)


# -- pause and resume ----------------------------------------------------------------------


async def test_pause_holds_the_saga_after_its_current_call_and_resume_completes_it(
    clients: Clients, stack: LocalStack
) -> None:
    orchestrator = clients.orchestrator
    order_id = new_order_id("slow-pause")
    # Inventory is frozen: the pause lands while the first step's call is on the wire.
    with frozen(stack.services["inventory"]):
        saga_id = await clients.place(order_request(order_id))
        paused = (await orchestrator.PauseSaga(pause(saga_id, "checking the address"))).saga
    assert status_name(paused.status) == "PAUSED"

    # The call on the wire finishes (or times out, if the freeze outlasted its deadline) and is
    # recorded; then nothing more is sent.
    def current_call_recorded(saga: pb.Saga) -> bool:
        after_pause = types(saga)[types(saga).index("SagaPaused") + 1 :]
        return "StepSucceeded" in after_pause or "StepFailed" in after_pause

    saga = await wait_for(clients, saga_id, current_call_recorded)
    await asyncio.sleep(QUIET_SECONDS)
    held = await clients.saga(saga_id)
    assert status_name(held.status) == "PAUSED", render(held)
    assert list(held.history) == list(saga.history), render(held)
    after_pause = events(held)[types(held).index("SagaPaused") :]
    assert after_pause in (
        [("SagaPaused", "", ""), ("StepSucceeded", "reserve_stock", "OK")],
        [
            ("SagaPaused", "", ""),
            ("StepFailed", "reserve_stock", "DEADLINE_EXCEEDED"),
            ("StepRetryScheduled", "reserve_stock", ""),
        ],
    ), render(held)
    assert held.current_step == V1_STEPS[len(succeeded_steps(held))]
    listed = await orchestrator.ListSagas(pb.ListSagasRequest(statuses=[pb.SAGA_STATUS_PAUSED], business_key=order_id))
    assert [s.saga_id for s in listed.sagas] == [saga_id]
    if succeeded_steps(held) == ["reserve_stock"]:
        await assert_no_payment(clients, order_id)
    await assert_refused(
        orchestrator.PauseSaga(pause(saga_id)), grpc.StatusCode.FAILED_PRECONDITION, "ILLEGAL_STATE_FOR_PAUSE"
    )

    resumed = (await orchestrator.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id))).saga
    assert status_name(resumed.status) == "RUNNING"
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert succeeded_steps(saga) == V1_STEPS
    paused_event = next(e for e in saga.history if e.type == "SagaPaused")
    assert (paused_event.message, paused_event.actor) == ("checking the address", "operator")
    assert "SagaResumed" in types(saga)
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]


# -- cancel ----------------------------------------------------------------------------------


async def assert_compensated_what_succeeded(clients: Clients, saga: pb.Saga, order_id: str) -> None:
    """The steps that succeeded were compensated newest first, and each service shows it."""
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    done = succeeded_steps(saga)
    assert done and "create_shipment" not in done, render(saga)
    compensated = [e.step for e in saga.history if e.type == "CompensationSucceeded"]
    assert compensated == done[::-1], render(saga)
    started = next(e for e in saga.history if e.type == "CompensationStarted")
    assert started.message == "cancelled"
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    if "charge_payment" in done:
        assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE", "REFUND"]
    else:
        await assert_no_payment(clients, order_id)
    assert (await refused(clients.shipment(order_id))).code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_of_a_running_saga_before_its_pivot_compensates_it(clients: Clients) -> None:
    order_id = new_order_id("slow-cancel")
    saga_id = await clients.place(order_request(order_id))
    cancelled = (await clients.orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id, reason="dup"))).saga
    # The reserve call is on the wire: its outcome decides, then the compensation runs.
    assert status_name(cancelled.status) in ("RUNNING", "COMPENSATING")
    saga = await wait_for(clients, saga_id, ENDED)
    milestones = [t for t in types(saga) if t in ("SagaCancelRequested", "CompensationStarted")]
    assert milestones == ["SagaCancelRequested", "CompensationStarted"], render(saga)
    request = next(e for e in saga.history if e.type == "SagaCancelRequested")
    assert (request.message, request.actor) == ("dup", "operator")
    await assert_compensated_what_succeeded(clients, saga, order_id)
    assert succeeded_steps(saga) == ["reserve_stock"], render(saga)


async def test_cancel_of_a_paused_saga_compensates_at_once(clients: Clients) -> None:
    order_id = new_order_id("slow-cancel-paused")
    saga_id = await clients.place(order_request(order_id))
    await clients.orchestrator.PauseSaga(pause(saga_id))
    await wait_for(clients, saga_id, has_event("StepSucceeded", "reserve_stock"))
    cancelled = (await clients.orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id))).saga
    assert status_name(cancelled.status) in ("COMPENSATING", "COMPENSATED")
    saga = await wait_for(clients, saga_id, ENDED)
    assert events(saga, "StepSucceeded", "CompensationSucceeded", "SagaCompensated") == [
        ("StepSucceeded", "reserve_stock", "OK"),
        ("CompensationSucceeded", "reserve_stock", "OK"),
        ("SagaCompensated", "", ""),
    ], render(saga)
    await assert_compensated_what_succeeded(clients, saga, order_id)


async def test_cancel_after_the_pivot_is_refused_and_the_order_completes(clients: Clients, stack: LocalStack) -> None:
    order_id = new_order_id("past-pivot")
    # Notify is frozen: past the pivot, the saga retries its confirmation, and cannot complete before
    # the cancel is refused.
    with frozen(stack.services["notify"]):
        saga_id = await clients.place(order_request(order_id))
        await wait_for(clients, saga_id, has_event("StepSucceeded", "create_shipment"))
        error = await assert_refused(
            clients.orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id, reason="too late")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ILLEGAL_STATE_FOR_CANCEL",
        )
    assert "status RUNNING" in (error.details() or "")
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert "SagaCancelRequested" not in types(saga) and "CompensationStarted" not in types(saga)
    assert [e.code for e in saga.history if e.step == "send_confirmation" and e.type.startswith("Step")][-1] == "OK"
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
    assert (await clients.shipment(order_id)).status == shipping_pb.SHIPMENT_STATUS_CREATED
    assert len(await clients.notifications(order_id)) == 1


# -- terminate -------------------------------------------------------------------------------


async def test_terminate_stops_a_running_saga_without_compensating(clients: Clients) -> None:
    orchestrator = clients.orchestrator
    order_id = new_order_id("slow-terminate")
    saga_id = await clients.place(order_request(order_id))
    terminated = await orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason="fraud review"))
    assert status_name(terminated.saga.status) == "TERMINATED"
    # The reserve call is on the wire: its effect may stand, and terminate says so.
    assert list(terminated.steps_maybe_applied) == ["reserve_stock"]
    for reason in ("", "   "):
        error = await refused(orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason=reason)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(error) == ["reason"]

    # The reserve call that was on the wire lands in inventory and is left there, as recorded.
    async def reserved() -> bool:
        try:
            return (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RESERVED
        except grpc.aio.AioRpcError:
            return False

    await wait_until(reserved, "the in-flight reservation to land")
    await wait_for(clients, saga_id, has_event("EffectAfterTerminate", "reserve_stock"))
    await asyncio.sleep(QUIET_SECONDS)
    saga = await clients.saga(saga_id)
    assert status_name(saga.status) == "TERMINATED", render(saga)
    assert types(saga) == ["SagaStarted", "SagaTerminated", "EffectAfterTerminate"], render(saga)
    assert saga.history[-1].message == "effect applied after terminate; not compensated"
    event = saga.history[-2]
    assert (event.message, event.actor) == ("fraud review", "operator")
    assert "fraud review" in saga.last_error and saga.HasField("ended_at")
    await assert_no_payment(clients, order_id)
    await assert_refused(
        orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason="again")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ILLEGAL_STATE_FOR_TERMINATE",
    )


# -- retry -----------------------------------------------------------------------------------


async def test_retry_of_a_saga_that_needs_attention_finishes_it(clients: Clients) -> None:
    order_id = new_order_id("confirm-once")
    saga_id = await clients.place(order_request(order_id))
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "NEEDS_ATTENTION", render(saga)
    assert "send_confirmation" in saga.last_error
    await assert_refused(
        clients.orchestrator.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ILLEGAL_STATE_FOR_RESUME",
    )

    retried = (await clients.orchestrator.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id))).saga
    assert status_name(retried.status) in ("RUNNING", "COMPLETED")
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert types(saga)[-5:] == [
        "StepFailed",
        "SagaNeedsAttention",
        "SagaRetried",
        "StepSucceeded",
        "SagaCompleted",
    ], render(saga)
    assert saga.history[-2].step == "send_confirmation"
    # Retried from the failed step only: every other effect happened once.
    assert succeeded_steps(saga) == V1_STEPS
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
    assert (await clients.shipment(order_id)).status == shipping_pb.SHIPMENT_STATUS_CREATED
    assert len(await clients.notifications(order_id)) == 1


# -- refusals ----------------------------------------------------------------------------------


def operator_calls(
    orchestrator: pb_grpc.OrchestratorServiceAsyncStub, saga_id: str
) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "PAUSE": lambda: orchestrator.PauseSaga(pause(saga_id)),
        "RESUME": lambda: orchestrator.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id)),
        "CANCEL": lambda: orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id)),
        "TERMINATE": lambda: orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason="r")),
        "RETRY": lambda: orchestrator.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id)),
    }


async def test_operator_calls_in_illegal_states_are_refused_and_change_nothing(
    clients: Clients, stack: LocalStack
) -> None:
    completed_id = await clients.place(order_request(new_order_id("done")))
    compensated_id = await clients.place(order_request(new_order_id("declined"), token="tok_declined"))
    # While running (inventory is frozen, so it cannot get past its first step): nothing to resume or retry.
    with frozen(stack.services["inventory"]):
        running_id = await clients.place(order_request(new_order_id("slow-running")))
        for operation in ("RESUME", "RETRY"):
            call = operator_calls(clients.orchestrator, running_id)[operation]
            error = await assert_refused(call(), grpc.StatusCode.FAILED_PRECONDITION, f"ILLEGAL_STATE_FOR_{operation}")
            assert "status RUNNING" in (error.details() or ""), error.details()
    for saga_id, status in ((completed_id, "COMPLETED"), (compensated_id, "COMPENSATED"), (running_id, "COMPLETED")):
        before = await wait_for(clients, saga_id, ENDED)
        assert status_name(before.status) == status, render(before)
        for operation, call in operator_calls(clients.orchestrator, saga_id).items():
            error = await assert_refused(call(), grpc.StatusCode.FAILED_PRECONDITION, f"ILLEGAL_STATE_FOR_{operation}")
            assert f"status {status}" in (error.details() or "")
        assert list((await clients.saga(saga_id)).history) == list(before.history)


async def test_unknown_or_malformed_saga_ids(clients: Clients) -> None:
    unknown = "0" * 32
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        **operator_calls(clients.orchestrator, unknown),
        "GET": lambda: clients.saga(unknown),
    }
    for name, call in calls.items():
        error = await assert_refused(call(), grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND")
        assert unknown in (error.details() or ""), name
    watch = clients.orchestrator.WatchSaga(pb.WatchSagaRequest(saga_id=unknown))
    error = await refused(watch.read())
    assert (error.code(), error_reason(error)) == (grpc.StatusCode.NOT_FOUND, "SAGA_NOT_FOUND")
    for call in operator_calls(clients.orchestrator, "no such saga").values():
        error = await refused(call())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(error) == ["saga_id"]


# -- watch, list, stats ------------------------------------------------------------------------


async def watch_all(clients: Clients, saga_id: str, after_seq: int = 0) -> list[pb.WatchSagaResponse]:
    async def collect() -> list[pb.WatchSagaResponse]:
        stream = clients.orchestrator.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id, after_seq=after_seq))
        return [response async for response in stream]

    return await asyncio.wait_for(collect(), 30)


async def test_watch_streams_every_event_until_the_saga_ends(clients: Clients) -> None:
    order_id = new_order_id("slow-watch")
    saga_id = await clients.place(order_request(order_id))
    streamed = await watch_all(clients, saga_id)
    saga = await clients.saga(saga_id)
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert [r.event for r in streamed] == list(saga.history)
    assert [r.event.seq for r in streamed] == list(range(1, len(streamed) + 1))
    assert streamed[-1].event.type == "SagaCompleted"
    assert status_name(streamed[-1].status) == "COMPLETED"
    assert status_name(streamed[0].status) in ("RUNNING", "COMPLETED")
    # Resuming a watch after a sequence number streams only what came after, then ends.
    tail = await watch_all(clients, saga_id, after_seq=3)
    assert [r.event for r in tail] == list(saga.history)[3:]


async def page_through(clients: Clients, request: pb.ListSagasRequest) -> tuple[list[pb.Saga], int]:
    sagas: list[pb.Saga] = []
    pages = 0
    while True:
        page = await clients.orchestrator.ListSagas(request)
        pages += 1
        sagas += page.sagas
        if not page.next_page_token:
            return sagas, pages
        request.page_token = page.next_page_token


def gift_card_request(business_key: str, request: pb.PlaceOrderRequest) -> pb.StartSagaRequest:
    packed = any_pb2.Any()
    packed.Pack(request)
    return pb.StartSagaRequest(saga_type="GiftCardSaga", business_key=business_key, input=packed)


async def test_list_filters_and_paginates_and_stats_count(clients: Clients) -> None:
    since = timestamp_pb2.Timestamp()
    since.FromNanoseconds(time.time_ns())
    placed = [await clients.place(order_request(new_order_id("list"))) for _ in range(4)]
    declined_order = new_order_id("list-declined")
    declined = await clients.place(order_request(declined_order, token="tok_declined"))
    gift_order = new_order_id("list-gift")
    gift = (await clients.orchestrator.StartSaga(gift_card_request(gift_order, order_request(gift_order)))).saga_id
    created = [*placed, declined, gift]
    for saga_id in created:
        await wait_for(clients, saga_id, ENDED)

    everything, pages = await page_through(clients, pb.ListSagasRequest(created_after=since, page_size=4))
    assert [s.saga_id for s in everything] == created[::-1]
    assert pages == 2
    everything, pages = await page_through(clients, pb.ListSagasRequest(created_after=since, page_size=2))
    assert [s.saga_id for s in everything] == created[::-1]
    assert pages == 3
    assert all(not s.history for s in everything)

    async def ids(**filters: Any) -> list[str]:
        listed, _ = await page_through(clients, pb.ListSagasRequest(created_after=since, **filters))
        return [s.saga_id for s in listed]

    assert await ids(statuses=[pb.SAGA_STATUS_COMPENSATED]) == [declined]
    assert await ids(statuses=[pb.SAGA_STATUS_COMPLETED], saga_type="OrderSaga") == placed[::-1]
    assert await ids(statuses=[pb.SAGA_STATUS_COMPLETED, pb.SAGA_STATUS_COMPENSATED]) == created[::-1]
    assert await ids(saga_type="GiftCardSaga") == [gift]
    assert await ids(business_key=declined_order) == [declined]
    assert await ids(statuses=[pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_PAUSED]) == []
    until = timestamp_pb2.Timestamp()
    until.FromNanoseconds(time.time_ns())
    assert len(await ids(created_before=until)) == len(created)

    for bad_request, field in (
        (pb.ListSagasRequest(page_token="not-a-token"), "page_token"),
        (pb.ListSagasRequest(page_size=501), "page_size"),
        (pb.ListSagasRequest(page_size=-1), "page_size"),
        (pb.ListSagasRequest(statuses=[99]), "statuses[0]"),  # type: ignore[list-item]
    ):
        error = await refused(clients.orchestrator.ListSagas(bad_request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(error) == [field]

    stats = await clients.orchestrator.GetSagaStats(pb.GetSagaStatsRequest(created_after=since))
    assert {status_name(c.status): c.count for c in stats.counts} == {"COMPLETED": 5, "COMPENSATED": 1}
    assert 0 < stats.completion_p50_ms <= stats.completion_p95_ms <= stats.completion_p99_ms


# -- a second saga type ------------------------------------------------------------------------


async def test_a_second_saga_type_runs_and_compensates_without_engine_changes(clients: Clients) -> None:
    orchestrator = clients.orchestrator
    card = new_order_id("gift")
    started = await orchestrator.StartSaga(gift_card_request(card, order_request(card, items=[("MUG-042", 1)])))
    assert started.created and started.definition_version == 1
    again = await orchestrator.StartSaga(gift_card_request(card, order_request(card, items=[("MUG-042", 1)])))
    assert (again.saga_id, again.created) == (started.saga_id, False)
    saga = await wait_for(clients, started.saga_id, ENDED)
    assert (saga.saga_type, status_name(saga.status)) == ("GiftCardSaga", "COMPLETED"), render(saga)
    assert [step.name for step in saga.steps] == ["reserve_stock", "charge_payment"]
    assert succeeded_steps(saga) == ["reserve_stock", "charge_payment"]
    assert (await clients.reservation(card)).status == inventory_pb.RESERVATION_STATUS_RESERVED
    assert ledger_kinds(await clients.ledger(card)) == ["CHARGE"]
    assert (await refused(clients.shipment(card))).code() == grpc.StatusCode.NOT_FOUND
    assert await clients.notifications(card) == []

    declined = new_order_id("gift-declined")
    response = await orchestrator.StartSaga(gift_card_request(declined, order_request(declined, token="tok_declined")))
    saga = await wait_for(clients, response.saga_id, ENDED)
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert events(saga, "StepSucceeded", "StepFailed", "CompensationSucceeded") == [
        ("StepSucceeded", "reserve_stock", "OK"),
        ("StepFailed", "charge_payment", "FAILED_PRECONDITION"),
        ("CompensationSucceeded", "reserve_stock", "OK"),
    ], render(saga)
    assert (await clients.reservation(declined)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    assert (await clients.payment_of(card)).status == payment_pb.PAYMENT_STATUS_CHARGED


async def test_start_saga_refuses_unknown_types_and_wrong_inputs(clients: Clients) -> None:
    key = new_order_id("start-bad")
    good = gift_card_request(key, order_request(key))
    wrong_type = any_pb2.Any()
    wrong_type.Pack(Money(currency_code="USD", minor_units=5))
    invalid_order = gift_card_request(key, order_request(key, email="nobody"))
    cases: list[tuple[pb.StartSagaRequest, str, str]] = [
        (pb.StartSagaRequest(saga_type="NoSuchSaga", business_key=key, input=good.input), "saga_type", "NoSuchSaga"),
        (pb.StartSagaRequest(saga_type="", business_key=key, input=good.input), "saga_type", "required"),
        (pb.StartSagaRequest(saga_type="GiftCardSaga", business_key=key, input=wrong_type), "input", "Money"),
        (pb.StartSagaRequest(saga_type="GiftCardSaga", business_key=key), "input", "required"),
        # An empty key is derived from the input; another key than the derived one is refused.
        (
            pb.StartSagaRequest(saga_type="GiftCardSaga", business_key="other", input=good.input),
            "business_key",
            "must be",
        ),
        (invalid_order, "customer_email", "e-mail"),
    ]
    for request, field, hint in cases:
        error = await refused(clients.orchestrator.StartSaga(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
        assert bad_request_fields(error) == [field]
        assert hint in (error.details() or "")
    listed = await clients.orchestrator.ListSagas(pb.ListSagasRequest(business_key=key))
    assert list(listed.sagas) == []


# -- a new definition version while sagas run -------------------------------------------------


async def test_running_sagas_finish_on_their_version_after_a_new_one_is_deployed(
    clients: Clients, stack: LocalStack
) -> None:
    old_orders = [new_order_id("slow-v1") for _ in range(3)]
    # Inventory is frozen until v2 is deployed: the v1 sagas cannot get past their first step before.
    with frozen(stack.services["inventory"]):
        old = [await clients.place(order_request(order_id)) for order_id in old_orders]
        for saga_id in old:
            saga = await clients.saga(saga_id)
            assert (status_name(saga.status), saga.definition_version) == ("RUNNING", 1), render(saga)
        # The next test, if any, restarts the orchestrator without v2 (see the clients fixture).
        restart_orchestrator(stack, f"{GIFT_CARD},{ORDER_V2}")
        new_order = new_order_id("v2")
        new = await clients.place(order_request(new_order))
    for saga_id in old:
        saga = await wait_for(clients, saga_id, ENDED)
        assert (status_name(saga.status), saga.definition_version) == ("COMPLETED", 1), render(saga)
        assert succeeded_steps(saga) == V1_STEPS, render(saga)
        assert saga.history[0].message == "OrderSaga v1"
    saga = await wait_for(clients, new, ENDED)
    assert (status_name(saga.status), saga.definition_version) == ("COMPLETED", 3), render(saga)
    assert succeeded_steps(saga) == V2_STEPS, render(saga)
    assert saga.history[0].message == "OrderSaga v3"
    assert [step.name for step in saga.steps] == V2_STEPS
    for order_id in [*old_orders, new_order]:
        assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
        assert len(await clients.notifications(order_id)) == 1
