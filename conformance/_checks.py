"""The checks: every call step of a definition, action and compensation, against the live participant services."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from conformance._h2 import RawCallFailed, answered_with_message
from conformance._report import Check, CheckResult, Outcome, Report
from conformance._wire import Answer, Caller, describe_method
from orchestrator.definition import DEFAULT_RETRYABLE_CODES, Call, ChildSaga, SagaDefinition, Step
from orchestrator.status import Direction
from svckit.idempotency_key import IDEMPOTENCY_HEADER, step_key

__all__ = [
    "COMMITTED_LIMIT",
    "DEADLINE_ROUNDS",
    "DUPLICATES",
    "EXPIRED_CALLS",
    "EXPIRED_GRPC_TIMEOUT",
    "run_conformance",
]

# How many copies of one call are in flight at once in the concurrency check.
DUPLICATES = 20
# The shortest deadline a call can carry. Servers on grpc core round it up to the next millisecond,
# so some calls are answered in time; the check counts only those that end with no response.
EXPIRED_GRPC_TIMEOUT = "1n"
# Calls that ran out of time to collect, within at most DEADLINE_ROUNDS tries.
EXPIRED_CALLS = 6
DEADLINE_ROUNDS = 24
# A commit can beat its deadline by microseconds and lose only its answer; this many, out of
# EXPIRED_CALLS, cannot all have been that lucky (a service that ignores deadlines commits every one).
COMMITTED_LIMIT = 3

_ACTION, _COMPENSATION = Direction.ACTION.value, Direction.COMPENSATION.value
_REFUSED = grpc.StatusCode.FAILED_PRECONDITION


class _SetupFailed(Exception):
    """A call the check needed before its own (an earlier step's action, this step's action) was not accepted."""


class _Unbuildable(Exception):
    """A request builder raised: it reads something the kit cannot give it (a signal, a child's result)."""


@dataclass
class _Subject:
    """One fresh entity (a new business key) under its own saga id, with the calls before the checked one done."""

    saga_id: str
    input_payload: bytes
    business_key: str
    results: dict[str, bytes] = field(default_factory=dict)

    def key(self, step: Step, direction: str) -> str:
        return step_key(self.saga_id, step.name, direction)


def _call_of(step: Step, direction: str) -> Call:
    call = step.action if direction == _ACTION else step.compensation
    assert call is not None, f"{step.name} has no {direction}"
    return call


def _service_name(call: Call) -> str:
    return call.method_path.lstrip("/").partition("/")[0]


def _same(first: Answer, second: Answer) -> bool:
    """Byte for byte: the response, or the status code, message and details."""
    return first == second


class _Run:
    """The checks of one definition against one set of targets; rows collect in results."""

    def __init__(
        self,
        definition: SagaDefinition,
        caller: Caller,
        make_input: Callable[[str], Message],
        services: Collection[str] | None,
    ) -> None:
        self.definition = definition
        self.caller = caller
        self.make_input = make_input
        self.services = services
        self.steps = [flat.node for flat in definition.nodes if isinstance(flat.node, Step)]
        self.results: list[CheckResult] = []
        # Refusals seen per (step, direction): what was sent and what came back, for the REASONS check.
        self._refusals: dict[tuple[str, str], list[tuple[str, Answer]]] = {}
        self._request_types: dict[tuple[str, str], str] = {}
        self._health: dict[tuple[str, str], tuple[Outcome, str]] = {}
        self._reflection: dict[tuple[str, str], tuple[Answer, list[str], list[FileDescriptorProto]]] = {}

    # Subjects and calls.

    def fresh(self, step: Step, *, with_action: bool = False) -> _Subject:
        """A new entity with the actions of every call step before step done (and step's own, if asked)."""
        message = self.make_input(uuid.uuid4().hex[:12])
        subject = _Subject(
            uuid.uuid4().hex, message.SerializeToString(deterministic=True), self.definition.business_key_of(message)
        )
        for earlier in self.steps:
            if earlier is step:
                break
            self.do_action(subject, earlier)
        if with_action:
            self.do_action(subject, step)
        return subject

    def do_action(self, subject: _Subject, step: Step) -> None:
        answer = self.send(subject, step, _ACTION)
        if not answer.ok:
            raise _SetupFailed(
                f"setup: {step.name}'s action for a fresh {subject.business_key} answered {answer.describe()}; "
                "the kit needs an input every step accepts"
            )
        subject.results[step.name] = answer.payload

    def request(self, subject: _Subject, step: Step, direction: str) -> bytes:
        context = self.definition.context(
            subject.saga_id, subject.input_payload, dict(subject.results), subject.business_key
        )
        try:
            message = _call_of(step, direction).build_request(context)
        except Exception as error:
            raise _Unbuildable(
                f"cannot build the {direction} request of {step.name} ({type(error).__name__}: {error})"
            ) from error
        self._request_types[(step.name, direction)] = message.DESCRIPTOR.full_name
        return message.SerializeToString(deterministic=True)

    def send(
        self, subject: _Subject, step: Step, direction: str, *, request: bytes | None = None, key: str = ""
    ) -> Answer:
        call = _call_of(step, direction)
        payload = self.request(subject, step, direction) if request is None else request
        return self.caller.call(call.service, call.method_path, payload, key or subject.key(step, direction))

    def refusal(self, step: Step, direction: str, what: str, answer: Answer) -> None:
        if not answer.ok:
            self._refusals.setdefault((step.name, direction), []).append((what, answer))

    def record(self, check: Check, step: Step, direction: str, body: Callable[[], tuple[Outcome, str]]) -> None:
        try:
            outcome, reason = body()
        except _SetupFailed as error:
            outcome, reason = Outcome.FAIL, str(error)
        except _Unbuildable as error:
            outcome, reason = Outcome.SKIP, str(error)
        service = _call_of(step, direction).service if direction != "-" else ""
        self.results.append(CheckResult(check, step.name, direction, outcome, reason, service))

    # The checks of one step in one direction.

    def replay(self, step: Step, direction: str) -> tuple[Outcome, str]:
        subject = self.fresh(step, with_action=direction == _COMPENSATION)
        first = self.send(subject, step, direction)
        if not first.ok:
            return Outcome.FAIL, (
                f"the first call for a fresh {subject.business_key} answered {first.describe()}; "
                "the kit needs an input every step accepts"
            )
        second = self.send(subject, step, direction)
        if _same(first, second):
            return Outcome.PASS, f"the repeat got the stored answer back, the same {len(first.payload)} bytes"
        if not second.ok:
            return Outcome.FAIL, (
                f"the repeat under the same key answered {second.short()} where the first answered OK: "
                "the request ran again instead of replaying the stored answer"
            )
        difference = _difference(_call_of(step, direction).response_type, first.payload, second.payload)
        return Outcome.FAIL, (
            f"the repeat under the same key answered other bytes ({difference}): "
            "the request ran again instead of replaying the stored answer"
        )

    def key_reuse(self, step: Step, direction: str) -> tuple[Outcome, str]:
        first_subject = self.fresh(step, with_action=direction == _COMPENSATION)
        other_subject = self.fresh(step, with_action=direction == _COMPENSATION)
        request = self.request(first_subject, step, direction)
        other = self.request(other_subject, step, direction)
        if request == other:
            return Outcome.SKIP, "the request does not change with the input: there is no other request to send"
        key = first_subject.key(step, direction)
        first = self.send(first_subject, step, direction, request=request, key=key)
        if not first.ok:
            return Outcome.FAIL, f"the first call for a fresh {first_subject.business_key} answered {first.describe()}"
        second = self.send(other_subject, step, direction, request=other, key=key)
        self.refusal(step, direction, "another request under a used key", second)
        if second.code is _REFUSED:
            return Outcome.PASS, f"refused {second.short()}"
        if second.ok:
            return Outcome.FAIL, (
                "another request under a used key was accepted (OK): the service ran it instead of refusing the key"
            )
        return Outcome.FAIL, f"refused {second.describe()}; it must be FAILED_PRECONDITION"

    def concurrent(self, step: Step, direction: str) -> tuple[Outcome, str]:
        subject = self.fresh(step, with_action=direction == _COMPENSATION)
        call = _call_of(step, direction)
        request = self.request(subject, step, direction)
        key = subject.key(step, direction)
        answers = self.caller.call_concurrently(call.service, call.method_path, request, key, DUPLICATES)
        succeeded = [answer for answer in answers if answer.ok]
        retryable = [answer for answer in answers if answer.code in DEFAULT_RETRYABLE_CODES]
        others = [answer for answer in answers if not answer.ok and answer.code not in DEFAULT_RETRYABLE_CODES]
        if others:
            return Outcome.FAIL, (
                f"{len(others)} of {DUPLICATES} duplicates answered {others[0].short()}"
                f"{' (and ' + str(len(succeeded)) + ' OK)' if succeeded else ''}: they ran again instead of "
                "waiting for the first and replaying its answer"
            )
        if not succeeded:
            return Outcome.FAIL, (
                f"none of {DUPLICATES} duplicates succeeded; the first answered {answers[0].describe()}"
            )
        distinct = {answer.payload for answer in succeeded}
        if len(distinct) > 1:
            difference = _difference(call.response_type, *sorted(distinct)[:2])
            return Outcome.FAIL, (
                f"{len(distinct)} different answers among {len(succeeded)} OK duplicates ({difference}): "
                "the call ran more than once"
            )
        later = self.caller.call(call.service, call.method_path, request, key)
        if not _same(later, succeeded[0]):
            return Outcome.FAIL, f"a later repeat answered {later.describe()}, not the answer the duplicates got"
        note = f", {len(retryable)} refused as retryable ({retryable[0].code.name})" if retryable else ""
        return Outcome.PASS, f"{len(succeeded)} identical answers{note}; a later repeat got the same bytes"

    def compensation_first(self, step: Step) -> None:
        """Two rows: the early compensation (compensation) and the late action it must refuse (action)."""
        late_action: tuple[Outcome, str] = (Outcome.SKIP, "no compensation went first")

        def early() -> tuple[Outcome, str]:
            nonlocal late_action
            subject = self.fresh(step)
            try:
                request = self.request(subject, step, _COMPENSATION)
            except _Unbuildable as error:
                if not self._buildable_after_action(subject, step):
                    raise
                return Outcome.FAIL, (
                    f"the compensation's request needs the action's result ({error.__cause__}): the orchestrator "
                    "also compensates an action that timed out, which left no result"
                )
            answer = self.send(subject, step, _COMPENSATION, request=request)
            if not answer.ok:
                return Outcome.FAIL, (
                    f"a compensation with no action before it answered {answer.describe()}; it must succeed "
                    "(a no-op that leaves a tombstone)"
                )
            late_action = self._late_action(subject, step)
            return Outcome.PASS, f"answered OK ({len(answer.payload)} bytes) with no action before it"

        self.record(Check.COMPENSATION_FIRST, step, _COMPENSATION, early)
        self.record(Check.LATE_ACTION, step, _ACTION, lambda: late_action)

    def _buildable_after_action(self, subject: _Subject, step: Step) -> bool:
        try:
            self.do_action(subject, step)
            self.request(subject, step, _COMPENSATION)
        except (_Unbuildable, _SetupFailed):
            return False
        return True

    def _late_action(self, subject: _Subject, step: Step) -> tuple[Outcome, str]:
        late = self.send(subject, step, _ACTION)
        self.refusal(step, _ACTION, "the action after its compensation", late)
        if late.ok:
            return Outcome.FAIL, (
                "the action after its compensation was accepted (OK): the compensation left no tombstone, so "
                "the effect stays with nothing left to undo it"
            )
        if late.code is not _REFUSED:
            return Outcome.FAIL, f"refused {late.describe()}; it must be FAILED_PRECONDITION"
        resent = self.send(subject, step, _ACTION)
        if not _same(late, resent):
            return Outcome.FAIL, f"refused {late.describe()}, but a resend under its key answered {resent.describe()}"
        return Outcome.PASS, f"refused {late.short()}, and the same again on a resend"

    def deadline(self, step: Step, direction: str) -> tuple[Outcome, str]:
        call = _call_of(step, direction)
        expired = answered = 0
        committed: list[Answer] = []
        for _ in range(DEADLINE_ROUNDS):
            if expired >= EXPIRED_CALLS:
                break
            subject = self.fresh(step, with_action=direction == _COMPENSATION)
            request = self.request(subject, step, direction)
            key = subject.key(step, direction)
            try:
                in_time = answered_with_message(
                    self.caller.address(call.service),
                    call.method_path,
                    request,
                    ((IDEMPOTENCY_HEADER, key),),
                    EXPIRED_GRPC_TIMEOUT,
                    self.caller.timeout,
                )
            except (RawCallFailed, ValueError) as error:
                return Outcome.SKIP, f"could not send a call with a {EXPIRED_GRPC_TIMEOUT} deadline: {error}"
            if in_time:
                # Servers on grpc core round a deadline up to the millisecond: this one was met.
                answered += 1
                continue
            expired += 1
            other_subject = self.fresh(step, with_action=direction == _COMPENSATION)
            other = self.request(other_subject, step, direction)
            if other == request:
                return Outcome.SKIP, "the request does not change with the input: there is no other request to probe"
            probe = self.send(other_subject, step, direction, request=other, key=key)
            if probe.code is _REFUSED:
                committed.append(probe)
            elif not probe.ok:
                return Outcome.FAIL, (
                    f"after a call that ran out of time, another request under its key answered {probe.describe()}; "
                    "it should have been taken as new"
                )
        if len(committed) >= COMMITTED_LIMIT:
            return Outcome.FAIL, (
                f"{len(committed)} of {expired} calls that ran out of time (sent with grpc-timeout "
                f"{EXPIRED_GRPC_TIMEOUT}, ended with no response) committed all the same: another request under "
                f"each one's key was then refused {committed[0].short()}"
            )
        if not expired:
            return Outcome.SKIP, (
                f"all {answered} calls sent with grpc-timeout {EXPIRED_GRPC_TIMEOUT} were answered in time, "
                "so none ran out of time to check"
            )
        # One commit may have beaten the deadline by microseconds and lost only its answer.
        raced = f" ({len(committed)} committed just in time, within tolerance)" if committed else ""
        return Outcome.PASS, (
            f"{expired} calls that ran out of time committed nothing{raced}: their keys then took another request"
        )

    def reasons(self, step: Step, direction: str) -> tuple[Outcome, str]:
        seen = self._refusals.get((step.name, direction), [])
        if not seen:
            return Outcome.SKIP, "no refusal was seen to inspect"
        for what, answer in seen:
            if answer.code is not _REFUSED:
                return Outcome.FAIL, f"{what} was refused {answer.describe()}, not FAILED_PRECONDITION"
            if not answer.reason:
                return Outcome.FAIL, (
                    f"{what} was refused {answer.describe()} with no google.rpc.ErrorInfo reason in its "
                    "status details (grpc-status-details-bin)"
                )
        reasons = sorted({answer.reason for _, answer in seen})
        return Outcome.PASS, f"FAILED_PRECONDITION with ErrorInfo reasons {', '.join(reasons)}"

    def health(self, step: Step, direction: str) -> tuple[Outcome, str]:
        call = _call_of(step, direction)
        name = _service_name(call)
        cached = self._health.get((self.caller.address(call.service), name))
        if cached is None:
            cached = self._check_health(call.service, name)
            self._health[(self.caller.address(call.service), name)] = cached
        return cached

    def _check_health(self, service: str, name: str) -> tuple[Outcome, str]:
        answer = self.caller.health(service, name)
        checked = name
        if answer.code is grpc.StatusCode.NOT_FOUND:
            answer, checked = self.caller.health(service, ""), '"" (the server)'
        if not answer.ok:
            return Outcome.FAIL, f"grpc.health.v1.Health/Check answered {answer.describe()}"
        status = health_pb2.HealthCheckResponse.FromString(answer.payload).status
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        if status != health_pb2.HealthCheckResponse.SERVING:
            return Outcome.FAIL, f"Check({checked}) answered {status_name}"
        return Outcome.PASS, f"Check({checked}) answered {status_name}"

    def reflection(self, step: Step, direction: str) -> tuple[Outcome, str]:
        call = _call_of(step, direction)
        name = _service_name(call)
        where = (self.caller.address(call.service), name)
        if where not in self._reflection:
            self._reflection[where] = self.caller.reflect(call.service, name)
        answer, listed, files = self._reflection[where]
        if not answer.ok:
            return Outcome.FAIL, f"server reflection answered {answer.describe()}"
        if name not in listed:
            return Outcome.FAIL, f"reflection lists {', '.join(listed) or 'no service'}, not {name}"
        method = describe_method(files, call.method_path)
        if method is None:
            return Outcome.FAIL, f"reflection lists {name}, but its files do not define {call.method_name}"
        expected_output = call.response_type.DESCRIPTOR.full_name
        if method.output_type != expected_output:
            return Outcome.FAIL, (
                f"reflection says {call.method_name} returns {method.output_type}; the definition reads "
                f"{expected_output}"
            )
        expected_input = self._request_types.get((step.name, direction))
        if expected_input is not None and method.input_type != expected_input:
            return Outcome.FAIL, (
                f"reflection says {call.method_name} takes {method.input_type}; the definition sends {expected_input}"
            )
        return Outcome.PASS, f"lists {name}; {call.method_name}({method.input_type}) returns {method.output_type}"

    # The whole run.

    def checked(self, step: Step, direction: str) -> bool:
        call = step.action if direction == _ACTION else step.compensation
        return call is not None and (self.services is None or call.service in self.services)

    def run(self) -> None:
        for flat in self.definition.nodes:
            node = flat.node
            if not isinstance(node, Step):
                what = (
                    f"a child saga ({node.definition.name} v{node.definition.version}): check that definition "
                    "on its own"
                    if isinstance(node, ChildSaga)
                    else f"a {node.node_kind} node: nothing to call, nothing to check"
                )
                self.results.append(CheckResult(Check.NOT_A_CALL, node.name, "-", Outcome.SKIP, what))
                continue
            self.run_step(node)

    def run_step(self, step: Step) -> None:
        directions = [d for d in (_ACTION, _COMPENSATION) if self.checked(step, d)]
        for direction in directions:
            self.record(Check.REPLAY, step, direction, functools.partial(self.replay, step, direction))
            self.record(Check.KEY_REUSE, step, direction, functools.partial(self.key_reuse, step, direction))
            self.record(Check.CONCURRENT, step, direction, functools.partial(self.concurrent, step, direction))
            self.record(Check.DEADLINE, step, direction, functools.partial(self.deadline, step, direction))
        if _COMPENSATION in directions and _ACTION in directions:
            self.compensation_first(step)
        # After the checks above, which collect the refusals these inspect.
        for direction in directions:
            self.record(Check.REASONS, step, direction, functools.partial(self.reasons, step, direction))
            self.record(Check.HEALTH, step, direction, functools.partial(self.health, step, direction))
            self.record(Check.REFLECTION, step, direction, functools.partial(self.reflection, step, direction))

    def ordered(self) -> list[CheckResult]:
        """Rows by step (definition order), direction (action first), then check (as Check lists them)."""
        position = {node.name: index for index, node in enumerate(flat.node for flat in self.definition.nodes)}
        checks = list(Check)
        directions = {_ACTION: 0, _COMPENSATION: 1, "-": 2}
        return sorted(
            self.results,
            key=lambda r: (position[r.step], directions[r.direction], checks.index(r.check)),
        )


def _difference(response_type: type[Message], first: bytes, second: bytes) -> str:
    """Where two responses differ, as `field: first then second`, for a reader; byte counts if they do not parse."""
    try:
        parsed = [
            json_format.MessageToDict(response_type.FromString(raw), preserving_proto_field_name=True)
            for raw in (first, second)
        ]
    except (DecodeError, ValueError):
        return f"{len(first)} bytes, then {len(second)}"
    found = _first_difference(parsed[0], parsed[1], "")
    return found or f"{len(first)} bytes, then {len(second)} with the same fields"


def _first_difference(first: object, second: object, path: str) -> str | None:
    if isinstance(first, dict) and isinstance(second, dict):
        for name in sorted(set(first) | set(second)):
            found = _first_difference(first.get(name), second.get(name), f"{path}.{name}" if path else name)
            if found:
                return found
        return None
    if isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            found = _first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    if first != second:
        return f"{path or 'the response'}: {_shown(first)} then {_shown(second)}"
    return None


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _call_services(definition: SagaDefinition) -> set[str]:
    services: set[str] = set()
    for flat in definition.nodes:
        if isinstance(flat.node, Step):
            services.add(flat.node.action.service)
            if flat.node.compensation is not None:
                services.add(flat.node.compensation.service)
    return services


def run_conformance(
    definition: SagaDefinition,
    targets: Mapping[str, str],
    make_input: Callable[[str], Message],
    *,
    timeout: float = 10.0,
    services: Collection[str] | None = None,
) -> Report:
    """Check every call step of definition, action and compensation, against the services at targets.

    targets maps each service name the definition calls to host:port (every one is needed: the steps
    before a checked one really run, in order, to give it their results). make_input(unique) returns
    a new input message whose business key is new, so that each check acts on a fresh entity.
    services, when given, limits the checks to the calls of those services (the others still run as
    the steps before them). timeout bounds each call. Raises ValueError for targets or inputs that
    cannot work and TargetUnreachable when a target accepts no connection; the checks themselves
    never raise, they report.
    """
    needed = _call_services(definition)
    missing = sorted(needed - set(targets))
    if missing:
        raise ValueError(
            f"{definition.name} v{definition.version} calls {', '.join(missing)}, which "
            f"{'has' if len(missing) == 1 else 'have'} no target: give each as NAME=host:port"
        )
    unknown = sorted(set(services or ()) - needed)
    if unknown:
        raise ValueError(f"{definition.name} v{definition.version} never calls {', '.join(unknown)}")
    _check_inputs(definition, make_input)
    caller = Caller(targets, timeout)
    try:
        caller.connect(needed)
        run = _Run(definition, caller, make_input, None if services is None else set(services))
        run.run()
        return Report(f"{definition.name} v{definition.version}", run.ordered())
    finally:
        caller.close()


def _check_inputs(definition: SagaDefinition, make_input: Callable[[str], Message]) -> None:
    """make_input gives the definition's input type, and a new business key for each unique suffix."""
    first, second = make_input("conformance-probe-1"), make_input("conformance-probe-2")
    wanted = definition.input_type.DESCRIPTOR.full_name
    if first.DESCRIPTOR.full_name != wanted:
        raise ValueError(f"make_input returned a {first.DESCRIPTOR.full_name}; {definition.name} takes a {wanted}")
    if definition.business_key_of(first) == definition.business_key_of(second):
        raise ValueError(
            f"make_input gave the same business key ({definition.business_key_of(first)!r}) for two suffixes: "
            "each check needs a fresh entity, so the suffix must change the business key"
        )
