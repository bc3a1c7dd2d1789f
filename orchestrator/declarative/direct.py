"""Requests whose arguments are literals and plain field paths, built by copying fields instead of running jq."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from orchestrator.declarative.expressions import as_expression_text, is_expression
from orchestrator.definition import Node, SagaContext, Step

__all__ = ["direct_builder"]

_INPUT_PATH = re.compile(r"^\s*((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*$")
_RESULT_PATH = re.compile(r"^\s*\$results\.([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*$")


@dataclass(frozen=True)
class _Copy:
    target: tuple[str, ...]  # the field path in the request
    step: str  # "" for the input, else the call step whose response it reads
    source: tuple[str, ...]


def _field(descriptor: Any, name: str) -> Any:
    return descriptor.fields_by_name.get(name)


def _same_type(a: Any, b: Any) -> bool:
    if a.is_repeated != b.is_repeated or a.type != b.type:
        return False
    if a.message_type is not None or b.message_type is not None:
        if a.message_type is None or b.message_type is None:
            return False
        if a.message_type.GetOptions().map_entry:
            return False
        return bool(a.message_type.full_name == b.message_type.full_name)
    if a.enum_type is not None or b.enum_type is not None:
        return a.enum_type is not None and b.enum_type is not None and a.enum_type.full_name == b.enum_type.full_name
    return True


def _resolve(descriptor: Any, path: tuple[str, ...]) -> Any:
    """The field a path of proto names ends on, through singular message fields only; None otherwise."""
    field = None
    current = descriptor
    for position, name in enumerate(path):
        if current is None:
            return None
        field = _field(current, name)
        if field is None or (field.is_repeated and position < len(path) - 1):
            return None
        current = field.message_type
    return field


def direct_builder(
    arguments: Any, message_type: type[Message], input_descriptor: Any, visible: Mapping[str, Node]
) -> Callable[[SagaContext], Message] | None:
    """A builder that copies fields, when every argument is a literal or a field path of the same type; else None.

    It builds the same message as the jq path would (a field read by jq and written back through
    the JSON mapping keeps its value), only without the JSON round trip.
    """
    copies: list[_Copy] = []
    literals: dict[str, Any] = {}
    if not isinstance(arguments, dict):
        return None
    if not _plan(arguments, message_type.DESCRIPTOR, (), input_descriptor, visible, copies, literals):
        return None
    template = message_type()
    try:
        json_format.ParseDict(literals, template)
    except json_format.ParseError:
        return None
    steps = {copy.step for copy in copies if copy.step}

    def build(context: SagaContext) -> Message:
        request = message_type()
        request.CopyFrom(template)
        sources: dict[str, Message] = {"": context.input}
        for step in steps:
            if context.has_result(step):
                sources[step] = context.result(step)
        for copy in copies:
            source = sources.get(copy.step)
            if source is None:
                continue
            _apply(request, copy, source)
        return request

    return build


def _plan(
    arguments: dict[Any, Any],
    descriptor: Any,
    prefix: tuple[str, ...],
    input_descriptor: Any,
    visible: Mapping[str, Node],
    copies: list[_Copy],
    literals: dict[str, Any],
) -> bool:
    for raw_name, value in arguments.items():
        name = str(raw_name)
        target = _field(descriptor, name)
        if target is None:
            return False  # a JSON name, or no such field: the jq path reports it
        if is_expression(value):
            body, _ = as_expression_text(str(value))
            input_path = _INPUT_PATH.match(body)
            result_path = _RESULT_PATH.match(body)
            if input_path:
                source_path = tuple(part for part in input_path.group(1).split(".") if part)
                source = _resolve(input_descriptor, source_path)
                step = ""
            elif result_path:
                step = result_path.group(1)
                node = visible.get(step)
                if not isinstance(node, Step):
                    return False
                source_path = tuple(part for part in result_path.group(2).split(".") if part)
                source = _resolve(node.action.response_type.DESCRIPTOR, source_path)
            else:
                return False
            if source is None or not _same_type(source, target):
                return False
            copies.append(_Copy((*prefix, name), step, source_path))
        elif isinstance(value, dict):
            if target.message_type is None or target.is_repeated:
                return False
            inner: dict[str, Any] = {}
            if not _plan(value, target.message_type, (*prefix, name), input_descriptor, visible, copies, inner):
                return False
            if inner:
                literals[name] = inner
            elif not any(copy.target[: len(prefix) + 1] == (*prefix, name) for copy in copies):
                literals[name] = {}
        elif isinstance(value, str | int | float | bool):
            literals[name] = value if isinstance(value, bool | int | float) else str(value)
        else:
            return False
    return True


def _apply(request: Message, copy: _Copy, source: Message) -> None:
    value: Any = source
    for name in copy.source:
        if _is_message_field(value, name) and not value.HasField(name):
            return  # absent: jq would read null and leave the field unset
        value = getattr(value, name)
    holder: Any = request
    for name in copy.target[:-1]:
        holder = getattr(holder, name)
    last = copy.target[-1]
    field = holder.DESCRIPTOR.fields_by_name[last]
    if field.is_repeated:
        getattr(holder, last).extend(value)
    elif field.message_type is not None:
        getattr(holder, last).CopyFrom(value)
    else:
        if field.has_presence and not _has(source, copy.source):
            return
        setattr(holder, last, value)


def _is_message_field(message: Any, name: str) -> bool:
    field = message.DESCRIPTOR.fields_by_name[name]
    return field.message_type is not None and not field.is_repeated


def _has(source: Message, path: tuple[str, ...]) -> bool:
    value: Any = source
    for name in path[:-1]:
        value = getattr(value, name)
    return bool(value.HasField(path[-1]))
