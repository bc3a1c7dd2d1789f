"""Tracing over the wire: every process exports OTLP spans to a test receiver; one trace per saga, across kill -9."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from devstack.launcher import ManagedProcess
from devstack.otlp_receiver import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, STATUS_ERROR, OtlpReceiver, ReceivedSpan
from devstack.stack import LocalStack, StackConfig
from sagasuite.notify.v1 import notify_service_pb2 as notify_pb
from sagasuite.notify.v1 import notify_service_pb2_grpc as notify_grpc
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from tests.orchestrator_helpers import (
    Clients,
    connect,
    definitions_env,
    events,
    new_order_id,
    order_request,
    render,
    wait_for,
    wait_until,
)

CLIENT_SERVICE = "test-client"
PLACE_ORDER = "/sagasuite.orchestrator.v1.OrchestratorService/PlaceOrder"
# step -> (service.name of the process that serves it, action method, compensation method)
STEPS = {
    "reserve_stock": ("inventory", "/sagasuite.inventory.v1.InventoryService/ReserveStock"),
    "charge_payment": ("payment", "/sagasuite.payment.v1.PaymentService/Charge"),
    "create_shipment": ("shipping", "/sagasuite.shipping.v1.ShippingService/CreateShipment"),
    "send_confirmation": ("notify", "/sagasuite.notify.v1.NotifyService/SendConfirmation"),
}
RELEASE_STOCK = "/sagasuite.inventory.v1.InventoryService/ReleaseStock"
# The shipment of a "slowship-" order is created at once, but its first reply is held back for
# 15 s, which the stack's order saga allows it (PATIENT_SHIPPING_ORDER_SAGA): the
# orchestrator is killed while that call is on the wire, however long the test takes to get there.
SLOW_SHIPPING = "CreateShipment:reply_delay_ms=15000,reply_delay_first=1,order_contains=slowship-"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[LocalStack]:
    config = StackConfig(
        tmp_path_factory.mktemp("traced"),
        common_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"},
        orchestrator_env={**definitions_env("PATIENT_SHIPPING_ORDER_SAGA"), "ORDER_SAGA_VERSION": "3"},
        service_env={"shipping": {"FAULTS": SLOW_SHIPPING}},
    )
    with LocalStack(config) as started:
        yield started


@pytest.fixture(scope="module")
def client_tracing(receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    """The test's own tracer provider (not the global one), exporting its client spans to the receiver."""
    provider = TracerProvider(resource=Resource.create({"service.name": CLIENT_SERVICE}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)))
    yield provider
    provider.shutdown()


def traced_clients(stack: LocalStack, provider: TracerProvider) -> AbstractAsyncContextManager[Clients]:
    """Stubs whose orchestrator channel traces its calls and sends the W3C traceparent."""
    # The instrumentation leaves its factories unannotated.
    interceptors = aio_client_interceptors(tracer_provider=provider)  # type: ignore[no-untyped-call]
    return connect(stack, token="", interceptors=interceptors)


class Tree:
    """The spans of one trace, navigable from parent to children."""

    def __init__(self, spans: list[ReceivedSpan]) -> None:
        self.spans = spans

    def __str__(self) -> str:
        return "\n  ".join(str(s) for s in sorted(self.spans, key=lambda s: s.start_ns))

    def named(self, name: str, service: str | None = None) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name and (service is None or s.service == service)]

    def one(self, name: str, service: str | None = None) -> ReceivedSpan:
        found = self.named(name, service)
        assert len(found) == 1, f"expected one span {name!r} ({service}), found {len(found)}:\n  {self}"
        return found[0]

    def children(self, parent: ReceivedSpan, name: str | None = None) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.parent_span_id == parent.span_id and (name is None or s.name == name)]

    def call_below(self, step_span: ReceivedSpan, method: str, service: str) -> tuple[ReceivedSpan, ReceivedSpan]:
        """The orchestrator's client span under a step span and the service's server span under it."""
        (client,) = self.children(step_span, method)
        assert (client.service, client.kind) == ("orchestrator", KIND_CLIENT), f"{client}\n  {self}"
        (server,) = self.children(client, method)
        assert (server.service, server.kind) == (service, KIND_SERVER), f"{server}\n  {self}"
        return client, server


