"""The saga definition API: steps with action and compensation side by side, registered by name and version."""

from __future__ import annotations

import base64
import enum
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeAlias

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from svckit.errors import FailedPrecondition, FieldViolation, InvalidArgument
from svckit.validation import quote

__all__ = [
    "DEFAULT_RETRYABLE_CODES",
    "DEFINITE_CODES",
    "SIGNAL_NAME",
    "UNCERTAIN_CODES",
    "Approval",
    "BusinessKeyMismatch",
    "Call",
    "ChildSaga",
    "DefinitionMissing",
    "DefinitionRegistry",
    "FlatNode",
    "Node",
    "OnTimeout",
    "Parallel",
    "RequestNotBuilt",
    "RetryPolicy",
    "SagaContext",
    "SagaDefinition",
    "Step",
    "StepKind",
    "Timer",
    "WaitForSignal",
    "approval_signal",
    "encode_child_result",
    "rpc",
]

# A signal's name: what SignalSaga carries and a WaitForSignal waits for.
SIGNAL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")

DEFAULT_RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)

# Answers after which a step may have taken effect: the call timed out, was cut, or the
# participant failed in a way that does not say whether its commit happened (a lost commit
# acknowledgement surfaces as INTERNAL or UNKNOWN; DATA_LOSS says nothing about the effect either).
# When the saga unwinds, such a step is compensated too.
UNCERTAIN_CODES = DEFAULT_RETRYABLE_CODES | frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)

# The participant's own answer under our idempotency key: it records refusals with the key (or
# refuses the request itself, the same way every time), so the step did not take effect under
# this saga, whatever earlier attempts left unknown. ORDER_ALREADY_RESERVED and its kind prove
# somebody else's effect, which this saga must not undo.
DEFINITE_CODES = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


class DefinitionMissing(FailedPrecondition, LookupError):
    """A saga's definition (name and version) is not registered in this replica."""

    def __init__(self, saga_type: str, version: int) -> None:
        super().__init__(
            "DEFINITION_MISSING",
            f"no saga definition {saga_type} v{version} is registered; load it (SAGA_DEFINITIONS) and retry",
            {"saga_type": saga_type, "version": str(version)},
        )
        self.saga_type = saga_type
        self.version = version


class BusinessKeyMismatch(InvalidArgument):
    """A start gave a business key other than the one its definition derives from the input."""

    def __init__(self, saga_type: str, given: str, derived: str) -> None:
        self.saga_type = saga_type
        self.given = given
        self.derived = derived
        super().__init__(
            [
                FieldViolation(
                    "business_key",
                    f"must be {quote(derived)}, the key {saga_type} derives from its input; got {quote(given)}",
                )
            ]
        )


class RequestNotBuilt(ValueError):
    """A request builder could not build its request from the stored data; nothing was sent.

    Building is deterministic (stored input, signals and results only), so trying again gives the
    same answer: the step is refused as a participant's definite refusal would be.
    """


class StepKind(enum.Enum):
    """Compensatable steps are undone on failure; retriable ones (after the pivot) only retry."""

    COMPENSATABLE = "compensatable"
    RETRIABLE = "retriable"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter and a maximum attempt count."""

    # About seven seconds of retries in all: long enough to ride out a service restart.
    initial_interval: float = 0.1
    backoff: float = 2.0
    maximum_interval: float = 2.0
    maximum_attempts: int = 8
    jitter: float = 0.2

    def delay(self, failed_attempt: int, rng: random.Random) -> float:
        """Seconds to wait after attempt number failed_attempt (1-based) before the next one."""
        base = min(self.maximum_interval, self.initial_interval * self.backoff ** (failed_attempt - 1))
        return max(0.0, base * (1 + self.jitter * (2 * rng.random() - 1)))


class SagaContext:
    """What a request builder or a condition may read: the saga's stored input, results, signals and children."""

    def __init__(
        self,
        saga_id: str,
        input_message: Message,
        results: dict[str, bytes],
        nodes: dict[str, Node],
        business_key: str = "",
    ) -> None:
        self.saga_id = saga_id
        self.business_key = business_key
        # Typed loosely: each definition knows its own input message type.
        self.input: Any = input_message
        self._results = results
        self._nodes = nodes

    def result_names(self) -> list[str]:
        """The names of the steps, waits and children that have a stored result."""
        return list(self._results)

    def node_of(self, name: str) -> Node:
        """The definition's node of that name."""
        return self._nodes[name]

    def has_result(self, name: str) -> bool:
        """Whether the step, wait or child of that name has a stored result (a skipped one has none)."""
        return name in self._results

    def result(self, step_name: str) -> Any:
        """The stored response of a step that succeeded, parsed as its action's response type."""
        payload = self._payload(step_name)
        node = self._nodes[step_name]
        if not isinstance(node, Step):
            raise LookupError(
                f"{step_name!r} is a {node.node_kind} node, not a call step: read it with signal() or child()"
            )
        return node.action.response_type.FromString(payload)

    def signal(self, wait_name: str) -> dict[str, Any]:
        """The JSON payload of the signal (or the approval decision) a wait consumed."""
        node = self._nodes.get(wait_name)
        if not isinstance(node, WaitForSignal | Approval):
            raise LookupError(f"{wait_name!r} is not a signal wait or an approval of this definition")
        payload = struct_pb2.Struct.FromString(self._payload(wait_name))
        return json_format.MessageToDict(payload)

    def child(self, step_name: str) -> SagaContext:
        """The context of a completed child saga: its input and results, read with the child's definition."""
        node = self._nodes.get(step_name)
        if not isinstance(node, ChildSaga):
            raise LookupError(f"{step_name!r} is not a child saga step of this definition")
        stored = json.loads(self._payload(step_name))
        results = {name: base64.b64decode(value) for name, value in stored["results"].items()}
        child_definition = node.definition
        return child_definition.context(
            stored["saga_id"], base64.b64decode(stored["input"]), results, stored.get("business_key", "")
        )

    def _payload(self, name: str) -> bytes:
        payload = self._results.get(name)
        if payload is None:
            raise LookupError(f"step {name!r} has no stored result")
        return payload


