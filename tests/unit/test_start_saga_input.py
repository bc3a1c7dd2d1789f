"""StartSaga's input checks without a server: one input of three, JSON parsed strictly, the business key derived."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format, struct_pb2

from devstack.orders import order_request
from orchestrator import server
from orchestrator.definition import BusinessKeyMismatch, SagaDefinition
from orchestrator.sagas.order import ORDER_SAGA, order_steps
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from svckit.errors import InvalidArgument
from svckit.validation import Violations


def refusal(request: pb.StartSagaRequest, definition: SagaDefinition = ORDER_SAGA) -> tuple[list[str], str]:
    """The fields and text of the refusal of a request's input (its shape, then its parse)."""
    with pytest.raises(InvalidArgument) as info:
        violations = Violations()
        server._check_input_given(violations, request)
        violations.raise_if_any()
        server._input_message(definition, request)
    return [v.field for v in info.value.violations], str(info.value)


def test_the_same_order_parses_the_same_from_each_input_field() -> None:
    order = order_request("ord-1")
    struct = struct_pb2.Struct()
    struct.update(json_format.MessageToDict(order))
    packed = pb.StartSagaRequest()
    packed.input.Pack(order)
    for request, field in (
        (packed, "input"),
        (pb.StartSagaRequest(input_struct=struct), "input_struct"),
        (pb.StartSagaRequest(input_json=json_format.MessageToJson(order)), "input_json"),
        # Field names as in the proto are the proto3 JSON mapping too.
        (
            pb.StartSagaRequest(input_json=json_format.MessageToJson(order, preserving_proto_field_name=True)),
            "input_json",
        ),
    ):
        violations = Violations()
        server._check_input_given(violations, request)
        violations.raise_if_any()
        assert server._input_message(ORDER_SAGA, request) == (order, field)


def test_exactly_one_input_field() -> None:
    assert refusal(pb.StartSagaRequest())[0] == ["input"]
    both = pb.StartSagaRequest(input_json="{}")
    both.input_struct.update({"orderId": "x"})
    fields, text = refusal(both)
    assert fields == ["input_struct", "input_json"] and "only one of" in text


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"orderId": "x", "orderId": "y"}', "given twice"),
        ('{"deadlineSeconds": NaN}', "NaN is not a JSON number"),
        ('{"deadlineSeconds": -Infinity}', "-Infinity is not a JSON number"),
        ('{"deadlineSeconds": 1e400}', "too large for a double"),
        ('{"deadlineSeconds": ' + "1" * 41 + "}", "more digits than any integer field takes"),
        ('{"deadlineSeconds": 1.5}', "deadlineSeconds"),
        ('{"orderId": "x", "zz": 1}', 'no field named "zz"'),
        ('{"a\\u0000": 1}', "control character"),
        ('{"orderId": "\\ud800"}', "surrogate"),
        ("[" * 65 + "]" * 65, "more than 64 deep"),
        ('{"a":' * 65 + "1" + "}" * 65, "more than 64 deep"),
        ("null", "got null"),
        ("{", "not valid JSON"),
        ('{"orderId": "x"} {}', "Extra data"),
    ],
)
def test_input_json_is_parsed_strictly(text: str, says: str) -> None:
    fields, refused = refusal(pb.StartSagaRequest(input_json=text))
    assert fields == ["input_json"] and says in refused, refused


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    inside = json.dumps({"orderId": "[" * 5000 + '\\"' + "{" * 5000})
    assert not server._nests_too_deep(inside)
    assert server._nests_too_deep("[" * 65 + "]" * 65) and not server._nests_too_deep("[" * 64 + "]" * 64)
    # An escaped quote does not end the string its brackets are in.
    assert not server._nests_too_deep('["\\"' + "[" * 100 + '"]')


def test_a_parser_reason_is_one_short_printable_line() -> None:
    fields, refused = refusal(pb.StartSagaRequest(input_json='{"' + "\u202e\x1b" * 400 + '": 1}'))
    assert fields == ["input_json"] and len(refused) < 400
    assert "\x1b" not in refused and "\u202e" not in refused and "\n" not in refused


def test_struct_input_is_held_to_json_numbers_and_clean_keys() -> None:
    nan = pb.StartSagaRequest()
    nan.input_struct.update({"deadlineSeconds": float("nan")})
    assert refusal(nan)[0] == ["input_struct.deadlineSeconds"]
    control = pb.StartSagaRequest()
    control.input_struct.update({"order\nId": "x"})
    assert refusal(control)[0] == ["input_struct['order\\nId']"]
    unknown = pb.StartSagaRequest()
    unknown.input_struct.update({"colour": "red"})
    assert refusal(unknown)[0] == ["input_struct"]


def test_the_business_key_is_derived_or_must_match() -> None:
    order = order_request("ord-7")
    assert server._business_key(ORDER_SAGA, order, "") == "ord-7"
    assert server._business_key(ORDER_SAGA, order, "ord-7") == "ord-7"
    with pytest.raises(BusinessKeyMismatch):
        server._business_key(ORDER_SAGA, order, "ord-8")
    with pytest.raises(InvalidArgument) as empty:
        server._business_key(ORDER_SAGA, order_request(""), "")
    assert "is empty too" in str(empty.value)


def test_a_derivation_that_fails_is_a_refusal_naming_the_business_key() -> None:
    def explode(order: pb.PlaceOrderRequest) -> str:
        raise ValueError("jq: error: null (null) has no keys\nat line 1")

    failing = SagaDefinition(
        name="Failing", version=1, input_type=pb.PlaceOrderRequest, steps=order_steps(), business_key=explode
    )
    for given in ("", "ord-1"):
        with pytest.raises(InvalidArgument) as info:
            server._business_key(failing, order_request("ord-1"), given)
        assert [v.field for v in info.value.violations] == ["business_key"]
        assert "cannot derive its key" in str(info.value) and "\n" not in str(info.value)
    too_long = SagaDefinition(
        name="Long", version=1, input_type=pb.PlaceOrderRequest, steps=order_steps(), business_key=lambda o: "k" * 201
    )
    with pytest.raises(InvalidArgument, match="201 characters"):
        server._business_key(too_long, order_request("ord-1"), "")