def has(*names: str) -> Callable[[list[ReceivedSpan]], bool]:
    """A receiver condition: every named span has arrived."""
    return lambda spans: all(any(s.name == name for s in spans) for name in names)


def assert_saga_root(tree: Tree, saga_id: str, order_id: str) -> ReceivedSpan:
    """The client span -> orchestrator server span -> saga span chain; returns the saga span."""
    client = tree.one(PLACE_ORDER, CLIENT_SERVICE)
    assert client.kind == KIND_CLIENT and client.parent_span_id == ""
    server = tree.one(PLACE_ORDER, "orchestrator")
    assert server.kind == KIND_SERVER and server.parent_span_id == client.span_id
    assert server.attributes["saga.id"] == saga_id and server.attributes["saga.created"] is True
    saga_span = tree.one("saga OrderSaga")
    assert saga_span.service == "orchestrator" and saga_span.kind == KIND_INTERNAL
    assert saga_span.parent_span_id == server.span_id
    assert saga_span.attributes["saga.id"] == saga_id
    assert saga_span.attributes["saga.type"] == "OrderSaga"
    assert saga_span.attributes["order.id"] == order_id
    return saga_span


def assert_step(
    tree: Tree, saga_span: ReceivedSpan, saga_id: str, order_id: str, step: str, direction: str
) -> ReceivedSpan:
    name = f"step {step}" if direction == "action" else f"compensate {step}"
    (span,) = tree.children(saga_span, name)
    assert span.service == "orchestrator" and span.kind == KIND_INTERNAL
    assert span.attributes["saga.id"] == saga_id
    assert span.attributes["saga.type"] == "OrderSaga"
    assert span.attributes["saga.step"] == step
    assert span.attributes["saga.attempt"] == 1
    assert span.attributes["idempotency.key"] == f"{saga_id}/{step}/{direction}"
    assert span.attributes["order.id"] == order_id
    return span


async def test_completed_saga_is_one_trace_across_all_five_processes(
    stack: LocalStack, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    order_id = new_order_id("traced")
    async with traced_clients(stack, client_tracing) as clients:
        saga_id = await clients.place(order_request(order_id))
        saga = await wait_for(clients, saga_id, {"COMPLETED"})
    trace_id = saga.trace_id
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), saga.trace_id
    methods = [method for _, method in STEPS.values()]
    spans = receiver.wait_for(
        lambda got: (
            has("saga OrderSaga outcome", *(f"step {s}" for s in STEPS))(got)
            and all(sum(s.name == m for s in got) == 2 for m in methods)
        ),
        trace_id=trace_id,
        what=f"the spans of saga {saga_id}",
    )
    tree = Tree(spans)

    # Every span that names this saga, from any process, is in this one trace.
    mine = [s for s in receiver.spans() if s.attributes.get("saga.id") == saga_id or saga_id in str(s.attributes)]
    assert {s.trace_id for s in mine} == {trace_id}
    assert {s.service for s in spans} == {CLIENT_SERVICE, "orchestrator", "inventory", "payment", "shipping", "notify"}

    saga_span = assert_saga_root(tree, saga_id, order_id)
    for step, (service, method) in STEPS.items():
        step_span = assert_step(tree, saga_span, saga_id, order_id, step, "action")
        assert step_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
        _, server = tree.call_below(step_span, method, service)
        assert server.attributes["idempotency.key"] == f"{saga_id}/{step}/action"
    assert not tree.named(f"compensate {next(iter(STEPS))}")
    (outcome,) = tree.children(saga_span, "saga OrderSaga outcome")
    assert outcome.attributes["saga.status"] == "COMPLETED"
    # The outcome span covers the saga's life: it starts when the saga was recorded, inside the saga span.
    assert saga_span.start_ns <= outcome.start_ns <= saga_span.end_ns <= outcome.end_ns

    # The per-call log line of a service is written inside its server span.
    _, reserve_server = tree.call_below(tree.one("step reserve_stock"), STEPS["reserve_stock"][1], "inventory")
    log = stack.services["inventory"].log_path.read_text()
    (line,) = [line for line in log.splitlines() if f"key={saga_id}/reserve_stock/action" in line]
    assert f"trace_id={trace_id} span_id={reserve_server.span_id}" in line


