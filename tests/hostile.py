"""Hypothesis strategies for hostile gRPC requests, built from the protobuf message descriptors of any contract."""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from google.protobuf import any_pb2, message_factory, struct_pb2, text_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

__all__ = [
    "CONTROL_CHARACTERS",
    "FORGED_LOG_LINE",
    "HOSTILE_JSON_TEXTS",
    "JSON_NEAR_MISSES",
    "MALFORMED_WIRE",
    "NEAR_MISSES",
    "Base",
    "HostileRequest",
    "abbreviate",
    "contract_modules",
    "contract_rpcs",
    "field_values",
    "holds_json",
    "hostile_any",
    "hostile_durations",
    "hostile_json",
    "hostile_strings",
    "hostile_structs",
    "hostile_timestamps",
    "invalid_utf8_records",
    "malformed_requests",
    "message_class",
    "messages",
    "mutations",
    "random_requests",
    "requests",
    "unacceptable",
    "unknown_fields",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# A base request and the business key a refusal of it must leave no trace of ("" when none).
Base = Callable[[], tuple[Message, str]]

# Wire types of the protobuf encoding.
VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
MAX_FIELD_NUMBER = 2**29 - 1
_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
# Values where validation rules and storage types tend to break: limits of our rules, of int32/int64, of float.
_INTERESTING_INTS = (
    0, 1, -1, 2, 99, 100, 101, 500, 501, 10_000, 10_001, 604_800, 604_801, 10**12, 10**12 + 1,
    2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1,
)  # fmt: skip

CONTROL_CHARACTERS = (
    "\x00", "\x01", "\x07", "\x08", "\t", "\n", "\x0b", "\x0c", "\r", "\x1b", "\x1f", "\x7f",
    "\x80", "\x85", "\x9f", "\u00ad", "\u200b", "\u200e", "\u202e", "\u2028", "\u2029", "\u2066",
    "\ufeff", "\ufffe", "\uffff", "\U000e0001", "\U0010ffff",
)  # fmt: skip
# A forged audit line, the way log forging looks once a newline gets through.
FORGED_LOG_LINE = "\naudit actor=mallory action=terminate saga=x outcome=ok"
_SPECIAL_STRINGS = (
    "", " ", "   ", "\t", "0", "-1", "1", "1.5", "-0", "0x10", "1e309", "-1e309", "NaN", "nan", "inf", "-inf",
    "9" * 18, "9" * 19, "9" * 40, "null", "None", "true", "%s%s%s%n", "{0}{1}{__class__}", "' OR '1'='1",
    '"; DROP TABLE sagas; --', "../../../../etc/passwd", "${jndi:ldap://127.0.0.1/a}", "<script>alert(1)</script>",
    "a" * 64, "a" * 65, "a" * 129, "a" * 201, "a" * 255, "a" * 256, "a" * 501, "USD", "usd", "US", "USDX", "XXX",
    "DE", "de", "D", "tok_visa", "tok_", "tok_declined", "ada@example.com", "a@b", "@", "a@@b.c", "x@y.z ",
    "OrderSaga", "orderSaga", "BOOK-001", "RARE-1", "_", "-", ".", ":", "a:b", "1_x", "1.0_x", "nan_x", "inf_x",
    "1e400_x", "-1e400_x", "0_", "_0", "1_2_3", "1e308_" + "a" * 64, "été", "日本語", "😀", "💩" * 3,
    "e\u0301", "\uff21", "\u0130", "ß", "ﬀ", "\u0000\u0000", "\r\n", FORGED_LOG_LINE,
)  # fmt: skip
# Byte sizes for huge values: past every field limit, one 64 KiB metadata-size trap, and about 1 MiB.
HUGE_SIZES = (4_097, 16_385, 65_537, 400_000, 1_000_000)
_HUGE_FILLS = ("a", "A1", "é", "😀", "e\u0301", "\x00", "\n", "9")
_PREFIXES = ("", "ORDER-1", "ada@example.com", "tok_visa", "USD", "BOOK-001", "DE")

_INVALID_UTF8 = (
    b"\xff", b"\xfe\xff", b"\x80", b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"a\xe2\x82", b"ORDER-1\xff", b"\xe2\x28\xa1",
)  # fmt: skip
_WELL_KNOWN = ("google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.Any")
_UNKNOWN_CANDIDATES = (15, 16, 99, 1000, 2047, 2048, 19_000, 19_999, 100_000, MAX_FIELD_NUMBER)


# -- the contracts -------------------------------------------------------------------------------


def contract_modules() -> list[ModuleType]:
    """Every generated *_pb2 module under sagasuite/*/v1, so a new contract file is picked up by itself."""
    paths = sorted((REPO_ROOT / "sagasuite").glob("*/v1/*_pb2.py"))
    return [importlib.import_module(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)) for path in paths]


