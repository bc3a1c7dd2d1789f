"""Deterministic jq expressions for YAML sagas: refusal of time, environment and input builtins, and field paths."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jq

__all__ = [
    "Expression",
    "ExpressionError",
    "FieldPath",
    "as_expression_text",
    "compile_program",
    "is_expression",
    "scan",
]

# Builtins whose answer depends on something other than the saga's stored data: a resend built
# with them would not be byte-identical, and the participant would refuse its key as reused.
NONDETERMINISTIC = frozenset(
    {
        "now",
        "input",
        "inputs",
        "env",
        "input_filename",
        "input_line_number",
        "mktime",
        "gmtime",
        "localtime",
        "strftime",
        "strflocaltime",
        "strptime",
        "todate",
        "fromdate",
        "date",
        "dateadd",
        "datesub",
        "dateiso8601",
        "todateiso8601",
        "fromdateiso8601",
        "debug",
        "stderr",
        "halt",
        "halt_error",
        "get_search_list",
        "import",
        "include",
        "modulemeta",
        "splits_random",
    }
)
NONDETERMINISTIC_VARIABLES = frozenset({"ENV", "__prog_args", "__prog_name"})
# The variables an expression may read besides `.` (the saga's input).
VARIABLES = ("results", "saga", "params")
_KEYWORDS_LEAVING_ROOT = frozenset({"as", "reduce", "foreach", "def", "label"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_COLONS_AFTER = re.compile(r"\s*(::|:)?")
_KEYWORDS_BEFORE_PATH = ("and", "or", "not", "then", "else", "elif", "if")
_IDENTIFIER_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_IDENTIFIER_CHARS = _IDENTIFIER_START | frozenset("0123456789")


class ExpressionError(ValueError):
    """An expression that is not valid jq, or reads something a resend could not read the same way."""

    def __init__(self, message: str, offset: int = 0, hint: str = "") -> None:
        super().__init__(message)
        self.offset = offset
        self.hint = hint


@dataclass(frozen=True)
class FieldPath:
    """A field path an expression reads: from the input (`.a.b`), or from `$results.step.a` / `$saga.x`."""

    root: str  # "input", "results" or "saga"
    names: tuple[str, ...]
    offset: int


def is_expression(value: object) -> bool:
    return isinstance(value, str) and value.strip().startswith("${") and value.strip().endswith("}")


def as_expression_text(value: str) -> tuple[str, int]:
    """The jq text inside `${ ... }`, and its offset in value."""
    start = value.index("${") + 2
    end = value.rindex("}")
    return value[start:end], start


def _code_only(text: str) -> str:
    """text with string literals and comments blanked, interpolations `\\( )` kept, offsets unchanged."""
    out = list(text)
    index = 0
    depth_stack: list[int] = []  # paren depth at which each open interpolation returns to its string
    in_string = False
    paren = 0
    while index < len(text):
        char = text[index]
        if in_string:
            if char == "\\" and index + 1 < len(text):
                if text[index + 1] == "(":
                    out[index] = out[index + 1] = " "
                    depth_stack.append(paren)
                    paren += 1
                    in_string = False
                    index += 2
                    continue
                out[index] = out[index + 1] = " "
                index += 2
                continue
            if char == '"':
                in_string = False
            else:
                out[index] = " "
            index += 1
            continue
        if char == '"':
            in_string = True
        elif char == "#":
            end = text.find("\n", index)
            end = len(text) if end < 0 else end
            for position in range(index, end):
                out[position] = " "
            index = end
            continue
        elif char == "(":
            paren += 1
        elif char == ")":
            paren -= 1
            if depth_stack and paren == depth_stack[-1]:
                depth_stack.pop()
                out[index] = " "
                in_string = True
        index += 1
    return "".join(out)


def scan(text: str) -> list[FieldPath]:
    """Refuse nondeterministic builtins (ExpressionError at their offset); return the field paths read."""
    code = _code_only(text)
    for match in _IDENTIFIER.finditer(code):
        name = match.group()
        before = code[match.start() - 1] if match.start() else ""
        if before in ("@",) or before.isalnum() or before == "_":
            continue
        if before == "$":
            if name in NONDETERMINISTIC_VARIABLES:
                raise ExpressionError(
                    f"${name} reads the orchestrator's environment, which a resend may not see the same way",
                    match.start() - 1,
                    "pass what the saga needs in its input",
                )
            continue
        if before == ".":
            continue  # a field, e.g. `.now`
        colons = _COLONS_AFTER.match(code, match.end())
        if colons is not None and colons.group(1) == ":":
            continue  # an object key, e.g. `{input: .x}`
        if name in NONDETERMINISTIC:
            raise ExpressionError(
                f"{name} is not allowed: a request must be rebuilt byte for byte from the saga's stored "
                "input, signals and results, and it reads the clock, the environment or another input",
                match.start(),
                "take times from the input or from an earlier step's result",
            )
    return list(_paths(code))


def _last_code(code: str, index: int) -> int:
    """The index of the last non-blank character before index, or -1.

    Walks back over the blanks just before index only: each run of blanks is walked once, by the
    character after it, so a scan stays linear in the text (a long expression is not a slow load).
    """
    position = index - 1
    while position >= 0 and code[position].isspace():
        position -= 1
    return position


def _after_keyword(code: str, end: int) -> bool:
    """Whether the code up to end (inclusive) ends with a keyword after which a path starts, e.g. `then`."""
    for keyword in _KEYWORDS_BEFORE_PATH:
        start = end - len(keyword) + 1
        if start >= 0 and code.startswith(keyword, start):
            if start == 0 or code[start - 1] not in _IDENTIFIER_CHARS | {"$", "."}:
                return True
    return False


def _paths(code: str) -> Iterator[FieldPath]:
    root_stack = [True]
    index = 0
    while index < len(code):
        char = code[index]
        # Only brackets, dots and identifiers look back: the scan stays linear (see _last_code).
        last = _last_code(code, index) if char in "([{." or char in _IDENTIFIER_START else -1
        previous = code[last] if last >= 0 else ""
        if char in "([{":
            call = char == "(" and previous in _IDENTIFIER_CHARS
            root_stack.append(False if call else root_stack[-1])
        elif char in ")]}":
            if len(root_stack) > 1:
                root_stack.pop()
        elif char == "|" and code[index + 1 : index + 2] != "=":
            root_stack[-1] = False
        elif char == "$":
            match = _IDENTIFIER.match(code, index + 1)
            if match:
                name = match.group()
                path = _PATH.match(code, match.end())
                if name in VARIABLES and path:
                    names = tuple(part for part in path.group().split(".") if part)
                    yield FieldPath(name, names, index)
                index = path.end() if (match and path) else match.end()
                continue
        elif char == ".":
            path = _PATH.match(code, index)
            after_keyword = last >= 0 and _after_keyword(code, last)
            starts_path = not previous or previous in '(,[{:|=<>!+-*/%;"' or after_keyword
            if path and starts_path:
                if root_stack[-1]:
                    names = tuple(part for part in path.group().split(".") if part)
                    yield FieldPath("input", names, index)
                index = path.end()
                continue
        elif char in _IDENTIFIER_START:  # ASCII, as jq's identifiers: any other letter is jq's to refuse
            match = _IDENTIFIER.match(code, index)
            assert match is not None
            if match.group() in _KEYWORDS_LEAVING_ROOT and previous != ".":
                root_stack[-1] = False
            index = match.end()
            continue
        index += 1


@dataclass(frozen=True)
class Expression:
    """A compiled program over [input, results, saga]: `.` is the input, `$results` and `$saga` the rest."""

    text: str
    program: Any
    results_read: frozenset[str] | None  # the step names read from $results; None: it reads $results whole
    params: dict[str, Any]  # the definition's parameters, fixed when it was loaded

    def evaluate(self, input_value: Any, results: dict[str, Any], saga: dict[str, str]) -> Any:
        """The expression's first output; ValueError (as jq's runtime errors) when it gives none (`empty`)."""
        try:
            return self.program.input_value([input_value, results, saga, self.params]).first()
        except StopIteration:
            raise ValueError("the expression gives no value (it is empty here)") from None


def results_read(paths: Iterable[FieldPath], text: str) -> frozenset[str] | None:
    code = _code_only(text)
    named = {path.names[0] for path in paths if path.root == "results" and path.names}
    uses = len(re.findall(r"\$results\b", code))
    return frozenset(named) if uses == sum(1 for p in paths if p.root == "results") else None


def compile_program(text: str, params: dict[str, Any] | None = None) -> Expression:
    """Compile jq text (already scanned) into an Expression; ExpressionError with jq's own message."""
    program_text = f".[1] as $results | .[2] as $saga | .[3] as $params | .[0] | ({text}\n)"
    try:
        program = jq.compile(program_text)
    except ValueError as error:
        message = str(error).replace("\n", " ").strip()
        message = re.sub(r"\s+", " ", message)
        raise ExpressionError(f"not a valid jq expression: {message}", 0, "check the jq syntax") from None
    paths = scan(text)
    return Expression(text, program, results_read(paths, text), dict(params or {}))
