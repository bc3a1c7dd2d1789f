"""Conversions between the shared contract types (sagasuite.common.v1) and plain domain objects."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from sagasuite.common.v1 import common_pb2
from svckit.validation import MAX_LINES, Line, Money, PostalAddress

__all__ = [
    "address_from_pb",
    "address_to_pb",
    "lines_from_pb",
    "lines_to_pb",
    "money_from_pb",
    "money_to_pb",
    "timestamp",
]


def lines_from_pb(items: Sequence[common_pb2.LineItem]) -> list[Line]:
    """The lines, but no more than MAX_LINES + 1 of them: validation refuses a longer list by its length
    either way, and a request of half a million empty lines then costs no half a million objects."""
    return [Line(item.sku, item.quantity) for item in items[: MAX_LINES + 1]]


def lines_to_pb(lines: Sequence[Line]) -> list[common_pb2.LineItem]:
    return [common_pb2.LineItem(sku=line.sku, quantity=line.quantity) for line in lines]


def money_from_pb(owner: Message, field_name: str) -> Money | None:
    if not owner.HasField(field_name):
        return None
    money = getattr(owner, field_name)
    return Money(money.currency_code, money.minor_units)


def money_to_pb(money: Money) -> common_pb2.Money:
    return common_pb2.Money(currency_code=money.currency_code, minor_units=money.minor_units)


def address_from_pb(owner: Message, field_name: str) -> PostalAddress | None:
    if not owner.HasField(field_name):
        return None
    a = getattr(owner, field_name)
    return PostalAddress(a.recipient_name, a.street, a.city, a.postal_code, a.country_code)


def address_to_pb(address: PostalAddress) -> common_pb2.Address:
    return common_pb2.Address(
        recipient_name=address.recipient_name,
        street=address.street,
        city=address.city,
        postal_code=address.postal_code,
        country_code=address.country_code,
    )


def timestamp(unix_seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix_seconds * 1e9))
    return stamp