def contract_rpcs() -> list[MethodDescriptor]:
    """Every method of every service declared in the contracts, in a stable order."""
    return [
        method
        for module in contract_modules()
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


@functools.cache
def _contract_messages() -> tuple[Descriptor, ...]:
    """The request message types of the contracts: what a hostile Any packs."""
    found: dict[str, Descriptor] = {}
    for method in contract_rpcs():
        found.setdefault(method.input_type.full_name, method.input_type)
    return tuple(found.values())


# -- the wire format -----------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """The base-128 varint of value; a negative value as its 64-bit two's complement, as protobuf does."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def _groups(number: int, depth: int) -> bytes:
    return tag(number, SGROUP) * depth + tag(number, EGROUP) * depth


# Bytes no decoder may take for a message: each is refused whatever the message type.
MALFORMED_WIRE: dict[str, bytes] = {
    "ff ff ff ff": b"\xff\xff\xff\xff",
    "a lone continuation byte": b"\xff",
    "truncated varint of field 1": b"\x08\x80",
    "truncated varint tag": b"\x80\x80",
    "varint of 11 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "length 5 with 2 bytes": b"\x0a\x05ab",
    "length past 4 GiB": b"\x0a" + varint(2**32 + 1) + b"a",
    "negative length": b"\x0a" + varint(-1) + b"a",
    "truncated fixed64": b"\x09\x01\x02\x03",
    "truncated fixed32": b"\x0d\x01\x02",
    "field number 0": b"\x02\x01a",
    "field number past 2^29": varint(((MAX_FIELD_NUMBER + 1) << 3) | VARINT) + b"\x01",
    "wire type 6": b"\x0e\x01",
    "wire type 7": b"\x0f\x01",
    "end group without start": tag(99, EGROUP),
    "group not closed": tag(99, SGROUP) + b"\x08\x01",
    "group closed by another number": tag(99, SGROUP) + tag(98, EGROUP),
    "groups nested 200 deep": _groups(99, 200),
    "groups nested 101 deep": _groups(99, 101),
    "groups nested 10000 deep": _groups(99, 10_000),
    "unbalanced groups 200 deep": tag(99, SGROUP) * 200,
}


def _field_number_paths(
    descriptor: Descriptor, want: Callable[[FieldDescriptor], bool], depth: int = 3
) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Field paths (through message fields, up to depth) that end in a field `want` accepts."""
    for field in descriptor.fields:
        if want(field):
            yield (field,)
        if field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN and depth > 1:
            for rest in _field_number_paths(field.message_type, want, depth - 1):
                yield (field, *rest)


def _wrap(path: Sequence[FieldDescriptor], record: bytes) -> bytes:
    """The record, placed inside the message fields of path (outermost first) as nested LEN fields."""
    for field in reversed(path):
        record = delimited(field.number, record)
    return record


def invalid_utf8_records(descriptor: Descriptor) -> list[tuple[str, bytes]]:
    """One record per string field (at any depth): its value as bytes that are not UTF-8."""
    records = []
    for path in _field_number_paths(descriptor, lambda f: f.type == FieldDescriptor.TYPE_STRING):
        name = ".".join(f.name for f in path)
        for bad in _INVALID_UTF8[:4]:
            records.append(
                (f"{name} = invalid UTF-8 {bad.hex(' ')}", _wrap(path[:-1], delimited(path[-1].number, bad)))
            )
    return records


def _wrong_wire_type_records(descriptor: Descriptor) -> list[tuple[str, bytes]]:
    """One record per field of the message: the field number with a wire type that does not fit it."""
    records = []
    for field in descriptor.fields:
        if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE):
            records.append((f"{field.name} as a varint", tag(field.number, VARINT) + b"\x01"))
            records.append((f"{field.name} as a group", tag(field.number, SGROUP) + tag(field.number, EGROUP)))
        else:
            records.append((f"{field.name} as a truncated LEN", tag(field.number, LEN) + b"\x10a"))
    for path in _field_number_paths(descriptor, lambda f: f.type == FieldDescriptor.TYPE_MESSAGE):
        records.append((f"{'.'.join(f.name for f in path)} holding ff ff", _wrap(path, b"\xff\xff")))
        records.append((f"{'.'.join(f.name for f in path)} holding groups 200 deep", _wrap(path, _groups(99, 200))))
    return records


# -- values --------------------------------------------------------------------------------------


def abbreviate(value: Any, limit: int = 40) -> str:
    """A short, printable rendering of a value for notes and failure reports."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} {'chars' if isinstance(value, str) else 'bytes'}" if isinstance(value, str | bytes) else ""
    return f"{text[: limit - 10]}…({size or str(len(text)) + ' chars of repr'})"


def _huge_text(size: int, fill: str, prefix: str) -> str:
    """A string of about `size` UTF-8 bytes: the prefix, then fill repeated."""
    return prefix + fill * max(1, size // len(fill.encode()))


@functools.cache
def hostile_strings(*, huge: bool = True) -> st.SearchStrategy[str]:
    """Empty, boundary, control characters, log forging, long unicode, random text, and (if huge) ~1 MiB values."""
    with_control = st.builds(
        lambda prefix, control, suffix: prefix + control + suffix,
        st.sampled_from(_PREFIXES),
        st.sampled_from(CONTROL_CHARACTERS),
        st.sampled_from(("", "x", FORGED_LOG_LINE)),
    )
    long_unicode = st.builds(
        lambda fill, count: fill * count, st.sampled_from(_HUGE_FILLS), st.sampled_from((33, 65, 129, 257, 1025))
    )
    branches = [
        st.sampled_from(_SPECIAL_STRINGS),
        with_control,
        long_unicode,
        st.text(st.characters(codec="utf-8"), max_size=40),
    ]
    if huge:
        branches.append(
            st.builds(_huge_text, st.sampled_from(HUGE_SIZES), st.sampled_from(_HUGE_FILLS), st.sampled_from(_PREFIXES))
        )
    return st.one_of(branches)


def _insert(control: str, fraction: float) -> Callable[[str], str]:
    def near_miss(value: str) -> str:
        at = round(len(value) * fraction)
        return value[:at] + control + value[at:]

    return near_miss


def _repeat_to(size: int) -> Callable[[str], str]:
    return lambda value: value * max(1, size // len(value.encode()))


_EDITS: tuple[Callable[[str], str], ...] = (
    lambda value: value + FORGED_LOG_LINE,
    lambda value: f" {value}",
    lambda value: f"{value} ",
    str.upper,
    str.lower,
    lambda value: value * 2,
    lambda value: value[:-1],
)
# Near misses of a valid value, as edits: a control character anywhere in it, surrounding blanks, a forged
# log line after it, or the value repeated to a huge size. Drawn once and applied, so no strategy is built
# per value.
NEAR_MISSES: st.SearchStrategy[Callable[[str], str]] = st.one_of(
    st.builds(_insert, st.sampled_from(CONTROL_CHARACTERS), st.sampled_from((0.0, 0.5, 1.0))),
    st.sampled_from(_EDITS),
    st.builds(_repeat_to, st.sampled_from(HUGE_SIZES)),
)


# -- JSON text and google.protobuf.Struct ---------------------------------------------------------


def holds_json(field: FieldDescriptor) -> bool:
    """A string field whose value is JSON text (StartSaga's input_json): it gets hostile JSON as well."""
    return field.type == FieldDescriptor.TYPE_STRING and field.name.endswith("_json")


def _nested(depth: int, opener: str = "[", closer: str = "]", inner: str = "1") -> str:
    return opener * depth + inner + closer * depth


# JSON texts where parsers and converters tend to break: syntax, depth, numbers past every type, duplicate and
# control-character keys, lone surrogates, wrong JSON types for a message, and sizes past the caps.
HOSTILE_JSON_TEXTS: tuple[str, ...] = (
    "", " ", "{", "}", "[]", "{}", "null", "0", "true", '"x"', "\ufeff{}", "{} {}", '{"a": 1} trailing',
    '{"orderId": "x",}', "{'orderId': 'x'}", '{"orderId": "x"', "{\n\t\"orderId\": \"x\"\r\n}",
    "NaN", "Infinity", '{"n": NaN}', '{"n": Infinity}', '{"n": -Infinity}', '{"n": 1e999}', '{"n": -1e999}',
    '{"n": 1e-400}', '{"n": -0}', '{"n": 0.1e1}', '{"n": 01}', '{"n": 1.}', '{"n": .5}', '{"n": +1}',
    '{"n": ' + "9" * 41 + "}", '{"n": ' + "9" * 5_000 + "}", '{"n": "' + "9" * 5_000 + '"}',
    '{"deadlineSeconds": 2147483648}', '{"deadlineSeconds": -2147483649}', '{"deadlineSeconds": 1.5}',
    '{"deadlineSeconds": "NaN"}', '{"deadlineSeconds": "Infinity"}', '{"deadlineSeconds": "1e3"}',
    '{"deadlineSeconds": true}', '{"deadlineSeconds": []}', '{"amount": {"minorUnits": "99999999999999999999"}}',
    '{"amount": {"minorUnits": 1e300}}', '{"amount": []}', '{"amount": "USD"}', '{"items": null}',
    '{"items": {}}', '{"items": [null]}', '{"items": [[[]]]}', '{"orderId": 12}', '{"orderId": null}',
    '{"orderId": ["x"]}', '{"orderId": "a", "orderId": "b"}', '{"orderId": "a", "order_id": "b"}',
    '{"orderId": "\\ud800"}', '{"orderId": "\\udfff\\ud800"}', '{"\\ud800": 1}', '{"\\u0000": 1}',
    '{"a\\nb": 1}', '{"orderId": "\\u0000"}', '{"orderId": "\\u2028"}', '{"orderId": "\\u001b[31m"}',
    '{"orderId": "x\\naudit actor=mallory action=terminate saga=x outcome=ok"}', '{"@type": "x"}',
    '{"zzUnknownField": 1}', '{"' + "k" * 70_000 + '": 1}', '{"orderId": "' + "o" * 70_000 + '"}',
    _nested(64), _nested(65), _nested(100_000), "[" * 100_000, _nested(5_000, '{"a":', "}"),
    '{"items": ' + _nested(200) + "}", '{"amount": ' + _nested(200, '{"minorUnits":', "}") + "}",
)  # fmt: skip


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),  # NaN and infinities included: json.dumps spells them as JavaScript does
        st.text(st.characters(codec="utf-8"), max_size=20),
        st.sampled_from(_SPECIAL_STRINGS),
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
        ),
        max_leaves=12,
    )


