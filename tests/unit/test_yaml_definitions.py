"""YAML saga definitions: refusals at their line:column, deterministic jq, the order saga as in Python, folders."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from sqlalchemy import Connection

from orchestrator import store
from orchestrator.declarative.compiler import DefinitionFileError, LoadedDefinition, Problem, compile_file
from orchestrator.declarative.contracts import contract_from_files, read_descriptor_set
from orchestrator.declarative.expressions import ExpressionError, scan
from orchestrator.declarative.folder import DefinitionFolder, compile_files
from orchestrator.definition import (
    Approval,
    ChildSaga,
    DefinitionRegistry,
    Parallel,
    SagaDefinition,
    Step,
)
from orchestrator.engine import SagaState, Status
from orchestrator.sagas.order import FULFILMENT_SAGA, ORDER_SAGA, order_saga_v2
from sagasuite.common.v1.common_pb2 import Address, LineItem, Money
from sagasuite.inventory.v1.inventory_service_pb2 import Reservation, ReserveStockResponse
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from sagasuite.payment.v1.payment_service_pb2 import ChargeResponse, Payment
from sagasuite.shipping.v1.shipping_service_pb2 import CreateShipmentResponse, Shipment
from svckit.db import Database

ROOT = Path(__file__).resolve().parents[2]
SUITE_YAML = ROOT / "orchestrator" / "sagas" / "yaml"
SUITE_DESCRIPTOR_SET = ROOT / "sagasuite" / "suite.binpb"
T0 = 1_000_000.0

# A saga of three calls: two compensatable, then a retriable one that reads an earlier result.
BASE = """\
document: {dsl: '1.0.0', namespace: test, name: TestSaga, version: '1'}
saga:
  input: sagasuite.orchestrator.v1.PlaceOrderRequest
  contract: {descriptorSet: suite}
  key: ${ .order_id }
do:
  - reserve_stock:
      call: grpc
      with:
        service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
        method: ReserveStock
        arguments:
          order_id: ${ .order_id }
          items: ${ .items }
      compensate:
        call: grpc
        with:
          service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
          method: ReleaseStock
          arguments:
            order_id: ${ .order_id }
            reason: compensated
  - create_shipment:
      call: grpc
      with:
        service: {name: sagasuite.shipping.v1.ShippingService, host: shipping}
        method: CreateShipment
        arguments:
          order_id: ${ .order_id }
          address: ${ .shipping_address }
      compensate:
        call: grpc
        with:
          service: {name: sagasuite.shipping.v1.ShippingService, host: shipping}
          method: CancelShipment
          arguments:
            order_id: ${ .order_id }
  - send_confirmation:
      call: grpc
      kind: retriable
      with:
        service: {name: sagasuite.notify.v1.NotifyService, host: notify}
        method: SendConfirmation
        arguments:
          order_id: ${ .order_id }
          recipient: ${ .customer_email }
          summary:
            tracking_number: ${ $results.create_shipment.shipment.tracking_number }
"""

# A compensatable call that may be inserted anywhere in BASE's task list.
EXTRA_RESERVE = """\
  - reserve_more:
      call: grpc
      with:
        service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
        method: ReserveStock
        arguments:
          order_id: ${ .order_id }
      compensate:
        call: grpc
        with:
          service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
          method: ReleaseStock
          arguments:
            order_id: ${ .order_id }
"""

BEFORE_SHIPMENT = "  - create_shipment:\n"


# -- helpers ----------------------------------------------------------------------------------


def edit(text: str, old: str, new: str) -> str:
    """text with its one occurrence of old replaced by new (a test that edits what is not there fails)."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def insert_before(text: str, anchor: str, block: str) -> str:
    return edit(text, anchor, block + anchor)


def at(text: str, target: str, after: str = "", occurrence: int = 1) -> tuple[int, int]:
    """The 1-based line and column where target starts, found as after + target (its nth occurrence)."""
    needle = after + target
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    index += len(after)
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


def write(folder: Path, text: str, name: str = "saga.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load(folder: Path, text: str, **options: Any) -> LoadedDefinition:
    return compile_file(write(folder, text), environ=options.pop("environ", {}), **options)


def problems_of(folder: Path, text: str | bytes, **options: Any) -> list[Problem]:
    path = folder / "saga.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(DefinitionFileError) as refused:
        compile_file(path, environ=options.pop("environ", {}), **options)
    assert str(refused.value), "a refusal says what is wrong"
    return refused.value.problems


def only_problem(folder: Path, text: str | bytes, **options: Any) -> Problem:
    problems = problems_of(folder, text, **options)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def assert_problem(problem: Problem, where: tuple[int, int], says: list[str], hint: list[str]) -> None:
    """The problem is at where, its message names each of says, its hint each of hint."""
    assert (problem.line, problem.column) == where, str(problem)
    for words in says:
        assert words in problem.message, str(problem)
    assert problem.hint, f"no hint: {problem}"
    for words in hint:
        assert words in problem.hint, str(problem)


def test_the_base_definition_loads(tmp_path: Path) -> None:
    loaded = load(tmp_path, BASE)
    assert (loaded.definition.name, loaded.definition.version) == ("TestSaga", 1)
    assert loaded.services == {"inventory", "shipping", "notify"}
    assert loaded.key_path == ("order_id",)
    assert [step.name for step in loaded.definition.steps] == ["reserve_stock", "create_shipment", "send_confirmation"]


# -- refusals at load -------------------------------------------------------------------------


def test_an_unknown_service_is_refused_at_its_name(tmp_path: Path) -> None:
    text = edit(
        BASE,
        "InventoryService, host: inventory}\n        method: ReserveStock",
        "StockService, host: inventory}\n        method: ReserveStock",
    )
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "sagasuite.inventory.v1.StockService"),
        ["reserve_stock's request", "no service sagasuite.inventory.v1.StockService", "InventoryService"],
        ["check the service and method names"],
    )


def test_an_unknown_method_is_refused_with_the_methods_the_service_has(tmp_path: Path) -> None:
    text = edit(BASE, "method: ReleaseStock", "method: FreeStock")
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "FreeStock"),
        ["reserve_stock's compensation", "has no method FreeStock", "ReleaseStock, ReserveStock"],
        ["check the service and method names"],
    )


