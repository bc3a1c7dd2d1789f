"""Request validation shared by every service: collects each bad field with the reason."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from svckit.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_LINES",
    "MAX_PAGE_SIZE",
    "MAX_QUANTITY",
    "SUPPORTED_CURRENCIES",
    "Line",
    "Money",
    "PostalAddress",
    "Violations",
    "decode_lines",
    "encode_lines",
    "page_offset",
]

MAX_ID_LENGTH = 64
MAX_LINES = 100
MAX_QUANTITY = 10_000
MAX_MINOR_UNITS = 10**12
MAX_REASON_LENGTH = 200
MAX_PAGE_SIZE = 500
SUPPORTED_CURRENCIES = frozenset({"USD", "EUR", "GBP", "JPY", "CHF", "SEK", "NOK", "DKK", "PLN", "CAD"})

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]*")
_EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_COUNTRY_PATTERN = re.compile(r"[A-Z]{2}")
_PAGE_TOKEN_PATTERN = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class Line:
    """One order line: a SKU and a quantity."""

    sku: str
    quantity: int


@dataclass(frozen=True)
class Money:
    """An amount in minor units of a currency."""

    currency_code: str
    minor_units: int


@dataclass(frozen=True)
class PostalAddress:
    """A delivery address."""

    recipient_name: str
    street: str
    city: str
    postal_code: str
    country_code: str


class Violations:
    """Collects field violations; raise_if_any() turns them into one INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_name: str, reason: str) -> None:
        self.items.append(FieldViolation(field_name, reason))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    def identifier(self, field_name: str, value: str) -> None:
        if not value:
            self.add(field_name, "is required")
        elif len(value) > MAX_ID_LENGTH:
            self.add(field_name, f"must be at most {MAX_ID_LENGTH} characters")
        elif not _ID_PATTERN.fullmatch(value):
            self.add(field_name, "must be ASCII letters, digits and . _ : - and start with a letter or digit")

    def text(self, field_name: str, value: str, *, required: bool, max_length: int) -> None:
        if required and not value.strip():
            self.add(field_name, "is required")
        elif len(value) > max_length:
            self.add(field_name, f"must be at most {max_length} characters")

    def reason(self, field_name: str, value: str) -> None:
        self.text(field_name, value, required=False, max_length=MAX_REASON_LENGTH)

    def email(self, field_name: str, value: str) -> None:
        if not value:
            self.add(field_name, "is required")
        elif len(value) > 254 or not _EMAIL_PATTERN.fullmatch(value):
            self.add(field_name, "must be an e-mail address like name@example.com")

    def lines(self, field_name: str, lines: Sequence[Line]) -> None:
        if not lines:
            self.add(field_name, "must hold at least one line")
            return
        if len(lines) > MAX_LINES:
            self.add(field_name, f"must hold at most {MAX_LINES} lines, got {len(lines)}")
            return
        seen: set[str] = set()
        for index, line in enumerate(lines):
            self.identifier(f"{field_name}[{index}].sku", line.sku)
            if line.sku in seen:
                self.add(f"{field_name}[{index}].sku", f"SKU {line.sku!r} appears more than once")
            seen.add(line.sku)
            if line.quantity < 1:
                self.add(f"{field_name}[{index}].quantity", "must be at least 1")
            elif line.quantity > MAX_QUANTITY:
                self.add(f"{field_name}[{index}].quantity", f"must be at most {MAX_QUANTITY}")

    def money(self, field_name: str, money: Money | None) -> None:
        if money is None:
            self.add(field_name, "is required")
            return
        if money.currency_code not in SUPPORTED_CURRENCIES:
            supported = ", ".join(sorted(SUPPORTED_CURRENCIES))
            self.add(f"{field_name}.currency_code", f"unknown currency {money.currency_code!r}; one of {supported}")
        if money.minor_units <= 0:
            self.add(f"{field_name}.minor_units", "must be positive")
        elif money.minor_units > MAX_MINOR_UNITS:
            self.add(f"{field_name}.minor_units", f"must be at most {MAX_MINOR_UNITS}")

    def address(self, field_name: str, address: PostalAddress | None) -> None:
        if address is None:
            self.add(field_name, "is required")
            return
        for part in ("recipient_name", "street", "city", "postal_code"):
            self.text(f"{field_name}.{part}", getattr(address, part), required=True, max_length=200)
        if not _COUNTRY_PATTERN.fullmatch(address.country_code):
            self.add(f"{field_name}.country_code", "must be an ISO 3166-1 alpha-2 code like DE")

    def page_size(self, field_name: str, value: int) -> None:
        if value < 0 or value > MAX_PAGE_SIZE:
            self.add(field_name, f"must be within 0..{MAX_PAGE_SIZE}")


def page_offset(token: str) -> int:
    """Decode a page token (an offset); raises INVALID_ARGUMENT naming page_token when it is bad."""
    if not token:
        return 0
    if not _PAGE_TOKEN_PATTERN.fullmatch(token):
        raise InvalidArgument.of("page_token", "is not a token returned by a previous page")
    return int(token)


def unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def encode_lines(lines: Sequence[Line]) -> str:
    """Lines as compact "sku=qty;sku=qty" text for a database column."""
    return ";".join(f"{line.sku}={line.quantity}" for line in lines)


def decode_lines(text: str) -> list[Line]:
    lines = []
    for part in filter(None, text.split(";")):
        sku, _, quantity = part.rpartition("=")
        lines.append(Line(sku, int(quantity)))
    return lines