@functools.cache
def hostile_json() -> st.SearchStrategy[str]:
    """Hostile JSON text: the fixed cases above, and random JSON values (NaN and huge numbers among them)."""
    return st.one_of(st.sampled_from(HOSTILE_JSON_TEXTS), _json_values().map(json.dumps))


# Values a JSON edit puts in place of one value of a valid document.
_HOSTILE_JSON_VALUES: tuple[Any, ...] = (
    None, True, 0, -1, 1.5, -0.0, math.nan, math.inf, -math.inf, 10**400, 2**63, -(2**63) - 1, 2**64, 1e308,
    "", " ", "\x00", "\ud800", "a\u2028b", "9" * 30, "NaN", "Infinity", "1e3", FORGED_LOG_LINE, "é" * 40_000,
    [], {}, [None], {"": None}, {"zzUnknownField": 1}, [[[[[[[[]]]]]]]],
)  # fmt: skip


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document (keys and indexes), the document itself first."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _json_paths(item, (*prefix, index))
    return paths


def _json_edit(pick: int, replacement: Any, how: str) -> Callable[[str], str]:
    """An edit of JSON text: one value (the pick-th path) replaced, a key doubled or added, or wrapped deep."""

    def edit(text: str) -> str:
        try:
            document = json.loads(text)
        except ValueError:
            return text + "}"
        paths = _json_paths(document)
        path = paths[pick % len(paths)]
        if how == "duplicate key" and isinstance(document, dict) and document:
            first = json.dumps(next(iter(document)))
            return text.replace("{", "{" + first + ": null, ", 1)
        if how == "wrap deep":
            return _nested(100, inner=text)
        if not path:
            return json.dumps(replacement)
        holder = document
        for step in path[:-1]:
            holder = holder[step]
        holder[path[-1]] = replacement
        try:
            return json.dumps(document)
        except (ValueError, RecursionError):
            return text

    return edit