@pytest.mark.parametrize(
    ("path", "says"),
    [
        (".order_number", "PlaceOrderRequest has no field 'order_number'"),
        (".shipping_address.zip", "sagasuite.common.v1.Address has no field 'zip'"),
        (".order_id.text", "PlaceOrderRequest.order_id is not a message, so it has no field 'text'"),
    ],
)
def test_an_input_path_to_no_field_is_refused(tmp_path: Path, path: str, says: str) -> None:
    text = edit(BASE, "address: ${ .shipping_address }", f"address: ${{ {path} }}")
    assert_problem(
        only_problem(tmp_path, text),
        at(text, f"${{ {path} }}"),
        [f"`{path}` reads no field of the input", says],
        ["fix the field name"],
    )


def test_a_results_path_to_no_field_is_refused(tmp_path: Path) -> None:
    text = edit(BASE, ".shipment.tracking_number }", ".shipment.tracking }")
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "${ $results.create_shipment.shipment.tracking }"),
        ["`$results.create_shipment.shipment.tracking`", "sagasuite.shipping.v1.Shipment has no field 'tracking'"],
        ["fix the field name"],
    )


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("recipient:", "recipients:", "sagasuite.notify.v1.SendConfirmationRequest has no field 'recipients'"),
        ("tracking_number:", "tracking:", "sagasuite.notify.v1.OrderSummary has no field 'tracking'"),
    ],
)
def test_an_arguments_key_the_request_has_no_field_for_is_refused(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    text = edit(BASE, old, new)
    assert_problem(only_problem(tmp_path, text), at(text, new), [says, "(it has: "], ["fix the field name"])


@pytest.mark.parametrize(
    ("task", "says"),
    [
        ("listen:\n        to: {one: {with: {type: payment.cleared}}}\n", "listen hold has no timeout"),
        ("approve: {role: reviewer}\n", "approval hold has no timeout"),
    ],
)
def test_a_wait_without_a_timeout_is_refused(tmp_path: Path, task: str, says: str) -> None:
    text = insert_before(BASE, BEFORE_SHIPMENT, f"  - hold:\n      {task}")
    assert_problem(
        only_problem(tmp_path, text), at(text, "hold:"), [says, "every wait must end"], ["add timeout: {after:"]
    )
    # With its timeout the same wait loads.
    load(tmp_path, insert_before(BASE, BEFORE_SHIPMENT, f"  - hold:\n      timeout: {{after: PT1H}}\n      {task}"))


def test_a_compensatable_step_after_a_retriable_one_is_refused(tmp_path: Path) -> None:
    text = BASE + EXTRA_RESERVE
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "reserve_more:"),
        ["step reserve_more is compensatable but comes after the retriable step send_confirmation"],
        ["compensatable steps come first"],
    )


def test_duplicate_step_names_are_refused_at_the_second(tmp_path: Path) -> None:
    text = insert_before(BASE, BEFORE_SHIPMENT, EXTRA_RESERVE.replace("reserve_more:", "reserve_stock:"))
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "reserve_stock:", occurrence=2),
        ["step name reserve_stock is used twice (first at line 7)"],
        ["rename one"],
    )


def test_a_step_named_as_a_step_of_a_fork_branch_is_refused(tmp_path: Path) -> None:
    fork = "  - both:\n      fork:\n        branches:\n" + textwrap.indent(EXTRA_RESERVE, "      ")
    fork += textwrap.indent(EXTRA_RESERVE.replace("reserve_more:", "reserve_stock:"), "      ")
    text = insert_before(BASE, BEFORE_SHIPMENT, fork)
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "reserve_stock:", occurrence=2),
        ["step name reserve_stock is used twice"],
        ["rename one"],
    )


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("${ .items }", 'it gives [{"sku": "sample-sku", "quantity": 1}] for a sample input, not a string'),
        ("${ .amount }", "not a string"),
        ('${ .order_id | select(. == "never") }', "the expression gives no value"),
    ],
)
def test_a_business_key_that_cannot_be_derived_is_refused(tmp_path: Path, key: str, says: str) -> None:
    text = edit(BASE, "key: ${ .order_id }", f"key: '{key}'")
    assert_problem(
        only_problem(tmp_path, text),
        at(text, f"'{key}'", after="key: "),
        ["the business key cannot be derived", says],
        ["derive it from an input field, e.g. ${ .order_id }"],
    )


def test_a_business_key_of_a_field_the_input_has_not_is_refused(tmp_path: Path) -> None:
    text = edit(BASE, "key: ${ .order_id }", "key: ${ .order_number }")
    where = at(text, "${ .order_number }")
    field, derived = problems_of(tmp_path, text)
    assert_problem(field, where, ["`.order_number` reads no field of the input"], ["fix the field name"])
    assert_problem(derived, where, ["the business key cannot be derived", "gives null"], ["${ .order_id }"])


def test_a_business_key_that_is_not_an_expression_is_refused(tmp_path: Path) -> None:
    text = edit(BASE, "key: ${ .order_id }", "key: order_id")
    assert_problem(only_problem(tmp_path, text), at(text, "key:"), ["saga/key: 'order_id' does not match"], ["schema"])


@pytest.mark.parametrize(
    ("old", "new", "target", "after", "says"),
    [
        # An unclosed flow mapping: YAML finds out at the colon of the next key.
        (
            "service: {name: sagasuite.notify.v1.NotifyService, host: notify}",
            "service: {name: sagasuite.notify.v1.NotifyService, host: notify",
            ": SendConfirmation",
            "method",
            "expected ',' or '}', but got ':'",
        ),
        # A jq expression in a flow sequence: its braces are YAML's there; quote it.
        ("items: ${ .items }", "items: [${ .items }]", "{ .items }", "[$", "expected ',' or ']', but got '{'"),
        ("      kind: retriable\n", "      kind: retriable\n\t\n", "\t", "", "found character '\\t' that cannot start"),
        (
            "      call: grpc\n      kind: retriable\n",
            "      call: grpc\n     kind: retriable\n",
            "kind: r",
            "",
            "block end",
        ),
        (
            "      kind: retriable\n",
            "      kind: retriable\n      kind: compensatable\n",
            "kind: c",
            "",
            "duplicate key",
        ),
        ("reason: compensated", "reason: compensated \x07", "\x07", "", "character #x0007 is not allowed"),
    ],
    ids=["unclosed-brace", "expression-in-flow", "tab", "indentation", "duplicate-key", "control-character"],
)
def test_yaml_syntax_errors_are_refused_where_yaml_finds_them(
    tmp_path: Path, old: str, new: str, target: str, after: str, says: str
) -> None:
    text = edit(BASE, old, new)
    assert_problem(only_problem(tmp_path, text), at(text, target, after), ["not valid YAML", says], [""])


