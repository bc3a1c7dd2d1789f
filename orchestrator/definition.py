"""The saga definition API: steps with action and compensation side by side, registered by name and version."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from svckit.errors import FailedPrecondition, FieldViolation, InvalidArgument
from svckit.validation import quote

__all__ = [
    "DEFAULT_RETRYABLE_CODES",
    "DEFINITE_CODES",
    "UNCERTAIN_CODES",
    "BusinessKeyMismatch",
    "Call",
    "DefinitionMissing",
    "DefinitionRegistry",
    "RetryPolicy",
    "SagaContext",
    "SagaDefinition",
    "Step",
    "StepKind",
    "rpc",
]

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
    """What a request builder may read: the saga's stored input and its steps' stored results."""

    def __init__(self, saga_id: str, input_message: Message, results: dict[str, bytes], steps: dict[str, Step]) -> None:
        self.saga_id = saga_id
        # Typed loosely: each definition knows its own input message type.
        self.input: Any = input_message
        self._results = results
        self._steps = steps

    def result(self, step_name: str) -> Any:
        """The stored response of a step that succeeded, parsed as its action's response type."""
        payload = self._results.get(step_name)
        if payload is None:
            raise LookupError(f"step {step_name!r} has no stored result")
        return self._steps[step_name].action.response_type.FromString(payload)


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
class SagaDefinition:
    """A named, versioned sequence of steps, the message type of its input and how its business key derives from it.

    business_key maps the input message to the saga's business key (the order saga:
    `lambda order: order.order_id`). It is required: the compensations of a saga act on what its
    input names (an order's stock, payment, shipment), so one input entity must have one saga, and a
    start under any other key is refused.
    """

    name: str
    version: int
    input_type: type[Message]
    steps: tuple[Step, ...]
    business_key: Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        if self.business_key is None:
            raise ValueError(
                f"{self.name} v{self.version}: declare business_key, how the business key derives from the "
                f"input (e.g. business_key=lambda order: order.order_id)"
            )
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name} v{self.version}: step names must be unique")
        kinds = [step.kind for step in self.steps]
        if StepKind.RETRIABLE in kinds and StepKind.COMPENSATABLE in kinds[kinds.index(StepKind.RETRIABLE) :]:
            raise ValueError(f"{self.name} v{self.version}: compensatable steps must come before retriable ones")
        for step in self.steps:
            if step.kind is StepKind.COMPENSATABLE and step.compensation is None:
                raise ValueError(f"{self.name} v{self.version}: step {step.name} needs a compensation")

    @property
    def step_by_name(self) -> dict[str, Step]:
        return {step.name: step for step in self.steps}

    @property
    def pivot_index(self) -> int:
        """Index of the last compensatable step: once it succeeded the saga can only go forward."""
        compensatable = [i for i, step in enumerate(self.steps) if step.kind is StepKind.COMPENSATABLE]
        return compensatable[-1] if compensatable else -1

    def business_key_of(self, input_message: Message) -> str:
        """The business key this definition derives from an input message."""
        assert self.business_key is not None
        return str(self.business_key(input_message))

    def check_business_key(self, given: str, input_message: Message) -> None:
        """Refuse (BusinessKeyMismatch) a business key other than the one the input derives."""
        derived = self.business_key_of(input_message)
        if given != derived:
            raise BusinessKeyMismatch(self.name, given, derived)

    def context(self, saga_id: str, input_payload: bytes, results: dict[str, bytes]) -> SagaContext:
        return SagaContext(saga_id, self.input_type.FromString(input_payload), results, self.step_by_name)


class DefinitionRegistry:
    """Definitions by name and version; new sagas start on the latest, running ones keep theirs."""

    def __init__(self, definitions: Iterable[SagaDefinition] = ()) -> None:
        self._definitions: dict[tuple[str, int], SagaDefinition] = {}
        for definition in definitions:
            self.register(definition)

    def register(self, definition: SagaDefinition) -> None:
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
        versions = [d for (n, _), d in self._definitions.items() if n == name]
        if not versions:
            raise LookupError(f"no saga definition named {name!r} is registered")
        return max(versions, key=lambda d: d.version)

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._definitions})

    def all(self) -> list[SagaDefinition]:
        return list(self._definitions.values())
