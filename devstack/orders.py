"""The one builder of the orders that the demo, the chaos harness, the benchmarks and the tests place."""

from __future__ import annotations

from collections.abc import Iterable

from sagasuite.common.v1.common_pb2 import Address, LineItem, Money
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["DEFAULT_ITEMS", "DEMO_ADDRESS", "UNIT_PRICE_MINOR", "order_request"]

# Where every demo, test and benchmark order is shipped.
DEMO_ADDRESS = Address(
    recipient_name="Ada Lovelace",
    street="12 St James's Square",
    city="London",
    postal_code="SW1Y 4JH",
    country_code="GB",
)
# Two lines of plentiful stock in the default catalogue.
DEFAULT_ITEMS: tuple[tuple[str, int], ...] = (("BOOK-001", 1), ("MUG-042", 2))
# The price of one unit where an order names no amount (`saga order`, the demo), in minor units.
UNIT_PRICE_MINOR = 2999


def order_request(
    order_id: str,
    *,
    items: Iterable[tuple[str, int]] = DEFAULT_ITEMS,
    minor_units: int = 2599,
    currency: str = "USD",
    token: str = "tok_visa",
    email: str = "ada@example.com",
    address: Address = DEMO_ADDRESS,
    deadline_seconds: int = 0,
) -> pb.PlaceOrderRequest:
    """A PlaceOrder request; by default two lines of plentiful stock and a card that is accepted."""
    return pb.PlaceOrderRequest(
        order_id=order_id,
        customer_email=email,
        items=[LineItem(sku=sku, quantity=quantity) for sku, quantity in items],
        amount=Money(currency_code=currency, minor_units=minor_units),
        payment_token=token,
        shipping_address=address,
        deadline_seconds=deadline_seconds,
    )
