"""PlaceOrderAndWait and StartSagaAndWait: one call that answers with the saga's outcome, bounded by its deadline."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import any_pb2

from devstack.orders import order_request
from devstack.stack import LocalStack
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.orchestrator_helpers import start_stack


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.OrchestratorServiceStub]:
    # v2 with a low review threshold: a large order waits for its review, longer than any call here.
    env = {"ORDER_SAGA_VERSION": "2", "REVIEW_THRESHOLD": "5000"}
    stack: LocalStack = start_stack(tmp_path_factory.mktemp("start-and-wait"), orchestrator_env=env)
    try:
        with grpc.insecure_channel(stack.address) as channel:
            yield pb_grpc.OrchestratorServiceStub(channel)
    finally:
        stack.stop()


def and_wait(order: pb.PlaceOrderRequest) -> pb.PlaceOrderAndWaitRequest:
    return pb.PlaceOrderAndWaitRequest(order=order)


def order_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_a_completed_order_answers_with_its_steps_and_results(orchestrator: pb_grpc.OrchestratorServiceStub) -> None:
    answer = orchestrator.PlaceOrderAndWait(and_wait(order_request(order_id("wait-ok"), minor_units=2000)), timeout=30)
    assert answer.created and answer.saga.saga_id == answer.saga_id
    assert answer.saga.status == pb.SAGA_STATUS_COMPLETED
    assert not answer.saga.history  # the outcome, not the record
    # Each step's result, as GetSaga gives it: the payment id here; the input the caller sent is not echoed.
    results = {step.name: step.result_json for step in answer.saga.steps}
    assert json.loads(results["charge_payment"])["payment"]["payment_id"]
    assert not answer.saga.input_json
    # The repeat finds the same saga, already ended, and answers at once.
    again = orchestrator.PlaceOrderAndWait(
        and_wait(order_request(answer.saga.business_key, minor_units=2000)), timeout=30
    )
    assert not again.created and again.saga_id == answer.saga_id and again.saga.status == pb.SAGA_STATUS_COMPLETED


def test_a_declined_order_answers_compensated(orchestrator: pb_grpc.OrchestratorServiceStub) -> None:
    request = order_request(order_id("wait-declined"), minor_units=2000, token="tok_declined")
    answer = orchestrator.PlaceOrderAndWait(and_wait(request), timeout=30)
    assert answer.saga.status == pb.SAGA_STATUS_COMPENSATED, answer.saga.last_error
    assert "charge_payment" in answer.saga.last_error


def test_the_deadline_bounds_the_wait_and_the_saga_goes_on(orchestrator: pb_grpc.OrchestratorServiceStub) -> None:
    key = order_id("wait-review")
    with pytest.raises(grpc.RpcError) as raised:
        orchestrator.PlaceOrderAndWait(and_wait(order_request(key, minor_units=9000)), timeout=1.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    found = orchestrator.ListSagas(pb.ListSagasRequest(business_key=key), timeout=10).sagas
    assert len(found) == 1 and found[0].status == pb.SAGA_STATUS_RUNNING


def test_start_saga_and_wait_takes_json_input(orchestrator: pb_grpc.OrchestratorServiceStub) -> None:
    packed = any_pb2.Any()
    packed.Pack(order_request(order_id("wait-start"), minor_units=2000))
    request = pb.StartSagaRequest(saga_type="OrderSaga", input=packed)
    answer = orchestrator.StartSagaAndWait(pb.StartSagaAndWaitRequest(start=request), timeout=30)
    assert answer.created and answer.definition_version == 2
    assert answer.saga.status == pb.SAGA_STATUS_COMPLETED
    assert [child.saga_type for child in answer.saga.children] == ["FulfilmentSaga"]


def test_bad_input_is_refused_before_anything_starts(orchestrator: pb_grpc.OrchestratorServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        orchestrator.StartSagaAndWait(
            pb.StartSagaAndWaitRequest(start=pb.StartSagaRequest(saga_type="OrderSaga")), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
