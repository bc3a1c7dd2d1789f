"""Builds the API's view of a saga (steps, attempts, history) from its stored state and events."""

from __future__ import annotations

from typing import Any

import grpc

from orchestrator.definition import SagaDefinition, Step
from orchestrator.engine import SagaState
from orchestrator.status import Direction, EventType, SagaStatus
from orchestrator.store import EventRecord, PendingCommand
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from svckit.convert import timestamp

__all__ = [
    "STATUS_FROM_PB",
    "STATUS_TO_PB",
    "StatusTracker",
    "api_status",
    "event_pb",
    "saga_pb",
    "steps_maybe_applied",
    "trace_id_of",
]

# The API's SagaStatus numbers by the same names: SAGA_STATUS_<status>.
STATUS_TO_PB: dict[SagaStatus, Any] = {status: pb.SagaStatus.Value(f"SAGA_STATUS_{status}") for status in SagaStatus}
STATUS_FROM_PB = {number: name for name, number in STATUS_TO_PB.items()}

# Keyed by str: a stored event's type is read back as its text.
_ATTEMPT_EVENTS: dict[str, Direction] = {
    EventType.STEP_SUCCEEDED: Direction.ACTION,
    EventType.STEP_FAILED: Direction.ACTION,
    EventType.COMPENSATION_SUCCEEDED: Direction.COMPENSATION,
    EventType.COMPENSATION_FAILED: Direction.COMPENSATION,
    EventType.EFFECT_AFTER_TERMINATE: Direction.ACTION,
}


def api_status(saga: SagaState) -> Any:
    """The API status: PAUSED while the paused flag is set, else the stored status."""
    return STATUS_TO_PB[saga.effective_status]


def trace_id_of(trace_context: str) -> str:
    parts = trace_context.split("-")
    return parts[1] if len(parts) == 4 else ""


def event_pb(event: EventRecord) -> pb.HistoryEvent:
    return pb.HistoryEvent(
        seq=event.seq,
        at=timestamp(event.at),
        type=event.type,
        step=event.step,
        attempt=event.attempt,
        code=event.code,
        message=event.message,
        actor=event.actor,
    )


def _steps(
    definition: SagaDefinition, saga: SagaState, events: list[EventRecord], pending: PendingCommand | None
) -> list[pb.SagaStep]:
    steps = {step.name: pb.SagaStep(name=step.name, index=i) for i, step in enumerate(definition.steps)}
    succeeded: set[str] = set()
    compensated: set[str] = set()
    failed: set[str] = set()
    for event in events:
        direction = _ATTEMPT_EVENTS.get(event.type)
        if direction is None or event.step not in steps:
            continue
        ended = event.at
        steps[event.step].attempts.append(
            pb.StepAttempt(
                direction=direction,
                attempt=event.attempt,
                started_at=timestamp(ended - event.duration_ms / 1000),
                ended_at=timestamp(ended),
                code=event.code,
                message=event.message,
            )
        )
        if event.type == EventType.STEP_SUCCEEDED:
            succeeded.add(event.step)
            failed.discard(event.step)
        elif event.type == EventType.STEP_FAILED:
            failed.add(event.step)
            steps[event.step].last_error = f"{event.code}: {event.message}"
        elif event.type == EventType.COMPENSATION_SUCCEEDED:
            compensated.add(event.step)
        elif event.type == EventType.EFFECT_AFTER_TERMINATE:
            # The call was on the wire at terminate: what it did stands, and is said so.
            (succeeded if event.code == "OK" else failed).add(event.step)
            steps[event.step].last_error = event.message
        else:
            steps[event.step].last_error = f"{event.code}: {event.message}"
    on_wire = definition.steps[pending.command.step_index].name if pending else None
    for name, view in steps.items():
        if name == on_wire and pending is not None:
            view.state = "running" if pending.command.direction == Direction.ACTION else "compensating"
        elif name in compensated:
            view.state = "compensated"
        elif name in succeeded:
            view.state = "succeeded"
        elif name in failed:
            view.state = "failed"
        else:
            view.state = "skipped" if saga.ended else "pending"
    return list(steps.values())