async def test_compensated_saga_traces_the_failed_step_and_the_compensation(
    stack: LocalStack, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    order_id = new_order_id("declined")
    async with traced_clients(stack, client_tracing) as clients:
        saga_id = await clients.place(order_request(order_id, token="tok_declined"))
        saga = await wait_for(clients, saga_id, {"COMPENSATED"})
    spans = receiver.wait_for(
        lambda got: (
            has("saga OrderSaga outcome", "compensate reserve_stock")(got)
            and sum(s.name == RELEASE_STOCK for s in got) == 2
            and sum(s.name == STEPS["charge_payment"][1] for s in got) == 2
        ),
        trace_id=saga.trace_id,
        what=f"the spans of saga {saga_id}",
    )
    tree = Tree(spans)
    saga_span = assert_saga_root(tree, saga_id, order_id)

    assert_step(tree, saga_span, saga_id, order_id, "reserve_stock", "action")
    charge = assert_step(tree, saga_span, saga_id, order_id, "charge_payment", "action")
    assert charge.status_code == STATUS_ERROR and "FAILED_PRECONDITION" in charge.status_message
    assert charge.attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    charge_client, charge_server = tree.call_below(charge, STEPS["charge_payment"][1], "payment")
    assert charge_client.status_code == STATUS_ERROR
    assert charge_server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]

    release = assert_step(tree, saga_span, saga_id, order_id, "reserve_stock", "compensation")
    assert release.start_ns >= charge.end_ns
    _, release_server = tree.call_below(release, RELEASE_STOCK, "inventory")
    assert release_server.attributes["idempotency.key"] == f"{saga_id}/reserve_stock/compensation"
    # The charge failed for sure (not retryable), so it is not compensated, and nothing came after it.
    assert not tree.named("compensate charge_payment")
    assert not tree.named("step create_shipment") and not tree.named("step send_confirmation")
    (outcome,) = tree.children(saga_span, "saga OrderSaga outcome")
    assert outcome.attributes["saga.status"] == "COMPENSATED"
    assert outcome.attributes["saga.last_error"].startswith("charge_payment: FAILED_PRECONDITION")


