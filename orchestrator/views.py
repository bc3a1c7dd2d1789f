"""Builds the API's view of a saga (steps, attempts, history) from its stored state and events."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError, Message

from orchestrator.definition import (
    Approval,
    Call,
    ChildSaga,
    Node,
    OnTimeout,
    SagaDefinition,
    Step,
    Timer,
    WaitForSignal,
)
from orchestrator.engine import WAIT_END_EVENTS as _WAIT_END_EVENTS
from orchestrator.engine import SagaState
from orchestrator.engine import utc_clock as _clock
from orchestrator.status import Direction, EventType, SagaStatus
from orchestrator.store import EventRecord, PendingCommand
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from svckit.convert import timestamp

__all__ = [
    "MAX_VIEW_JSON_BYTES",
    "STATUS_FROM_PB",
    "STATUS_TO_PB",
    "StatusTracker",
    "api_status",
    "capped_json",
    "definition_info_pb",
    "event_pb",
    "input_json",
    "message_json",
    "result_json",
    "saga_pb",
    "steps_maybe_applied",
    "trace_id_of",
]

# GetSaga's input_json and each step's result_json: larger JSON is left out (flagged truncated), never cut,
# so what a client gets always parses. 64 KiB holds any input (its wire form is capped at 64 KiB too,
# and JSON rarely takes more) and the results of the suite's calls many times over.
MAX_VIEW_JSON_BYTES = 64 * 1024

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


def capped_json(text: str) -> tuple[str, bool]:
    """(text, False) when it fits MAX_VIEW_JSON_BYTES in UTF-8, else ("", True): JSON is never cut."""
    if len(text) > MAX_VIEW_JSON_BYTES or len(text.encode()) > MAX_VIEW_JSON_BYTES:
        return "", True
    return text, False


def message_json(message: Message) -> str:
    """A message in the proto3 JSON mapping, compact, with proto field names (as YAML expressions read them)."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False)


def input_json(saga: SagaState, definition: SagaDefinition) -> tuple[str, bool]:
    """The saga's stored input as capped JSON; ("", False) when it does not parse as the input type."""
    try:
        return capped_json(message_json(definition.input_type.FromString(saga.input)))
    except DecodeError:
        return "", False


def result_json(node: Node, payload: bytes) -> tuple[str, bool]:
    """A node's stored result as capped JSON: a call's response, a wait's Struct payload, a child's stored
    outcome; ("", False) for a node without results or a payload that does not parse."""
    try:
        if isinstance(node, Step):
            return capped_json(message_json(node.action.response_type.FromString(payload)))
        if isinstance(node, WaitForSignal | Approval):
            return capped_json(message_json(struct_pb2.Struct.FromString(payload)))
        if isinstance(node, ChildSaga):
            # Stored as JSON already (definition.encode_child_result): the child's id, key, input and results.
            return capped_json(payload.decode())
    except (DecodeError, UnicodeDecodeError):
        pass
    return "", False


def _steps(
    definition: SagaDefinition,
    saga: SagaState,
    events: list[EventRecord],
    pendings: dict[str, PendingCommand],
    *,
    include_results: bool = False,
) -> list[pb.SagaStep]:
    steps: dict[str, pb.SagaStep] = {}
    for flat in definition.nodes:
        group = definition.nodes[flat.group].node.name if flat.group >= 0 else ""
        view = steps[flat.node.name] = pb.SagaStep(
            name=flat.node.name,
            index=flat.index,
            kind=flat.node.node_kind,
            group=group,
            branch=flat.branch,
            child_saga_id=saga.progress.children.get(flat.node.name, ""),
        )
        payload = saga.results.get(flat.node.name) if include_results else None
        if payload is not None:
            view.result_json, view.result_truncated = result_json(flat.node, payload)
    skipped = {definition.nodes[i].node.name for i in saga.progress.skipped}
    waiting = {definition.nodes[p.command.step_index].node.name: p for p in pendings.values()}
    finished_waits: set[str] = set()
    succeeded: set[str] = set()
    compensated: set[str] = set()
    failed: set[str] = set()
    for event in events:
        if event.type in _WAIT_END_EVENTS and event.step in steps:
            finished_waits.add(event.step)
            if event.code not in ("OK", "APPROVED", "COMPLETED", ""):
                steps[event.step].last_error = f"{event.code}: {event.message}"
            continue
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
    for name, view in steps.items():
        pending = waiting.get(name)
        if pending is not None:
            if pending.command.direction == Direction.COMPENSATION:
                view.state = "compensating"
            elif view.kind == "call":
                view.state = "running"
            else:
                view.state = "waiting"
        elif name in skipped:
            view.state = "skipped"
        elif name in compensated:
            view.state = "compensated"
        elif name in succeeded:
            view.state = "succeeded"
        elif name in failed:
            view.state = "failed"
        elif name in finished_waits:
            view.state = "failed" if view.last_error else "succeeded"
        else:
            view.state = "skipped" if saga.ended else "pending"
    # A group stands where its branches stand: a second pass, once every branch step has its state.
    for view in steps.values():
        if view.kind == "parallel" and view.name not in skipped:
            view.state = _group_state([s.state for s in steps.values() if s.group == view.name], view.state)
    return list(steps.values())