def steps_maybe_applied(
    definition: SagaDefinition, events: list[EventRecord], pending: PendingCommand | None
) -> list[str]:
    """The steps whose effects may stand: succeeded, or last answered uncertainly, or handed out
    and not yet answered; and not compensated since. In definition order."""
    by_name = definition.step_by_name
    may_stand: dict[str, bool] = {}
    for event in events:
        step = by_name.get(event.step)
        if step is None:
            continue
        if event.type in (EventType.STEP_SUCCEEDED, EventType.EFFECT_AFTER_TERMINATE):
            may_stand[step.name] = event.code == "OK" or _may_have_happened(step, event.code, True)
        elif event.type == EventType.STEP_FAILED:
            may_stand[step.name] = _may_have_happened(step, event.code, may_stand.get(step.name, False))
        elif event.type == EventType.COMPENSATION_SUCCEEDED:
            may_stand[step.name] = False
    if pending is not None and pending.lease_owner is not None and pending.command.direction == Direction.ACTION:
        may_stand[definition.steps[pending.command.step_index].name] = True
    return [step.name for step in definition.steps if may_stand.get(step.name)]


def _may_have_happened(step: Step, code_name: str, before: bool) -> bool:
    code = grpc.StatusCode.__members__.get(code_name)
    return before if code is None else step.may_have_happened(code, before)


def saga_pb(
    saga: SagaState,
    definition: SagaDefinition | None,
    events: list[EventRecord] | None = None,
    pending: PendingCommand | None = None,
    *,
    include_history: bool = False,
) -> pb.Saga:
    view = pb.Saga(
        saga_id=saga.saga_id,
        saga_type=saga.saga_type,
        definition_version=saga.version,
        business_key=saga.business_key,
        status=api_status(saga),
        created_at=timestamp(saga.created_at),
        updated_at=timestamp(saga.updated_at),
        deadline_at=timestamp(saga.deadline_at),
        last_error=saga.last_error,
        trace_id=trace_id_of(saga.trace_context),
    )
    if saga.ended_at is not None:
        view.ended_at.CopyFrom(timestamp(saga.ended_at))
    if definition is not None:
        if not saga.ended or saga.status == SagaStatus.NEEDS_ATTENTION:
            view.current_step = definition.steps[saga.step_index].name
        if events is not None:
            view.steps.extend(_steps(definition, saga, events, pending))
            if saga.status == SagaStatus.TERMINATED:
                view.steps_maybe_applied.extend(steps_maybe_applied(definition, events, pending))
    if include_history and events is not None:
        view.history.extend(event_pb(event) for event in events)
    return view


_ENDING_EVENTS: dict[str, Any] = {
    EventType.SAGA_COMPLETED: pb.SAGA_STATUS_COMPLETED,
    EventType.SAGA_COMPENSATED: pb.SAGA_STATUS_COMPENSATED,
    EventType.SAGA_NEEDS_ATTENTION: pb.SAGA_STATUS_NEEDS_ATTENTION,
    EventType.SAGA_TERMINATED: pb.SAGA_STATUS_TERMINATED,
}


class StatusTracker:
    """The saga's status after each event, folded from the event types of its history in order.

    Folding the history gives the status each event left behind, where the saga row only knows
    the latest. Until SagaStarted is seen (a watch that starts part-way) the current status stands.
    """

    def __init__(self) -> None:
        self._known = False
        self._compensating = False
        self._paused = False
        self._ended: int | None = None

    def after(self, event: pb.HistoryEvent, reported: Any) -> Any:
        kind = event.type
        if kind == EventType.SAGA_STARTED:
            self._known = True
        elif kind == EventType.COMPENSATION_STARTED:
            self._compensating = True
        elif kind == EventType.SAGA_PAUSED:
            self._paused = True
        elif kind in (EventType.SAGA_RESUMED, EventType.SAGA_CANCEL_REQUESTED):
            self._paused = False
        elif kind == EventType.SAGA_RETRIED:
            self._ended = None
        elif kind in _ENDING_EVENTS:
            self._ended = _ENDING_EVENTS[kind]
            self._paused = False
        if not self._known:
            return reported
        if self._ended is not None:
            return self._ended
        if self._paused:
            return pb.SAGA_STATUS_PAUSED
        return pb.SAGA_STATUS_COMPENSATING if self._compensating else pb.SAGA_STATUS_RUNNING
