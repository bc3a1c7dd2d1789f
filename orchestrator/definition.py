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

__all__ = [
    "DEFAULT_RETRYABLE_CODES",
    "Call",
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


@dataclass(frozen=True)
class SagaDefinition:
    """A named, versioned sequence of steps and the message type of its input."""

    name: str
    version: int
    input_type: type[Message]
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
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
        try:
            return self._definitions[(name, version)]
        except KeyError:
            raise LookupError(f"no saga definition {name} v{version} is registered") from None

    def latest(self, name: str) -> SagaDefinition:
        versions = [d for (n, _), d in self._definitions.items() if n == name]
        if not versions:
            raise LookupError(f"no saga definition named {name!r} is registered")
        return max(versions, key=lambda d: d.version)

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._definitions})

    def all(self) -> list[SagaDefinition]:
        return list(self._definitions.values())
