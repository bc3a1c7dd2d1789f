"""GetSaga's JSON views: the input and each step's result in the proto3 JSON mapping, left out whole past the cap."""

from __future__ import annotations

import json

from google.protobuf import struct_pb2

from devstack.orders import order_request
from orchestrator.definition import encode_child_result
from orchestrator.engine import SagaState
from orchestrator.sagas.order import ORDER_SAGA, order_saga_v2
from orchestrator.status import SagaStatus
from orchestrator.views import MAX_VIEW_JSON_BYTES, capped_json, definition_info_pb, result_json, saga_pb
from sagasuite.payment.v1 import payment_service_pb2 as payment
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping

T0 = 1_700_000_000.0


def saga_of(results: dict[str, bytes], order_id: str = "ord-1", saga_type: str = "OrderSaga") -> SagaState:
    return SagaState(
        saga_id="s1",
        saga_type=saga_type,
        version=1,
        business_key=order_id,
        input=order_request(order_id).SerializeToString(),
        status=SagaStatus.RUNNING,
        deadline_at=T0 + 300,
        created_at=T0,
        updated_at=T0,
        results=results,
    )


def charged(payment_id: str) -> bytes:
    return payment.ChargeResponse(payment=payment.Payment(payment_id=payment_id, order_id="ord-1")).SerializeToString()


def shipped(tracking_number: str) -> bytes:
    response = shipping.CreateShipmentResponse(shipment=shipping.Shipment(tracking_number=tracking_number))
    return response.SerializeToString()


def test_the_input_and_results_are_compact_json_in_the_proto3_mapping() -> None:
    saga = saga_of({"charge_payment": charged("pay-7"), "create_shipment": shipped("TRK-42")})
    view = saga_pb(saga, ORDER_SAGA, [], include_data=True)
    assert not view.input_truncated
    given = json.loads(view.input_json)
    # Proto field names, as a YAML definition's expressions read them.
    assert given["order_id"] == "ord-1" and given["items"] and "orderId" not in given
    # Compact: no blank after a separator.
    assert '": ' not in view.input_json and ', "' not in view.input_json
    results = {step.name: step.result_json for step in view.steps}
    assert json.loads(results["charge_payment"])["payment"]["payment_id"] == "pay-7"
    assert json.loads(results["create_shipment"])["shipment"]["tracking_number"] == "TRK-42"
    assert results["reserve_stock"] == "" and results["send_confirmation"] == ""


def test_without_include_data_or_without_the_definition_nothing_is_filled() -> None:
    saga = saga_of({"charge_payment": charged("pay-7")})
    listed = saga_pb(saga, ORDER_SAGA, [])
    assert listed.input_json == "" and all(step.result_json == "" for step in listed.steps)
    missing = saga_pb(saga, None, [], include_data=True)
    assert (missing.input_json, missing.input_truncated, list(missing.steps)) == ("", False, [])


def test_a_result_larger_than_the_cap_is_left_out_whole_and_flagged() -> None:
    huge = shipped("T" * (MAX_VIEW_JSON_BYTES + 1))
    view = saga_pb(
        saga_of({"create_shipment": huge, "charge_payment": charged("pay-8")}), ORDER_SAGA, [], include_data=True
    )
    by_name = {step.name: step for step in view.steps}
    assert (by_name["create_shipment"].result_json, by_name["create_shipment"].result_truncated) == ("", True)
    assert not by_name["charge_payment"].result_truncated and by_name["charge_payment"].result_json


def test_the_cap_counts_utf8_bytes_and_never_cuts() -> None:
    fits = "[" + '"é",' * ((MAX_VIEW_JSON_BYTES - 10) // 6) + "1]"
    assert capped_json(fits) == (fits, False) and len(fits.encode()) <= MAX_VIEW_JSON_BYTES
    # Fewer characters than the cap, more bytes: left out.
    wide = '"' + "é" * (MAX_VIEW_JSON_BYTES // 2 + 1) + '"'
    assert len(wide) < MAX_VIEW_JSON_BYTES < len(wide.encode())
    assert capped_json(wide) == ("", True)
    assert capped_json("x" * MAX_VIEW_JSON_BYTES) == ("x" * MAX_VIEW_JSON_BYTES, False)


def test_a_signal_an_approval_and_a_child_show_their_stored_json() -> None:
    definition = order_saga_v2(review_threshold=1, review_timeout=600)
    nodes = definition.step_by_name
    decision = struct_pb2.Struct()
    decision.update({"approved": True, "reason": "ok", "actor": "rita"})
    assert json.loads(result_json(nodes["fraud_review"], decision.SerializeToString())[0]) == {
        "approved": True,
        "reason": "ok",
        "actor": "rita",
    }
    child = encode_child_result("child-1", "ord-1", b"", {"create_shipment": shipped("TRK-1")})
    text, truncated = result_json(nodes["fulfilment"], child)
    assert not truncated and json.loads(text)["saga_id"] == "child-1"
    # A payload that does not parse as what the node stores is shown as nothing, not as an error.
    assert result_json(nodes["fraud_review"], b"\xff\xff") == ("", False)


def test_definition_info_lists_nodes_in_flat_order_with_the_pivot() -> None:
    info = definition_info_pb(ORDER_SAGA, running=3, latest=True)
    expected = ("OrderSaga", 1, "python:orchestrator.sagas.order", 3, True)
    assert (info.name, info.version, info.source, info.running, info.latest) == expected
    assert info.input_type == "sagasuite.orchestrator.v1.PlaceOrderRequest"
    assert list(info.services) == ["inventory", "notify", "payment", "shipping"]
    assert [(n.index, n.name, n.step_kind, n.pivot) for n in info.nodes] == [
        (0, "reserve_stock", "compensatable", False),
        (1, "charge_payment", "compensatable", False),
        (2, "create_shipment", "compensatable", True),
        (3, "send_confirmation", "retriable", False),
    ]
    charge = info.nodes[1]
    assert charge.action == "payment/sagasuite.payment.v1.PaymentService/Charge"
    assert charge.compensation == "payment/sagasuite.payment.v1.PaymentService/Refund"
    assert charge.call_timeout_seconds == 2.0 and charge.budget_seconds == 30.0
    v2 = definition_info_pb(order_saga_v2(review_threshold=1, review_timeout=600), running=0, latest=False)
    assert [(n.name, n.kind, n.group, n.branch) for n in v2.nodes] == [
        ("reserve_and_charge", "parallel", "", 0),
        ("reserve_stock", "call", "reserve_and_charge", 1),
        ("charge_payment", "call", "reserve_and_charge", 2),
        ("fraud_review", "approval", "", 0),
        ("fulfilment", "child", "", 0),
    ]
    review, fulfilment = v2.nodes[3], v2.nodes[4]
    assert (review.timeout_seconds, review.signal, review.on_timeout, review.conditional) == (
        600.0,
        "reviewer",
        "compensate",
        True,
    )
    assert fulfilment.child == "FulfilmentSaga v1" and fulfilment.pivot
    assert v2.deadline_seconds == 600.0 + 3600.0
