"""Exactly once on real processes, both databases: one saga per order, terminate mid-call, INTERNAL, lost definition."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from devstack.stack import LocalStack
from sagactl.render import saga_header, saga_steps, saga_timeline
from sagasuite.common.v1.common_pb2 import LineItem
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from tests.grpc_helpers import bad_request_fields, error_reason, keyed
from tests.orchestrator_helpers import (
    DEFINITIONS_MODULE,
    Clients,
    connect,
    events,
    fresh_postgres_database,
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
    "inventory": (
        # A reservation that takes 1.5 s: long enough to terminate its saga while it is on the wire.
        "ReserveStock:latency_ms=1500,order_contains=term-;"
        # The first try fails before the handler, so the step's outcome is unknown until the retry answers.
        "ReserveStock:fail_first=1,order_contains=refusal-;"
        # Never succeeds: its saga keeps retrying, in flight, for as long as a test needs.
        "ReserveStock:fail_first=1000000,order_contains=loyal-"
    ),
}
LOYALTY = f"{DEFINITIONS_MODULE}:LOYALTY_SAGA"
ENDED = ("COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED")
# Orders whose Charge the payment proxy answers INTERNAL after the real service charged them.
INTERNAL_MARKER = "internal-"


class InternalAfterCharge(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic only in grpc-stubs
    """A proxy in front of payment: forwards every call, then answers INTERNAL to the Charge of marked orders.

    The charge has committed in payment by then: INTERNAL is what a participant answers when its
    commit failed in a way that does not say whether it happened (a lost commit acknowledgement).
    """

    def __init__(self, upstream: str) -> None:
        self._channel = grpc.insecure_channel(upstream)
        self.injected: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = handler_call_details.method
        forward = self._channel.unary_unary(method, request_serializer=None, response_deserializer=None)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                response = forward(request, metadata=tuple(context.invocation_metadata()),
                                   timeout=context.time_remaining())  # fmt: skip
            except grpc.RpcError as error:
                context.set_trailing_metadata(error.trailing_metadata() or ())  # type: ignore[arg-type]  # opaque in grpc-stubs
                context.abort(error.code(), error.details() or "")
            if method.endswith("/Charge"):
                order_id = payment_pb.ChargeRequest.FromString(request).order_id
                if INTERNAL_MARKER in order_id:
                    self.injected.append(order_id)
                    context.abort(grpc.StatusCode.INTERNAL, "injected: the charge committed, then its reply failed")
            return response  # type: ignore[no-any-return]

        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The stack with its payment calls going through the INTERNAL proxy; on PostgreSQL with a second replica."""
    with contextlib.ExitStack() as cleanup:
        database_url = ""
        if request.param == "postgresql":
            database_url = cleanup.enter_context(fresh_postgres_database(request.getfixturevalue("postgres_admin_url")))
        running = start_stack(
            tmp_path_factory.mktemp(f"exactly-once-{request.param}"),
            faults=FAULTS,
            orchestrator_env={"SAGA_DEFINITIONS": LOYALTY, "METRICS_PORT": "0"},
            database_url=database_url,
        )
        proxy = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        proxy.add_generic_rpc_handlers((InternalAfterCharge(running.services["payment"].address),))
        port = proxy.add_insecure_port("127.0.0.1:0")
        proxy.start()
        try:
            assert running.orchestrator is not None
            running.orchestrator.stop()
            running.orchestrator.env["PAYMENT_ADDR"] = f"127.0.0.1:{port}"
            running.orchestrator.restart()
            if request.param == "postgresql":
                running.second = running.add_orchestrator("orchestrator-b")  # type: ignore[attr-defined]
            yield running
        finally:
            second = getattr(running, "second", None)
            if second is not None:
                second.stop()
            running.stop()
            proxy.stop(None)


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(stack) as connected:
        yield connected


def packed(request: pb.PlaceOrderRequest) -> any_pb2.Any:
    wrapped = any_pb2.Any()
    wrapped.Pack(request)
    return wrapped


def start_saga(business_key: str, request: pb.PlaceOrderRequest, saga_type: str = "OrderSaga") -> pb.StartSagaRequest:
    return pb.StartSagaRequest(saga_type=saga_type, business_key=business_key, input=packed(request))


async def sagas_of(clients: Clients, order_id: str) -> list[pb.Saga]:
    return list((await clients.orchestrator.ListSagas(pb.ListSagasRequest(business_key=order_id))).sagas)