def _group_state(members: list[str], otherwise: str) -> str:
    for state in ("compensating", "running", "waiting", "failed", "compensated"):
        if state in members:
            return state
    if members and all(state in ("succeeded", "skipped") for state in members):
        return "succeeded"
    return otherwise


def waits_pb(definition: SagaDefinition, saga: SagaState, pendings: dict[str, PendingCommand]) -> list[pb.SagaWait]:
    """What the saga waits for, one entry per waiting track: timers, signals, approvals, children."""
    waits: list[pb.SagaWait] = []
    for track, pending in sorted(pendings.items()):
        command = pending.command
        if command.wait_until is None:
            continue
        node = definition.node(command.step_index)
        wait = pb.SagaWait(step=node.name, branch=int(track) if track else 0, since=timestamp(command.first_attempt_at))
        if command.due_at is not None or not saga.paused:
            wait.until.CopyFrom(timestamp(command.wait_until))
        ending = f"times out at {_clock(command.wait_until)}"
        if isinstance(node, Timer):
            wait.kind = "timer"
            wait.description = (
                f"timer {node.name} since {_clock(command.first_attempt_at)}, fires at {_clock(command.wait_until)}"
            )
        elif isinstance(node, Approval):
            wait.kind, wait.signal = "approval", node.role
            wait.description = f"approval {node.name} by {node.role} since {_clock(command.first_attempt_at)}, {ending}"
        elif isinstance(node, WaitForSignal):
            wait.kind, wait.signal = "signal", node.signal_name
            wait.description = f"signal {node.signal_name} since {_clock(command.first_attempt_at)}, {ending}"
        elif isinstance(node, ChildSaga):
            wait.kind = "child"
            wait.child_saga_id = saga.progress.children.get(node.name, "")
            verb = "compensating" if command.direction == Direction.COMPENSATION else "running"
            wait.description = (
                f"child {node.definition.name} {wait.child_saga_id} {verb} since {_clock(command.first_attempt_at)}"
            )
        if track:
            wait.description = f"branch {track} at step {node.name}: {wait.description}"
        if saga.paused:
            wait.description += " (held: paused)"
        waits.append(wait)
    return waits


def steps_maybe_applied(
    definition: SagaDefinition, events: list[EventRecord], pendings: dict[str, PendingCommand]
) -> list[str]:
    """The steps whose effects may stand: succeeded, or last answered uncertainly, or handed out
    and not yet answered; and not compensated since. In definition order."""
    by_name = definition.step_by_name
    may_stand: dict[str, bool] = {}
    for event in events:
        step = by_name.get(event.step)
        if isinstance(step, ChildSaga) and event.type == EventType.CHILD_STARTED:
            may_stand[step.name] = True
            continue
        if not isinstance(step, Step):
            continue
        if event.type in (EventType.STEP_SUCCEEDED, EventType.EFFECT_AFTER_TERMINATE):
            may_stand[step.name] = event.code == "OK" or _may_have_happened(step, event.code, True)
        elif event.type == EventType.STEP_FAILED:
            may_stand[step.name] = _may_have_happened(step, event.code, may_stand.get(step.name, False))
        elif event.type == EventType.COMPENSATION_SUCCEEDED:
            may_stand[step.name] = False
    for pending in pendings.values():
        if pending.lease_owner is not None and pending.command.direction == Direction.ACTION:
            node = definition.node(pending.command.step_index)
            if isinstance(node, Step):
                may_stand[node.name] = True
    return [flat.node.name for flat in definition.nodes if may_stand.get(flat.node.name)]


def _may_have_happened(step: Step, code_name: str, before: bool) -> bool:
    code = grpc.StatusCode.__members__.get(code_name)
    return before if code is None else step.may_have_happened(code, before)