@pytest.mark.parametrize(
    ("old", "new", "target", "says", "hint"),
    [
        (
            "  key: ${ .order_id }\n",
            "  key: ${ .order_id }\n  colour: red\n",
            "colour:",
            "saga: unknown key ('colour' was unexpected)",
            "allowed here: input, contract, key, deadline, example, parameters",
        ),
        (
            "      kind: retriable\n",
            "      kind: retriable\n      retries: 3\n",
            "retries:",
            "do/2/send_confirmation: unknown key ('retries' was unexpected)",
            "allowed here: if, timeout, call, with, compensate, kind, retry",
        ),
        (
            "method: SendConfirmation\n",
            "method: SendConfirmation\n        timeout: PT1S\n",
            "timeout: PT1S",
            "do/2/send_confirmation/with: unknown key ('timeout' was unexpected)",
            "allowed here: proto, service, method, arguments",
        ),
        (
            "      kind: retriable\n",
            "      kind: retriable\n      retry: {limit: {attempt: {count: many}}}\n",
            "count: many",
            "do/2/send_confirmation/retry/limit/attempt/count: 'many' is not of type 'integer'",
            "docs/saga-definition.schema.json",
        ),
        ("version: '1'", "version: [1]", "version: [1]", "document/version: [1] is not valid", "schema"),
        (
            "kind: retriable",
            "kind: pivot",
            "kind: pivot",
            "'pivot' is not one of ['compensatable', 'retriable']",
            "schema",
        ),
        (
            "service: {name: sagasuite.notify.v1.NotifyService, host: notify}\n        method: SendConfirmation\n",
            "method: SendConfirmation\n",
            "with:\n        method: SendConfirmation",
            "do/2/send_confirmation/with: 'service' is required",
            "schema",
        ),
    ],
    ids=[
        "unknown-saga-key",
        "unknown-task-key",
        "unknown-with-key",
        "wrong-type",
        "wrong-version",
        "bad-kind",
        "no-service",
    ],
)
def test_schema_errors_are_refused_at_the_key(
    tmp_path: Path, old: str, new: str, target: str, says: str, hint: str
) -> None:
    text = edit(BASE, old, new)
    assert_problem(only_problem(tmp_path, text), at(text, target), [says], [hint])


def test_results_of_a_later_step_are_refused(tmp_path: Path) -> None:
    text = edit(
        BASE,
        "          items: ${ .items }\n",
        "          items: ${ $results.create_shipment.shipment.items }\n",
    )
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "${ $results.create_shipment.shipment.items }"),
        [
            "`$results.create_shipment.shipment.items`: create_shipment is not an earlier step on this path",
            "(earlier: none)",
        ],
        ["read only steps that ran before this one"],
    )


FORK = """\
  - reserve_and_charge:
      fork:
        branches:
          - reserve_more:
              call: grpc
              with:
                service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
                method: ReserveStock
                arguments:
                  order_id: ${ .order_id }
              compensate:
                call: grpc
                with:
                  service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
                  method: ReleaseStock
                  arguments:
                    order_id: ${ .order_id }
          - charge_payment:
              call: grpc
              with:
                service: {name: sagasuite.payment.v1.PaymentService, host: payment}
                method: Charge
                arguments:
                  order_id: CHARGE_ORDER_ID
              compensate:
                call: grpc
                with:
                  service: {name: sagasuite.payment.v1.PaymentService, host: payment}
                  method: Refund
                  arguments:
                    order_id: ${ .order_id }
"""


def test_results_of_a_sibling_branch_are_refused_and_of_earlier_steps_allowed(tmp_path: Path) -> None:
    sibling = "${ $results.reserve_more.reservation.order_id }"
    text = insert_before(BASE, BEFORE_SHIPMENT, FORK.replace("CHARGE_ORDER_ID", sibling))
    assert_problem(
        only_problem(tmp_path, text),
        at(text, sibling),
        ["reserve_more is not an earlier step on this path (earlier: reserve_stock)"],
        ["read only steps that ran before this one"],
    )
    # A step before the fork may be read in a branch, and both branches after it.
    earlier = "${ $results.reserve_stock.reservation.order_id }"
    after = "${ $results.charge_payment.payment.payment_id }"
    text = insert_before(BASE, BEFORE_SHIPMENT, FORK.replace("CHARGE_ORDER_ID", earlier))
    text = edit(text, "recipient: ${ .customer_email }", f"recipient: {after}")
    loaded = load(tmp_path, text)
    assert isinstance(loaded.definition.steps[1], Parallel)


# -- deterministic jq -------------------------------------------------------------------------

REFUSED_JQ = [
    ("now | tostring", "now"),
    ("input", "input"),
    ("[inputs] | tostring", "inputs"),
    ("$ENV.HOME", "$ENV"),
    ("env.HOME", "env"),
    ("input_filename", "input_filename"),
    ("input_line_number | tostring", "input_line_number"),
    ("[2026, 0, 1, 0, 0, 0, 0, 0] | mktime | tostring", "mktime"),
    ('0 | strftime("%Y")', "strftime"),
    ('0 | strflocaltime("%Y")', "strflocaltime"),
    ("0 | todate", "todate"),
    ('"2026-01-01T00:00:00Z" | fromdate | tostring', "fromdate"),
    ("0 | gmtime | tostring", "gmtime"),
    ("0 | localtime | tostring", "localtime"),
    ('"2026" | strptime("%Y") | tostring', "strptime"),
    ("0 | todateiso8601", "todateiso8601"),
    ('"at \\(now)"', "now"),
    ('"a \\("b \\(now)")"', "now"),
    ("{a: now} | tostring", "now"),
    ("[1] | map(input) | tostring", "input"),
    ("try now catch 0 | tostring", "now"),
    ("def clock: now; clock | tostring", "now"),
]