def text_of(*renderables: Any) -> str:
    text = io.StringIO()
    console = Console(file=text, width=200, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return text.getvalue()


# -- item 2: one saga per order -------------------------------------------------------------------


async def test_a_start_under_another_key_for_the_same_order_is_refused(clients: Clients) -> None:
    order_id = new_order_id("again")
    request = order_request(order_id)
    first = await wait_for(clients, await clients.place(request), ENDED)
    assert status_name(first.status) == "COMPLETED", render(first)

    error = await refused(clients.orchestrator.StartSaga(start_saga(f"{order_id}-again", request)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad_request_fields(error) == ["business_key"]
    assert repr(order_id) in (error.details() or "")
    assert await sagas_of(clients, f"{order_id}-again") == []
    # The first saga's effects stand, untouched.
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RESERVED
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]


async def test_the_same_order_started_every_way_at_once_is_one_saga(stack: LocalStack, clients: Clients) -> None:
    second = getattr(stack, "second", None)
    channel = grpc.aio.insecure_channel(second.address) if second else None
    other = pb_grpc.OrchestratorServiceStub(channel) if channel is not None else clients.orchestrator
    try:
        orders = [new_order_id("every-way") for _ in range(6)]
        calls: list[Awaitable[pb.PlaceOrderResponse | pb.StartSagaResponse]] = []
        for order_id in orders:
            request = order_request(order_id)
            calls += [
                clients.orchestrator.PlaceOrder(request),
                other.PlaceOrder(request),
                clients.orchestrator.StartSaga(start_saga(order_id, request)),
                other.StartSaga(start_saga(order_id, request)),
                other.StartSaga(start_saga(f"{order_id}-again", request)),
            ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        if channel is not None:
            await channel.close(None)
    for index, order_id in enumerate(orders):
        *started, again = answers[index * 5 : index * 5 + 5]
        assert isinstance(again, grpc.aio.AioRpcError) and again.code() == grpc.StatusCode.INVALID_ARGUMENT, again
        assert not any(isinstance(answer, BaseException) for answer in started), started
        assert len({answer.saga_id for answer in started}) == 1  # type: ignore[union-attr]
        assert sorted(answer.created for answer in started) == [False, False, False, True]  # type: ignore[union-attr]
        saga = await wait_for(clients, started[0].saga_id, ENDED)  # type: ignore[union-attr]
        assert status_name(saga.status) == "COMPLETED", render(saga)
        assert [s.saga_id for s in await sagas_of(clients, order_id)] == [saga.saga_id]
        assert await sagas_of(clients, f"{order_id}-again") == []
        assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE"]
        assert len(await clients.notifications(order_id)) == 1


async def test_a_refusal_that_proves_another_effect_is_not_compensated(clients: Clients) -> None:
    # Somebody else (not a saga) holds the order's stock; the saga's first try is lost on the way.
    order_id = new_order_id("refusal")
    direct = inventory_pb.ReserveStockRequest(order_id=order_id, items=[LineItem(sku="BOOK-001", quantity=1)])
    # The fault fails the first try of every key, this one's too.
    await refused(clients.inventory.ReserveStock(direct, metadata=keyed("someone-else/reserve")))
    await clients.inventory.ReserveStock(direct, metadata=keyed("someone-else/reserve"))
    saga = await wait_for(clients, await clients.place(order_request(order_id)), ENDED)

    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert events(saga, "StepFailed", "CompensationStarted", "CompensationSucceeded") == [
        ("StepFailed", "reserve_stock", "UNAVAILABLE"),
        ("StepFailed", "reserve_stock", "FAILED_PRECONDITION"),
        ("CompensationStarted", "", ""),
    ], render(saga)
    assert "already holds" in saga.last_error, render(saga)
    # ORDER_ALREADY_RESERVED under our key: our reserve never happened, and the other holder keeps its stock.
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RESERVED


# -- item 3: terminate while a call is on the wire ---------------------------------------------------


async def test_a_call_on_the_wire_at_terminate_is_recorded_and_reported(clients: Clients) -> None:
    order_id = new_order_id("term-midcall")
    saga_id = await clients.place(order_request(order_id))
    answer = await clients.orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason="fraud"))
    assert status_name(answer.saga.status) == "TERMINATED"
    assert list(answer.steps_maybe_applied) == ["reserve_stock"]
    assert list(answer.saga.steps_maybe_applied) == ["reserve_stock"]
    assert {s.name: s.state for s in answer.saga.steps}["reserve_stock"] == "running"

    def recorded(saga: pb.Saga) -> bool:
        return any(e.type == "EffectAfterTerminate" for e in saga.history)

    saga = await wait_for(clients, saga_id, recorded)
    assert status_name(saga.status) == "TERMINATED", render(saga)
    assert events(saga, "SagaTerminated", "EffectAfterTerminate") == [
        ("SagaTerminated", "", ""),
        ("EffectAfterTerminate", "reserve_stock", "OK"),
    ], render(saga)
    assert saga.history[-1].message == "effect applied after terminate; not compensated"
    step = {s.name: s for s in saga.steps}["reserve_stock"]
    assert step.state == "succeeded" and step.last_error == "effect applied after terminate; not compensated"
    assert list(saga.steps_maybe_applied) == ["reserve_stock"]
    shown = text_of(saga_header(saga), saga_steps(saga), saga_timeline(saga))
    assert "effect applied after terminate; not compensated" in shown
    assert "effects that may still stand (not compensated): reserve_stock" in shown
    # What the history says is what the services hold: the stock stays reserved, nothing else ran.
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RESERVED
    assert (await refused(clients.payment_of(order_id))).code() == grpc.StatusCode.NOT_FOUND


# -- item 6: a participant's INTERNAL answer may have happened ------------------------------------------


async def test_an_internal_answer_after_the_charge_is_refunded_when_the_saga_unwinds(
    stack: LocalStack, clients: Clients
) -> None:
    order_id = new_order_id(INTERNAL_MARKER)
    saga = await wait_for(clients, await clients.place(order_request(order_id)), ENDED)

    assert status_name(saga.status) == "COMPENSATED", render(saga)
    assert events(saga, "StepFailed", "CompensationSucceeded") == [
        ("StepFailed", "charge_payment", "INTERNAL"),
        ("CompensationSucceeded", "charge_payment", "OK"),
        ("CompensationSucceeded", "reserve_stock", "OK"),
    ], render(saga)
    # INTERNAL is not retried: one charge went out, and it was refunded.
    assert ledger_kinds(await clients.ledger(order_id)) == ["CHARGE", "REFUND"]
    assert (await clients.payment_of(order_id)).status == payment_pb.PAYMENT_STATUS_REFUNDED
    assert (await clients.reservation(order_id)).status == inventory_pb.RESERVATION_STATUS_RELEASED


# -- item 4: a saga whose definition is not loaded -------------------------------------------------------


def metric(process: Any, name: str, **labels: str) -> float:
    port = int(re.findall(r"METRICS port=(\d+)", process.log_path.read_text())[-1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def restart_orchestrators(stack: LocalStack, definitions: str) -> None:
    replicas = [stack.orchestrator, getattr(stack, "second", None)]
    for replica in replicas:
        if replica is not None:
            replica.stop()
    for replica in replicas:
        if replica is not None:
            replica.env["SAGA_DEFINITIONS"] = definitions
            replica.restart()


async def test_a_saga_whose_definition_is_gone_after_a_restart_waits_for_an_operator(
    stack: LocalStack, clients: Clients
) -> None:
    order_id = new_order_id("loyal")
    started = await clients.orchestrator.StartSaga(start_saga(order_id, order_request(order_id), "LoyaltySaga"))
    saga_id = started.saga_id

    def retrying(saga: pb.Saga) -> bool:
        return sum(e.type == "StepRetryScheduled" for e in saga.history) >= 2

    await wait_for(clients, saga_id, retrying)
    assert stack.orchestrator is not None
    log_start = len(stack.orchestrator.log_path.read_text())
    restart_orchestrators(stack, "")
    try:
        async with connect(stack) as after:
            saga = await wait_for(after, saga_id, ["NEEDS_ATTENTION"])
            last = saga.history[-1]
            assert (last.type, last.code) == ("SagaNeedsAttention", "DEFINITION_MISSING"), render(saga)
            assert saga.last_error.startswith("DEFINITION_MISSING"), render(saga)
            log = stack.orchestrator.log_path.read_text()[log_start:]
            lines = [line for line in log.splitlines() if "no loaded definition" in line]
            assert len(lines) == 1 and "ERROR" in lines[0] and saga_id in lines[0] and "LoyaltySaga v1" in lines[0]
            assert metric(stack.orchestrator, "sagasuite_sagas_definition_missing", saga_type="LoyaltySaga") >= 1
            for call in (
                after.orchestrator.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id)),
                after.orchestrator.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id)),
            ):
                error = await refused(call)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                assert error_reason(error) == "DEFINITION_MISSING", error.details()
                assert "LoyaltySaga v1" in (error.details() or "")
            assert status_name((await after.saga(saga_id)).status) == "NEEDS_ATTENTION"
            assert "Task exception was never retrieved" not in stack.orchestrator.log_path.read_text()[log_start:]
    finally:
        restart_orchestrators(stack, LOYALTY)

    # With the definition back, an operator retries it and it runs again.
    async with connect(stack) as back:
        retried = (await back.orchestrator.RetrySaga(pb.RetrySagaRequest(saga_id=saga_id))).saga
        assert status_name(retried.status) == "RUNNING"

        async def retrying_again() -> bool:
            saga = await back.saga(saga_id)
            return saga.history[-1].type in ("StepRetryScheduled", "StepFailed")

        await wait_until(retrying_again, "the retried saga to call its step again")
        await back.orchestrator.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason="test over"))
