"""`saga order` builds its request through devstack.orders: the file's order, the flags on top, then the defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer

from devstack.orders import DEMO_ADDRESS, UNIT_PRICE_MINOR, order_request
from sagactl.order import _ADDRESS_FIELDS, _build_order
from sagasuite.common.v1.common_pb2 import Address
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

NO_ADDRESS: dict[str, str | None] = dict.fromkeys(_ADDRESS_FIELDS)


def build(
    file: Path | None = None,
    order_id: str | None = None,
    items: list[str] | None = None,
    amount: str | None = None,
    currency: str | None = None,
    payment_token: str | None = None,
    email: str | None = None,
    deadline: int | None = None,
    **shipping: str | None,
) -> pb.PlaceOrderRequest:
    return _build_order(
        file, order_id, items, amount, currency, payment_token, email, {**NO_ADDRESS, **shipping}, deadline
    )


def test_without_flags_one_book_priced_per_unit_in_euros_to_the_demo_address() -> None:
    request = build()
    assert re.fullmatch(r"ord-[0-9a-f]{12}", request.order_id)
    assert request == order_request(
        request.order_id, items=[("BOOK-001", 1)], minor_units=UNIT_PRICE_MINOR, currency="EUR"
    )
    assert request.payment_token == "tok_visa" and request.customer_email == "ada@example.com"
    assert request.shipping_address == DEMO_ADDRESS and request.deadline_seconds == 0


def test_flags_give_every_field() -> None:
    request = build(
        order_id="ord-42",
        items=["BOOK-001:2", "MUG-042"],
        amount="59.98",
        currency="usd",
        payment_token="tok_declined",
        email="grace@example.com",
        deadline=30,
        city="Paris",
        country_code="FR",
    )
    address = Address()
    address.CopyFrom(DEMO_ADDRESS)
    address.city, address.country_code = "Paris", "FR"
    assert request == order_request(
        "ord-42",
        items=[("BOOK-001", 2), ("MUG-042", 1)],
        minor_units=5998,
        currency="USD",
        token="tok_declined",
        email="grace@example.com",
        address=address,
        deadline_seconds=30,
    )


def test_empty_flags_fall_back_to_defaults_but_empty_an_address_field() -> None:
    request = build(order_id="", amount="0", currency="", payment_token="", email="", street="")
    assert request.order_id.startswith("ord-") and request.amount.minor_units == UNIT_PRICE_MINOR
    assert (request.amount.currency_code, request.payment_token, request.customer_email) == (
        "EUR",
        "tok_visa",
        "ada@example.com",
    )
    # An address field given empty is sent empty: the orchestrator refuses it, naming the field.
    assert request.shipping_address.street == "" and request.shipping_address.city == DEMO_ADDRESS.city


def test_a_file_gives_the_order_and_the_flags_go_on_top(tmp_path: Path) -> None:
    order_file = tmp_path / "order.json"
    order_file.write_text(
        json.dumps(
            {
                "orderId": "ord-file",
                "items": [{"sku": "TEE-007", "quantity": 3}],
                "paymentToken": "tok_insufficient_funds",
                "shippingAddress": {"city": "Rome"},
                "deadlineSeconds": 9,
            }
        )
    )
    request = build(order_file, currency="gbp", email="linus@example.com")
    assert request.order_id == "ord-file" and [(i.sku, i.quantity) for i in request.items] == [("TEE-007", 3)]
    assert (request.amount.minor_units, request.amount.currency_code) == (3 * UNIT_PRICE_MINOR, "GBP")
    assert (request.payment_token, request.customer_email) == ("tok_insufficient_funds", "linus@example.com")
    assert request.shipping_address.city == "Rome" and request.shipping_address.street == DEMO_ADDRESS.street
    assert request.deadline_seconds == 9
    flagged = build(order_file, order_id="ord-flag", items=["MUG-042:2"], amount="1.50", deadline=0)
    assert (flagged.order_id, [(i.sku, i.quantity) for i in flagged.items]) == ("ord-flag", [("MUG-042", 2)])
    assert (flagged.amount.minor_units, flagged.deadline_seconds) == (150, 0)


@pytest.mark.parametrize(
    ("arguments", "option", "words"),
    [
        ({"items": ["BOOK-001:0"]}, "--item", "expected SKU or SKU:QUANTITY"),
        ({"items": [":2"]}, "--item", "expected SKU or SKU:QUANTITY"),
        ({"items": ["BOOK-001:two"]}, "--item", "expected SKU or SKU:QUANTITY"),
        ({"amount": "12.345"}, "--amount", "expected an amount like 29.99"),
        ({"amount": "NaN"}, "--amount", "expected an amount like 29.99"),
        ({"file": Path("/nonexistent/order.json")}, "--file", "cannot read"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_it(arguments: dict[str, object], option: str, words: str) -> None:
    with pytest.raises(typer.BadParameter) as raised:
        build(**arguments)  # type: ignore[arg-type]
    assert raised.value.param_hint == option and words in raised.value.message


def test_a_file_that_is_not_an_order_is_a_usage_error(tmp_path: Path) -> None:
    order_file = tmp_path / "order.json"
    order_file.write_text('{"orderId": 7, "nope": true}')
    with pytest.raises(typer.BadParameter) as raised:
        build(order_file)
    assert raised.value.param_hint == "--file" and "is not a PlaceOrderRequest in JSON" in raised.value.message