def encode_child_result(saga_id: str, business_key: str, input_payload: bytes, results: dict[str, bytes]) -> bytes:
    """What a parent stores as a completed child's result: the child's id, key, input and results."""
    return json.dumps(
        {
            "saga_id": saga_id,
            "business_key": business_key,
            "input": base64.b64encode(input_payload).decode(),
            "results": {name: base64.b64encode(value).decode() for name, value in sorted(results.items())},
        },
        sort_keys=True,
    ).encode()


def approval_signal(step_name: str) -> str:
    """The internal signal name an approval's decision is stored under (never a valid SignalSaga name)."""
    return f"approval:{step_name}"


@dataclass(frozen=True)
class Call:
    """One unary gRPC method of a discovered service, with the builder of its request."""

    service: str
    method_path: str
    response_type: type[Message]
    build_request: Callable[[SagaContext], Message]

    @property
    def method_name(self) -> str:
        return self.method_path.rsplit("/", 1)[1]


def rpc(service: str, module: ModuleType, method: str, build_request: Callable[[SagaContext], Message]) -> Call:
    """A Call to `Service.Method` of a generated *_pb2 module, found by discovery name service."""
    (service_descriptor,) = module.DESCRIPTOR.services_by_name.values()
    method_descriptor = service_descriptor.methods_by_name[method]
    return Call(
        service=service,
        method_path=f"/{service_descriptor.full_name}/{method}",
        response_type=GetMessageClass(method_descriptor.output_type),
        build_request=build_request,
    )


@dataclass(frozen=True)
class Step:
    """A step: its action and compensation side by side, how it retries and how long it may take."""

    name: str
    action: Call
    compensation: Call | None = None
    kind: StepKind = StepKind.COMPENSATABLE
    retry: RetryPolicy = RetryPolicy()
    timeout: float = 2.0
    budget: float = 30.0
    compensation_retry: RetryPolicy = RetryPolicy(maximum_attempts=20, maximum_interval=5.0)
    compensation_budget: float = 300.0
    retryable_codes: frozenset[grpc.StatusCode] = frozenset()
    non_retryable_codes: frozenset[grpc.StatusCode] = frozenset()
    # A deterministic predicate over the stored input and results: the step runs only when it holds.
    when: Callable[[SagaContext], bool] | None = None
    node_kind = "call"

    def is_retryable(self, code: grpc.StatusCode) -> bool:
        if code in self.non_retryable_codes:
            return False
        return code in self.retryable_codes or code in DEFAULT_RETRYABLE_CODES

    def may_have_happened(self, code: grpc.StatusCode, uncertain_before: bool) -> bool:
        """Whether the action may have taken effect, after an attempt answered code.

        A definite answer settles it (no effect under our key); an uncertain one leaves it open;
        anything else (PERMISSION_DENIED, UNIMPLEMENTED...) says nothing about earlier attempts.
        """
        if code in DEFINITE_CODES:
            return False
        if code in UNCERTAIN_CODES or self.is_retryable(code):
            return True
        return uncertain_before