def saga_pb(
    saga: SagaState,
    definition: SagaDefinition | None,
    events: list[EventRecord] | None = None,
    pendings: dict[str, PendingCommand] | None = None,
    *,
    include_history: bool = False,
    include_data: bool = False,
    include_results: bool = False,
    children: list[SagaState] | None = None,
) -> pb.Saga:
    """The API's view of a saga. With events, its steps; include_data adds its input and each step's
    result as JSON (GetSaga: a list spares the cost), include_results only the results (the waiting
    starts: the caller sent the input)."""
    pendings = pendings or {}
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
        parent_saga_id=saga.parent_id,
        contract_hash=saga.contract_hash,
    )
    if saga.ended_at is not None:
        view.ended_at.CopyFrom(timestamp(saga.ended_at))
    if definition is not None:
        if not saga.ended or saga.status == SagaStatus.NEEDS_ATTENTION:
            view.current_step = definition.node(saga.step_index).name
        if include_data:
            view.input_json, view.input_truncated = input_json(saga, definition)
        if events is not None:
            view.steps.extend(
                _steps(definition, saga, events, pendings, include_results=include_data or include_results)
            )
            if saga.status == SagaStatus.TERMINATED:
                view.steps_maybe_applied.extend(steps_maybe_applied(definition, events, pendings))
        if not saga.ended:
            view.waits.extend(waits_pb(definition, saga, pendings))
    if children is not None:
        for child in children:
            step = next((name for name, child_id in saga.progress.children.items() if child_id == child.saga_id), "")
            view.children.append(
                pb.ChildLink(step=step, saga_id=child.saga_id, saga_type=child.saga_type, status=api_status(child))
            )
    elif saga.progress.children and definition is not None:
        # A listing links the children from the parent's own row: their status needs GetSaga.
        by_name = definition.step_by_name
        for step, child_id in saga.progress.children.items():
            node = by_name.get(step)
            child_type = node.definition.name if isinstance(node, ChildSaga) else ""
            view.children.append(pb.ChildLink(step=step, saga_id=child_id, saga_type=child_type))
    if include_history and events is not None:
        view.history.extend(event_pb(event) for event in events)
    return view


def _call_path(call: Call) -> str:
    """service/Method as a definition node names a call, e.g. payment/sagasuite.payment.v1.PaymentService/Charge."""
    return f"{call.service}{call.method_path}"


def _node_pb(definition: SagaDefinition, index: int) -> pb.DefinitionNode:
    flat = definition.nodes[index]
    node = flat.node
    view = pb.DefinitionNode(
        name=node.name,
        kind=node.node_kind,
        index=flat.index,
        group=definition.nodes[flat.group].node.name if flat.group >= 0 else "",
        branch=flat.branch,
        conditional=node.when is not None,
        pivot=index == definition.pivot_index,
    )
    if isinstance(node, Step):
        view.step_kind = node.kind.value
        view.action = _call_path(node.action)
        view.compensation = _call_path(node.compensation) if node.compensation is not None else ""
        view.call_timeout_seconds = node.timeout
        view.budget_seconds = node.budget
    elif isinstance(node, Timer):
        view.timeout_seconds = node.duration or 0.0
    elif isinstance(node, WaitForSignal):
        view.timeout_seconds = node.timeout
        view.signal = node.signal_name
        view.on_timeout = node.on_timeout.value
    elif isinstance(node, Approval):
        view.timeout_seconds = node.timeout
        view.signal = node.role
        view.on_timeout = OnTimeout.COMPENSATE.value
    elif isinstance(node, ChildSaga):
        view.child = f"{node.definition.name} v{node.definition.version}"
    return view


def _services(definition: SagaDefinition) -> list[str]:
    """The discovery names its own calls use (actions and compensations), sorted; a child's are the child's."""
    services: set[str] = set()
    for flat in definition.nodes:
        node = flat.node
        if isinstance(node, Step):
            services.add(node.action.service)
            if node.compensation is not None:
                services.add(node.compensation.service)
    return sorted(services)


def definition_info_pb(definition: SagaDefinition, *, running: int, latest: bool) -> pb.SagaDefinitionInfo:
    """ListDefinitions' view of one loaded definition version, its nodes in flat order."""
    return pb.SagaDefinitionInfo(
        name=definition.name,
        version=definition.version,
        # Python definitions loaded without a recorded module say only that they are Python code.
        source=definition.source or "python",
        input_type=definition.input_type.DESCRIPTOR.full_name,
        fingerprint=definition.fingerprint,
        contract_hash=definition.contract_hash,
        deadline_seconds=definition.deadline or 0.0,
        services=_services(definition),
        nodes=[_node_pb(definition, index) for index in range(len(definition.nodes))],
        running=running,
        latest=latest,
    )


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
