"""Request validation shared by every service: collects each bad field with the reason, sizes first."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from svckit import page_token
from svckit.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_ADDRESS_PART_LENGTH",
    "MAX_DURATION_SECONDS",
    "MAX_EMAIL_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_LINES",
    "MAX_MINOR_UNITS",
    "MAX_PAGE_SIZE",
    "MAX_PAYMENT_TOKEN_LENGTH",
    "MAX_QUANTITY",
    "MAX_QUOTED_CHARACTERS",
    "MAX_REASON_LENGTH",
    "MAX_SEQUENCE_TOKEN",
    "MAX_TIMESTAMP_SECONDS",
    "MIN_TIMESTAMP_SECONDS",
    "PAYMENT_TOKEN_PREFIX",
    "SUPPORTED_CURRENCIES",
    "Line",
    "Money",
    "PostalAddress",
    "Violations",
    "decode_lines",
    "encode_lines",
    "forbidden_character",
    "page_offset",
    "quote",
]

MAX_ID_LENGTH = 64
MAX_LINES = 100
MAX_QUANTITY = 10_000
MAX_MINOR_UNITS = 10**12
MAX_REASON_LENGTH = 200
MAX_PAGE_SIZE = 500
MAX_EMAIL_LENGTH = 254
MAX_ADDRESS_PART_LENGTH = 200
MAX_PAYMENT_TOKEN_LENGTH = 128
PAYMENT_TOKEN_PREFIX = "tok_"
# Page tokens that are sequence numbers or entry ids: positive and within a signed 64-bit column.
MAX_SEQUENCE_TOKEN = page_token.MAX_SEQUENCE_TOKEN
# A refusal quotes at most this many characters of a value, escaped.
MAX_QUOTED_CHARACTERS = 32
# google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
# google.protobuf.Duration: about +-10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000
_MAX_NANOS = 999_999_999
SUPPORTED_CURRENCIES = frozenset({"USD", "EUR", "GBP", "JPY", "CHF", "SEK", "NOK", "DKK", "PLN", "CAD"})

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]*")
_EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_COUNTRY_PATTERN = re.compile(r"[A-Z]{2}")
# What no text field may hold: C0 controls (NUL, which PostgreSQL cannot store, among them), DEL,
# C1 controls, lone surrogates (not UTF-8, so neither store nor the wire can carry them) and the
# Unicode line and paragraph separators, which split a line as a newline does.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


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


def quote(value: str, limit: int = MAX_QUOTED_CHARACTERS) -> str:
    """A value fit for an error message: at most limit characters of it, escaped, and its length when cut."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def forbidden_character(value: str) -> int | None:
    """The position of the first character no text field may hold (a control character, say), or None."""
    found = _FORBIDDEN.search(value)
    return found.start() if found is not None else None


def _forbidden_reason(value: str, position: int) -> str:
    return f"must not contain control characters; U+{ord(value[position]):04X} at position {position}"