@dataclass(frozen=True)
class Timer:
    """Wait for a duration, or until a time (epoch seconds) read from the input or earlier results."""

    name: str
    duration: float | None = None
    until: Callable[[SagaContext], float] | None = None
    when: Callable[[SagaContext], bool] | None = None
    node_kind = "timer"

    def wake_at(self, context: SagaContext, now: float) -> float:
        if self.until is not None:
            return float(self.until(context))
        assert self.duration is not None
        return now + self.duration


class OnTimeout(enum.Enum):
    """What a signal wait does when its timeout passes first."""

    COMPENSATE = "compensate"
    CONTINUE = "continue"
    FAIL = "fail"


@dataclass(frozen=True)
class WaitForSignal:
    """Wait for a named signal (SignalSaga) for at most timeout seconds; its payload becomes the step's result."""

    name: str
    timeout: float
    signal: str = ""
    on_timeout: OnTimeout = OnTimeout.COMPENSATE
    when: Callable[[SagaContext], bool] | None = None
    node_kind = "signal"

    @property
    def signal_name(self) -> str:
        return self.signal or self.name


@dataclass(frozen=True)
class Approval:
    """A person approves or rejects (DecideApproval); reject or timeout compensates.

    role: the token role that may decide (an `operator` token may always). remind_after: seconds
    after which the waiting approval raises a metric and a WARNING line.
    """

    name: str
    timeout: float
    role: str = "operator"
    remind_after: float | None = None
    when: Callable[[SagaContext], bool] | None = None
    node_kind = "approval"

    @property
    def signal_name(self) -> str:
        return approval_signal(self.name)


@dataclass(frozen=True)
class ChildSaga:
    """Start another definition as a child saga and wait for it to end; a completed child is compensated whole."""

    name: str
    definition: SagaDefinition
    build_input: Callable[[SagaContext], Message]
    when: Callable[[SagaContext], bool] | None = None
    node_kind = "child"


@dataclass(frozen=True)
class Parallel:
    """Branches, each a sequence of nodes, run concurrently; the group succeeds when every branch does."""

    name: str
    branches: tuple[tuple[Node, ...], ...]
    when: Callable[[SagaContext], bool] | None = None
    node_kind = "parallel"


Node: TypeAlias = "Step | Timer | WaitForSignal | Approval | ChildSaga | Parallel"
WAITS = (WaitForSignal, Approval)


@dataclass(frozen=True)
class FlatNode:
    """A node at its flat index: the group and branch it belongs to and the index that follows it."""

    index: int
    node: Node
    group: int = -1  # the flat index of its parallel group, -1 on the main track
    branch: int = 0  # 1-based branch number inside the group; 0 on the main track
    next: int | None = None  # the next node of the same sequence; None at its end

    @property
    def track(self) -> str:
        return str(self.branch) if self.branch else ""


def _flatten(nodes: tuple[Node, ...], group: int, branch: int, out: list[FlatNode]) -> list[int]:
    indexes: list[int] = []
    for node in nodes:
        index = len(out)
        out.append(FlatNode(index, node, group, branch))
        indexes.append(index)
        if isinstance(node, Parallel):
            for number, steps in enumerate(node.branches, start=1):
                _flatten(steps, index, number, out)
    for position, index in enumerate(indexes):
        following = indexes[position + 1] if position + 1 < len(indexes) else None
        out[index] = FlatNode(index, out[index].node, group, branch, following)
    return indexes


def _walk(nodes: Iterable[Node]) -> Iterator[Node]:
    for node in nodes:
        yield node
        if isinstance(node, Parallel):
            for steps in node.branches:
                yield from _walk(steps)