async def test_saga_resumed_after_kill_9_continues_its_trace(
    stack: LocalStack, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    order_id = new_order_id("slowship")
    async with traced_clients(stack, client_tracing) as clients:
        saga_id = await clients.place(order_request(order_id))
        saga = await clients.saga(saga_id)
        trace_id = saga.trace_id

        async def shipment_created() -> bool:
            try:
                await clients.shipping.GetShipment(shipping_pb.GetShipmentRequest(order_id=order_id))
            except grpc.aio.AioRpcError:
                return False
            return True

        before = receiver.wait_for(
            has("saga OrderSaga", "step reserve_stock", "step charge_payment"),
            trace_id=trace_id,
            what="the spans exported before the kill",
        )
        first_instance = Tree(before).one("saga OrderSaga").instance
        # The shipment is committed and its reply is held back: the call is on the wire.
        await wait_until(shipment_created, "the shipment of the slow order")
        assert stack.orchestrator is not None
        stack.orchestrator.kill()
        stack.orchestrator.restart()

        async def answers() -> bool:
            try:
                await clients.saga(saga_id)
            except grpc.aio.AioRpcError:
                return False  # the channel may still be reconnecting
            return True

        await wait_until(answers, "the restarted orchestrator")
        saga = await wait_for(clients, saga_id, {"COMPLETED"})
    history = render(saga)
    # Killed while the call was on the wire: no outcome of its first attempt was recorded.
    assert events(saga, "StepSucceeded", "StepFailed")[2:] == [
        ("StepSucceeded", "create_shipment", "OK"),
        ("StepSucceeded", "send_confirmation", "OK"),
    ], history

    def resent_call_traced(got: list[ReceivedSpan]) -> bool:
        """The restarted orchestrator's spans and the shipping server span of its resent call (each
        process exports on its own schedule)."""
        tree = Tree(got)
        method = STEPS["create_shipment"][1]
        resent = [s for s in tree.named("step create_shipment") if s.instance != first_instance]
        server_spans = [server for s in resent for c in tree.children(s, method) for server in tree.children(c, method)]
        return has("step send_confirmation", "saga OrderSaga outcome")(got) and bool(server_spans)

    spans = receiver.wait_for(resent_call_traced, trace_id=trace_id, what="the spans of the resumed saga")
    tree = Tree(spans)
    saga_span = assert_saga_root(tree, saga_id, order_id)
    assert saga_span.instance == first_instance, history
    # The attempt cut off by the kill never ended, so only the resent one has a step span.
    resumed = assert_step(tree, saga_span, saga_id, order_id, "create_shipment", "action")
    confirm = assert_step(tree, saga_span, saga_id, order_id, "send_confirmation", "action")
    outcome = tree.one("saga OrderSaga outcome")
    for span in (resumed, confirm, outcome):
        assert span.instance != first_instance, f"{span} should come from the restarted orchestrator\n{history}"
        assert span.trace_id == trace_id and span.parent_span_id == saga_span.span_id
    _, replayed = tree.call_below(resumed, STEPS["create_shipment"][1], "shipping")
    assert replayed.attributes.get("idempotency.replayed") is True, f"{replayed}\n{history}"
    assert outcome.attributes["saga.status"] == "COMPLETED"
    # Every span of the saga, before and after the kill, is in the one trace.
    assert {s.trace_id for s in receiver.spans() if s.attributes.get("saga.id") == saga_id} == {trace_id}


async def test_a_streaming_call_works_and_is_traced(
    stack: LocalStack, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    watch = "/sagasuite.orchestrator.v1.OrchestratorService/WatchSaga"
    async with traced_clients(stack, client_tracing) as clients:
        saga_id = await clients.place(order_request(new_order_id("watched")))
        request = pb.WatchSagaRequest(saga_id=saga_id)
        types = [response.event.type async for response in clients.orchestrator.WatchSaga(request)]
    assert types[0] == "SagaStarted" and types[-1] == "SagaCompleted", types

    def both_ends(got: list[ReceivedSpan]) -> bool:
        return {s.service for s in got if s.name == watch} >= {"orchestrator", CLIENT_SERVICE}

    spans = receiver.wait_for(both_ends, what="the WatchSaga spans")
    (server,) = [s for s in spans if s.name == watch and s.service == "orchestrator"]
    (client,) = [s for s in spans if s.span_id == server.parent_span_id]
    assert (client.service, client.kind, server.kind) == (CLIENT_SERVICE, KIND_CLIENT, KIND_SERVER)


async def test_sigterm_flushes_the_spans_still_queued(start_process: Callable[..., ManagedProcess]) -> None:
    with OtlpReceiver() as own_receiver:
        # A minute between batch exports: only the flush on a graceful stop can deliver the span.
        process = start_process(
            "notify_svc",
            "notify-flush",
            OTEL_EXPORTER_OTLP_ENDPOINT=own_receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="60000",
        )
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = notify_grpc.NotifyServiceStub(channel)
            await stub.ListNotifications(notify_pb.ListNotificationsRequest(order_id="flush-1"))
        assert own_receiver.spans() == []
        assert process.stop() == 0
        (span,) = own_receiver.spans()
    assert (span.name, span.service, span.kind) == (
        "/sagasuite.notify.v1.NotifyService/ListNotifications",
        "notify",
        KIND_SERVER,
    )