@pytest.mark.parametrize(("expression", "builtin"), REFUSED_JQ)
def test_nondeterministic_jq_is_refused_at_load(tmp_path: Path, expression: str, builtin: str) -> None:
    value = "'${ " + expression + " }'"
    text = edit(BASE, "recipient: ${ .customer_email }", f"recipient: {value}")
    problem = only_problem(tmp_path, text)
    assert_problem(problem, at(text, value), [builtin], ["take times from the input" if builtin[0] != "$" else "input"])
    assert "not allowed" in problem.message or "environment" in problem.message, str(problem)


@pytest.mark.parametrize(
    ("old", "new", "target"),
    [
        ("key: ${ .order_id }", "key: '${ .order_id + (now | tostring) }'", "'${ .order_id + (now | tostring) }'"),
        ("      kind: retriable\n", "      kind: retriable\n      if: ${ now > 0 }\n", "${ now > 0 }"),
        ("reason: compensated", 'reason: ${ "compensated at \\(now)" }', '${ "compensated at \\(now)" }'),
    ],
    ids=["key", "if", "compensation"],
)
def test_nondeterministic_jq_is_refused_in_keys_conditions_and_compensations(
    tmp_path: Path, old: str, new: str, target: str
) -> None:
    text = edit(BASE, old, new)
    assert_problem(only_problem(tmp_path, text), at(text, target), ["now is not allowed"], ["take times from"])


@pytest.mark.parametrize(
    "expression",
    [".now", "{input: .x}", '{"input": .x}', ".a.now", '"now"', 'ltrimstr("now")', "# now\n.x", ".x as $now | $now"],
)
def test_names_of_builtins_as_fields_keys_strings_and_variables_are_not_refused(expression: str) -> None:
    scan(expression)


def _clock_file() -> descriptor_pb2.FileDescriptorProto:
    """A contract outside the suite whose message has fields named as jq builtins: now and input."""
    clock = descriptor_pb2.FileDescriptorProto(name="test/v1/clock.proto", package="test.v1", syntax="proto3")
    message = clock.message_type.add(name="Tick")
    for number, name in enumerate(("id", "now", "input"), start=1):
        message.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=1)
    service = clock.service.add(name="ClockService")
    service.method.add(name="Record", input_type=".test.v1.Tick", output_type=".test.v1.Tick")
    service.method.add(name="Erase", input_type=".test.v1.Tick", output_type=".test.v1.Tick")
    return clock


CLOCK_SAGA = """\
document: {dsl: '1.0.0', namespace: test, name: ClockSaga, version: 1}
saga:
  input: test.v1.Tick
  contract: {descriptorSet: clock.binpb}
  key: ${ .id }
do:
  - record:
      call: grpc
      with:
        service: {name: test.v1.ClockService, host: clock}
        method: Record
        arguments: "${ {id: .id, now: .input, input: .now} }"
      compensate:
        call: grpc
        with:
          service: {name: test.v1.ClockService, host: clock}
          method: Erase
          arguments:
            id: ${ .id }
            now: ${ "\\(.now) \\(.input)" }
"""


def test_a_contract_with_fields_named_now_and_input_loads(tmp_path: Path) -> None:
    """A field `.now` and an object key `{input: ...}` read data, not the clock or another input."""
    _write_set(tmp_path / "clock.binpb", [_clock_file()])
    text = CLOCK_SAGA
    definition = load(tmp_path, text).definition
    tick = definition.input_type(id="t-1", now="noon", input="typed")
    context = definition.context("saga-1", tick.SerializeToString(), {}, "t-1")
    step = definition.steps[0]
    assert isinstance(step, Step) and step.compensation is not None
    assert step.action.build_request(context) == definition.input_type(id="t-1", now="typed", input="noon")
    assert step.compensation.build_request(context) == definition.input_type(id="t-1", now="noon typed")


def test_a_long_expression_is_scanned_in_linear_time() -> None:
    # A quadratic scan took minutes on this one; a linear one takes a fraction of a second. The bound
    # is generous (a loaded machine is slower), and the quadratic scan would take far beyond it.
    text = " + ".join([".order_id"] * 40_000)
    started = time.perf_counter()
    assert len(scan(text)) == 40_000
    assert time.perf_counter() - started < 20.0


def test_a_letter_jq_does_not_know_is_refused_as_jq(tmp_path: Path) -> None:
    text = edit(BASE, "recipient: ${ .customer_email }", "recipient: ${ .customer_email + é }")
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "${ .customer_email + é }"),
        ["not a valid jq expression"],
        ["check the jq syntax"],
    )


def test_scan_refuses_at_the_offset_of_the_builtin() -> None:
    with pytest.raises(ExpressionError) as refused:
        scan('.a | "x \\(now)"')
    assert refused.value.offset == len('.a | "x \\(')


# -- the order saga in YAML builds what the Python one builds ---------------------------------

ORDER = PlaceOrderRequest(
    order_id="order-7",
    customer_email="ada@example.com",
    items=[LineItem(sku="BOOK-001", quantity=1), LineItem(sku="MUG-042", quantity=2)],
    amount=Money(currency_code="EUR", minor_units=2599),
    payment_token="tok_visa",
    shipping_address=Address(
        recipient_name="Ada Lovelace", street="12 St James's Square", city="London", postal_code="SW1Y 4JH",
        country_code="GB",
    ),
    deadline_seconds=600,
)  # fmt: skip
RESULTS = {
    "reserve_stock": ReserveStockResponse(
        reservation=Reservation(reservation_id="res-1", order_id="order-7", items=ORDER.items)
    ).SerializeToString(),
    "charge_payment": ChargeResponse(
        payment=Payment(payment_id="pay-1", order_id="order-7", amount=ORDER.amount)
    ).SerializeToString(),
    "create_shipment": CreateShipmentResponse(
        shipment=Shipment(shipment_id="shp-1", order_id="order-7", tracking_number="TRACK-123")
    ).SerializeToString(),
}
# Every plain path as a jq program: the requests are then built by jq, not by copying fields.
_PLAIN_PATH = re.compile(r"\$\{ ((?:\$results)?(?:\.[A-Za-z_]+)+) \}")


