"""The order saga on real processes: success, a failure at each step, retries, slow replies, dedup, bad input."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, timestamp_pb2

from devstack.stack import LocalStack
from sagasuite.common.v1.common_pb2 import LineItem
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from tests.grpc_helpers import bad_request_fields, error_reason, keyed
from tests.orchestrator_helpers import (
    YAML_SAGAS,
    Clients,
    connect,
    events,
    ledger_kinds,
    new_order_id,
    order_request,
    refused,
    render,
    start_stack,
    status_name,
    wait_for,
)

# Each fault is aimed at orders whose id holds a marker, so one stack serves every test here.
FAULTS = {
    "payment": (
        "Charge:fail_first=2,order_contains=flaky-charge;"
        # The first reply comes long after the orchestrator's 2 s call deadline; the effect is committed.
        "Charge:reply_delay_ms=5000,reply_delay_first=1,order_contains=slow-charge;"
        # Every reply is late: the charge's outcome stays unknown.
        "Charge:reply_delay_ms=5000,order_contains=lost-charge"
    ),
    "shipping": "CreateShipment:error_rate=1,code=FAILED_PRECONDITION,order_contains=ship-refused",
    "notify": "SendConfirmation:error_rate=1,code=FAILED_PRECONDITION,order_contains=notify-refused",
}
ENDED = ("COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED")


@pytest.fixture(scope="module", params=["python", "yaml"])
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    # The order saga as Python (orchestrator/sagas/order.py) and as YAML (orchestrator/sagas/yaml/):
    # every test here runs against both, and both must give the same results.
    env = {"SAGA_DEFINITIONS_DIR": str(YAML_SAGAS)} if request.param == "yaml" else {}
    running = start_stack(tmp_path_factory.mktemp("saga"), faults=FAULTS, orchestrator_env=env)
    yield running
    running.stop()


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(stack) as connected:
        yield connected


async def run_order(clients: Clients, request: pb.PlaceOrderRequest) -> pb.Saga:
    """Place the order and wait until its saga stops moving."""
    return await wait_for(clients, await clients.place(request), ENDED)


async def assert_not_found(call: Any) -> None:
    error = await refused(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()


def step_states(saga: pb.Saga) -> dict[str, str]:
    return {step.name: step.state for step in saga.steps}


def succeeded(*steps: str) -> list[tuple[str, str, str]]:
    return [("StepSucceeded", step, "OK") for step in steps]


# -- the happy path ------------------------------------------------------------------------


async def test_happy_path_completes_with_exactly_one_effect_in_each_service(clients: Clients) -> None:
    order_id = new_order_id("happy")
    saga = await run_order(clients, order_request(order_id, items=[("BOOK-001", 2), ("TEE-007", 1)]))
    assert status_name(saga.status) == "COMPLETED", render(saga)
    assert (saga.saga_type, saga.definition_version, saga.business_key) == ("OrderSaga", 1, order_id)
    assert events(saga) == [
        ("SagaStarted", "", ""),
        *succeeded("reserve_stock", "charge_payment", "create_shipment", "send_confirmation"),
        ("SagaCompleted", "", ""),
    ], render(saga)
    assert set(step_states(saga).values()) == {"succeeded"}
    assert all(len(step.attempts) == 1 for step in saga.steps)
    assert saga.HasField("ended_at") and not saga.last_error

    reservation = await clients.reservation(order_id)
    assert reservation.status == inventory_pb.RESERVATION_STATUS_RESERVED
    assert [(i.sku, i.quantity) for i in reservation.items] == [("BOOK-001", 2), ("TEE-007", 1)]
    payment = await clients.payment_of(order_id)
    assert payment.status == payment_pb.PAYMENT_STATUS_CHARGED
    assert (payment.amount.currency_code, payment.amount.minor_units) == ("USD", 2599)
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
    shipment = await clients.shipment(order_id)
    assert shipment.status == shipping_pb.SHIPMENT_STATUS_CREATED
    assert shipment.tracking_number and shipment.address.country_code == "GB"
    (notification,) = await clients.notifications(order_id)
    assert notification.recipient == "ada@example.com"
    assert shipment.tracking_number in notification.body


# -- a failure at each step ----------------------------------------------------------------


async def test_out_of_stock_at_reserve_compensates_nothing(clients: Clients) -> None:
    order_id = new_order_id("oos")
    before = await clients.stock("LAMP-3")
    saga = await run_order(clients, order_request(order_id, items=[("LAMP-3", before.available + 1)]))
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert events(saga) == [
        ("SagaStarted", "", ""),
        ("StepFailed", "reserve_stock", "FAILED_PRECONDITION"),
        ("CompensationStarted", "", ""),
        ("SagaCompensated", "", ""),
    ], render(saga)
    assert "reserve_stock" in saga.last_error and "FAILED_PRECONDITION" in saga.last_error
    assert step_states(saga) == {
        "reserve_stock": "failed",
        "charge_payment": "skipped",
        "create_shipment": "skipped",
        "send_confirmation": "skipped",
    }
    await assert_not_found(clients.reservation(order_id))
    await assert_not_found(clients.payment_of(order_id))
    await assert_not_found(clients.shipment(order_id))
    assert await clients.notifications(order_id) == []
    assert await clients.stock("LAMP-3") == before


async def test_declined_card_releases_the_stock_only_and_is_not_retried(clients: Clients) -> None:
    order_id = new_order_id("declined")
    before = await clients.stock("TEE-007")
    saga = await run_order(clients, order_request(order_id, items=[("TEE-007", 3)], token="tok_declined"))
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    # A non-retryable refusal compensates at once: one attempt, no retry scheduled.
    assert events(saga) == [
        ("SagaStarted", "", ""),
        *succeeded("reserve_stock"),
        ("StepFailed", "charge_payment", "FAILED_PRECONDITION"),
        ("CompensationStarted", "", ""),
        ("CompensationSucceeded", "reserve_stock", "OK"),
        ("SagaCompensated", "", ""),
    ], render(saga)
    assert "declined" in saga.history[2].message
    assert step_states(saga)["reserve_stock"] == "compensated"
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    assert await clients.stock("TEE-007") == before
    await assert_not_found(clients.payment_of(order_id))
    assert await clients.ledger(order_id) == []
    await assert_not_found(clients.shipment(order_id))


async def cancel_shipment_in_advance(clients: Clients, order_id: str) -> None:
    """A cancellation that arrives before the shipment leaves a tombstone: shipping then refuses the order."""
    request = shipping_pb.CancelShipmentRequest(order_id=order_id, reason="customer called")
    await clients.shipping.CancelShipment(request, metadata=keyed(f"support-desk/{order_id}"))


@pytest.mark.parametrize("refusal", ["injected", "cancelled_in_advance"])
async def test_shipping_refusal_refunds_then_releases(clients: Clients, refusal: str) -> None:
    if refusal == "injected":
        order_id = new_order_id("ship-refused")
        expected_shipment = None
    else:
        order_id = new_order_id("tombstoned")
        await cancel_shipment_in_advance(clients, order_id)
        expected_shipment = shipping_pb.SHIPMENT_STATUS_TOMBSTONE
    saga = await run_order(clients, order_request(order_id))
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert events(saga) == [
        ("SagaStarted", "", ""),
        *succeeded("reserve_stock", "charge_payment"),
        ("StepFailed", "create_shipment", "FAILED_PRECONDITION"),
        ("CompensationStarted", "", ""),
        ("CompensationSucceeded", "charge_payment", "OK"),
        ("CompensationSucceeded", "reserve_stock", "OK"),
        ("SagaCompensated", "", ""),
    ], render(saga)
    payment = await clients.payment_of(order_id)
    assert payment.status == payment_pb.PAYMENT_STATUS_REFUNDED
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE", "REFUND"]
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    if expected_shipment is None:
        await assert_not_found(clients.shipment(order_id))
    else:
        assert (await clients.shipment(order_id)).status == expected_shipment
    assert await clients.notifications(order_id) == []


async def test_confirmation_failure_needs_attention_and_never_refunds(clients: Clients) -> None:
    order_id = new_order_id("notify-refused")
    saga = await run_order(clients, order_request(order_id))
    assert status_name(saga.status) == "NEEDS_ATTENTION", render(saga)
    assert events(saga) == [
        ("SagaStarted", "", ""),
        *succeeded("reserve_stock", "charge_payment", "create_shipment"),
        ("StepFailed", "send_confirmation", "FAILED_PRECONDITION"),
        ("SagaNeedsAttention", "", ""),
    ], render(saga)
    assert saga.current_step == "send_confirmation"
    assert "send_confirmation" in saga.last_error
    # The order stands: still charged once, still shipped, stock still held, nothing unwound.
    assert (await clients.payment_of(order_id)).status == payment_pb.PAYMENT_STATUS_CHARGED
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
    assert (await clients.shipment(order_id)).status == shipping_pb.SHIPMENT_STATUS_CREATED
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RESERVED
    assert await clients.notifications(order_id) == []


# -- retries, slow replies and unknown outcomes -----------------------------------------------


async def test_retryable_failures_are_retried_until_the_charge_succeeds(clients: Clients) -> None:
    order_id = new_order_id("flaky-charge")
    saga = await run_order(clients, order_request(order_id))
    assert status_name(saga.status) == "COMPLETED", render(saga)
    charge = [(e.type, e.attempt, e.code) for e in saga.history if e.step == "charge_payment"]
    assert charge == [
        ("StepFailed", 1, "UNAVAILABLE"),
        ("StepRetryScheduled", 2, ""),
        ("StepFailed", 2, "UNAVAILABLE"),
        ("StepRetryScheduled", 3, ""),
        ("StepSucceeded", 3, "OK"),
    ], render(saga)
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
    assert len(await clients.notifications(order_id)) == 1


def charge_log_lines(stack: LocalStack, saga_id: str) -> list[str]:
    """The payment service's log lines of one saga's Charge calls, oldest first."""
    key = re.escape(f"key={saga_id}/charge_payment/action ")
    return [line for line in stack.services["payment"].log_path.read_text().splitlines() if re.search(key, line)]


async def test_reply_past_the_deadline_is_retried_with_the_same_key_and_charged_once(
    clients: Clients, stack: LocalStack
) -> None:
    order_id = new_order_id("slow-charge")
    saga = await run_order(clients, order_request(order_id))
    assert status_name(saga.status) == "COMPLETED", render(saga)
    charge = [(e.type, e.attempt, e.code) for e in saga.history if e.step == "charge_payment"]
    assert charge == [
        ("StepFailed", 1, "DEADLINE_EXCEEDED"),
        ("StepRetryScheduled", 2, ""),
        ("StepSucceeded", 2, "OK"),
    ], render(saga)
    # The first call committed the charge, the retry (same idempotency key) got the stored answer.
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
    lines = charge_log_lines(stack, saga.saga_id)
    assert len(lines) == 2, lines
    assert "replayed" not in lines[0] and "code=OK" in lines[1] and " replayed" in lines[1], lines


async def test_a_charge_whose_outcome_stays_unknown_is_refunded_when_the_deadline_passes(clients: Clients) -> None:
    order_id = new_order_id("lost-charge")
    saga = await run_order(clients, order_request(order_id, deadline_seconds=3))
    assert status_name(saga.status) == "COMPENSATED", render(saga)
    failures = [e.code for e in saga.history if e.type == "StepFailed"]
    assert failures and set(failures) == {"DEADLINE_EXCEEDED"}, render(saga)
    started = next(e for e in saga.history if e.type == "CompensationStarted")
    assert "deadline" in started.message
    # The step that timed out may have happened, so it is compensated too, newest first.
    assert events(saga, "CompensationSucceeded", "SagaCompensated") == [
        ("CompensationSucceeded", "charge_payment", "OK"),
        ("CompensationSucceeded", "reserve_stock", "OK"),
        ("SagaCompensated", "", ""),
    ], render(saga)
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE", "REFUND"]
    assert (await clients.payment_of(order_id)).status == payment_pb.PAYMENT_STATUS_REFUNDED
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED
    await assert_not_found(clients.shipment(order_id))


# -- business-key dedup --------------------------------------------------------------------


async def list_by_key(clients: Clients, business_key: str) -> list[pb.Saga]:
    return list((await clients.orchestrator.ListSagas(pb.ListSagasRequest(business_key=business_key))).sagas)


async def test_same_order_returns_the_same_saga_and_a_different_payload_is_refused(clients: Clients) -> None:
    order_id = new_order_id("dedup")
    request = order_request(order_id)
    # Concurrent duplicates start one saga.
    responses = await asyncio.gather(*(clients.orchestrator.PlaceOrder(request) for _ in range(8)))
    assert len({r.saga_id for r in responses}) == 1
    assert sorted(r.created for r in responses) == [False] * 7 + [True]
    saga_id = responses[0].saga_id
    saga = await wait_for(clients, saga_id, ENDED)
    assert status_name(saga.status) == "COMPLETED", render(saga)

    again = await clients.orchestrator.PlaceOrder(request)
    assert (again.saga_id, again.created, status_name(again.status)) == (saga_id, False, "COMPLETED")
    packed = any_pb2.Any()
    packed.Pack(request)
    started = await clients.orchestrator.StartSaga(
        pb.StartSagaRequest(saga_type="OrderSaga", business_key=order_id, input=packed)
    )
    assert (started.saga_id, started.created, started.definition_version) == (saga_id, False, 1)

    different = order_request(order_id, minor_units=9999)
    conflict = await refused(clients.orchestrator.PlaceOrder(different))
    assert conflict.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(conflict) == "BUSINESS_KEY_CONFLICT"
    assert order_id in (conflict.details() or "") and saga_id in (conflict.details() or "")

    assert [s.saga_id for s in await list_by_key(clients, order_id)] == [saga_id]
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
    assert len(await clients.notifications(order_id)) == 1


# -- bad input -----------------------------------------------------------------------------


def _set(field: str, value: Any) -> Callable[[pb.PlaceOrderRequest], None]:
    def change(request: pb.PlaceOrderRequest) -> None:
        setattr(request, field, value)

    return change


def _clear(field: str) -> Callable[[pb.PlaceOrderRequest], None]:
    return lambda request: request.ClearField(field)


def _items(*lines: tuple[str, int]) -> Callable[[pb.PlaceOrderRequest], None]:
    def change(request: pb.PlaceOrderRequest) -> None:
        del request.items[:]
        request.items.extend(LineItem(sku=sku, quantity=quantity) for sku, quantity in lines)

    return change


def _address(part: str, value: str) -> Callable[[pb.PlaceOrderRequest], None]:
    return lambda request: setattr(request.shipping_address, part, value)


def _amount(part: str, value: Any) -> Callable[[pb.PlaceOrderRequest], None]:
    return lambda request: setattr(request.amount, part, value)


BAD_INPUTS: list[tuple[str, Callable[[pb.PlaceOrderRequest], None], str]] = [
    ("empty order id", _set("order_id", ""), "order_id"),
    ("order id with spaces", _set("order_id", "order 1"), "order_id"),
    ("order id too long", _set("order_id", "o" * 65), "order_id"),
    ("bad email", _set("customer_email", "ada-at-example"), "customer_email"),
    ("missing email", _set("customer_email", ""), "customer_email"),
    ("no items", _items(), "items"),
    ("zero quantity", _items(("BOOK-001", 0)), "items[0].quantity"),
    ("negative quantity", _items(("BOOK-001", 1), ("MUG-042", -2)), "items[1].quantity"),
    ("too many units", _items(("BOOK-001", 10_001)), "items[0].quantity"),
    ("empty sku", _items(("", 1)), "items[0].sku"),
    ("repeated sku", _items(("BOOK-001", 1), ("BOOK-001", 1)), "items[1].sku"),
    ("more than 100 items", _items(*((f"SKU-{i}", 1) for i in range(101))), "items"),
    ("unknown currency", _amount("currency_code", "XYZ"), "amount.currency_code"),
    ("zero amount", _amount("minor_units", 0), "amount.minor_units"),
    ("negative amount", _amount("minor_units", -5), "amount.minor_units"),
    ("missing amount", _clear("amount"), "amount"),
    ("missing payment token", _set("payment_token", ""), "payment_token"),
    ("missing address", _clear("shipping_address"), "shipping_address"),
    ("missing street", _address("street", ""), "shipping_address.street"),
    ("lower-case country", _address("country_code", "gb"), "shipping_address.country_code"),
    ("three-letter country", _address("country_code", "GBR"), "shipping_address.country_code"),
    ("negative deadline", _set("deadline_seconds", -1), "deadline_seconds"),
    ("deadline over a week", _set("deadline_seconds", 7 * 24 * 3600 + 1), "deadline_seconds"),
]


@pytest.mark.parametrize(("change", "field"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
async def test_bad_place_order_input_names_the_field_and_starts_nothing(
    clients: Clients, change: Callable[[pb.PlaceOrderRequest], None], field: str
) -> None:
    request = order_request(new_order_id("bad"))
    change(request)
    since = timestamp_pb2.Timestamp()
    since.FromNanoseconds(time.time_ns() - 1_000_000)
    error = await refused(clients.orchestrator.PlaceOrder(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_request_fields(error) == [field]
    assert f"{field}:" in (error.details() or "")
    if request.order_id:
        assert await list_by_key(clients, request.order_id) == []
    listed = await clients.orchestrator.ListSagas(pb.ListSagasRequest(created_after=since))
    assert list(listed.sagas) == []
