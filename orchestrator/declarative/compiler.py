"""A YAML saga file, checked against its schema and its contract, compiled into a SagaDefinition."""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from google.protobuf import json_format
from google.protobuf.message import Message
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from orchestrator.declarative.contracts import (
    Contract,
    ContractError,
    check_path,
    contract_from_files,
    field_names,
    read_descriptor_set,
    reflect_descriptor_set,
    sample,
    to_jq,
)
from orchestrator.declarative.direct import direct_builder
from orchestrator.declarative.expressions import (
    Expression,
    ExpressionError,
    FieldPath,
    as_expression_text,
    compile_program,
    is_expression,
    scan,
)
from orchestrator.definition import (
    SIGNAL_NAME,
    Approval,
    Call,
    ChildSaga,
    Node,
    OnTimeout,
    Parallel,
    RequestNotBuilt,
    RetryPolicy,
    SagaContext,
    SagaDefinition,
    Step,
    StepKind,
    Timer,
    WaitForSignal,
)

__all__ = [
    "DefinitionFileError",
    "LoadedDefinition",
    "Problem",
    "RequestNotBuilt",
    "compile_file",
    "schema",
]

SUITE_DESCRIPTOR_SET = "suite"
_MAX_FILE_BYTES = 1 << 20
# A definition is a few hundred values a few levels deep. Aliases can make a small file expand to
# billions of values (a "YAML bomb"), and deep nesting exhausts the recursion of what walks it.
_MAX_VALUES = 100_000
_MAX_DEPTH = 64
# Brackets open at once, counted in the text before YAML reads it: ruamel's scanner slows down with
# the square of flow nesting (seconds at a few thousand), so a deeper file is refused unread.
_MAX_OPEN_BRACKETS = 256
_BRACKET = re.compile(r"[\[\]{}]")
_ISO_DURATION = re.compile(
    r"^P(?:(?P<days>\d+)D)?(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)
_UNITS = {"days": 86400.0, "hours": 3600.0, "minutes": 60.0, "seconds": 1.0, "milliseconds": 0.001}
_PARAMETER_KINDS = {int: "a whole number", float: "a finite number", str: "a string"}
_SIMPLE_PATH = re.compile(r"^\s*((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a definition file, where it is and how to fix it."""

    file: str
    line: int
    column: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.column}: {self.message}"
        return f"{text}\n    {self.hint}" if self.hint else text


class DefinitionFileError(ValueError):
    """A definition file that cannot be loaded, with every problem found in it."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


@dataclass(frozen=True)
class LoadedDefinition:
    """A compiled YAML definition with what the tools need beside it: its file, example and key path."""

    definition: SagaDefinition
    path: Path
    services: frozenset[str]
    example: dict[str, Any] | None = None
    key_path: tuple[str, ...] | None = None
    children: tuple[tuple[str, int], ...] = field(default=())
    version_at: tuple[int, int] = (1, 1)  # line and column of document.version

    def make_input(self, unique: str) -> Message:
        """The example input with its business key made unique, for checks that need a fresh entity."""
        if self.example is None:
            raise ValueError(f"{self.path}: give saga.example, a sample input, to make inputs from")
        if self.key_path is None:
            raise ValueError(f"{self.path}: the business key is not a plain field path, so it cannot be varied")
        value = copy.deepcopy(self.example)
        target: Any = value
        for name in self.key_path[:-1]:
            target = target.setdefault(name, {})
        original = target.get(self.key_path[-1], "")
        target[self.key_path[-1]] = f"{original}-{unique}" if original else unique
        message = self.definition.input_type()
        json_format.ParseDict(value, message)
        return message


def schema() -> dict[str, Any]:
    """The published JSON Schema of a definition file."""
    text = resources.files("orchestrator.declarative").joinpath("saga-definition.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


_VALIDATOR: jsonschema.Draft202012Validator | None = None


def _validator() -> jsonschema.Draft202012Validator:
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = jsonschema.Draft202012Validator(schema())
    return _VALIDATOR


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        match = _ISO_DURATION.match(value)
        if not match or value in ("P", "PT"):
            raise ValueError(f"{value!r} is not an ISO 8601 duration such as PT30S or P1DT2H")
        return sum(float(amount) * _UNITS[unit] for unit, amount in match.groupdict().items() if amount)
    return sum(float(value.get(unit, 0)) * scale for unit, scale in _UNITS.items())


def _visible_result_descriptor(node: Node) -> Any:
    if isinstance(node, Step):
        descriptor: Any = node.action.response_type.DESCRIPTOR
        return descriptor
    return None


def _truthy(value: Any) -> bool:
    return value is not None and value is not False


def results_document(context: SagaContext, names: frozenset[str] | None) -> dict[str, Any]:
    """The stored results an expression reads, as jq sees them ($results)."""
    out: dict[str, Any] = {}
    for name in context.result_names() if names is None else names:
        if not context.has_result(name):
            continue
        node = context.node_of(name)
        if isinstance(node, Step):
            out[name] = to_jq(context.result(name))
        elif isinstance(node, WaitForSignal | Approval):
            out[name] = context.signal(name)
        elif isinstance(node, ChildSaga):
            child = context.child(name)
            out[name] = {
                "saga_id": child.saga_id,
                "business_key": child.business_key,
                "input": to_jq(child.input),
                "results": results_document(child, None),
            }
    return out


def _evaluate(expression: Expression, context: SagaContext) -> Any:
    try:
        return expression.evaluate(
            to_jq(context.input),
            results_document(context, expression.results_read),
            {"id": context.saga_id, "business_key": context.business_key},
        )
    except ValueError as error:  # jq's runtime errors
        raise RequestNotBuilt(f"the expression failed: {str(error)[:300]}") from None


def _message_from(value: Any, message_type: type[Message], what: str) -> Message:
    if not isinstance(value, dict):
        raise RequestNotBuilt(f"{what} must build a JSON object, got {type(value).__name__}")
    message = message_type()
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as error:
        raise RequestNotBuilt(f"{what} is not a {message_type.DESCRIPTOR.full_name}: {str(error)[:300]}") from None
    return message


class _Compiler:
    def __init__(
        self,
        path: Path,
        text: str,
        children: Mapping[tuple[str, int], SagaDefinition],
        resolve_address: Callable[[str], str | None] | None,
        environ: Mapping[str, str],
    ) -> None:
        self.path = path
        self.text = text
        self.children = children
        self.resolve_address = resolve_address
        self.problems: list[Problem] = []
        self.services: set[str] = set()
        self.child_keys: list[tuple[str, int]] = []
        self.names: dict[str, tuple[int, int]] = {}
        self.contract: Contract | None = None
        self.input_descriptor: Any = None
        self.compensatable_after_retriable: list[str] = []
        self.seen_retriable: str | None = None
        self.environ = environ
        self.params: dict[str, Any] = {}

    # -- problems ------------------------------------------------------------------------------

    def problem(self, at: tuple[int, int], message: str, hint: str = "") -> None:
        self.problems.append(Problem(str(self.path), at[0], at[1], message, hint))

    @staticmethod
    def key_at(container: Any, key: Any) -> tuple[int, int]:
        try:
            if isinstance(key, int):
                line, column = container.lc.item(key)
            else:
                line, column = container.lc.key(key)
            return line + 1, column + 1
        except (AttributeError, KeyError, IndexError, TypeError):
            return _Compiler.at(container)

    @staticmethod
    def value_at(container: Any, key: Any) -> tuple[int, int]:
        try:
            line, column = container.lc.item(key) if isinstance(key, int) else container.lc.value(key)
            return line + 1, column + 1
        except (AttributeError, KeyError, IndexError, TypeError):
            return _Compiler.key_at(container, key)

    @staticmethod
    def at(container: Any) -> tuple[int, int]:
        lc = getattr(container, "lc", None)
        return (lc.line + 1, lc.col + 1) if lc is not None else (1, 1)

    def schema_position(self, document: Any, path: list[Any]) -> tuple[int, int]:
        container = document
        position = (1, 1)
        for part in path:
            try:
                position = self.key_at(container, part)
                container = container[part]
            except (KeyError, IndexError, TypeError):
                break
        return position

    # -- the file ------------------------------------------------------------------------------

    def compile(self) -> LoadedDefinition | None:
        deep = _too_many_brackets(self.text)
        if deep is not None:
            self.problem(
                deep,
                f"more than {_MAX_OPEN_BRACKETS} brackets are open here: the file nests too deeply",
                f"a definition nests a few levels, at most {_MAX_DEPTH}",
            )
            return None
        try:
            document = YAML(typ="rt").load(self.text)
        except MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            self.problem((line, column), f"not valid YAML: {error.problem or error.context}", "fix the YAML syntax")
            return None
        except ReaderError as error:  # a control character: YAML refuses it before any token
            position = int(error.position)
            line = self.text.count("\n", 0, position) + 1
            column = position - self.text.rfind("\n", 0, position)
            self.problem(
                (line, column),
                f"not valid YAML: character #x{error.character:04x} is not allowed",
                "remove the control character, or write it as an escape in a double-quoted string",
            )
            return None
        except (YAMLError, RecursionError) as error:
            too_deep = isinstance(error, RecursionError)
            self.problem(
                (1, 1),
                "not valid YAML: it nests too deeply to read" if too_deep else f"not valid YAML: {str(error)[:200]}",
                f"a definition nests a few levels, at most {_MAX_DEPTH}" if too_deep else "fix the YAML syntax",
            )
            return None
        if not isinstance(document, dict):
            self.problem((1, 1), "a definition is a YAML mapping with document, saga and do", "see docs/yaml-sagas.md")
            return None
        oversized = _oversized(document)
        if oversized is not None:
            self.problem(*oversized)
            return None
        for invalid in sorted(_validator().iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
            path = list(invalid.absolute_path)
            hint = "see the schema, docs/saga-definition.schema.json"
            unknown = _unknown_keys(invalid)
            if unknown:
                # Point at the key itself, not at the mapping that holds it.
                path.append(unknown[0])
                allowed = ", ".join(invalid.schema.get("properties", {}))
                hint = f"remove it or fix its spelling; allowed here: {allowed}"
            where = self.schema_position(document, path)
            at = "/".join(map(str, invalid.absolute_path)) or "the file"
            self.problem(where, f"{at}: {_schema_message(invalid)}", hint)
        if self.problems:
            return None
        return self.compile_document(document)

    def compile_document(self, document: Any) -> LoadedDefinition | None:
        head = document["document"]
        saga = document["saga"]
        name = str(head["name"])
        version = int(head["version"])
        self.read_parameters(saga)
        self.contract = self.load_contract(document)
        if self.contract is None:
            return None
        try:
            input_type = self.contract.message_class(str(saga["input"]))
        except ContractError as error:
            self.problem(self.value_at(saga, "input"), str(error), "name a message type the descriptor set holds")
            return None
        self.input_descriptor = input_type.DESCRIPTOR
        key_expression = self.expression(saga, "key", {})
        deadline = self.duration(saga, "deadline") if "deadline" in saga else None
        steps = self.sequence(document["do"], {}, in_branch=False)
        if key_expression is not None:
            self.check_key(saga, key_expression, input_type)
        for flagged in self.compensatable_after_retriable:
            line_column = self.names.get(flagged, (1, 1))
            self.problem(
                line_column,
                f"step {flagged} is compensatable but comes after the retriable step {self.seen_retriable}",
                "compensatable steps come first; once a retriable step runs the saga only goes forward",
            )
        example = saga.get("example")
        if example is not None:
            try:
                json_format.ParseDict(_plain(example), input_type())
            except json_format.ParseError as error:
                self.problem(self.value_at(saga, "example"), f"saga.example is not a {saga['input']}: {error}")
        if self.problems or key_expression is None:
            return None
        key_program = key_expression

        def business_key(message: Message) -> str:
            value = key_program.evaluate(to_jq(message), {}, {})
            return str(value) if value is not None else ""

        simple_key = _SIMPLE_PATH.match(key_program.text)
        if simple_key and _string_path(input_type.DESCRIPTOR, simple_key.group(1)):
            key_fields = [part for part in simple_key.group(1).split(".") if part]

            def business_key(message: Message) -> str:  # the same key, read without jq
                value: Any = message
                for name in key_fields:
                    value = getattr(value, name)
                return str(value)

        # The parameters' values count as content: a running saga's conditions must not change under it.
        parameters = json.dumps(self.params, sort_keys=True).encode()
        # So do the children it starts: a changed child changes its parents, which then need a new
        # version while their sagas run, as the child does.
        children = json.dumps(
            [[n, v, self.children[(n, v)].fingerprint or self.children[(n, v)].source] for n, v in self.child_keys]
        ).encode()
        fingerprint = hashlib.sha256(
            self.text.encode() + b"\0" + self.contract.hash.encode() + b"\0" + parameters + b"\0" + children
        ).hexdigest()
        try:
            definition = SagaDefinition(
                name=name,
                version=version,
                input_type=input_type,
                steps=steps,
                business_key=business_key,
                deadline=deadline,
                source=str(self.path),
                fingerprint=fingerprint,
                contract_hash=self.contract.hash,
            )
        except ValueError as error:
            message = str(error).split(": ", 1)[-1]
            self.problem(
                self._first_step_named(message) or self.key_at(document, "do"),
                message,
                "see the load-time checks in docs/yaml-sagas.md",
            )
            return None
        simple = _SIMPLE_PATH.match(key_expression.text)
        key_path = tuple(part for part in simple.group(1).split(".") if part) if simple else None
        return LoadedDefinition(
            definition,
            self.path,
            frozenset(self.services),
            _plain(example) if example is not None else None,
            key_path,
            tuple(self.child_keys),
            self.value_at(head, "version"),
        )

    def _first_step_named(self, message: str) -> tuple[int, int] | None:
        """Where the step a definition-level refusal names first is (the message names steps by name)."""
        found = []
        for name, where in self.names.items():
            match = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message)
            if match:
                found.append((match.start(), where))
        return min(found)[1] if found else None

    def read_parameters(self, saga: Any) -> None:
        """Each parameter from its environment variable, typed as its default, fixed for this load."""
        for name, spec in (saga.get("parameters") or {}).items():
            default = _plain(spec["default"])
            raw = self.environ.get(str(spec.get("env", ""))) if spec.get("env") else None
            if raw is None or raw.strip() == "":
                self.params[str(name)] = default
                continue
            try:
                if isinstance(default, bool):
                    raise ValueError("a parameter's default is a number or a string")
                value: Any = type(default)(raw.strip()) if isinstance(default, int | float) else raw
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError("nan and inf are not values a condition or a duration can use")
            except ValueError:
                kind = _PARAMETER_KINDS.get(type(default), type(default).__name__)
                self.problem(
                    self.value_at(saga["parameters"], name),
                    f"parameter {name}: {spec['env']}={raw[:40]!r} is not {kind}",
                    f"set {spec['env']} to {kind}, or unset it for the default {default!r}",
                )
                continue
            self.params[str(name)] = value

    def parameter_value(self, container: Any, key: str) -> Any:
        """A value given as an expression over $params only, evaluated at load."""
        raw = str(container[key])
        body, _ = as_expression_text(raw)
        try:
            paths = scan(body)
            if any(path.root != "params" for path in paths):
                raise ExpressionError("only $params can be read here, at load", 0, "use a literal or $params.name")
            return compile_program(body, self.params).evaluate(None, {}, {})
        except (ExpressionError, ValueError) as error:
            self.problem(self.value_at(container, key), f"{key}: {error}")
            return None

    # -- contract ------------------------------------------------------------------------------

    def load_contract(self, document: Any) -> Contract | None:
        saga = document["saga"]
        contract = saga.get("contract") or {"descriptorSet": SUITE_DESCRIPTOR_SET}
        files: list[Any] = []
        where = self.value_at(saga, "contract") if "contract" in saga else self.key_at(document, "saga")
        sets: list[tuple[str, tuple[int, int]]] = []
        if "descriptorSet" in contract:
            sets.append((str(contract["descriptorSet"]), self.value_at(contract, "descriptorSet")))
        for task, _, _ in _calls(document["do"]):
            for call in (task, task.get("compensate")):
                if isinstance(call, dict) and isinstance(call.get("with"), dict) and "proto" in call["with"]:
                    endpoint = str(call["with"]["proto"].get("endpoint", ""))
                    sets.append((endpoint.removeprefix("file://"), self.value_at(call["with"], "proto")))
        at = where  # the descriptor set being read, so that a problem points at the one that has it
        try:
            for name, set_at in sets:
                at = set_at
                files.extend(read_descriptor_set(self.descriptor_path(name)).file)
            if contract.get("reflection"):
                at = where
                files.extend(self.reflected(document))
            if not files:
                self.problem(where, "no contract: give saga.contract.descriptorSet or reflection: true")
                return None
            return contract_from_files(files)
        except ContractError as error:
            self.problem(at, str(error), "make the descriptor set with `buf build -o x.binpb`")
            return None

    def descriptor_path(self, name: str) -> Path:
        if name == SUITE_DESCRIPTOR_SET:
            return Path(str(resources.files("sagasuite").joinpath("suite.binpb")))
        candidate = Path(name)
        return candidate if candidate.is_absolute() else self.path.parent / candidate

    def reflected(self, document: Any) -> list[Any]:
        by_host: dict[str, set[str]] = {}
        for task, _, _ in _calls(document["do"]):
            for call in (task, task.get("compensate")):
                if isinstance(call, dict) and isinstance(call.get("with"), dict):
                    service = call["with"].get("service") or {}
                    by_host.setdefault(str(service.get("host", "")), set()).add(str(service.get("name", "")))
        files: list[Any] = []
        for host, services in sorted(by_host.items()):
            address = self.resolve_address(host) if self.resolve_address else None
            if address is None:
                raise ContractError(f"reflection: no address for service {host!r} (set {host.upper()}_ADDR)")
            files.extend(reflect_descriptor_set(address, sorted(services)).file)
        return files

    # -- values --------------------------------------------------------------------------------

    def duration(self, container: Any, key: str) -> float | None:
        try:
            if is_expression(container[key]):
                value = self.parameter_value(container, key)
                if value is None:
                    return None
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ValueError(f"{key} must give a number of seconds, got {json.dumps(value)[:40]}")
                seconds = float(value)
            else:
                seconds = _seconds(container[key])
        except ValueError as error:
            self.problem(self.value_at(container, key), str(error))
            return None
        if not 0 < seconds < math.inf:
            self.problem(
                self.value_at(container, key), f"{key} must be a positive duration", "e.g. PT30S or {seconds: 30}"
            )
            return None
        return seconds

    def expression(
        self, container: Any, key: str, visible: Mapping[str, Node], text: str | None = None
    ) -> Expression | None:
        raw = str(container[key]) if text is None else text
        where = self.value_at(container, key)
        if not is_expression(raw):
            self.problem(where, f"{key} must be a ${{ }} expression, got {raw[:60]!r}", "write it as ${ .field }")
            return None
        body, _ = as_expression_text(raw)
        return self.program(body, where, visible)

    def program(self, body: str, where: tuple[int, int], visible: Mapping[str, Node]) -> Expression | None:
        try:
            paths = scan(body)
            compiled = compile_program(body, self.params)
        except ExpressionError as error:
            self.problem(where, f"{error} (in `{body.strip()[:80]}`)", error.hint)
            return None
        for path in paths:
            self.check_field_path(path, where, visible, body)
        return compiled

    def check_field_path(self, path: FieldPath, where: tuple[int, int], visible: Mapping[str, Node], body: str) -> None:
        shown = "." + ".".join(path.names)
        if path.root == "input":
            assert self.input_descriptor is not None
            reason = check_path(self.input_descriptor, list(path.names))
            if reason:
                self.problem(where, f"`{shown}` reads no field of the input: {reason}", "fix the field name")
        elif path.root == "saga":
            if path.names[0] not in ("id", "business_key") or len(path.names) > 1:
                self.problem(where, f"`$saga{shown}`: $saga has only .id and .business_key")
        elif path.root == "results":
            step = path.names[0]
            node = visible.get(step)
            if node is None:
                earlier = ", ".join(visible) or "none"
                self.problem(
                    where,
                    f"`$results{shown}`: {step} is not an earlier step on this path (earlier: {earlier})",
                    "read only steps that ran before this one",
                )
                return
            descriptor = _visible_result_descriptor(node)
            if descriptor is not None and len(path.names) > 1:
                reason = check_path(descriptor, list(path.names[1:]))
                if reason:
                    self.problem(where, f"`$results{shown}`: {reason}", "fix the field name")

    def request_builder(
        self,
        container: Any,
        key: str,
        message_type: type[Message],
        visible: Mapping[str, Node],
        what: str,
        default: str | None = None,
    ) -> Callable[[SagaContext], Message] | None:
        """A builder from `arguments` (an object of values and expressions, or one expression)."""
        value = container.get(key) if container is not None else None
        where = self.value_at(container, key) if value is not None else self.at(container)
        if value is None:
            if default is None:
                value = {}
            else:
                value = default
        known_problems = len(self.problems)
        jq_text = self.jq_of(value, container, key, message_type.DESCRIPTOR, visible)
        if jq_text is None:
            return None
        try:
            # Each expression in it was checked where it stands; this compiles them as one program.
            expression = compile_program(jq_text, self.params)
        except ExpressionError as error:
            self.problem(where, f"{what}: {error}", error.hint)
            return None
        if len(self.problems) == known_problems:  # a field named wrong already said why the dry run would fail
            self.dry_run(expression, message_type, visible, where, what)
        # Literals and plain field paths of the same types: the same message, built by copying fields.
        assert self.input_descriptor is not None
        direct = direct_builder(_plain(value), message_type, self.input_descriptor, visible)
        if direct is not None:
            return direct

        def build(context: SagaContext) -> Message:
            return _message_from(_evaluate(expression, context), message_type, what)

        return build

    def jq_of(self, value: Any, container: Any, key: Any, descriptor: Any, visible: Mapping[str, Node]) -> str | None:
        """The jq object construction for an arguments tree; each expression is checked where it stands."""
        where = self.value_at(container, key)
        if is_expression(value):
            body, _ = as_expression_text(str(value))
            try:
                paths = scan(body)
                compile_program(body, self.params)
            except ExpressionError as error:
                self.problem(where, f"{error} (in `{body.strip()[:80]}`)", error.hint)
                return None
            for path in paths:
                self.check_field_path(path, where, visible, body)
            return f"({body})"
        if isinstance(value, dict):
            parts = []
            fields = field_names(descriptor) if descriptor is not None else None
            for name in value:
                sub_descriptor = None
                if fields is not None:
                    field_descriptor = fields.get(str(name))
                    if field_descriptor is None:
                        known = ", ".join(f.name for f in descriptor.fields)
                        self.problem(
                            self.key_at(value, name),
                            f"{descriptor.full_name} has no field {name!r} (it has: {known})",
                            "fix the field name",
                        )
                        return None
                    if field_descriptor.message_type is not None and not field_descriptor.is_repeated:
                        message_type = field_descriptor.message_type
                        sub_descriptor = None if message_type.GetOptions().map_entry else message_type
                inner = self.jq_of(value[name], value, name, sub_descriptor, visible)
                if inner is None:
                    return None
                parts.append(f"{json.dumps(str(name))}: {inner}")
            return "{" + ", ".join(parts) + "}"
        if isinstance(value, list):
            items = []
            for index, item in enumerate(value):
                inner = self.jq_of(item, value, index, None, visible)
                if inner is None:
                    return None
                items.append(inner)
            return "[" + ", ".join(items) + "]"
        return json.dumps(_plain(value))

    def dry_run(
        self,
        expression: Expression,
        message_type: type[Message],
        visible: Mapping[str, Node],
        where: tuple[int, int],
        what: str,
    ) -> None:
        assert self.input_descriptor is not None
        results = {}
        for name, node in visible.items():
            descriptor = _visible_result_descriptor(node)
            results[name] = sample(descriptor) if descriptor is not None else {}
        try:
            value = expression.evaluate(sample(self.input_descriptor), results, {"id": "saga", "business_key": "k"})
        except ValueError as error:
            self.problem(
                where,
                f"{what}: the expression fails on a sample input: {str(error)[:200]}",
                "each path must read what the message types hold: a message's fields, a list's items",
            )
            return
        try:
            _message_from(value, message_type, what)
        except RequestNotBuilt as error:
            self.problem(where, str(error), "build only fields the message has, with values of their types")

    def check_key(self, saga: Any, expression: Expression, input_type: type[Message]) -> None:
        where = self.value_at(saga, "key")
        assert self.input_descriptor is not None
        try:
            value = expression.evaluate(sample(self.input_descriptor), {}, {})
        except ValueError as error:
            self.problem(
                where,
                f"the business key cannot be derived: {str(error)[:200]}",
                "derive it from an input field, e.g. ${ .order_id }",
            )
            return
        if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
            self.problem(
                where,
                f"the business key cannot be derived: it gives {json.dumps(value)[:60]} for a sample input, "
                "not a string",
                "derive it from an input field, e.g. ${ .order_id }",
            )

    # -- tasks ---------------------------------------------------------------------------------

    def sequence(self, tasks: Any, visible: dict[str, Node], *, in_branch: bool) -> tuple[Node, ...]:
        nodes: list[Node] = []
        seen = dict(visible)
        for index, item in enumerate(tasks):
            ((name, body),) = item.items()
            name = str(name)
            where = self.key_at(item, name)
            if name in self.names:
                first = self.names[name]
                self.problem(where, f"step name {name} is used twice (first at line {first[0]})", "rename one")
                continue
            self.names[name] = where
            if "do" in body and len(body) == 1:
                inner = self.sequence(body["do"], seen, in_branch=in_branch)
                nodes.extend(inner)
                for node in inner:
                    seen[node.name] = node
                continue
            built = self.task(name, body, item, seen, in_branch=in_branch, index=index)
            if built is not None:
                nodes.append(built)
                seen[name] = built
                if isinstance(built, Parallel):
                    for branch in built.branches:
                        for branch_node in branch:
                            seen[branch_node.name] = branch_node
        visible.clear()
        visible.update(seen)
        return tuple(nodes)

    def task(
        self, name: str, body: Any, item: Any, visible: dict[str, Node], *, in_branch: bool, index: int
    ) -> Node | None:
        where = self.key_at(item, name)
        kinds = [kind for kind in ("call", "wait", "listen", "approve", "fork", "run", "do") if kind in body]
        if len(kinds) != 1:
            self.problem(
                where,
                f"task {name} must be exactly one of call, wait, listen, approve, fork, run, do; it has "
                f"{', '.join(kinds) or 'none'}",
            )
            return None
        kind = kinds[0]
        when = None
        if "if" in body:
            condition = self.expression(body, "if", visible)
            if condition is not None:
                condition_program = condition

                def when(context: SagaContext) -> bool:
                    return _truthy(_evaluate(condition_program, context))

        extra = {"if", "timeout", kind} | ({"with", "compensate", "kind", "retry"} if kind == "call" else set())
        extra |= {"onTimeout"} if kind in ("listen",) else set()
        extra |= {"listen"} if kind == "approve" else set()
        for key in body:
            if key not in extra:
                self.problem(self.key_at(body, key), f"{key} does not apply to a {kind} task ({name})")
        if kind == "call":
            return self.call_step(name, body, visible, when, in_branch)
        if kind == "wait":
            return self.timer(name, body, visible, when)
        if kind == "listen":
            return self.signal_wait(name, body, when)
        if kind == "approve":
            return self.approval(name, body, when)
        if kind == "fork":
            return self.fork(name, body, visible, when)
        if kind == "run":
            return self.child(name, body, visible, when)
        self.problem(where, f"task {name}: a do block inside a task list holds tasks only")
        return None

    def call(self, call_body: Any, visible: Mapping[str, Node], what: str) -> Call | None:
        spec = call_body["with"]
        service = spec["service"]
        try:
            assert self.contract is not None
            method = self.contract.method(str(service["name"]), str(spec["method"]))
        except ContractError as error:
            wrong_method = "has no method" in str(error) or "streaming" in str(error)
            at = self.value_at(spec, "method") if wrong_method else self.value_at(service, "name")
            self.problem(at, f"{what}: {error}", "check the service and method names")
            return None
        request_type = self.contract.message_class(method.input_type.full_name)
        response_type = self.contract.message_class(method.output_type.full_name)
        builder = self.request_builder(spec, "arguments", request_type, visible, what)
        if builder is None:
            return None
        host = str(service["host"])
        self.services.add(host)
        return Call(
            service=host,
            method_path=f"/{method.containing_service.full_name}/{method.name}",
            response_type=response_type,
            build_request=builder,
        )

    def call_step(self, name: str, body: Any, visible: Mapping[str, Node], when: Any, in_branch: bool) -> Step | None:
        where = self.names[name]
        if "with" not in body:
            self.problem(where, f"call {name} needs with: service, method and arguments")
            return None
        action = self.call(body, visible, f"{name}'s request")
        kind = StepKind(str(body.get("kind", "compensatable" if "compensate" in body else "")) or "retriable")
        if "kind" not in body and "compensate" not in body:
            self.problem(
                where,
                f"call {name} needs compensate: (its undo), or kind: retriable (it only retries, after the pivot)",
            )
            return None
        compensation = None
        if "compensate" in body:
            if kind is StepKind.RETRIABLE:
                self.problem(
                    self.key_at(body, "compensate"),
                    f"call {name} is retriable, so it is never compensated",
                    "remove compensate:, or drop kind: retriable and place the step before the pivot",
                )
                return None
            compensation = self.call(body["compensate"], visible, f"{name}'s compensation")
        elif kind is StepKind.COMPENSATABLE:
            self.problem(where, f"call {name} is compensatable and needs compensate:", "add its undo as compensate:")
            return None
        if kind is StepKind.RETRIABLE:
            self.seen_retriable = self.seen_retriable or name
        elif self.seen_retriable is not None:
            self.compensatable_after_retriable.append(name)
        retry = self.retry(body) if "retry" in body else RetryPolicy()
        budget = self.duration(body["timeout"], "after") if "timeout" in body else None
        if action is None or (kind is StepKind.COMPENSATABLE and compensation is None) or retry is None:
            return None
        return Step(
            name,
            action=action,
            compensation=compensation,
            kind=kind,
            retry=retry,
            budget=budget or 30.0,
            when=when,
        )

    def retry(self, body: Any) -> RetryPolicy | None:
        spec = body["retry"]
        default = RetryPolicy()
        initial = self.duration(spec, "delay") if "delay" in spec else default.initial_interval
        backoff = spec.get("backoff", {"exponential": {}})
        factor = 1.0 if "constant" in backoff else float(backoff.get("exponential", {}).get("factor", default.backoff))
        exponential = backoff.get("exponential", {})
        maximum = self.duration(exponential, "maxDelay") if "maxDelay" in exponential else default.maximum_interval
        attempts = int(spec.get("limit", {}).get("attempt", {}).get("count", default.maximum_attempts))
        if initial is None or maximum is None:
            return None
        return RetryPolicy(
            initial_interval=initial,
            backoff=factor,
            maximum_interval=max(maximum, initial),
            maximum_attempts=attempts,
            jitter=float(spec.get("jitter", default.jitter)),
        )

    def wait_timeout(self, name: str, body: Any, what: str) -> float | None:
        if "timeout" not in body:
            self.problem(
                self.names[name],
                f"{what} {name} has no timeout: every wait must end",
                "add timeout: {after: {hours: 24}} (no longer than the saga deadline)",
            )
            return None
        return self.duration(body["timeout"], "after")

    def timer(self, name: str, body: Any, visible: Mapping[str, Node], when: Any) -> Timer | None:
        spec = body["wait"]
        if isinstance(spec, dict) and "until" in spec:
            until_expression = self.expression(spec, "until", visible)
            if until_expression is None:
                return None
            program = until_expression

            def until(context: SagaContext) -> float:
                return _epoch(_evaluate(program, context))

            return Timer(name, until=until, when=when)
        seconds = self.duration(body, "wait")
        return Timer(name, duration=seconds, when=when) if seconds is not None else None

    def signal_wait(self, name: str, body: Any, when: Any) -> WaitForSignal | None:
        signal = str(body["listen"]["to"]["one"]["with"]["type"])
        if not SIGNAL_NAME.match(signal):
            self.problem(self.names[name], f"listen {name}: signal type {signal!r} must match {SIGNAL_NAME.pattern}")
            return None
        timeout = self.wait_timeout(name, body, "listen")
        if timeout is None:
            return None
        return WaitForSignal(
            name, timeout=timeout, signal=signal, on_timeout=OnTimeout(str(body.get("onTimeout", "compensate"))),
            when=when,
        )  # fmt: skip

    def approval(self, name: str, body: Any, when: Any) -> Approval | None:
        spec = body["approve"] or {}
        timeout = self.wait_timeout(name, body, "approval")
        remind = self.duration(spec, "remindAfter") if "remindAfter" in spec else None
        if timeout is None:
            return None
        role = spec.get("role", "operator")
        if is_expression(role):
            role = self.parameter_value(spec, "role")
        if not isinstance(role, str) or not re.match(r"^[a-z][a-z0-9_]{0,39}$", role):
            self.problem(self.value_at(spec, "role"), f"approval {name}: the role must match [a-z][a-z0-9_]{{0,39}}")
            return None
        return Approval(name, timeout=timeout, role=role, remind_after=remind, when=when)

    def fork(self, name: str, body: Any, visible: dict[str, Node], when: Any) -> Parallel | None:
        branches = []
        for item in body["fork"]["branches"]:
            ((branch_name, branch_body),) = item.items()
            branch_visible = dict(visible)
            if "do" in branch_body and len(branch_body) == 1:
                self.names.setdefault(str(branch_name), self.key_at(item, branch_name))
                steps = self.sequence(branch_body["do"], branch_visible, in_branch=True)
            else:
                steps = self.sequence([item], branch_visible, in_branch=True)
            branches.append(steps)
        return Parallel(name, branches=tuple(branches), when=when)

    def child(self, name: str, body: Any, visible: Mapping[str, Node], when: Any) -> ChildSaga | None:
        spec = body["run"]["workflow"]
        key = (str(spec["name"]), int(spec["version"]))
        definition = self.children.get(key)
        if definition is None:
            self.problem(
                self.value_at(body["run"], "workflow"),
                f"run {name}: no definition {key[0]} v{key[1]} is loaded",
                "put its YAML file in the same folder, or load it first",
            )
            return None
        self.child_keys.append(key)
        builder = self.request_builder(spec, "input", definition.input_type, visible, f"{name}'s child input", "${ . }")
        if builder is None:
            return None
        return ChildSaga(name, definition, build_input=builder, when=when)


def _oversized(document: Any) -> tuple[tuple[int, int], str, str] | None:
    """Where and why a loaded document is too big to check: aliases expanding past _MAX_VALUES, or deep nesting.

    Walked without recursion, counting an aliased value each time it appears, and stopped at the
    first excess, so a YAML bomb costs at most _MAX_VALUES steps.
    """
    stack: list[tuple[Any, int, Any]] = [(document, 1, document)]
    count = 0
    while stack:
        value, depth, holder = stack.pop()
        count += 1
        if count > _MAX_VALUES:
            return (
                _Compiler.at(holder),
                f"the file holds more than {_MAX_VALUES} values (an alias counts each time it is used)",
                "a definition holds a few hundred values: use fewer aliases, or split the file",
            )
        if depth > _MAX_DEPTH:
            return (
                _Compiler.at(value if hasattr(value, "lc") else holder),
                f"the file nests deeper than {_MAX_DEPTH} levels",
                "a definition nests a few levels: flatten it",
            )
        if isinstance(value, dict):
            stack.extend((item, depth + 1, value) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1, value) for item in value)
    return None


def _too_many_brackets(text: str) -> tuple[int, int] | None:
    """Where more than _MAX_OPEN_BRACKETS brackets are open at once; quoted ones count too: a bound, not a parse."""
    depth = 0
    for match in _BRACKET.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        if depth > _MAX_OPEN_BRACKETS:
            position = match.start()
            return text.count("\n", 0, position) + 1, position - text.rfind("\n", 0, position)
    return None


def _unknown_keys(error: jsonschema.ValidationError) -> list[Any]:
    """The keys an `additionalProperties: false` refused, in the file's order."""
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return []
    known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
    return [key for key in error.instance if key not in known]


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key")
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    return error.message[:300]


def _calls(tasks: Any) -> list[tuple[Any, str, Any]]:
    found = []
    for item in tasks if isinstance(tasks, list) else []:
        if not isinstance(item, dict):
            continue
        for name, body in item.items():
            if not isinstance(body, dict):
                continue
            if body.get("call") == "grpc":
                found.append((body, str(name), item))
            if isinstance(body.get("do"), list):
                found.extend(_calls(body["do"]))
            fork = body.get("fork")
            if isinstance(fork, dict) and isinstance(fork.get("branches"), list):
                found.extend(_calls(fork["branches"]))
    return found


def _string_path(descriptor: Any, path: str) -> bool:
    """Whether a path of proto names leads through set-or-default singular messages to a string field."""
    names = [part for part in path.split(".") if part]
    current = descriptor
    for position, name in enumerate(names):
        field = current.fields_by_name.get(name) if current is not None else None
        if field is None or field.is_repeated:
            return False
        if position == len(names) - 1:
            return bool(field.type == field.TYPE_STRING and not field.has_presence)
        if position < len(names) - 1:
            return False  # a nested key: an unset message reads null through jq, "" by getattr
        current = field.message_type
    return False


def _plain(value: Any) -> Any:
    """Round-trip YAML values as plain JSON values."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    return str(value)


def _epoch(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise RequestNotBuilt(f"a timer's until must give epoch seconds or an RFC 3339 time, got {json.dumps(value)[:60]}")


def compile_file(
    path: Path,
    *,
    children: Mapping[tuple[str, int], SagaDefinition] | None = None,
    resolve_address: Callable[[str], str | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedDefinition:
    """Compile one definition file; DefinitionFileError lists every problem with file:line:column."""
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise DefinitionFileError(
                [
                    Problem(
                        str(path), 1, 1, f"the file is {size} bytes; at most 1 MiB",
                        "a definition is a few KiB: is this the right file?",
                    )
                ]
            )  # fmt: skip
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        data = error.object
        line, column = data.count(b"\n", 0, error.start) + 1, error.start - data.rfind(b"\n", 0, error.start)
        raise DefinitionFileError(
            [Problem(str(path), line, column, f"not UTF-8 text: byte {data[error.start]:#04x}", "save it as UTF-8")]
        ) from None
    except OSError as error:
        raise DefinitionFileError([Problem(str(path), 1, 1, f"cannot read the file: {error.strerror}")]) from None
    compiler = _Compiler(path, text, children or {}, resolve_address, os.environ if environ is None else environ)
    loaded = compiler.compile()
    if compiler.problems or loaded is None:
        problems = compiler.problems or [Problem(str(path), 1, 1, "the definition could not be compiled")]
        raise DefinitionFileError(sorted(problems, key=lambda p: (p.line, p.column)))
    return loaded
