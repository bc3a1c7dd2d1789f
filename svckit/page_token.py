"""Page tokens of every List call, in one place; a bad token is INVALID_ARGUMENT naming page_token."""

from __future__ import annotations

import math
import re

from svckit.errors import FieldViolation, InvalidArgument

__all__ = [
    "BAD_PAGE_TOKEN",
    "MAX_CURSOR_TOKEN_LENGTH",
    "MAX_SEQUENCE_TOKEN",
    "BadPageToken",
    "decode_cursor",
    "decode_offset",
    "decode_sequence",
    "encode_cursor",
    "encode_offset",
    "encode_sequence",
]

BAD_PAGE_TOKEN = "is not a token returned by a previous page"
# Tokens that are sequence numbers or entry ids: positive and within a signed 64-bit column.
MAX_SEQUENCE_TOKEN = 2**63 - 1
# A cursor token is "<created_at as repr(float)>_<id>"; the id part goes into a query, so its shape is checked.
MAX_CURSOR_TOKEN_LENGTH = 100

_SEQUENCE = re.compile(r"[0-9]{1,19}")
_OFFSET = re.compile(r"[0-9]{1,18}")
_CURSOR = re.compile(r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)_([A-Za-z0-9][A-Za-z0-9._:\-]{0,63})")


class BadPageToken(InvalidArgument):
    """The page token is not one a previous page returned."""

    def __init__(self, field_name: str = "page_token") -> None:
        super().__init__([FieldViolation(field_name, BAD_PAGE_TOKEN)])


def encode_sequence(sequence: int) -> str:
    """The token of a page that continues below this sequence number (or entry id)."""
    return str(sequence)


def decode_sequence(token: str, field_name: str = "page_token") -> int | None:
    """The sequence number a token holds, None for "" (the first page); raises BadPageToken when it is bad."""
    if not token:
        return None
    # Shape and length first: int() of thousands of digits is slow, and str.isdigit() takes "²" that int() refuses.
    if _SEQUENCE.fullmatch(token) and 0 < int(token) <= MAX_SEQUENCE_TOKEN:
        return int(token)
    raise BadPageToken(field_name)


def encode_offset(offset: int) -> str:
    """The token of a page that starts at this offset."""
    return str(offset)


def decode_offset(token: str, field_name: str = "page_token") -> int:
    """The offset a token holds, 0 for "" (the first page); raises BadPageToken when it is bad."""
    if not token:
        return 0
    if not _OFFSET.fullmatch(token):
        raise BadPageToken(field_name)
    return int(token)


def encode_cursor(created_at: float, key: str) -> str:
    """The token of a page that continues after the row (created_at, key) in newest-first order."""
    return f"{created_at!r}_{key}"


def decode_cursor(token: str, field_name: str = "page_token") -> tuple[float, str] | None:
    """The (created_at, key) a cursor token holds, None for "" (the first page); raises BadPageToken when it is bad."""
    if not token:
        return None
    # Length and shape first: the key part goes into a query, and PostgreSQL refuses a NUL there.
    found = _CURSOR.fullmatch(token) if len(token) <= MAX_CURSOR_TOKEN_LENGTH else None
    value = float(found.group(1)) if found is not None else math.nan
    if found is None or not math.isfinite(value):
        raise BadPageToken(field_name)
    return value, found.group(2)
