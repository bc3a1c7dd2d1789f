"""Tracing of long-running sagas: a wait is a span, and a child saga's spans sit under its parent's step."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from devstack.otlp_receiver import STATUS_ERROR, OtlpReceiver, ReceivedSpan
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from tests.orchestrator_helpers import OPERATOR_TOKEN, Clients, connect, new_order_id, order_request, wait_for


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[LocalStack]:
    config = StackConfig(
        tmp_path_factory.mktemp("traced-long-running"),
        common_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"},
        orchestrator_env={
            "ORDER_SAGA_VERSION": "2",
            "REVIEW_THRESHOLD": "5000",
            "OPERATOR_TOKENS": f"operator:{OPERATOR_TOKEN}",
        },
    )
    with LocalStack(config) as started:
        yield started


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(stack) as opened:
        yield opened


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


async def test_the_review_is_a_wait_span_and_the_child_sits_under_its_parent_step(
    clients: Clients, receiver: OtlpReceiver
) -> None:
    order_id = new_order_id("traced-v2")
    saga_id = await clients.place(order_request(order_id, minor_units=9000))
    await wait_for(clients, saga_id, lambda s: any(w.step == "fraud_review" for w in s.waits))
    await clients.orchestrator.DecideApproval(
        pb.DecideApprovalRequest(saga_id=saga_id, step="fraud_review", approve=True, reason="fine")
    )
    saga = await wait_for(clients, saga_id, {"COMPLETED"})
    (child,) = saga.children

    spans = receiver.wait_for(
        lambda got: (
            bool(named(got, "wait fraud_review") and named(got, "wait fulfilment"))
            and len(named(got, "step create_shipment")) == 1
            and bool(named(got, "saga FulfilmentSaga outcome"))
        ),
        trace_id=saga.trace_id,
        what="the spans of the v2 saga and its child",
    )
    by_id = {span.span_id: span for span in spans}
    (saga_span,) = [s for s in spans if s.name == "saga OrderSaga" and s.attributes.get("saga.id") == saga_id]
    (review,) = named(spans, "wait fraud_review")
    assert review.parent_span_id == saga_span.span_id
    assert review.attributes["saga.wait.code"] == "APPROVED"
    assert review.end_ns > review.start_ns
    (child_step,) = named(spans, "child fulfilment")
    assert child_step.parent_span_id == saga_span.span_id
    # The child's own spans (its steps, its outcome) are under the parent's child step, in the parent's trace.
    (shipment,) = named(spans, "step create_shipment")
    assert shipment.attributes["saga.id"] == child.saga_id
    assert by_id[shipment.parent_span_id].span_id == child_step.span_id
    (wait_child,) = named(spans, "wait fulfilment")
    assert wait_child.parent_span_id == saga_span.span_id and wait_child.attributes["saga.wait.code"] == "COMPLETED"


async def test_a_rejected_review_is_a_wait_span_not_an_error(clients: Clients, receiver: OtlpReceiver) -> None:
    order_id = new_order_id("traced-reject")
    saga_id = await clients.place(order_request(order_id, minor_units=9000))
    await wait_for(clients, saga_id, lambda s: any(w.step == "fraud_review" for w in s.waits))
    await clients.orchestrator.DecideApproval(
        pb.DecideApprovalRequest(saga_id=saga_id, step="fraud_review", approve=False, reason="no")
    )
    saga = await wait_for(clients, saga_id, {"COMPENSATED"})
    spans = receiver.wait_for(
        lambda got: bool(named(got, "wait fraud_review")), trace_id=saga.trace_id, what="the review's span"
    )
    (review,) = named(spans, "wait fraud_review")
    assert review.attributes["saga.wait.code"] == "REJECTED" and review.status_code != STATUS_ERROR