@dataclass(frozen=True)
class SagaDefinition:
    """A named, versioned tree of steps, the message type of its input and how its business key derives from it.

    business_key maps the input message to the saga's business key (the order saga:
    `lambda order: order.order_id`). It is required: the compensations of a saga act on what its
    input names (an order's stock, payment, shipment), so one input entity must have one saga, and a
    start under any other key is refused. deadline (seconds) bounds the whole saga when a start does
    not give one; every wait's timeout must fit in it.
    """

    name: str
    version: int
    input_type: type[Message]
    steps: tuple[Node, ...]
    business_key: Callable[[Any], str] | None = None
    deadline: float | None = None
    # Where it was defined ("python:module" or a YAML file's path), the sha256 of what defines it
    # (a YAML file with its descriptor set; empty for Python), and the sha256 of the contract
    # (descriptor set) its calls use, which every saga started on it records and keeps.
    source: str = field(default="", compare=False)
    fingerprint: str = field(default="", compare=False)
    contract_hash: str = field(default="", compare=False)
    nodes: tuple[FlatNode, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"{self.name} v{self.version}"
        if self.business_key is None:
            raise ValueError(
                f"{where}: declare business_key, how the business key derives from the "
                f"input (e.g. business_key=lambda order: order.order_id)"
            )
        flat: list[FlatNode] = []
        _flatten(self.steps, -1, 0, flat)
        object.__setattr__(self, "nodes", tuple(flat))
        names = [node.name for node in _walk(self.steps)]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{where}: step names must be unique; {', '.join(duplicates)} appear more than once")
        kinds = [_compensation_kind(f.node) for f in flat if isinstance(f.node, Step | ChildSaga)]
        if StepKind.RETRIABLE in kinds and StepKind.COMPENSATABLE in kinds[kinds.index(StepKind.RETRIABLE) :]:
            raise ValueError(f"{where}: compensatable steps must come before retriable ones")
        for flat_node in flat:
            self._check_node(where, flat_node)
        pivot = self.pivot_index
        for flat_node in flat:
            node = flat_node.node
            compensates = isinstance(node, Approval) or (
                isinstance(node, WaitForSignal) and node.on_timeout is OnTimeout.COMPENSATE
            )
            if compensates and not self.before_pivot(flat_node.index):
                where_pivot = (
                    f"comes after the pivot ({flat[pivot].node.name})"
                    if pivot >= 0
                    else "is in a definition with no compensatable step"
                )
                raise ValueError(
                    f"{where}: {node.node_kind} {node.name} {where_pivot}, where nothing can be compensated: "
                    "move it before the pivot, or (a signal wait) choose on_timeout=CONTINUE or FAIL"
                )

    def _check_node(self, where: str, flat_node: FlatNode) -> None:
        node = flat_node.node
        if isinstance(node, Step):
            if node.kind is StepKind.COMPENSATABLE and node.compensation is None:
                raise ValueError(f"{where}: step {node.name} needs a compensation")
            if flat_node.group >= 0 and node.kind is StepKind.RETRIABLE:
                raise ValueError(
                    f"{where}: step {node.name} is retriable, which a parallel branch cannot hold: a branch "
                    f"is undone when another fails, so its steps must be compensatable"
                )
        elif isinstance(node, Timer):
            if (node.duration is None) == (node.until is None):
                raise ValueError(f"{where}: timer {node.name} needs exactly one of duration or until")
            if node.duration is not None:
                self._check_wait(where, node.name, "duration", node.duration)
        elif isinstance(node, WaitForSignal | Approval):
            self._check_wait(where, node.name, "timeout", node.timeout)
            if isinstance(node, WaitForSignal):
                if not SIGNAL_NAME.match(node.signal_name):
                    raise ValueError(
                        f"{where}: wait {node.name}: signal name {node.signal_name!r} must match {SIGNAL_NAME.pattern}"
                    )
                if flat_node.group >= 0 and node.on_timeout is OnTimeout.FAIL:
                    raise ValueError(
                        f"{where}: wait {node.name} in a parallel branch cannot fail for an operator "
                        "on timeout: choose compensate or continue"
                    )
            if (
                isinstance(node, Approval)
                and node.remind_after is not None
                and not 0 < node.remind_after < node.timeout
            ):
                raise ValueError(
                    f"{where}: approval {node.name}: remind_after must be positive and shorter than its timeout"
                )
        elif isinstance(node, ChildSaga):
            if node.definition.name == self.name:
                raise ValueError(f"{where}: child step {node.name} cannot start its own definition")
        elif isinstance(node, Parallel):
            if flat_node.group >= 0:
                raise ValueError(f"{where}: parallel group {node.name} is inside another; groups do not nest")
            if len(node.branches) < 2 or any(not branch for branch in node.branches):
                raise ValueError(f"{where}: parallel group {node.name} needs at least two non-empty branches")

    def _check_wait(self, where: str, name: str, what: str, seconds: float) -> None:
        # Every wait ends: a wait without a positive timeout would hang with no alarm.
        if not 0 < seconds < math.inf:
            raise ValueError(f"{where}: {name}: the {what} must be a positive, finite number of seconds")
        if self.deadline is not None and seconds > self.deadline:
            raise ValueError(
                f"{where}: {name}: the {what} ({seconds:g} s) exceeds the saga deadline ({self.deadline:g} s)"
            )

    @property
    def step_by_name(self) -> dict[str, Node]:
        return {node.name: node for node in _walk(self.steps)}

    @property
    def pivot_index(self) -> int:
        """Flat index of the last compensatable node: once it succeeded the saga can only go forward."""
        compensatable = [
            flat_node.index
            for flat_node in self.nodes
            if isinstance(flat_node.node, Step | ChildSaga)
            and _compensation_kind(flat_node.node) is StepKind.COMPENSATABLE
        ]
        return compensatable[-1] if compensatable else -1

    def before_pivot(self, index: int) -> bool:
        """Whether the node at a flat index can still be compensated: up to the pivot, or in the pivot's group.

        Branches are flattened one after another, so a node of an earlier branch can have a smaller
        index than the pivot (in a later branch) and still run after it; the group decides.
        """
        pivot = self.pivot_index
        if pivot < 0:
            return False
        group = self.nodes[pivot].group
        return index <= pivot or (group >= 0 and self.nodes[index].group == group)

    def node(self, index: int) -> Node:
        return self.nodes[index].node

    def step(self, index: int) -> Step:
        """The call step at a flat index (the engine only sends calls for call steps)."""
        node = self.nodes[index].node
        assert isinstance(node, Step), f"{node.name} is not a call step"
        return node

    def is_compensatable(self, index: int) -> bool:
        node = self.nodes[index].node
        return isinstance(node, Step | ChildSaga) and _compensation_kind(node) is StepKind.COMPENSATABLE

    def signal_names(self) -> set[str]:
        """Every signal name a wait of this definition consumes (a child's waits are the child's own)."""
        return {node.signal_name for node in _walk(self.steps) if isinstance(node, WaitForSignal | Approval)}

    def children(self) -> list[SagaDefinition]:
        """The child definitions this one starts, recursively."""
        found: list[SagaDefinition] = []
        for node in _walk(self.steps):
            if isinstance(node, ChildSaga):
                found += [node.definition, *node.definition.children()]
        return found

    def business_key_of(self, input_message: Message) -> str:
        """The business key this definition derives from an input message."""
        assert self.business_key is not None
        return str(self.business_key(input_message))

    def check_business_key(self, given: str, input_message: Message) -> None:
        """Refuse (BusinessKeyMismatch) a business key other than the one the input derives."""
        derived = self.business_key_of(input_message)
        if given != derived:
            raise BusinessKeyMismatch(self.name, given, derived)

    def context(
        self, saga_id: str, input_payload: bytes, results: dict[str, bytes], business_key: str = ""
    ) -> SagaContext:
        return SagaContext(saga_id, self.input_type.FromString(input_payload), results, self.step_by_name, business_key)


def _compensation_kind(node: Step | ChildSaga) -> StepKind:
    # A child saga is undone as a whole, so it counts as compensatable.
    return node.kind if isinstance(node, Step) else StepKind.COMPENSATABLE


class DefinitionRegistry:
    """Definitions by name and version; new sagas start on the latest, running ones keep theirs."""

    def __init__(self, definitions: Iterable[SagaDefinition] = ()) -> None:
        self._definitions: dict[tuple[str, int], SagaDefinition] = {}
        self._pinned: dict[str, int] = {}
        for definition in definitions:
            self.register(definition)

    def replace(self, definition: SagaDefinition) -> None:
        """Register a definition in place of the one of its name and version, if any (a reload)."""
        self._definitions[(definition.name, definition.version)] = definition

    def pin(self, name: str, version: int) -> None:
        """New sagas of name start on version rather than the latest (ORDER_SAGA_VERSION)."""
        self.get(name, version)
        self._pinned[name] = version

    def register(self, definition: SagaDefinition) -> None:
        for child in definition.children():
            if self.find(child.name, child.version) is not child:
                self.register(child)
        key = (definition.name, definition.version)
        if key in self._definitions and self._definitions[key] is not definition:
            raise ValueError(f"{definition.name} v{definition.version} is registered already")
        self._definitions[key] = definition

    def get(self, name: str, version: int) -> SagaDefinition:
        """The definition of name and version; DefinitionMissing (a LookupError) when it is not loaded."""
        found = self._definitions.get((name, version))
        if found is None:
            raise DefinitionMissing(name, version)
        return found

    def find(self, name: str, version: int) -> SagaDefinition | None:
        return self._definitions.get((name, version))

    def keys(self) -> set[tuple[str, int]]:
        """The (name, version) of every registered definition."""
        return set(self._definitions)

    def latest(self, name: str) -> SagaDefinition:
        """The version new sagas of name start on: the pinned one, else the highest."""
        if name in self._pinned:
            return self.get(name, self._pinned[name])
        versions = [d for (n, _), d in self._definitions.items() if n == name]
        if not versions:
            raise LookupError(f"no saga definition named {name!r} is registered")
        return max(versions, key=lambda d: d.version)

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._definitions})

    def all(self) -> list[SagaDefinition]:
        return list(self._definitions.values())