def order_definitions(folder: Path, environ: dict[str, str], *, through_jq: bool = False) -> dict[str, SagaDefinition]:
    """OrderSaga v1, v2 and FulfilmentSaga v1 compiled from the suite's YAML files (copied into folder)."""
    paths = []
    for source in sorted(SUITE_YAML.glob("*.yaml")):
        text = source.read_text()
        paths.append(write(folder, _PLAIN_PATH.sub(r"${ \1 | . }", text) if through_jq else text, source.name))
    loaded = compile_files(paths, {}, environ=environ)
    return {f"{item.definition.name} v{item.definition.version}": item.definition for item in loaded}


def built(definition: SagaDefinition, order: PlaceOrderRequest = ORDER) -> dict[str, Any]:
    """What each node of a definition builds for order and RESULTS: requests as bytes, waits as their settings."""
    context = definition.context("saga-1", order.SerializeToString(), dict(RESULTS), definition.business_key_of(order))
    out: dict[str, Any] = {"business key": definition.business_key_of(order), "deadline": definition.deadline}
    for flat in definition.nodes:
        node = flat.node
        if isinstance(node, Step):
            compensation = node.compensation
            out[node.name] = (
                node.kind,
                node.retry,
                node.budget,
                node.action.service,
                node.action.method_path,
                node.action.response_type.DESCRIPTOR.full_name,
                node.action.build_request(context).SerializeToString(deterministic=True),
                compensation and compensation.method_path,
                compensation and compensation.build_request(context).SerializeToString(deterministic=True),
            )
        elif isinstance(node, Approval):
            out[node.name] = (node.timeout, node.role, node.remind_after, node.when is not None and node.when(context))
        elif isinstance(node, ChildSaga):
            out[node.name] = (node.definition.name, node.build_input(context).SerializeToString(deterministic=True))
        else:
            out[node.name] = (type(node).__name__, flat.group, flat.branch)
    return out


def with_amount(minor_units: int) -> PlaceOrderRequest:
    order = PlaceOrderRequest()
    order.CopyFrom(ORDER)
    order.amount.minor_units = minor_units
    return order


@pytest.mark.parametrize("through_jq", [False, True], ids=["copied", "jq"])
def test_the_yaml_order_saga_v1_builds_the_python_requests(tmp_path: Path, through_jq: bool) -> None:
    definitions = order_definitions(tmp_path, {}, through_jq=through_jq)
    yaml_built, python_built = built(definitions["OrderSaga v1"]), built(ORDER_SAGA)
    assert list(yaml_built) == list(python_built)
    for name in python_built:
        assert yaml_built[name] == python_built[name], name
    assert yaml_built["business key"] == "order-7"


@pytest.mark.parametrize("through_jq", [False, True], ids=["copied", "jq"])
@pytest.mark.parametrize("minor_units", [49_999, 50_000, 50_001])
def test_the_yaml_order_saga_v2_builds_the_python_requests_and_reviews_from_the_threshold(
    tmp_path: Path, through_jq: bool, minor_units: int
) -> None:
    environ = {"REVIEW_THRESHOLD": "50000", "REVIEW_TIMEOUT_SECONDS": "7200", "REVIEW_ROLE": "fraud_desk"}
    definitions = order_definitions(tmp_path, environ, through_jq=through_jq)
    python = order_saga_v2(review_threshold=50_000, review_timeout=7200.0, review_role="fraud_desk")
    order = with_amount(minor_units)
    yaml_built, python_built = built(definitions["OrderSaga v2"], order), built(python, order)
    assert list(yaml_built) == list(python_built)
    for name in python_built:
        assert yaml_built[name] == python_built[name], name
    # The review's condition: at or above the threshold given through the environment.
    assert yaml_built["fraud_review"][3] is (minor_units >= 50_000)
    # The child: the same input as the Python v2 gives it, and the same requests as the Python child builds.
    child = definitions["FulfilmentSaga v1"]
    assert yaml_built["fulfilment"] == ("FulfilmentSaga", order.SerializeToString(deterministic=True))
    assert built(child, order) == built(FULFILMENT_SAGA, order)
    node = definitions["OrderSaga v2"].steps[2]
    assert isinstance(node, ChildSaga) and node.definition is child


def test_the_yaml_order_saga_v2_takes_its_defaults_without_the_environment(tmp_path: Path) -> None:
    definitions = order_definitions(tmp_path, {})
    python = order_saga_v2(review_threshold=100_000, review_timeout=86_400.0)
    for minor_units in (99_999, 100_000):
        assert built(definitions["OrderSaga v2"], with_amount(minor_units)) == built(python, with_amount(minor_units))


# -- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["lots", "1e5", "12.5", "nan"])
def test_a_bad_parameter_value_is_refused_naming_the_variable(tmp_path: Path, value: str) -> None:
    text = (SUITE_YAML / "order-v2.yaml").read_text()
    problem = only_problem(
        tmp_path, text, environ={"REVIEW_THRESHOLD": value}, children={("FulfilmentSaga", 1): FULFILMENT_SAGA}
    )
    assert_problem(
        problem,
        at(text, "{env: REVIEW_THRESHOLD", after="review_threshold: "),
        [f"parameter review_threshold: REVIEW_THRESHOLD={value!r} is not a whole number"],
        ["set REVIEW_THRESHOLD to a whole number, or unset it for the default 100000"],
    )


def test_parameter_values_count_in_the_fingerprint(tmp_path: Path) -> None:
    def fingerprint(environ: dict[str, str]) -> str:
        path = SUITE_YAML / "order-v2.yaml"
        children = {("FulfilmentSaga", 1): FULFILMENT_SAGA}
        return compile_file(path, environ=environ, children=children).definition.fingerprint

    default = fingerprint({})
    assert fingerprint({"REVIEW_THRESHOLD": "5"}) != default
    assert fingerprint({"REVIEW_ROLE": "fraud_desk"}) != default
    assert fingerprint({"REVIEW_THRESHOLD": "100000"}) == default  # the default's own value: the same content
    assert fingerprint({"UNRELATED": "x", "REVIEW_THRESHOLD": ""}) == default
    assert fingerprint({"REVIEW_THRESHOLD": "5"}) == fingerprint({"REVIEW_THRESHOLD": " 5 "})


# -- contracts --------------------------------------------------------------------------------


