"""svckit.validation: every rule names the field with a reason, and all violations are reported together."""

from __future__ import annotations

import pytest
from google.rpc import error_details_pb2

from svckit.errors import FieldViolation, InvalidArgument
from svckit.validation import (
    MAX_ID_LENGTH,
    MAX_LINES,
    MAX_QUANTITY,
    Line,
    Money,
    PostalAddress,
    Violations,
    page_offset,
    unique,
)

GOOD_ADDRESS = PostalAddress("Ada Lovelace", "1 Analytical Way", "London", "N1 9GU", "GB")


def _fields(violations: Violations) -> list[str]:
    return [item.field for item in violations.items]


@pytest.mark.parametrize("value", ["order-1", "A", "a.b_c:d-9", "x" * MAX_ID_LENGTH])
def test_identifier_accepts(value: str) -> None:
    violations = Violations()
    violations.identifier("order_id", value)
    violations.raise_if_any()
    assert violations.items == []


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "is required"),
        ("x" * (MAX_ID_LENGTH + 1), f"at most {MAX_ID_LENGTH} characters"),
        ("-leading-dash", "start with a letter or digit"),
        ("has space", "ASCII letters"),
        ("ünïcode", "ASCII letters"),
        ("slash/inside", "ASCII letters"),
    ],
)
def test_identifier_names_field_and_reason(value: str, reason: str) -> None:
    violations = Violations()
    violations.identifier("order_id", value)
    (item,) = violations.items
    assert item.field == "order_id"
    assert reason in item.reason


def test_text_required_and_length() -> None:
    violations = Violations()
    violations.text("note", "   ", required=True, max_length=10)
    violations.text("note2", "x" * 11, required=False, max_length=10)
    violations.text("note3", "", required=False, max_length=10)
    violations.text("note4", "x" * 10, required=True, max_length=10)
    assert violations.items == [
        FieldViolation("note", "is required"),
        FieldViolation("note2", "must be at most 10 characters"),
    ]


def test_reason_is_optional_but_bounded() -> None:
    violations = Violations()
    violations.reason("reason", "")
    violations.reason("reason", "x" * 200)
    assert violations.items == []
    violations.reason("reason", "x" * 201)
    assert _fields(violations) == ["reason"]
    assert "at most 200" in violations.items[0].reason


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("ada@example.com", True),
        ("", False),
        ("no-at-sign.example.com", False),
        ("two@@example.com", False),
        ("ada@localhost", False),
        ("spa ce@example.com", False),
        ("a@" + "x" * 250 + ".com", False),
    ],
)
def test_email(value: str, ok: bool) -> None:
    violations = Violations()
    violations.email("customer_email", value)
    assert _fields(violations) == ([] if ok else ["customer_email"])


def test_lines_empty_and_too_many() -> None:
    violations = Violations()
    violations.lines("items", [])
    violations.lines("more_items", [Line(f"SKU-{i}", 1) for i in range(MAX_LINES + 1)])
    assert _fields(violations) == ["items", "more_items"]
    assert "at least one line" in violations.items[0].reason
    assert f"at most {MAX_LINES} lines" in violations.items[1].reason
    ok = Violations()
    ok.lines("items", [Line(f"SKU-{i}", MAX_QUANTITY) for i in range(MAX_LINES)])
    assert ok.items == []


def test_lines_name_each_bad_line() -> None:
    violations = Violations()
    violations.lines(
        "items",
        [Line("LAMP-3", 1), Line("", 2), Line("LAMP-3", 0), Line("DESK-1", MAX_QUANTITY + 1)],
    )
    assert _fields(violations) == [
        "items[1].sku",
        "items[2].sku",
        "items[2].quantity",
        "items[3].quantity",
    ]
    reasons = [item.reason for item in violations.items]
    assert reasons[0] == "is required"
    assert "'LAMP-3' appears more than once" in reasons[1]
    assert reasons[2] == "must be at least 1"
    assert reasons[3] == f"must be at most {MAX_QUANTITY}"


def test_money() -> None:
    violations = Violations()
    violations.money("amount", Money("USD", 1999))
    assert violations.items == []
    violations.money("amount", None)
    violations.money("refund", Money("XYZ", 0))
    violations.money("huge", Money("EUR", 10**12 + 1))
    assert _fields(violations) == ["amount", "refund.currency_code", "refund.minor_units", "huge.minor_units"]
    assert "unknown currency 'XYZ'" in violations.items[1].reason
    assert "USD" in violations.items[1].reason
    assert violations.items[2].reason == "must be positive"
    assert "at most" in violations.items[3].reason


def test_address() -> None:
    violations = Violations()
    violations.address("shipping_address", GOOD_ADDRESS)
    assert violations.items == []
    violations.address("shipping_address", None)
    violations.address("to", PostalAddress(" ", "", "x" * 201, "", "gb"))
    assert _fields(violations) == [
        "shipping_address",
        "to.recipient_name",
        "to.street",
        "to.city",
        "to.postal_code",
        "to.country_code",
    ]
    assert violations.items[3].reason == "must be at most 200 characters"
    assert "ISO 3166-1 alpha-2" in violations.items[5].reason


@pytest.mark.parametrize(("value", "ok"), [(0, True), (500, True), (-1, False), (501, False)])
def test_page_size(value: int, ok: bool) -> None:
    violations = Violations()
    violations.page_size("page_size", value)
    assert _fields(violations) == ([] if ok else ["page_size"])


def test_page_offset() -> None:
    assert page_offset("") == 0
    assert page_offset("40") == 40
    for bad in ("-1", "abc", "4.0"):
        with pytest.raises(InvalidArgument) as caught:
            page_offset(bad)
        assert [v.field for v in caught.value.violations] == ["page_token"]


@pytest.mark.parametrize("bad", ["\u00b2", "9" * 5000])
def test_page_offset_rejects_odd_digits_as_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        page_offset(bad)
    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_unique_keeps_first_occurrence_order() -> None:
    assert unique(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_all_violations_are_reported_in_one_error() -> None:
    violations = Violations()
    violations.identifier("order_id", "")
    violations.email("customer_email", "nope")
    violations.lines("items", [Line("SKU-1", 0)])
    violations.money("amount", Money("usd", -5))
    violations.address("shipping_address", None)
    with pytest.raises(InvalidArgument) as caught:
        violations.raise_if_any()
    error = caught.value
    expected = [
        "order_id",
        "customer_email",
        "items[0].quantity",
        "amount.currency_code",
        "amount.minor_units",
        "shipping_address",
    ]
    assert [v.field for v in error.violations] == expected
    for name in expected:
        assert f"{name}: " in error.message
    # The same violations travel to the client as a google.rpc.BadRequest.
    (packed,) = error.details()
    bad_request = error_details_pb2.BadRequest()
    assert packed.Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        (v.field, v.reason) for v in error.violations
    ]


def test_no_violations_raises_nothing() -> None:
    violations = Violations()
    violations.identifier("order_id", "order-1")
    violations.email("customer_email", "ada@example.com")
    violations.lines("items", [Line("SKU-1", 2)])
    violations.money("amount", Money("JPY", 100))
    violations.address("shipping_address", GOOD_ADDRESS)
    violations.raise_if_any()