class Violations:
    """Collects field violations; raise_if_any() turns them into one INVALID_ARGUMENT.

    Every rule checks the size of a value before anything else, and a field is reported once: a
    field that failed one rule is not checked by the next (a 400 KB SKU refused by its length is
    not compared with the other SKUs too). A refusal quotes at most a short prefix of a value.
    """

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []
        self._failed: set[str] = set()

    def add(self, field_name: str, reason: str) -> None:
        if field_name in self._failed:
            return
        self._failed.add(field_name)
        self.items.append(FieldViolation(field_name, reason))

    def failed(self, field_name: str) -> bool:
        """True when field_name was refused already."""
        return field_name in self._failed

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
        if len(value) > max_length:
            self.add(field_name, f"must be at most {max_length} characters")
            return
        position = forbidden_character(value)
        if position is not None:
            self.add(field_name, _forbidden_reason(value, position))
        elif required and not value.strip():
            self.add(field_name, "is required")

    def reason(self, field_name: str, value: str) -> None:
        self.text(field_name, value, required=False, max_length=MAX_REASON_LENGTH)

    def email(self, field_name: str, value: str) -> None:
        if not value:
            self.add(field_name, "is required")
            return
        if len(value) > MAX_EMAIL_LENGTH:
            self.add(field_name, f"must be at most {MAX_EMAIL_LENGTH} characters")
            return
        position = forbidden_character(value)
        if position is not None:
            self.add(field_name, _forbidden_reason(value, position))
        elif not _EMAIL_PATTERN.fullmatch(value):
            self.add(field_name, "must be an e-mail address like name@example.com")

    def count(self, field_name: str, values: Sized, maximum: int) -> bool:
        """Refuse a repeated field longer than maximum; True when it is within (and may be iterated)."""
        if len(values) > maximum:
            self.add(field_name, f"must hold at most {maximum} elements, got {len(values)}")
            return False
        return True

    def lines(self, field_name: str, lines: Sequence[Line]) -> None:
        if not lines:
            self.add(field_name, "must hold at least one line")
            return
        if len(lines) > MAX_LINES:
            # svckit.convert stops converting past MAX_LINES + 1 lines: the count is a lower bound.
            self.add(field_name, f"must hold at most {MAX_LINES} lines")
            return
        seen: set[str] = set()
        for index, line in enumerate(lines):
            sku_field = f"{field_name}[{index}].sku"
            self.identifier(sku_field, line.sku)
            if not self.failed(sku_field):
                if line.sku in seen:
                    self.add(sku_field, f"SKU {quote(line.sku)} appears more than once")
                seen.add(line.sku)
            if line.quantity < 1:
                self.add(f"{field_name}[{index}].quantity", "must be at least 1")
            elif line.quantity > MAX_QUANTITY:
                self.add(f"{field_name}[{index}].quantity", f"must be at most {MAX_QUANTITY}")

    def money(self, field_name: str, money: Money | None) -> None:
        if money is None:
            self.add(field_name, "is required")
            return
        currency_field = f"{field_name}.currency_code"
        if len(money.currency_code) != 3:
            self.add(currency_field, "must be an ISO 4217 code of three upper-case letters like USD")
        elif money.currency_code not in SUPPORTED_CURRENCIES:
            supported = ", ".join(sorted(SUPPORTED_CURRENCIES))
            self.add(currency_field, f"unknown currency {quote(money.currency_code)}; one of {supported}")
        if money.minor_units <= 0:
            self.add(f"{field_name}.minor_units", "must be positive")
        elif money.minor_units > MAX_MINOR_UNITS:
            self.add(f"{field_name}.minor_units", f"must be at most {MAX_MINOR_UNITS}")

    def address(self, field_name: str, address: PostalAddress | None) -> None:
        if address is None:
            self.add(field_name, "is required")
            return
        for part in ("recipient_name", "street", "city", "postal_code"):
            self.text(f"{field_name}.{part}", getattr(address, part), required=True, max_length=MAX_ADDRESS_PART_LENGTH)
        # The pattern is anchored and two characters long: a huge value fails at its third.
        if not _COUNTRY_PATTERN.fullmatch(address.country_code):
            self.add(f"{field_name}.country_code", "must be an ISO 3166-1 alpha-2 code like DE")

    def payment_token(self, field_name: str, value: str) -> None:
        """The payment service's rule, shared so that whoever forwards a token is at least as strict."""
        if not value:
            self.add(field_name, "is required")
            return
        if len(value) > MAX_PAYMENT_TOKEN_LENGTH:
            self.add(field_name, f"must be at most {MAX_PAYMENT_TOKEN_LENGTH} characters")
            return
        position = forbidden_character(value)
        if position is not None:
            self.add(field_name, _forbidden_reason(value, position))
        elif not value.startswith(PAYMENT_TOKEN_PREFIX):
            self.add(field_name, f"must be a payment token starting with {PAYMENT_TOKEN_PREFIX!r}")

    def page_size(self, field_name: str, value: int) -> None:
        if value < 0 or value > MAX_PAGE_SIZE:
            self.add(field_name, f"must be within 0..{MAX_PAGE_SIZE}")

    def sequence_token(self, field_name: str, token: str) -> int | None:
        """A page token that is a positive sequence number or id ("" is no token); None when absent or bad."""
        try:
            return page_token.decode_sequence(token, field_name)
        except page_token.BadPageToken:
            self.add(field_name, page_token.BAD_PAGE_TOKEN)
            return None

    def timestamp(self, field_name: str, stamp: Timestamp) -> None:
        """A google.protobuf.Timestamp within 0001-01-01..9999-12-31 with nanos in 0..999,999,999."""
        if not MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS:
            self.add(
                f"{field_name}.seconds",
                f"must be within {MIN_TIMESTAMP_SECONDS}..{MAX_TIMESTAMP_SECONDS} "
                "(0001-01-01T00:00:00Z..9999-12-31T23:59:59Z)",
            )
        if not 0 <= stamp.nanos <= _MAX_NANOS:
            self.add(f"{field_name}.nanos", f"must be within 0..{_MAX_NANOS}")

    def duration(self, field_name: str, duration: Duration) -> None:
        """A google.protobuf.Duration within +-315,576,000,000 s whose nanos have the sign of its seconds."""
        if not -MAX_DURATION_SECONDS <= duration.seconds <= MAX_DURATION_SECONDS:
            self.add(f"{field_name}.seconds", f"must be within -{MAX_DURATION_SECONDS}..{MAX_DURATION_SECONDS}")
        if not -_MAX_NANOS <= duration.nanos <= _MAX_NANOS:
            self.add(f"{field_name}.nanos", f"must be within -{_MAX_NANOS}..{_MAX_NANOS}")
        elif (duration.seconds < 0 < duration.nanos) or (duration.nanos < 0 < duration.seconds):
            self.add(f"{field_name}.nanos", "must have the sign of seconds (or be 0)")

    def contents(self, field_prefix: str, message: Message) -> None:
        """What holds for every field of any message: text without control characters, timestamps and
        durations in range, at any depth. For messages without rules of their own (a custom saga input)."""
        for descriptor, value in message.ListFields():
            name = f"{field_prefix}{descriptor.name}"
            if _is_map(descriptor):
                for key, entry in value.items():
                    self._content(f"{name}[{quote(str(key))}]", entry)
            elif descriptor.is_repeated:
                for index, element in enumerate(value):
                    self._content(f"{name}[{index}]", element)
            else:
                self._content(name, value)

    def _content(self, field_name: str, value: object) -> None:
        if isinstance(value, str):
            position = forbidden_character(value)
            if position is not None:
                self.add(field_name, _forbidden_reason(value, position))
        elif isinstance(value, Timestamp):
            self.timestamp(field_name, value)
        elif isinstance(value, Duration):
            self.duration(field_name, value)
        elif isinstance(value, Message):
            self.contents(f"{field_name}.", value)


def _is_map(descriptor: FieldDescriptor) -> bool:
    return descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry


def page_offset(token: str) -> int:
    """Decode a page token (an offset); raises INVALID_ARGUMENT naming page_token when it is bad."""
    return page_token.decode_offset(token)


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