def _suite_files() -> list[descriptor_pb2.FileDescriptorProto]:
    return list(read_descriptor_set(SUITE_DESCRIPTOR_SET).file)


def _with_source_info(files: list[descriptor_pb2.FileDescriptorProto]) -> list[descriptor_pb2.FileDescriptorProto]:
    """The same files as protoc --include_source_info would give them: comments and positions."""
    commented = []
    for number, file in enumerate(files):
        copy = descriptor_pb2.FileDescriptorProto()
        copy.CopyFrom(file)
        location = copy.source_code_info.location.add(path=[4, 0], span=[3 + number, 0, 12, 1])
        location.leading_comments = f" Message comment {number}.\n"
        copy.source_code_info.location.add(path=[2], span=[1, 0, 30]).trailing_comments = " package\n"
        commented.append(copy)
    return commented


def _write_set(path: Path, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())


def test_the_contract_hash_ignores_comments_and_positions_and_follows_the_fields(tmp_path: Path) -> None:
    suite = contract_from_files(_suite_files()).hash
    assert contract_from_files(_with_source_info(_suite_files())).hash == suite
    assert contract_from_files(reversed(_suite_files())).hash == suite
    changed = _suite_files()
    common = next(file for file in changed if file.name == "sagasuite/common/v1/common.proto")
    money = next(message for message in common.message_type if message.name == "Money")
    money.field.add(name="note", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=1)
    assert contract_from_files(changed).hash != suite
    renamed = _suite_files()
    common = next(file for file in renamed if file.name == "sagasuite/common/v1/common.proto")
    next(message for message in common.message_type if message.name == "Money").field[0].name = "currency"
    assert contract_from_files(renamed).hash != suite


def test_a_saga_records_the_hash_of_its_contract_however_the_set_was_built(tmp_path: Path) -> None:
    suite_hash = load(tmp_path, BASE).definition.contract_hash
    assert len(suite_hash) == 64
    _write_set(tmp_path / "commented.binpb", _with_source_info(_suite_files()))
    commented = load(tmp_path, edit(BASE, "descriptorSet: suite", "descriptorSet: commented.binpb")).definition
    assert commented.contract_hash == suite_hash
    changed = _suite_files()
    common = next(file for file in changed if file.name == "sagasuite/common/v1/common.proto")
    common.message_type[0].field.add(
        name="note", number=9, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=1
    )
    _write_set(tmp_path / "changed.binpb", changed)
    other = load(tmp_path, edit(BASE, "descriptorSet: suite", "descriptorSet: changed.binpb")).definition
    assert other.contract_hash != suite_hash


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\xff\xff\xff\xff", ["junk.binpb is not a descriptor set", "make one with `buf build -o junk.binpb`"]),
        (b"", ["junk.binpb holds no proto file"]),
        (None, ["cannot read the descriptor set", "junk.binpb"]),
    ],
    ids=["garbage", "empty", "missing"],
)
def test_a_descriptor_set_that_is_not_one_is_refused_clearly(
    tmp_path: Path, content: bytes | None, says: list[str]
) -> None:
    if content is not None:
        (tmp_path / "junk.binpb").write_bytes(content)
    text = edit(BASE, "descriptorSet: suite", "descriptorSet: junk.binpb")
    assert_problem(only_problem(tmp_path, text), at(text, "junk.binpb"), says, ["buf build -o x.binpb"])


def test_a_descriptor_set_without_the_imports_is_refused_naming_the_import(tmp_path: Path) -> None:
    clock = _clock_file()
    clock.dependency.append("test/v1/units.proto")
    _write_set(tmp_path / "clock.binpb", [clock])
    assert_problem(
        only_problem(tmp_path, CLOCK_SAGA),
        at(CLOCK_SAGA, "clock.binpb"),
        ["test/v1/clock.proto imports test/v1/units.proto, which the descriptor set does not hold"],
        ["buf build"],
    )


# -- files in order, and folders --------------------------------------------------------------


def test_a_parent_file_sorted_before_its_child_file_loads_with_that_child(tmp_path: Path) -> None:
    parent = write(tmp_path, (SUITE_YAML / "order-v2.yaml").read_text(), "a-order-v2.yaml")
    child = write(tmp_path, (SUITE_YAML / "fulfilment-v1.yaml").read_text(), "b-fulfilment-v1.yaml")
    # Even with a FulfilmentSaga v1 registered already, the parent takes the one its folder defines.
    loaded = compile_files([parent, child], {("FulfilmentSaga", 1): FULFILMENT_SAGA}, environ={})
    by_name = {item.definition.name: item for item in loaded}
    assert set(by_name) == {"OrderSaga", "FulfilmentSaga"}
    node = by_name["OrderSaga"].definition.steps[2]
    assert isinstance(node, ChildSaga) and node.definition is by_name["FulfilmentSaga"].definition
    assert by_name["OrderSaga"].children == (("FulfilmentSaga", 1),)


def test_a_parent_whose_child_is_nowhere_is_refused(tmp_path: Path) -> None:
    text = (SUITE_YAML / "order-v2.yaml").read_text()
    path = write(tmp_path, text, "order-v2.yaml")
    with pytest.raises(DefinitionFileError) as refused:
        compile_files([path], {}, environ={})
    (problem,) = refused.value.problems
    assert_problem(
        problem,
        at(text, "{name: FulfilmentSaga", after="workflow: "),
        ["run fulfilment: no definition FulfilmentSaga v1 is loaded"],
        ["put its YAML file in the same folder"],
    )


def test_one_name_and_version_in_two_files_is_refused(tmp_path: Path) -> None:
    text = (SUITE_YAML / "order-v1.yaml").read_text()
    first, second = write(tmp_path, text, "a.yaml"), write(tmp_path, text, "b.yaml")
    with pytest.raises(DefinitionFileError) as refused:
        compile_files([first, second], {}, environ={})
    (problem,) = refused.value.problems
    assert problem.file == str(second)
    assert_problem(
        problem,
        at(text, "'1'", after="version: "),
        [f"OrderSaga v1 is defined in {first} already"],
        ["one file per definition version: give this one a new version"],
    )


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    opened = Database(f"sqlite:///{tmp_path / 'orchestrator.db'}")
    store.ensure_schema(opened)
    yield opened
    opened.close()


