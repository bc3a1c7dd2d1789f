"""Where the kit's definition comes from: a YAML file (the declarative loader) or a Python `module:attribute`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from orchestrator.definition import SagaDefinition

__all__ = ["DEFAULT_KEY_FIELD", "DefinitionSource", "json_inputs", "load_definition"]

DEFAULT_KEY_FIELD = "order_id"
_YAML_SUFFIXES = (".yaml", ".yml")
# The example's own key is kept as a prefix (clipped), so the services' logs show where an entity came from.
_KEY_PREFIX_LENGTH = 40


@dataclass(frozen=True)
class DefinitionSource:
    """A definition to check and the maker of its fresh inputs."""

    definition: SagaDefinition
    make_input: Callable[[str], Message]


def json_inputs(
    definition: SagaDefinition, example: str, key_field: str = DEFAULT_KEY_FIELD
) -> Callable[[str], Message]:
    """make_input from a JSON example of the definition's input: the example with key_field made unique.

    Raises ValueError when the JSON is not the input message or key_field is not one of its string fields.
    """
    input_type = definition.input_type
    try:
        template = json_format.Parse(example, input_type())
    except json_format.ParseError as error:
        raise ValueError(f"the input is not a JSON {input_type.DESCRIPTOR.full_name}: {error}") from None
    field = input_type.DESCRIPTOR.fields_by_name.get(key_field)
    if field is None or field.type != FieldDescriptor.TYPE_STRING or field.is_repeated:
        strings = sorted(
            f.name for f in input_type.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated
        )
        raise ValueError(
            f"{input_type.DESCRIPTOR.full_name} has no string field {key_field!r} to make unique; "
            f"choose one of {', '.join(strings) or '(none)'}"
        )
    prefix = str(getattr(template, key_field))[:_KEY_PREFIX_LENGTH] or "conformance"

    def make_input(unique: str) -> Message:
        fresh = input_type()
        fresh.CopyFrom(template)
        setattr(fresh, key_field, f"{prefix}-{unique}")
        return fresh

    return make_input


def load_definition(
    spec: str, *, example: str = "", key_field: str = DEFAULT_KEY_FIELD, targets: Mapping[str, str] | None = None
) -> DefinitionSource:
    """The definition named by spec: a path ending in .yaml/.yml, or `package.module:ATTRIBUTE`.

    A YAML file is compiled as the orchestrator compiles it (orchestrator.declarative), a child it
    starts from the files beside it, a contract it reflects from targets (service name -> host:port);
    its inputs come from its own `saga.example` unless example (JSON) is given. A Python definition
    needs example. key_field names the string field of an example made unique for each check.
    Raises ValueError with what is wrong and how to fix it.
    """
    if spec.endswith(_YAML_SUFFIXES):
        return _from_yaml(Path(spec), example, key_field, targets or {})
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{spec!r}: give a YAML file (*.yaml, *.yml) or a Python definition as module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{spec!r}: cannot import {module_name} ({error})") from None
    definition = getattr(module, attribute, None)
    if not isinstance(definition, SagaDefinition):
        found = "nothing" if definition is None else f"a {type(definition).__name__}"
        raise ValueError(f"{spec!r}: {module_name}.{attribute} is {found}, not a SagaDefinition")
    if not example:
        raise ValueError(
            f"{spec!r} is a Python definition: give --input FILE, a JSON example of its input "
            f"({definition.input_type.DESCRIPTOR.full_name})"
        )
    return DefinitionSource(definition, json_inputs(definition, example, key_field))


def _from_yaml(path: Path, example: str, key_field: str, targets: Mapping[str, str]) -> DefinitionSource:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    from orchestrator.declarative.compiler import DefinitionFileError, LoadedDefinition, compile_file
    from orchestrator.declarative.folder import compile_files

    # A definition that reflects its contract reads it from the targets, as the orchestrator from discovery.
    resolve = targets.get
    loaded: LoadedDefinition
    try:
        loaded = compile_file(path, resolve_address=resolve)
    except DefinitionFileError as alone:
        # It may start a child defined beside it: the folder's files, compiled in the order their children need.
        siblings = sorted(p for p in path.parent.iterdir() if p.suffix in _YAML_SUFFIXES and p.is_file())
        try:
            everything = compile_files(siblings, {}, resolve_address=resolve)
        except DefinitionFileError:
            # Its own problems, each with file:line:column, what is wrong and how to fix it.
            raise ValueError(str(alone)) from None
        loaded = next(item for item in everything if item.path.resolve() == path.resolve())
    make_input: Callable[[str], Message] = loaded.make_input
    if example:
        make_input = json_inputs(loaded.definition, example, key_field)
    return DefinitionSource(loaded.definition, make_input)
