"""The saga state machine: pure transitions from an outcome or an operator call to new state, events and command."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

from orchestrator.definition import SagaDefinition, Step, StepKind
from orchestrator.errors import IllegalState
from orchestrator.status import (
    ENDED_STATUSES,
    IN_FLIGHT_STATUSES,
    Direction,
    EventType,
    OperatorCall,
    SagaStatus,
    effective_status,
)
from svckit.idempotency_key import step_key

__all__ = [
    "ACTION",
    "COMPENSATION",
    "DEFINITION_MISSING",
    "EFFECT_AFTER_TERMINATE",
    "ENDED_STATUSES",
    "Command",
    "Engine",
    "Event",
    "Outcome",
    "SagaState",
    "Status",
    "Transition",
]

# Short names of the vocabulary (orchestrator.status) the engine and its tests use throughout.
ACTION, COMPENSATION = Direction.ACTION, Direction.COMPENSATION
EFFECT_AFTER_TERMINATE = EventType.EFFECT_AFTER_TERMINATE
Status = SagaStatus
# Reason (event code) of a saga stopped because its definition is not loaded in this replica.
DEFINITION_MISSING = "DEFINITION_MISSING"


@dataclass
class SagaState:
    """A saga as the engine sees it; the store maps it to and from its row."""

    saga_id: str
    saga_type: str
    version: int
    business_key: str
    input: bytes
    status: SagaStatus
    deadline_at: float
    created_at: float
    updated_at: float
    paused: bool = False
    cancel_requested: bool = False
    step_index: int = 0
    compensations: list[int] = field(default_factory=list)
    results: dict[str, bytes] = field(default_factory=dict)
    last_error: str = ""
    trace_context: str = ""
    event_seq: int = 0
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATUSES

    @property
    def effective_status(self) -> SagaStatus:
        """The status it reports: PAUSED while paused and not ended, else the stored status."""
        return effective_status(self.status, self.paused)


@dataclass
class Command:
    """The next call a saga must make: one step in one direction, with its attempt count."""

    saga_id: str
    step_index: int
    direction: Direction
    attempt: int
    first_attempt_at: float
    uncertain: bool = False
    due_at: float | None = None

    def idempotency_key(self, step_name: str) -> str:
        # Independent of the attempt: a resend is the same command, and the service replays it.
        return step_key(self.saga_id, step_name, self.direction)


@dataclass(frozen=True)
class Outcome:
    """What a call returned: OK with the response bytes, or an error code and message."""

    code: grpc.StatusCode
    message: str = ""
    response: bytes | None = None
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def duration_ms(self) -> float:
        return max(0.0, (self.ended_at - self.started_at) * 1000)


@dataclass
class Event:
    """One history entry to append."""

    type: EventType
    at: float
    step: str = ""
    attempt: int = 0
    code: str = ""
    message: str = ""
    duration_ms: float = 0.0
    actor: str = "orchestrator"


@dataclass
class Transition:
    """The result of applying something to a saga: events to append and the saga's next command."""

    events: list[Event] = field(default_factory=list)
    next_command: Command | None = None