def insert_saga(database: Database, definition: SagaDefinition, saga_id: str, status: Status = Status.RUNNING) -> None:
    """A saga row on a definition as it is now: its contract and definition hashes."""
    ended = status in (Status.COMPLETED, Status.COMPENSATED, Status.TERMINATED)
    saga = SagaState(
        saga_id=saga_id,
        saga_type=definition.name,
        version=definition.version,
        business_key=f"order-{saga_id}",
        input=b"",
        status=status,
        deadline_at=T0 + 300,
        created_at=T0,
        updated_at=T0,
        ended_at=T0 + 1 if ended else None,
        contract_hash=definition.contract_hash,
        definition_hash=definition.fingerprint,
    )

    def work(connection: Connection) -> None:
        store.insert_saga(connection, saga, f"input-hash-{saga_id}")

    database.transaction_sync(work)


def a_folder(tmp_path: Path, database: Database, registry: DefinitionRegistry | None = None) -> DefinitionFolder:
    folder = tmp_path / "definitions"
    folder.mkdir()
    return DefinitionFolder(folder, registry or DefinitionRegistry(), database, environ={})


CHANGED = ("reason: compensated", "reason: compensated, the order is void")


def test_a_changed_version_is_refused_while_a_saga_runs_on_it(tmp_path: Path, database: Database) -> None:
    registry = DefinitionRegistry()
    folder = a_folder(tmp_path, database, registry)
    path = write(folder.folder, BASE, "test-v1.yaml")
    assert [item.definition.name for item in folder.load()] == ["TestSaga"]
    before = registry.get("TestSaga", 1)
    insert_saga(database, before, "running")
    insert_saga(database, before, "waiting", Status.NEEDS_ATTENTION)
    changed = write(folder.folder, edit(BASE, *CHANGED), path.name)
    with pytest.raises(DefinitionFileError) as refused:
        folder.load()
    (problem,) = refused.value.problems
    assert problem.file == str(changed)
    assert_problem(
        problem,
        at(BASE, "'1'", after="version: "),
        [
            "2 saga(s) still run on TestSaga v1 as it was",
            f"definition {before.fingerprint[:12]}",
            f"contract {before.contract_hash[:12]}",
        ],
        ["give the change a new version (2); running sagas keep theirs"],
    )
    assert registry.get("TestSaga", 1) is before
    assert registry.keys() == {("TestSaga", 1)}
    # As a new version it loads beside the one the sagas run on.
    write(folder.folder, edit(edit(BASE, *CHANGED), "version: '1'", "version: '2'"), path.name)
    assert [item.definition.version for item in folder.load()] == [2]
    assert registry.get("TestSaga", 1) is before  # its file is gone; it stays for the sagas on it
    assert registry.latest("TestSaga").version == 2


def test_a_changed_version_replaces_the_old_when_no_saga_runs_on_it(tmp_path: Path, database: Database) -> None:
    registry = DefinitionRegistry()
    folder = a_folder(tmp_path, database, registry)
    write(folder.folder, BASE, "test-v1.yaml")
    folder.load()
    before = registry.get("TestSaga", 1)
    insert_saga(database, before, "done", Status.COMPLETED)
    insert_saga(database, before, "undone", Status.COMPENSATED)
    write(folder.folder, edit(BASE, *CHANGED), "test-v1.yaml")
    (item,) = folder.load()
    after = registry.get("TestSaga", 1)
    assert after is item.definition and after.fingerprint != before.fingerprint
    assert after.contract_hash == before.contract_hash
    # A saga on the version as it is now does not stop a load that changes nothing.
    insert_saga(database, after, "new")
    assert folder.load() == []
    assert registry.get("TestSaga", 1) is after


def test_a_yaml_file_in_place_of_a_python_definition_waits_for_its_sagas(tmp_path: Path, database: Database) -> None:
    registry = DefinitionRegistry([ORDER_SAGA])
    folder = a_folder(tmp_path, database, registry)
    text = (SUITE_YAML / "order-v1.yaml").read_text()
    write(folder.folder, text, "order-v1.yaml")
    insert_saga(database, ORDER_SAGA, "python")
    with pytest.raises(DefinitionFileError) as refused:
        folder.load()
    (problem,) = refused.value.problems
    assert_problem(problem, at(text, "'1'", after="version: "), ["1 saga(s)", "its Python definition"], ["(2)"])
    assert registry.get("OrderSaga", 1) is ORDER_SAGA


def test_a_failed_load_registers_nothing(tmp_path: Path, database: Database) -> None:
    registry = DefinitionRegistry()
    folder = a_folder(tmp_path, database, registry)
    write(folder.folder, BASE, "test-v1.yaml")
    folder.load()
    before = registry.get("TestSaga", 1)
    write(folder.folder, edit(BASE, "version: '1'", "version: '2'"), "test-v2.yaml")
    broken = write(
        folder.folder, edit(BASE, "name: TestSaga", "name: OtherSaga").replace("method: Charge", ""), "z.yaml"
    )
    broken.write_text(edit(broken.read_text(), "method: ReserveStock", "method: ReserveStok"))
    with pytest.raises(DefinitionFileError) as refused:
        folder.load()
    assert [problem.file for problem in refused.value.problems] == [str(broken)]
    assert registry.keys() == {("TestSaga", 1)} and registry.get("TestSaga", 1) is before
    assert set(folder.loaded) == {("TestSaga", 1)}
    broken.unlink()
    assert [item.definition.version for item in folder.load()] == [2]
    assert registry.keys() == {("TestSaga", 1), ("TestSaga", 2)}


def test_a_folder_that_is_not_one_is_refused(tmp_path: Path, database: Database) -> None:
    folder = DefinitionFolder(tmp_path / "nowhere", DefinitionRegistry(), database, environ={})
    with pytest.raises(DefinitionFileError) as refused:
        folder.load()
    assert "SAGA_DEFINITIONS_DIR is not a folder" in str(refused.value)


# -- hostile files ----------------------------------------------------------------------------