# Edits of a valid JSON input, so rules past the parser's are reached: a value set to a hostile one (a NaN,
# a number past int64, a control character, a wrong JSON type, an unknown field), a key doubled, or the whole
# document nested deep.
JSON_NEAR_MISSES: st.SearchStrategy[Callable[[str], str]] = st.builds(
    _json_edit,
    st.integers(0, 2**16),
    st.sampled_from(_HOSTILE_JSON_VALUES),
    st.sampled_from(("value",) * 8 + ("duplicate key", "wrap deep")),
)


def _struct_of(value: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        struct.update(value if isinstance(value, dict) else {"value": value})
    except (ValueError, TypeError):
        # A lone surrogate or a number Python protobuf refuses: a plain string instead.
        struct.update({"value": repr(value)[:100]})
    return struct


def _deep_struct(depth: int) -> struct_pb2.Struct:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return _struct_of(value)


@functools.cache
def hostile_structs() -> st.SearchStrategy[struct_pb2.Struct]:
    """google.protobuf.Struct values: NaN and infinities, control characters in keys, deep or wide ones, and
    random JSON objects."""
    fixed = [
        _struct_of({"n": math.nan}),
        _struct_of({"n": math.inf}),
        _struct_of({"n": -math.inf}),
        _struct_of({"n": 1e308, "m": -1e308}),
        _struct_of({"\x00": 1}),
        _struct_of({"a\nb": "x"}),
        _struct_of({"k": "\x1b[31m"}),
        _struct_of({"orderId": "x" + FORGED_LOG_LINE}),
        _struct_of({"zzUnknownField": 1}),
        _struct_of({"orderId": 12}),
        _struct_of({"items": {"sku": "BOOK-001"}}),
        _struct_of({f"k{i}": i for i in range(5_000)}),
        _struct_of({"orderId": "o" * 70_000}),
        _deep_struct(20),
        _deep_struct(31),
        _deep_struct(40),
    ]
    return st.one_of(
        st.sampled_from(fixed), st.dictionaries(st.text(max_size=12), _json_values(), max_size=5).map(_struct_of)
    )


@functools.cache
def _hostile_bytes(*, huge: bool = True) -> st.SearchStrategy[bytes]:
    branches = [
        st.binary(max_size=48),
        st.sampled_from(list(MALFORMED_WIRE.values())),
        st.sampled_from(_INVALID_UTF8),
    ]
    if huge:
        branches.append(
            st.builds(
                lambda size, byte: byte * size, st.sampled_from(HUGE_SIZES), st.sampled_from((b"\x00", b"\xff", b"a"))
            )
        )
    return st.one_of(branches)


@functools.cache
def _integers(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field.cpp_type]
    interesting = sorted({v for v in (*_INTERESTING_INTS, low, high, low + 1, high - 1) if low <= v <= high})
    return st.one_of(st.sampled_from(interesting), st.integers(low, high))


@functools.cache
def _enums(enum: EnumDescriptor) -> st.SearchStrategy[int]:
    numbers = [v.number for v in enum.values]
    outside = [-1, max(numbers) + 1, max(numbers) + 100, 2**31 - 1, -(2**31)]
    return st.one_of(st.sampled_from(numbers), st.sampled_from(outside), st.integers(-(2**31), 2**31 - 1))


_TIMESTAMP_SECONDS = (
    0, 1, -1, 1_700_000_000, 253_402_300_799, 253_402_300_800, -62_135_596_800, -62_135_596_801,
    4_611_686_018_427_387_904, 2**63 - 1, -(2**63), 2**62 - 1, 9_999_999_999_999,
)  # fmt: skip
_NANOS = (0, 1, 999_999_999, 1_000_000_000, -1, -999_999_999, -1_000_000_000, 2**31 - 1, -(2**31))
_DURATION_SECONDS = (
    0,
    1,
    -1,
    315_576_000_000,
    315_576_000_001,
    -315_576_000_000,
    -315_576_000_001,
    2**63 - 1,
    -(2**63),
)


@functools.cache
def hostile_timestamps() -> st.SearchStrategy[tuple[int, int]]:
    """(seconds, nanos) of a Timestamp: past year 9999, before year 1, nanos -1 and 1e9, int64 limits."""
    return st.tuples(
        st.one_of(st.sampled_from(_TIMESTAMP_SECONDS), st.integers(-(2**63), 2**63 - 1)),
        st.one_of(st.sampled_from(_NANOS), st.integers(-(2**31), 2**31 - 1)),
    )


@functools.cache
def hostile_durations() -> st.SearchStrategy[tuple[int, int]]:
    """(seconds, nanos) of a google.protobuf.Duration: past ±10,000 years, nanos out of range or of the other sign."""
    return st.tuples(
        st.one_of(st.sampled_from(_DURATION_SECONDS), st.integers(-(2**63), 2**63 - 1)),
        st.one_of(st.sampled_from(_NANOS), st.integers(-(2**31), 2**31 - 1)),
    )


_TYPE_URL_PREFIX = "type.googleapis.com/"
_BOGUS_TYPE_URLS = (
    "", "/", _TYPE_URL_PREFIX, "sagasuite.orchestrator.v1.PlaceOrderRequest",
    "example.com/sagasuite.orchestrator.v1.PlaceOrderRequest", _TYPE_URL_PREFIX + "no.such.Type",
    _TYPE_URL_PREFIX + "google.protobuf.Any", _TYPE_URL_PREFIX + "google.protobuf.Timestamp",
    _TYPE_URL_PREFIX + "sagasuite.orchestrator.v1.PlaceOrderRequest\x00", _TYPE_URL_PREFIX + "a" * 1_000_000,
    _TYPE_URL_PREFIX + "sagasuite.orchestrator.v1.PlaceOrderRequest" + "/" * 5_000,
)  # fmt: skip


@functools.cache
@st.composite
def hostile_any(draw: st.DrawFn, depth: int = 0) -> any_pb2.Any:
    """A google.protobuf.Any: a bogus or huge type_url, a value that is malformed, huge, or a hostile known message."""
    kind = draw(st.sampled_from(("bogus", "packed", "packed", "mismatched")))
    packed = any_pb2.Any()
    if kind == "bogus":
        packed.type_url = draw(st.one_of(st.sampled_from(_BOGUS_TYPE_URLS), hostile_strings()))
        packed.value = draw(_hostile_bytes())
        return packed
    descriptor = draw(st.sampled_from(_contract_messages()))
    inner = draw(messages(descriptor, depth=depth + 1)) if depth < 2 else message_class(descriptor)()
    packed.type_url = _TYPE_URL_PREFIX + descriptor.full_name
    packed.value = inner.SerializeToString()
    if kind == "mismatched":
        # A right-looking type_url whose value is bytes that are not that message.
        packed.value = draw(_hostile_bytes())
    return packed


@functools.cache
def field_values(field: FieldDescriptor, *, depth: int = 0, huge: bool = True) -> st.SearchStrategy[Any]:
    """Hostile values for one (non-repeated) field, by its type; messages come as Message instances."""
    if field.message_type is not None:
        name = field.message_type.full_name
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            pairs = hostile_timestamps() if name.endswith("Timestamp") else hostile_durations()
            cls = message_class(field.message_type)
            return pairs.map(lambda pair: cls(seconds=pair[0], nanos=pair[1]))
        if name == "google.protobuf.Any":
            return hostile_any(depth)
        if name == "google.protobuf.Struct":
            return st.one_of(hostile_structs(), messages(field.message_type, depth=depth + 1))
        return messages(field.message_type, depth=depth + 1)
    if holds_json(field):
        return st.one_of(hostile_json(), hostile_strings(huge=huge))
    if field.type == FieldDescriptor.TYPE_STRING:
        return hostile_strings(huge=huge)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _hostile_bytes(huge=huge)
    if field.enum_type is not None:
        return _enums(field.enum_type)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return st.floats(width=32 if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT else 64)
    return _integers(field)


@st.composite
def _repeated_mutation(draw: st.DrawFn, field: FieldDescriptor, base: Sequence[Any]) -> list[Any]:
    """A hostile list for a repeated field of a base request: half the time thousands of copies of one of its
    valid elements, else what any repeated field gets."""
    copy_valid: bool = len(base) > 0 and draw(st.booleans())
    if copy_valid:
        return _copies(base[draw(st.integers(0, len(base) - 1))], draw(_COUNTS))
    return draw(_repeated_hostile_values(field, 1))


_COUNTS = st.sampled_from((101, 501, 1_000, 5_000, 20_000))


@functools.cache
def _repeated_hostile_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[list[Any]]:
    """A hostile list for a repeated field: empty, a few hostile elements, or thousands of elements."""
    counts = _COUNTS
    same = st.builds(_copies, field_values(field, depth=depth, huge=False), counts)
    branches = [st.just([]), st.lists(field_values(field, depth=depth), min_size=1, max_size=3), same]
    if field.type == FieldDescriptor.TYPE_STRING:
        # Thousands of distinct values, so a duplicate check cannot stop at the second one.
        branches.append(
            st.builds(
                lambda value, count: [f"{value}{i}" for i in range(count)],
                st.sampled_from(("SKU-", "BOOK-", "")),
                counts,
            )
        )
    return st.one_of(branches)


def _size(value: Any) -> int:
    if isinstance(value, Message):
        return value.ByteSize()
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    return 10


# Repeated values stay under about this many bytes in all, so a list tests counts, not the message size limit.
_LIST_BYTES = 900_000


def _copies(value: Any, count: int) -> list[Any]:
    return [value] * max(1, min(count, _LIST_BYTES // max(1, _size(value))))


def _elements(message: Message, field: FieldDescriptor) -> list[Any]:
    """A repeated field's elements; a map's as entry messages (iterating a map gives only its keys)."""
    current = getattr(message, field.name)
    if field.message_type is None or not field.message_type.GetOptions().map_entry:
        return list(current)
    entry_class = message_factory.GetMessageClass(field.message_type)
    value_field = field.message_type.fields_by_name["value"]
    entries = []
    for key in current:
        entry: Any = entry_class(key=key)  # a map entry class, made at run time
        if value_field.message_type is not None:
            entry.value.CopyFrom(current[key])
        else:
            entry.value = current[key]
        entries.append(entry)
    return entries


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set one field of message to value (a list for a repeated field), replacing what was there."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        container = getattr(message, field.name)
        container.clear()
        key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        for entry in value:
            if value_field.message_type is not None:
                container[getattr(entry, key_field.name)].CopyFrom(getattr(entry, value_field.name))
            else:
                container[getattr(entry, key_field.name)] = getattr(entry, value_field.name)
        return
    if field.is_repeated:
        container = getattr(message, field.name)
        del container[:]
        container.extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


@functools.cache
def messages(descriptor: Descriptor, *, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of any type with any fields set to hostile values; nesting stops after three levels."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_class(descriptor)()
        if depth > 3:
            return message
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            value = draw(
                _repeated_hostile_values(field, depth) if field.is_repeated else field_values(field, depth=depth)
            )
            try:
                _assign(message, field, value)
            except (ValueError, TypeError):
                # A closed enum or a map key type refuses the value in Python; the wire variants cover it.
                continue
        return message

    return build()


@functools.cache
def _unknown_numbers(descriptor: Descriptor) -> list[int]:
    return [n for n in _UNKNOWN_CANDIDATES if n not in descriptor.fields_by_number]


@functools.cache
@st.composite
def unknown_fields(draw: st.DrawFn, descriptor: Descriptor) -> tuple[bytes, str]:
    """Wire records of field numbers the message does not declare: a few, thousands, a ~1 MiB one, or groups."""
    number = draw(st.sampled_from(_unknown_numbers(descriptor)))
    kind = draw(st.sampled_from(("few", "many", "huge", "group", "nested group")))
    if kind == "few":
        records = [
            tag(number, VARINT) + varint(draw(st.integers(-(2**63), 2**64 - 1))),
            tag(number + 1, I64) + b"\x01" * 8,
            tag(number + 2, I32) + b"\x01" * 4,
            delimited(number + 3, draw(st.binary(max_size=32))),
        ]
        return b"".join(records), f"unknown fields {number}..{number + 3}"
    if kind == "many":
        count = draw(st.sampled_from((1_000, 10_000, 100_000)))
        return (tag(number, VARINT) + b"\x01") * count, f"{count} unknown varints of field {number}"
    if kind == "huge":
        size = draw(st.sampled_from((65_537, 500_000, 1_000_000)))
        return delimited(number, b"u" * size), f"unknown field {number} of {size} bytes"
    depth = draw(st.sampled_from((2, 50, 99)))
    inner = tag(number, SGROUP) * depth + (delimited(1, b"x" * 1000)) + tag(number, EGROUP) * depth
    if kind == "nested group":
        return inner * 100, f"100 unknown groups {depth} deep of field {number}"
    return inner, f"unknown group {depth} deep of field {number}"


# -- what no server may accept -------------------------------------------------------------------

# Characters no text field takes: C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_FORBIDDEN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_FORBIDDEN_JSON_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
_TIMESTAMP_RANGE = (-62_135_596_800, 253_402_300_799)  # 0001-01-01 to 9999-12-31, as the protobuf docs define
_DURATION_RANGE = (-315_576_000_000, 315_576_000_000)  # about ±10,000 years


def unacceptable(message: Message, prefix: str = "") -> list[tuple[str, str]]:
    """Values in the message that a server must refuse whatever the field: control characters in text,
    Timestamps and Durations out of their documented range, enum numbers the enum does not declare.
    Packed Any values of the contracts' types are looked into too. Returns (field path, what is wrong)."""
    found: list[tuple[str, str]] = []
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            for key, item in value.items():
                found += _unacceptable_value(key_field, key, f"{name}[{key!r}] (key)")
                found += _unacceptable_value(value_field, item, f"{name}[{key!r}]")
            continue
        values = list(value) if field.is_repeated else [value]
        for index, item in enumerate(values):
            where = f"{name}[{index}]" if field.is_repeated else name
            found += _unacceptable_value(field, item, where)
    return found


def _unacceptable_value(field: FieldDescriptor, value: Any, where: str) -> list[tuple[str, str]]:
    if field.type == FieldDescriptor.TYPE_STRING:
        # JSON text may be laid out with tabs and line breaks between its tokens (a pretty-printed file):
        # what it holds is checked once parsed, where a control character is refused like anywhere else.
        bad = (_FORBIDDEN_JSON_TEXT if holds_json(field) else _FORBIDDEN_TEXT).search(value)
        return [(where, f"control character {bad.group()!r}")] if bad else []
    if field.enum_type is not None:
        return (
            [] if value in field.enum_type.values_by_number else [(where, f"{value} is not a {field.enum_type.name}")]
        )
    if field.message_type is None:
        return []
    name = field.message_type.full_name
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        low, high = _TIMESTAMP_RANGE if name.endswith("Timestamp") else _DURATION_RANGE
        low_nanos = 0 if name.endswith("Timestamp") else -999_999_999
        if not low <= value.seconds <= high or not low_nanos <= value.nanos <= 999_999_999:
            return [(where, f"{{seconds: {value.seconds} nanos: {value.nanos}}} is out of range")]
        if name.endswith("Duration") and value.seconds * value.nanos < 0:
            return [(where, "seconds and nanos of opposite signs")]
        return []
    if name == "google.protobuf.Any":
        inner = _unpacked(value)
        return unacceptable(inner, f"{where}<{inner.DESCRIPTOR.name}>.") if inner is not None else []
    return unacceptable(value, f"{where}.")


# -- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostileRequest:
    """Bytes to send as a request, how they were made, and the message they decode to when they are one."""

    wire: bytes
    kind: str  # "mutation", "random" or "malformed"
    note: str
    message: Message | None = None
    base_key: str = ""  # the fresh business key of the base request it came from, if any

    def text(self, limit: int = 1500) -> str:
        """The request in text format with long values cut short, or its hex when it is not a message."""
        if self.message is None or self.kind == "malformed":
            shown = self.wire[:96].hex(" ")
            more = f" … ({len(self.wire)} bytes)" if len(self.wire) > 96 else ""
            return f"hex: {shown}{more}"
        try:
            text = text_format.MessageToString(_shortened(self.message), as_one_line=True)
        except (DecodeError, UnicodeError) as error:
            text = f"(not printable as text: {error}) hex: {self.wire[:96].hex(' ')}"
        if len(text) > limit:
            text = text[:limit] + " …"
        return f"{text}  ({len(self.wire)} bytes on the wire)"


def _shortened(message: Message) -> Message:
    """A copy with long strings and bytes cut, and long repeated fields cut to three elements, for display;
    a packed message of the contracts is shortened inside its Any."""
    if isinstance(message, any_pb2.Any):
        inner = _unpacked(message)
        if inner is not None:
            return any_pb2.Any(type_url=message.type_url, value=_shortened(inner).SerializeToString())
        # Text format would try to expand the Any; keep only its type_url and a hint of its bytes.
        return any_pb2.Any(type_url=_cut(message.type_url))
    copy = type(message)()
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            # A map (a Struct's fields): its first three entries, keys cut like any string.
            holder = getattr(copy, field.name)
            for key in list(value)[:3]:
                if field.message_type.fields_by_name["value"].message_type is not None:
                    holder[_cut(key)].CopyFrom(_shortened(value[key]))
                else:
                    holder[_cut(key)] = _cut(value[key])
        elif field.is_repeated:
            shown = list(value)[:3]
            if field.message_type is not None:
                getattr(copy, field.name).extend([_shortened(v) for v in shown])
            else:
                getattr(copy, field.name).extend([_cut(v) for v in shown])
        elif field.message_type is not None:
            getattr(copy, field.name).CopyFrom(_shortened(value))
        else:
            setattr(copy, field.name, _cut(value))
    return copy


def _unpacked(packed: any_pb2.Any) -> Message | None:
    """The message an Any holds, when its type is one of the contracts' and its bytes parse."""
    for descriptor in _contract_messages():
        if packed.type_url == _TYPE_URL_PREFIX + descriptor.full_name:
            inner = message_class(descriptor)()
            try:
                inner.ParseFromString(packed.value)
            except DecodeError:
                return None
            return inner
    return None


def _cut(value: Any) -> Any:
    marker = f"…<{len(value)}>" if isinstance(value, str | bytes) and len(value) > 64 else ""
    if marker and isinstance(value, str):
        return value[:40] + marker
    if marker and isinstance(value, bytes):
        return value[:40] + marker.encode()
    return value


def _serialize(message: Message) -> bytes | None:
    try:
        return message.SerializeToString()
    except (ValueError, UnicodeError, OverflowError):
        return None


@functools.cache
@st.composite
def malformed_requests(draw: st.DrawFn, descriptor: Descriptor, base: Base | None = None) -> HostileRequest:
    """Bytes that are not a valid message: fixed malformed encodings, invalid UTF-8 in any string field,
    wrong wire types, and a valid base request truncated or followed by garbage."""
    base_message, base_key = base() if base is not None else (message_class(descriptor)(), "")
    valid = base_message.SerializeToString()
    kind = draw(st.sampled_from(("fixed", "utf8", "utf8", "wire type", "truncated", "suffix")))
    if kind == "fixed":
        note, wire = draw(st.sampled_from(sorted(MALFORMED_WIRE.items())))
    elif kind in ("utf8", "wire type"):
        records = invalid_utf8_records(descriptor) if kind == "utf8" else _wrong_wire_type_records(descriptor)
        if not records:
            records = sorted(MALFORMED_WIRE.items())
        note, record = draw(st.sampled_from(records))
        # A valid request followed by one bad record, so every earlier byte parses.
        wire = valid + record
    elif kind == "truncated" and len(valid) > 1:
        # Drawn independently of the length (fresh ids make it vary), so generation stays reproducible.
        cut = 1 + draw(st.integers(0, 2**16)) % (len(valid) - 1)
        note, wire = f"valid request cut to {cut} of {len(valid)} bytes", valid[:cut]
    else:
        suffix_note, suffix = draw(st.sampled_from(sorted(MALFORMED_WIRE.items())))
        note, wire = f"valid request + {suffix_note}", valid + suffix
    return HostileRequest(wire, "malformed", note, _parsed(descriptor, wire), base_key)


def _parsed(descriptor: Descriptor, wire: bytes) -> Message | None:
    message = message_class(descriptor)()
    try:
        message.ParseFromString(wire)
    except (DecodeError, RecursionError):
        return None
    return message


@dataclass(frozen=True)
class _Step:
    field: FieldDescriptor
    index: int | None  # the element of a repeated message field the path goes into


def _paths(descriptor: Descriptor, base: Message | None, depth: int = 3) -> list[tuple[_Step, ...]]:
    """Every field a mutation may target, set or not, through message fields and base's list elements."""
    paths: list[tuple[_Step, ...]] = []
    for field in descriptor.fields:
        paths.append((_Step(field, None),))
        sub = field.message_type
        if sub is None or sub.full_name in _WELL_KNOWN or sub.GetOptions().map_entry or depth <= 1:
            continue
        if field.is_repeated:
            present = len(getattr(base, field.name)) if base is not None else 0
            for index in range(max(1, min(present, 2))):
                element = getattr(base, field.name)[index] if index < present else None
                paths += [(_Step(field, index), *rest) for rest in _paths(sub, element, depth - 1)]
        else:
            inner = getattr(base, field.name) if base is not None and base.HasField(field.name) else None
            paths += [(_Step(field, None), *rest) for rest in _paths(sub, inner, depth - 1)]
    return paths


def _describe(path: Sequence[_Step]) -> str:
    return ".".join(s.field.name + (f"[{s.index}]" if s.index is not None else "") for s in path)


def _navigate(message: Message, path: Sequence[_Step]) -> Message:
    """The message that holds the last field of path, creating list elements on the way."""
    for step in path[:-1]:
        if step.index is not None:
            container = getattr(message, step.field.name)
            while len(container) <= step.index:
                container.add()
            message = container[step.index]
        else:
            message = getattr(message, step.field.name)
    return message


@st.composite
def _mutate_any(draw: st.DrawFn, packed: any_pb2.Any) -> tuple[any_pb2.Any, str] | None:
    """The packed message with one field mutated and packed again, when its type is a known one."""
    inner = _unpacked(packed)
    if inner is None:
        return None
    message, note = draw(_mutated_copy(cast(Descriptor, inner.DESCRIPTOR), inner))
    repacked = any_pb2.Any(type_url=packed.type_url, value=_serialize(message) or b"")
    return repacked, f"inside the packed {inner.DESCRIPTOR.name}: {note}"


_ACTIONS = st.sampled_from(("value", "value", "value", "clear", "unknown"))


@st.composite
def _mutated_copy(draw: st.DrawFn, descriptor: Descriptor, base: Message) -> tuple[Message, str]:
    """A copy of base with one field (at any depth) set to a hostile value, cleared, or given unknown fields."""
    message = type(base)()
    message.CopyFrom(base)
    paths = _paths(descriptor, base)
    path = paths[draw(st.integers(0, len(paths) - 1))]
    holder = _navigate(message, path)
    field = path[-1].field
    name = _describe(path)
    action = draw(_ACTIONS)
    if action == "clear":
        holder.ClearField(field.name)
        return message, f"{name} cleared"
    if action == "unknown" and field.message_type is not None and not field.is_repeated:
        record, note = draw(unknown_fields(field.message_type))
        try:
            getattr(holder, field.name).MergeFromString(record)
        except DecodeError:
            # Groups nested this deep inside a nested message pass the parser's depth limit: not a message.
            return message, f"{name} unchanged ({note} would be too deep)"
        return message, f"{name} carries {note}"
    if field.is_repeated:
        elements = draw(_repeated_mutation(field, _elements(holder, field)))
        _assign(holder, field, elements)
        return message, f"{name} = {len(elements)} elements, first {abbreviate(elements[0]) if elements else '-'}"
    if (
        field.message_type is not None
        and field.message_type.full_name == "google.protobuf.Any"
        and holder.HasField(field.name)
    ):
        mutated = draw(_mutate_any(getattr(holder, field.name))) if draw(st.booleans()) else None
        if mutated is not None:
            getattr(holder, field.name).CopyFrom(mutated[0])
            return message, f"{name}: {mutated[1]}"
    if field.type == FieldDescriptor.TYPE_STRING and draw(st.booleans()):
        # Half the time a near miss of the valid value, so each rule past the shape checks is reached;
        # for JSON text, half of those edit the document rather than its characters.
        edits = JSON_NEAR_MISSES if holds_json(field) and draw(st.booleans()) else NEAR_MISSES
        value = draw(edits)(getattr(holder, field.name) or "x")
    else:
        value = draw(field_values(field, depth=1))
    try:
        _assign(holder, field, value)
    except (ValueError, TypeError):
        return message, f"{name} unchanged ({abbreviate(value)} refused by Python protobuf)"
    shown = (
        text_format.MessageToString(_shortened(value), as_one_line=True)
        if isinstance(value, Message)
        else abbreviate(value)
    )
    return message, f"{name} = {shown[:200]}"


@functools.cache
@st.composite
def mutations(draw: st.DrawFn, descriptor: Descriptor, base: Base) -> HostileRequest:
    """A valid base request with one hostile change, so validation past the first rule is exercised; at times
    unknown fields are appended to the whole request too."""
    base_message, base_key = base()
    message, note = draw(_mutated_copy(descriptor, base_message))
    wire = _serialize(message)
    if wire is None:
        message, wire, note = base_message, base_message.SerializeToString(), f"{note} (unserializable: base sent)"
    if draw(st.integers(0, 9)) == 0:
        record, unknown_note = draw(unknown_fields(descriptor))
        wire += record
        note += f"; plus {unknown_note}"
    return HostileRequest(wire, "mutation", note, message, base_key)


@functools.cache
@st.composite
def random_requests(draw: st.DrawFn, descriptor: Descriptor) -> HostileRequest:
    """A message with any fields set to hostile values, at times followed by unknown fields."""
    message = draw(messages(descriptor))
    wire = _serialize(message) or b""
    note = "random message"
    if draw(st.integers(0, 4)) == 0:
        record, unknown_note = draw(unknown_fields(descriptor))
        wire += record
        note += f" plus {unknown_note}"
    return HostileRequest(wire, "random", note, message)


@functools.cache
@st.composite
def requests(draw: st.DrawFn, descriptor: Descriptor, base: Base | None = None) -> HostileRequest:
    """Hostile requests for one message type: half one-field mutations of the base (when there is one),
    the rest random messages with any fields set, and malformed bytes."""
    kind = draw(st.sampled_from(_KINDS if base is not None else _KINDS_WITHOUT_BASE))
    if kind == "mutation" and base is not None:
        return draw(mutations(descriptor, base))
    if kind == "random":
        return draw(random_requests(descriptor))
    return draw(malformed_requests(descriptor, base))


_KINDS = ("mutation",) * 5 + ("random",) * 3 + ("malformed",) * 2
_KINDS_WITHOUT_BASE = ("random",) * 3 + ("malformed",) * 2