class Engine:
    """Applies outcomes and operator calls to sagas, following their definitions."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    # -- forward and backward ------------------------------------------------------------

    def start(self, definition: SagaDefinition, saga: SagaState, now: float) -> Transition:
        transition = Transition(
            [Event(EventType.SAGA_STARTED, now, message=f"{definition.name} v{definition.version}")]
        )
        transition.next_command = self._schedule(saga, Command(saga.saga_id, 0, ACTION, 1, now), now)
        return transition

    def on_outcome(
        self, definition: SagaDefinition, saga: SagaState, command: Command, outcome: Outcome, now: float
    ) -> Transition:
        step = definition.steps[command.step_index]
        saga.updated_at = now
        if saga.ended:
            # Only a terminated saga has a call out after its end: terminate keeps the call's row.
            return self._after_terminate(saga, step, command, outcome, now)
        if command.direction == ACTION:
            return self._on_action_outcome(definition, saga, step, command, outcome, now)
        return self._on_compensation_outcome(definition, saga, step, command, outcome, now)

    def _on_action_outcome(
        self, definition: SagaDefinition, saga: SagaState, step: Step, command: Command, outcome: Outcome, now: float
    ) -> Transition:
        transition = Transition()
        if outcome.ok:
            assert outcome.response is not None
            saga.results[step.name] = outcome.response
            transition.events.append(
                Event(EventType.STEP_SUCCEEDED, now, step.name, command.attempt, "OK", duration_ms=outcome.duration_ms)
            )
            if saga.cancel_requested and command.step_index <= definition.pivot_index:
                self._begin_compensation(definition, saga, command.step_index + 1, transition, now, "cancelled")
                return transition
            if command.step_index + 1 == len(definition.steps):
                self._end(saga, Status.COMPLETED, now, transition)
                return transition
            saga.step_index = command.step_index + 1
            transition.next_command = self._schedule(saga, Command(saga.saga_id, saga.step_index, ACTION, 1, now), now)
            return transition

        retryable = step.is_retryable(outcome.code)
        # Whether the step may have taken effect under this saga's key: a definite refusal (the
        # participant's recorded answer to this key) says it did not, whatever came before.
        uncertain = step.may_have_happened(outcome.code, command.uncertain)
        saga.last_error = f"{step.name}: {outcome.code.name}: {outcome.message}"
        transition.events.append(
            Event(
                EventType.STEP_FAILED,
                now,
                step.name,
                command.attempt,
                outcome.code.name,
                outcome.message,
                outcome.duration_ms,
            )
        )
        compensatable = step.kind is StepKind.COMPENSATABLE
        deadline_passed = compensatable and now >= saga.deadline_at
        delay = step.retry.delay(command.attempt, self._rng)
        may_retry = (
            retryable
            and not saga.cancel_requested
            and not deadline_passed
            and command.attempt < step.retry.maximum_attempts
            and now + delay <= command.first_attempt_at + step.budget
            and (not compensatable or now + delay < saga.deadline_at)
        )
        if may_retry:
            retry = Command(
                saga.saga_id, command.step_index, ACTION, command.attempt + 1, command.first_attempt_at, uncertain
            )
            transition.events.append(
                Event(
                    EventType.STEP_RETRY_SCHEDULED, now, step.name, retry.attempt, message=f"in {delay * 1000:.0f} ms"
                )
            )
            transition.next_command = self._schedule(saga, retry, now + delay)
            return transition
        if not compensatable:
            # Past the pivot the order stands: an operator must look, nothing is unwound.
            self._need_attention(saga, now, transition)
            return transition
        reason = (
            "cancelled"
            if saga.cancel_requested
            else ("saga deadline passed" if deadline_passed else f"{step.name} failed: {outcome.code.name}")
        )
        # A step whose outcome is unknown may have taken effect: compensate it too.
        self._begin_compensation(
            definition, saga, command.step_index + (1 if uncertain else 0), transition, now, reason
        )
        return transition

    def _on_compensation_outcome(
        self, definition: SagaDefinition, saga: SagaState, step: Step, command: Command, outcome: Outcome, now: float
    ) -> Transition:
        transition = Transition()
        if outcome.ok:
            transition.events.append(
                Event(
                    EventType.COMPENSATION_SUCCEEDED,
                    now,
                    step.name,
                    command.attempt,
                    "OK",
                    duration_ms=outcome.duration_ms,
                )
            )
            saga.compensations = saga.compensations[1:]
            self._next_compensation(saga, transition, now)
            return transition
        saga.last_error = f"{step.name} compensation: {outcome.code.name}: {outcome.message}"
        transition.events.append(
            Event(
                EventType.COMPENSATION_FAILED,
                now,
                step.name,
                command.attempt,
                outcome.code.name,
                outcome.message,
                outcome.duration_ms,
            )
        )
        delay = step.compensation_retry.delay(command.attempt, self._rng)
        if (
            step.is_retryable(outcome.code)
            and command.attempt < step.compensation_retry.maximum_attempts
            and now + delay <= command.first_attempt_at + step.compensation_budget
        ):
            retry = Command(
                saga.saga_id, command.step_index, COMPENSATION, command.attempt + 1, command.first_attempt_at
            )
            transition.events.append(
                Event(
                    EventType.COMPENSATION_RETRY_SCHEDULED,
                    now,
                    step.name,
                    retry.attempt,
                    message=f"in {delay * 1000:.0f} ms",
                )
            )
            transition.next_command = self._schedule(saga, retry, now + delay)
            return transition
        self._need_attention(saga, now, transition)
        return transition

    def _after_terminate(
        self, saga: SagaState, step: Step, command: Command, outcome: Outcome, now: float
    ) -> Transition:
        """Record what a call on the wire at terminate did; nothing more is sent and nothing is undone."""
        code = outcome.code.name

        def recorded(event_type: EventType, message: str) -> Transition:
            return Transition([Event(event_type, now, step.name, command.attempt, code, message, outcome.duration_ms)])

        if command.direction == COMPENSATION:
            if outcome.ok:
                return recorded(EventType.COMPENSATION_SUCCEEDED, "after terminate: the step's effect is undone")
            return recorded(EventType.COMPENSATION_FAILED, f"after terminate: {outcome.message}")
        if outcome.ok:
            assert outcome.response is not None
            saga.results[step.name] = outcome.response
            return recorded(EFFECT_AFTER_TERMINATE, "effect applied after terminate; not compensated")
        if step.may_have_happened(outcome.code, command.uncertain):
            return recorded(
                EFFECT_AFTER_TERMINATE,
                f"outcome unknown after terminate ({outcome.message}); the effect may stand; not compensated",
            )
        return recorded(EventType.STEP_FAILED, outcome.message)

    def _begin_compensation(
        self, definition: SagaDefinition, saga: SagaState, upto: int, transition: Transition, now: float, reason: str
    ) -> None:
        """Compensate the compensatable steps with index below upto, newest first."""
        saga.status = Status.COMPENSATING
        saga.cancel_requested = False
        saga.compensations = [
            i
            for i in range(min(upto, definition.pivot_index + 1) - 1, -1, -1)
            if definition.steps[i].kind is StepKind.COMPENSATABLE
        ]
        transition.events.append(Event(EventType.COMPENSATION_STARTED, now, message=reason))
        self._next_compensation(saga, transition, now)

    def _next_compensation(self, saga: SagaState, transition: Transition, now: float) -> None:
        if not saga.compensations:
            self._end(saga, Status.COMPENSATED, now, transition)
            return
        saga.step_index = saga.compensations[0]
        transition.next_command = self._schedule(
            saga, Command(saga.saga_id, saga.step_index, COMPENSATION, 1, now), now
        )

    def _schedule(self, saga: SagaState, command: Command, due_at: float) -> Command:
        command.due_at = None if saga.paused else due_at
        return command

    def _end(self, saga: SagaState, status: SagaStatus, now: float, transition: Transition) -> None:
        saga.status = status
        saga.ended_at = now
        saga.paused = False
        transition.events.append(Event(_END_EVENTS[status], now))

    def _need_attention(self, saga: SagaState, now: float, transition: Transition) -> None:
        saga.status = Status.NEEDS_ATTENTION
        # Like an end, it waits for an operator: a pause made while its last call was on the
        # wire would otherwise report it as PAUSED and hide it from a NEEDS_ATTENTION listing.
        saga.paused = False
        transition.events.append(Event(EventType.SAGA_NEEDS_ATTENTION, now, message=saga.last_error))

    # -- operator calls --------------------------------------------------------------------
    # Each takes the saga's pending command (None when there is none) and whether that command
    # is out on the wire now; it returns the transition, whose next_command replaces the pending one.

    def pause(self, saga: SagaState, pending: Command | None, actor: str, reason: str, now: float) -> Transition:
        if saga.status not in IN_FLIGHT_STATUSES or saga.paused:
            raise _illegal(saga, OperatorCall.PAUSE)
        saga.paused = True
        saga.updated_at = now
        transition = Transition([Event(EventType.SAGA_PAUSED, now, message=reason, actor=actor)])
        if pending is not None:
            pending.due_at = None
        transition.next_command = pending
        return transition

    def resume(self, saga: SagaState, pending: Command | None, actor: str, now: float) -> Transition:
        if not saga.paused:
            raise _illegal(saga, OperatorCall.RESUME)
        saga.paused = False
        saga.updated_at = now
        if pending is not None and pending.due_at is None:
            pending.due_at = now
        return Transition([Event(EventType.SAGA_RESUMED, now, actor=actor)], pending)

    def cancel(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        pending: Command | None,
        in_flight: bool,
        actor: str,
        reason: str,
        now: float,
    ) -> Transition:
        if saga.status != Status.RUNNING or saga.step_index > definition.pivot_index:
            raise _illegal(saga, OperatorCall.CANCEL)
        saga.paused = False
        saga.updated_at = now
        transition = Transition([Event(EventType.SAGA_CANCEL_REQUESTED, now, message=reason, actor=actor)])
        if in_flight:
            # The call on the wire decides: its outcome starts the compensation.
            saga.cancel_requested = True
            transition.next_command = pending
            return transition
        uncertain = pending is not None and pending.uncertain
        saga.last_error = f"cancelled: {reason}" if reason else "cancelled"
        self._begin_compensation(
            definition, saga, saga.step_index + (1 if uncertain else 0), transition, now, "cancelled"
        )
        return transition

    def terminate(self, saga: SagaState, actor: str, reason: str, now: float) -> Transition:
        if saga.ended:
            raise _illegal(saga, OperatorCall.TERMINATE)
        saga.status = Status.TERMINATED
        saga.ended_at = now
        saga.updated_at = now
        saga.paused = False
        saga.last_error = f"terminated: {reason}"
        return Transition([Event(EventType.SAGA_TERMINATED, now, message=reason, actor=actor)], None)

    def definition_missing(self, saga: SagaState, detail: str, now: float) -> Transition:
        """Stop a saga this replica cannot run, for an operator: its definition is not loaded."""
        saga.status = Status.NEEDS_ATTENTION
        saga.paused = False
        saga.updated_at = now
        saga.last_error = f"{DEFINITION_MISSING}: {detail}"
        return Transition([Event(EventType.SAGA_NEEDS_ATTENTION, now, code=DEFINITION_MISSING, message=detail)])

    def retry(self, saga: SagaState, actor: str, now: float) -> Transition:
        if saga.status != Status.NEEDS_ATTENTION:
            raise _illegal(saga, OperatorCall.RETRY)
        saga.updated_at = now
        if saga.compensations:
            saga.status = Status.COMPENSATING
            command = Command(saga.saga_id, saga.compensations[0], COMPENSATION, 1, now, due_at=now)
        else:
            saga.status = Status.RUNNING
            command = Command(saga.saga_id, saga.step_index, ACTION, 1, now, due_at=now)
        return Transition(
            [Event(EventType.SAGA_RETRIED, now, message=f"from step index {command.step_index}", actor=actor)], command
        )


_END_EVENTS = {SagaStatus.COMPLETED: EventType.SAGA_COMPLETED, SagaStatus.COMPENSATED: EventType.SAGA_COMPENSATED}
# What each operator call applies to, as its refusal says.
_APPLIES_TO = {
    OperatorCall.PAUSE: "only a running or compensating saga that is not paused",
    OperatorCall.RESUME: "only a paused saga",
    OperatorCall.CANCEL: "only a running saga before its pivot step has succeeded",
    OperatorCall.TERMINATE: "only a saga that has not ended",
    OperatorCall.RETRY: "only a saga that needs attention",
}


def _illegal(saga: SagaState, operation: OperatorCall) -> IllegalState:
    return IllegalState(operation, saga.saga_id, saga.effective_status, _APPLIES_TO[operation])