def test_a_2_mib_file_is_refused_unread(tmp_path: Path) -> None:
    text = "a: [" + "1, " * (700 * 1024) + "1]\n"  # dense: YAML would take long to read it
    problem = only_problem(tmp_path, text)
    size = len(text.encode())
    assert_problem(problem, (1, 1), [f"the file is {size} bytes; at most 1 MiB"], ["a definition is a few KiB"])
    # In a folder too: nothing reads it before the compiler refuses it.
    with pytest.raises(DefinitionFileError) as refused:
        compile_files([tmp_path / "saga.yaml", write(tmp_path, BASE, "base.yaml")], {}, environ={})
    assert [problem.message for problem in refused.value.problems] == [problem.message]


def test_a_file_that_is_not_utf8_is_refused_at_the_byte(tmp_path: Path) -> None:
    data = BASE.encode().replace(b"name: TestSaga", b"name: Test\xe9Saga")
    assert_problem(
        only_problem(tmp_path, data), at(BASE, "Saga,", after="name: Test"), ["not UTF-8 text: byte 0xe9"], ["UTF-8"]
    )


def _bomb(indent: str) -> list[str]:
    """Nine levels of ten aliases each: a billion strings from a few hundred bytes."""
    lines = [f'{indent}a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        lines.append(f"{indent}a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    return lines


@pytest.mark.parametrize("where", ["metadata", "example", "arguments"])
def test_a_yaml_bomb_is_refused_before_anything_expands_it(tmp_path: Path, where: str) -> None:
    if where == "metadata":
        head = "document: {dsl: '1.0.0', namespace: test, name: TestSaga, version: '1'}\n"
        block = "document:\n  dsl: '1.0.0'\n  namespace: test\n  name: TestSaga\n  version: '1'\n  metadata:\n"
        text = edit(BASE, head, block + "\n".join(_bomb("    ")) + "\n")
    elif where == "example":
        text = edit(
            BASE, "  key: ${ .order_id }\n", "  key: ${ .order_id }\n  example:\n" + "\n".join(_bomb("    ")) + "\n"
        )
    else:
        text = edit(BASE, "          items: ${ .items }\n", "\n".join(_bomb("          ")) + "\n")
    bomb_lines = {number for number, line in enumerate(text.splitlines(), start=1) if "&a" in line}
    problem = only_problem(tmp_path, text)
    assert "the file holds more than 100000 values" in problem.message, str(problem)
    assert "use fewer aliases" in problem.hint
    assert problem.line in bomb_lines, str(problem)


def test_aliases_that_stay_small_are_read(tmp_path: Path) -> None:
    text = edit(
        BASE,
        "service: {name: sagasuite.notify.v1.NotifyService, host: notify}",
        "service: &notify {name: sagasuite.notify.v1.NotifyService, host: notify}",
    )
    assert load(tmp_path, text).services == {"inventory", "shipping", "notify"}


def test_deep_flow_nesting_is_refused_unread(tmp_path: Path) -> None:
    text = BASE + "# " + "\n" + "extra: " + "[" * 100_000 + "]" * 100_000 + "\n"
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "[", after="extra: " + "[" * 256),
        ["more than 256 brackets are open here: the file nests too deeply"],
        ["at most 64"],
    )


def test_deep_block_nesting_is_refused(tmp_path: Path) -> None:
    text = (
        BASE
        + "extra:\n"
        + "".join("  " * depth + f"level{depth}:\n" for depth in range(1, 1000))
        + "  " * 1000
        + "end: 1\n"
    )
    assert_problem(only_problem(tmp_path, text), (1, 1), ["nests too deeply to read"], ["at most 64"])


def test_nesting_is_bounded_at_64_levels(tmp_path: Path) -> None:
    def nested(levels: int) -> str:
        return edit(BASE, "version: '1'}", "version: '1', metadata: " + "{a: " * levels + "1" + "}" * levels + "}")

    # The file's mapping is level 1, document's 2, so metadata's innermost value is at levels + 3.
    load(tmp_path, nested(61))
    text = nested(70)
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "{a: ", after="metadata: " + "{a: " * 62),
        ["the file nests deeper than 64 levels"],
        ["flatten it"],
    )


# -- the published schema ---------------------------------------------------------------------


def test_the_published_schema_is_the_one_the_compiler_uses() -> None:
    published = ROOT / "docs" / "saga-definition.schema.json"
    used = ROOT / "orchestrator" / "declarative" / "saga-definition.schema.json"
    assert published.read_bytes() == used.read_bytes(), "copy orchestrator/declarative's schema to docs/"


def test_a_wait_longer_than_the_saga_deadline_is_refused_at_the_wait(tmp_path: Path) -> None:
    text = edit(BASE, "  key: ${ .order_id }\n", "  key: ${ .order_id }\n  deadline: PT1H\n")
    wait = "  - hold:\n      timeout: {after: PT2H}\n      listen:\n        to: {one: {with: {type: go}}}\n"
    text = insert_before(text, BEFORE_SHIPMENT, wait)
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "hold:"),
        ["hold: the timeout (7200 s) exceeds the saga deadline (3600 s)"],
        ["docs/yaml-sagas.md"],
    )


def test_an_approval_after_the_pivot_is_refused_at_the_approval(tmp_path: Path) -> None:
    text = BASE + "  - late_review:\n      timeout: {after: PT2H}\n      approve: {role: reviewer}\n"
    assert_problem(
        only_problem(tmp_path, text),
        at(text, "late_review:"),
        ["approval late_review comes after the pivot (create_shipment)", "move it before the pivot"],
        ["docs/yaml-sagas.md"],
    )


def test_a_changed_child_changes_its_parents_fingerprint(tmp_path: Path) -> None:
    # A parent runs its child as it was when the parent started: the child is part of its content.
    suite = Path(__file__).resolve().parents[2] / "orchestrator" / "sagas" / "yaml"
    for name in ("order-v2.yaml", "fulfilment-v1.yaml"):
        (tmp_path / name).write_text((suite / name).read_text())
    paths = sorted(tmp_path.glob("*.yaml"))
    before = {d.definition.name: d.definition.fingerprint for d in compile_files(paths, {})}
    child = tmp_path / "fulfilment-v1.yaml"
    child.write_text(child.read_text().replace("reason: order saga compensated", "reason: fulfilment undone"))
    after = {d.definition.name: d.definition.fingerprint for d in compile_files(paths, {})}
    assert after["FulfilmentSaga"] != before["FulfilmentSaga"]
    assert after["OrderSaga"] != before["OrderSaga"]
