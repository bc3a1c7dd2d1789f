"""svckit.validation against hostile values: sizes first, short quotes, one violation a field, no control characters."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from sagasuite.common.v1 import common_pb2
from sagasuite.inventory.v1 import inventory_service_pb2
from sagasuite.notify.v1 import notify_service_pb2
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2
from sagasuite.shipping.v1 import shipping_service_pb2
from svckit.convert import lines_from_pb
from svckit.errors import InvalidArgument
from svckit.validation import (
    MAX_LINES,
    MAX_QUOTED_CHARACTERS,
    MAX_TIMESTAMP_SECONDS,
    MIN_TIMESTAMP_SECONDS,
    Line,
    Money,
    PostalAddress,
    Violations,
    forbidden_character,
    quote,
)

# Each kind of character no text field may hold, with a name for the test id.
FORBIDDEN = {
    "NUL": "\x00",
    "SOH": "\x01",
    "TAB": "\t",
    "LF": "\n",
    "CR": "\r",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "NEL": "\x85",
    "C1-end": "\x9f",
    "LINE-SEPARATOR": "\u2028",
    "PARAGRAPH-SEPARATOR": "\u2029",
    "LONE-SURROGATE": "\ud800",
}
ALLOWED = ["Zoë Åström", "東京都", "O'Brien-Smith", "flat 3/b, 2nd floor", "😀 emoji"]


def _only(violations: Violations) -> tuple[str, str]:
    (item,) = violations.items
    return item.field, item.reason


# -- quoting -----------------------------------------------------------------------------------


def test_quote_keeps_a_short_value_whole_and_escaped() -> None:
    assert quote("LAMP-3") == "'LAMP-3'"
    assert quote("a\x00b\nc") == "'a\\x00b\\nc'"


def test_quote_cuts_a_long_value_to_a_short_escaped_prefix_with_its_length() -> None:
    quoted = quote("\x00" * 1_000_000)
    assert quoted.startswith("'" + "\\x00" * MAX_QUOTED_CHARACTERS + "'")
    assert quoted.endswith("(1000000 characters)")
    assert len(quoted) < 200


# -- control characters ------------------------------------------------------------------------


@pytest.mark.parametrize("char", FORBIDDEN.values(), ids=FORBIDDEN.keys())
def test_text_fields_refuse_control_characters_naming_the_position(char: str) -> None:
    value = f"1 Analytical{char}Way"
    assert forbidden_character(value) == len("1 Analytical")
    for rule in ("text", "reason", "email", "address", "payment_token"):
        violations = Violations()
        if rule == "text":
            violations.text("street", value, required=True, max_length=200)
        elif rule == "reason":
            violations.reason("street", value)
        elif rule == "email":
            violations.email("street", f"ada{char}@example.com")
        elif rule == "address":
            violations.address("to", PostalAddress("Ada", value, "London", "N1", "GB"))
        else:
            violations.payment_token("street", f"tok_{char}visa")
        field, reason = _only(violations)
        assert field in ("street", "to.street"), rule
        assert "control characters" in reason, (rule, reason)
        assert f"U+{ord(char):04X}" in reason


@pytest.mark.parametrize("char", FORBIDDEN.values(), ids=FORBIDDEN.keys())
def test_a_blank_value_of_control_characters_is_refused_even_where_optional(char: str) -> None:
    violations = Violations()
    violations.reason("reason", char)
    assert "control characters" in _only(violations)[1]


@pytest.mark.parametrize("value", ALLOWED)
def test_ordinary_unicode_text_is_accepted(value: str) -> None:
    violations = Violations()
    violations.text("street", value, required=True, max_length=200)
    violations.address("to", PostalAddress(value, value, value, value, "DE"))
    violations.reason("reason", value)
    assert violations.items == []


# -- sizes first, one violation a field --------------------------------------------------------


def test_a_huge_value_is_refused_by_its_size_before_any_other_rule() -> None:
    huge = "\x00" * 1_000_000
    violations = Violations()
    violations.text("street", huge, required=True, max_length=200)
    violations.email("customer_email", huge)
    violations.payment_token("payment_token", huge)
    violations.identifier("order_id", huge)
    violations.money("amount", Money(huge, 100))
    assert [(v.field, v.reason) for v in violations.items] == [
        ("street", "must be at most 200 characters"),
        ("customer_email", "must be at most 254 characters"),
        ("payment_token", "must be at most 128 characters"),
        ("order_id", "must be at most 64 characters"),
        ("amount.currency_code", "must be an ISO 4217 code of three upper-case letters like USD"),
    ]


def test_an_unknown_currency_is_quoted_short() -> None:
    violations = Violations()
    violations.money("amount", Money("usd", 100))
    field, reason = _only(violations)
    assert field == "amount.currency_code"
    assert "unknown currency 'usd'" in reason


def test_two_lines_with_the_same_huge_sku_get_one_size_violation_each_and_no_duplicate_check() -> None:
    sku = "S" * 400_000
    violations = Violations()
    violations.lines("items", [Line(sku, 1), Line(sku, 1)])
    assert [(v.field, v.reason) for v in violations.items] == [
        ("items[0].sku", "must be at most 64 characters"),
        ("items[1].sku", "must be at most 64 characters"),
    ]
    with pytest.raises(InvalidArgument) as caught:
        violations.raise_if_any()
    assert len(caught.value.message) < 200
    assert sum(packed.ByteSize() for packed in caught.value.details()) < 200


def test_a_duplicate_sku_is_still_reported_and_quoted() -> None:
    violations = Violations()
    violations.lines("items", [Line("LAMP-3", 1), Line("LAMP-3", 2)])
    assert _only(violations) == ("items[1].sku", "SKU 'LAMP-3' appears more than once")


def test_a_field_that_failed_is_reported_once() -> None:
    violations = Violations()
    violations.text("summary.tracking_number", "TRK\n1", required=True, max_length=64)
    # A later rule on the same field (notify's printable check, say) adds nothing.
    violations.add("summary.tracking_number", "must be printable text without line breaks")
    assert violations.failed("summary.tracking_number")
    assert _only(violations)[1].startswith("must not contain control characters")


def test_conversion_stops_past_the_line_limit_and_the_count_is_refused() -> None:
    items = [common_pb2.LineItem(sku="", quantity=0)] * 100_000
    lines = lines_from_pb(pb.PlaceOrderRequest(items=items).items)
    assert len(lines) == MAX_LINES + 1
    violations = Violations()
    violations.lines("items", lines)
    assert _only(violations) == ("items", f"must hold at most {MAX_LINES} lines")


def test_count_bounds_a_repeated_field_before_it_is_iterated() -> None:
    violations = Violations()
    assert violations.count("statuses", [1] * 16, 16)
    assert not violations.count("statuses", [1] * 100_000, 16)
    assert _only(violations) == ("statuses", "must hold at most 16 elements, got 100000")


@pytest.mark.parametrize("token", ["9" * 5000, "0", "-1", "1.5", "\x00", "\u0661", str(2**63)])
def test_a_bad_sequence_token_is_a_violation_not_a_crash(token: str) -> None:
    violations = Violations()
    assert violations.sequence_token("page_token", token) is None
    assert _only(violations) == ("page_token", "is not a token returned by a previous page")


def test_a_good_sequence_token_is_its_number() -> None:
    violations = Violations()
    assert violations.sequence_token("page_token", "") is None
    assert violations.sequence_token("page_token", str(2**63 - 1)) == 2**63 - 1
    assert violations.items == []


# -- timestamps and durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos", "bad_field"),
    [
        (4_611_686_018_427_387_904, 0, "created_after.seconds"),
        (MAX_TIMESTAMP_SECONDS + 1, 0, "created_after.seconds"),  # 10000-01-01
        (MIN_TIMESTAMP_SECONDS - 1, 0, "created_after.seconds"),  # before year 1
        (0, -1, "created_after.nanos"),
        (0, 1_000_000_000, "created_after.nanos"),
    ],
)
def test_an_out_of_range_timestamp_names_its_part(seconds: int, nanos: int, bad_field: str) -> None:
    violations = Violations()
    violations.timestamp("created_after", Timestamp(seconds=seconds, nanos=nanos))
    assert _only(violations)[0] == bad_field


def test_the_extreme_timestamps_are_accepted() -> None:
    violations = Violations()
    violations.timestamp("a", Timestamp(seconds=MIN_TIMESTAMP_SECONDS, nanos=0))
    violations.timestamp("b", Timestamp(seconds=MAX_TIMESTAMP_SECONDS, nanos=999_999_999))
    assert violations.items == []


@pytest.mark.parametrize(
    ("seconds", "nanos", "bad_field"),
    [
        (315_576_000_001, 0, "timeout.seconds"),
        (-315_576_000_001, 0, "timeout.seconds"),
        (0, 1_000_000_000, "timeout.nanos"),
        (1, -1, "timeout.nanos"),
        (-1, 1, "timeout.nanos"),
    ],
)
def test_an_out_of_range_duration_names_its_part(seconds: int, nanos: int, bad_field: str) -> None:
    violations = Violations()
    violations.duration("timeout", Duration(seconds=seconds, nanos=nanos))
    assert _only(violations)[0] == bad_field


def test_good_durations_are_accepted() -> None:
    violations = Violations()
    for seconds, nanos in [(0, -5), (0, 5), (-3, -5), (315_576_000_000, 999_999_999)]:
        violations.duration("timeout", Duration(seconds=seconds, nanos=nanos))
    assert violations.items == []


# -- any message -------------------------------------------------------------------------------


def test_contents_checks_every_string_and_timestamp_of_any_message() -> None:
    message = Struct()
    message.update({"note": "fine", "nested": {"bad": "a\x00b"}, "list": ["ok", "line\nbreak"]})
    violations = Violations()
    violations.contents("", message)
    fields = sorted(v.field for v in violations.items)
    assert fields == [
        "fields['list'].list_value.values[1].string_value",
        "fields['nested'].struct_value.fields['bad'].string_value",
    ]
    stamp = Violations()
    stamp.contents("input.", pb.StepAttempt(direction="action", started_at=Timestamp(seconds=0, nanos=-1)))
    assert _only(stamp)[0] == "input.started_at.nanos"


# -- the contracts -----------------------------------------------------------------------------

SERVICE_FILES = [
    inventory_service_pb2,
    payment_service_pb2,
    shipping_service_pb2,
    notify_service_pb2,
    pb,
]
# Every Timestamp or Duration a client can send, and where the server checks it.
VALIDATED_TIME_FIELDS = {
    "sagasuite.orchestrator.v1.ListSagasRequest.created_after",  # orchestrator/server.py ListSagas
    "sagasuite.orchestrator.v1.ListSagasRequest.created_before",  # orchestrator/server.py ListSagas
    "sagasuite.orchestrator.v1.GetSagaStatsRequest.created_after",  # orchestrator/server.py GetSagaStats
}


def _time_fields(message: Descriptor, seen: set[str]) -> set[str]:
    found: set[str] = set()
    if message.full_name in seen:
        return found
    seen.add(message.full_name)
    for field in message.fields:
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        assert field.message_type is not None
        if field.message_type.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            found.add(field.full_name)
        else:
            found |= _time_fields(field.message_type, seen)
    return found


def test_every_timestamp_and_duration_of_every_request_is_one_the_servers_validate() -> None:
    requests = [
        method.input_type
        for module in SERVICE_FILES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    found: set[str] = set()
    for request in requests:
        found |= _time_fields(request, set())
    # A new one must be validated at the edge (Violations.timestamp / .duration) and listed here.
    assert found == VALIDATED_TIME_FIELDS
