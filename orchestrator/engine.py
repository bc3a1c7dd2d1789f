"""The saga state machine: pure transitions from an outcome or an operator call to new state, events and command."""

from __future__ import annotations

import base64
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from orchestrator.definition import (
    Approval,
    ChildSaga,
    OnTimeout,
    Parallel,
    SagaDefinition,
    Step,
    StepKind,
    Timer,
    WaitForSignal,
    approval_signal,
    encode_child_result,
)
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
    "WAIT_END_EVENTS",
    "Command",
    "Engine",
    "Event",
    "Outcome",
    "Progress",
    "SagaState",
    "Status",
    "Transition",
    "utc_clock",
]

# Short names of the vocabulary (orchestrator.status) the engine and its tests use throughout.
ACTION, COMPENSATION = Direction.ACTION, Direction.COMPENSATION
EFFECT_AFTER_TERMINATE = EventType.EFFECT_AFTER_TERMINATE
Status = SagaStatus
# Reason (event code) of a saga stopped because its definition is not loaded in this replica.
DEFINITION_MISSING = "DEFINITION_MISSING"


@dataclass
class Progress:
    """Where a saga stands beyond its main step: completions, skips, branches, signals and children.

    Stored as one JSON column. A saga stored before this existed has none (legacy): its completed
    steps are then every compensatable step before its step index, as they always were.
    """

    # Compensatable nodes that completed (or may have taken effect), as [flat index, track], oldest first.
    done: list[list[Any]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    # The active parallel group (its flat index) and where each of its branches stands (-1: finished).
    group: int = -1
    branches: dict[str, int] = field(default_factory=dict)
    # Set while a failed group waits for its other branches' calls on the wire: why it then compensates.
    draining: str = ""
    # Signals received and not consumed yet, oldest first: {"name", "id", "payload" (base64 Struct), "at", "actor"}.
    signals: list[dict[str, Any]] = field(default_factory=list)
    # Child sagas started, by the name of their step.
    children: dict[str, str] = field(default_factory=dict)
    legacy: bool = False

    def to_json(self) -> str:
        value = {
            "done": self.done,
            "skipped": self.skipped,
            "group": self.group,
            "branches": self.branches,
            "draining": self.draining,
            "signals": self.signals,
            "children": self.children,
        }
        return json.dumps({k: v for k, v in value.items() if v not in ("", -1, [], {})}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        if not text:
            return cls(legacy=True)
        value = json.loads(text)
        return cls(
            done=value.get("done", []),
            skipped=value.get("skipped", []),
            group=value.get("group", -1),
            branches=value.get("branches", {}),
            draining=value.get("draining", ""),
            signals=value.get("signals", []),
            children=value.get("children", {}),
        )


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
    parent_id: str = ""
    progress: Progress = field(default_factory=Progress)
    contract_hash: str = ""
    definition_hash: str = ""

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
    # The branch of a parallel group it belongs to ("" on the main track): a saga has one command per track.
    track: str = ""
    # For a wait (timer, signal, approval, child): when it times out or fires; due_at is the next check.
    wait_until: float | None = None

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
    # For an event that ends a wait: when the wait began (a span's start; not stored in the history).
    since: float = 0.0


# Events that end a wait, forward: each is drawn as one span from the wait's start to its end.
WAIT_END_EVENTS = frozenset(
    {
        EventType.TIMER_FIRED,
        EventType.SIGNAL_CONSUMED,
        EventType.APPROVAL_DECIDED,
        EventType.WAIT_TIMED_OUT,
        EventType.CHILD_ENDED,
    }
)


@dataclass
class Transition:
    """The result of applying something to a saga: events to append and its next commands.

    next_command is the next command of the track the transition came from; more holds commands of
    other tracks (branches that start), and drop the tracks whose pending commands are withdrawn.
    start_child asks the dispatcher to start a child saga in the same transaction.
    """

    events: list[Event] = field(default_factory=list)
    next_command: Command | None = None
    more: list[Command] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    start_child: ChildStart | None = None
    # What the transition was computed against: the saga's commands on other tracks.
    others: Others = field(default_factory=lambda: Others(), repr=False, compare=False)

    def commands(self) -> list[Command]:
        return ([self.next_command] if self.next_command is not None else []) + self.more


@dataclass(frozen=True)
class ChildStart:
    """A child saga to start: its definition, input and business key, under its parent."""

    definition: SagaDefinition
    business_key: str
    input_payload: bytes
    deadline_at: float
    track: str = ""
    node_name: str = ""  # the parent's child step


@dataclass(frozen=True)
class Others:
    """A saga's pending commands on other tracks, and which of them are on the wire now."""

    commands: dict[str, Command] = field(default_factory=dict)
    in_flight: frozenset[str] = frozenset()


class Engine:
    """Applies outcomes, wake-ups, signals and operator calls to sagas, following their definitions."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    # -- forward and backward ------------------------------------------------------------

    def start(self, definition: SagaDefinition, saga: SagaState, now: float) -> Transition:
        transition = Transition(
            [Event(EventType.SAGA_STARTED, now, message=f"{definition.name} v{definition.version}")]
        )
        self._enter(definition, saga, 0, "", now, transition)
        return transition

    def on_outcome(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        command: Command,
        outcome: Outcome,
        now: float,
        others: Others | None = None,
    ) -> Transition:
        step = definition.step(command.step_index)
        saga.updated_at = now
        self._settle_legacy(definition, saga)
        if saga.ended:
            # Only a terminated saga has a call out after its end: terminate keeps the call's row.
            return self._after_terminate(saga, step, command, outcome, now)
        if command.direction == ACTION:
            return self._on_action_outcome(definition, saga, step, command, outcome, now, others or Others())
        return self._on_compensation_outcome(definition, saga, step, command, outcome, now)

    def _on_action_outcome(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        step: Step,
        command: Command,
        outcome: Outcome,
        now: float,
        others: Others,
    ) -> Transition:
        transition = Transition(others=others)
        # Another branch stopped the saga for an operator: this one's call is recorded, nothing more
        # is sent (a retry enters the group again).
        held = bool(command.track) and saga.status == Status.NEEDS_ATTENTION
        if outcome.ok:
            assert outcome.response is not None
            saga.results[step.name] = outcome.response
            transition.events.append(
                Event(EventType.STEP_SUCCEEDED, now, step.name, command.attempt, "OK", duration_ms=outcome.duration_ms)
            )
            if step.kind is StepKind.COMPENSATABLE:
                self._done(saga, command.step_index, command.track)
            if held:
                return transition
            if saga.progress.draining:
                self._settle_branch(definition, saga, command.track, others, transition, now)
                return transition
            if saga.cancel_requested and definition.before_pivot(command.step_index):
                self._unwind(definition, saga, transition, now, "cancelled", others)
                return transition
            self._advance(definition, saga, command.step_index, command.track, now, transition)
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
        if held:
            if uncertain:
                self._done(saga, command.step_index, command.track)
            return transition
        if saga.progress.draining:
            if uncertain:
                self._done(saga, command.step_index, command.track)
            self._settle_branch(definition, saga, command.track, others, transition, now)
            return transition
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
                saga.saga_id,
                command.step_index,
                ACTION,
                command.attempt + 1,
                command.first_attempt_at,
                uncertain,
                track=command.track,
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
        if uncertain:
            self._done(saga, command.step_index, command.track)
        self._unwind(definition, saga, transition, now, reason, others)
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
            self._next_compensation(definition, saga, transition, now)
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

    # -- walking the definition ------------------------------------------------------------

    def _enter(
        self, definition: SagaDefinition, saga: SagaState, index: int, track: str, now: float, transition: Transition
    ) -> None:
        """Begin the node at a flat index on a track: skip it, wait, start branches or schedule its call."""
        flat = definition.nodes[index]
        node = flat.node
        if track:
            saga.progress.branches[track] = index
        else:
            saga.step_index = index
        if node.when is not None:
            try:
                runs = bool(node.when(self._context(definition, saga)))
            except Exception as error:
                self._cannot_run(definition, saga, index, track, "its condition", error, now, transition)
                return
            if not runs:
                if index not in saga.progress.skipped:
                    saga.progress.skipped.append(index)
                transition.events.append(Event(EventType.STEP_SKIPPED, now, node.name, message="condition false"))
                self._advance(definition, saga, index, track, now, transition)
                return
        if isinstance(node, Step):
            self._put(
                transition, track, self._schedule(saga, Command(saga.saga_id, index, ACTION, 1, now, track=track), now)
            )
        elif isinstance(node, Timer):
            try:
                wake = node.wake_at(self._context(definition, saga), now)
            except Exception as error:
                self._cannot_run(definition, saga, index, track, "its wake-up time", error, now, transition)
                return
            wake = self._capped(definition, saga, index, wake)
            transition.events.append(
                Event(EventType.WAIT_STARTED, now, node.name, message=_on(track, f"timer fires at {utc_clock(wake)}"))
            )
            self._put(transition, track, self._wait(saga, index, track, now, wake, due=wake))
        elif isinstance(node, WaitForSignal | Approval):
            until = self._capped(definition, saga, index, now + node.timeout)
            what = f"approval by {node.role}" if isinstance(node, Approval) else f"signal {node.signal_name}"
            transition.events.append(
                Event(
                    EventType.WAIT_STARTED,
                    now,
                    node.name,
                    message=_on(track, f"{what}, times out at {utc_clock(until)}"),
                )
            )
            if self._stored_signal(saga, node.signal_name) is not None:
                # It came before the wait began: consume it now, never lose it.
                self._consume(definition, saga, index, track, now, transition, transition.others)
                return
            due = until
            if isinstance(node, Approval) and node.remind_after is not None:
                due = min(until, now + node.remind_after)
            self._put(transition, track, self._wait(saga, index, track, now, until, due=due))
        elif isinstance(node, ChildSaga):
            self._start_child(definition, saga, index, track, node, now, transition)
        elif isinstance(node, Parallel):
            saga.progress.group = index
            saga.progress.branches = {}
            transition.events.append(
                Event(EventType.BRANCHES_STARTED, now, node.name, message=f"{len(node.branches)} branches")
            )
            firsts = [f.index for f in definition.nodes if f.group == index and f.index == _first(definition, f)]
            # Every branch is registered before any is entered: one that ends at once (skipped) must
            # not end the group while the others have not begun.
            saga.progress.branches = {definition.nodes[first].track: first for first in firsts}
            for first in firsts:
                branch_track = definition.nodes[first].track
                self._enter(definition, saga, first, branch_track, now, transition)
                if saga.status != Status.RUNNING or saga.progress.group != index:
                    return

    def _advance(
        self, definition: SagaDefinition, saga: SagaState, index: int, track: str, now: float, transition: Transition
    ) -> None:
        """The node at index is done on its track: enter the next one, finish the branch, or end the saga."""
        flat = definition.nodes[index]
        if flat.next is not None:
            self._enter(definition, saga, flat.next, track, now, transition)
            return
        if flat.group < 0:
            self._end(saga, Status.COMPLETED, now, transition)
            return
        saga.progress.branches[track] = -1
        if any(position != -1 for position in saga.progress.branches.values()):
            return
        group = definition.nodes[flat.group]
        saga.progress.group = -1
        saga.progress.branches = {}
        transition.events.append(Event(EventType.BRANCHES_COMPLETED, now, group.node.name))
        self._advance(definition, saga, flat.group, "", now, transition)

    def _put(self, transition: Transition, track: str, command: Command) -> None:
        # Every command of a transition is put; next_command is simply the first of them.
        assert command.track == track
        if transition.next_command is None:
            transition.next_command = command
        else:
            transition.more.append(command)

    def _wait(self, saga: SagaState, index: int, track: str, now: float, until: float, *, due: float) -> Command:
        command = Command(saga.saga_id, index, ACTION, 1, now, track=track, wait_until=until)
        return self._schedule(saga, command, due)

    def _capped(self, definition: SagaDefinition, saga: SagaState, index: int, until: float) -> float:
        # The saga deadline bounds every wait that could still be compensated.
        return min(until, saga.deadline_at) if definition.before_pivot(index) else until

    def _context(self, definition: SagaDefinition, saga: SagaState) -> Any:
        return definition.context(saga.saga_id, saga.input, saga.results, saga.business_key)

    def _cannot_run(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        index: int,
        track: str,
        what: str,
        error: Exception,
        now: float,
        transition: Transition,
    ) -> None:
        name = definition.node(index).name
        saga.last_error = f"{name}: {what} failed: {type(error).__name__}: {error}"
        if track:
            # A branch either completes or fails its group: the group compensates, as for a failed step.
            self._unwind(definition, saga, transition, now, saga.last_error, transition.others, track=track)
            return
        self._need_attention(saga, now, transition)

    def _done(self, saga: SagaState, index: int, track: str) -> None:
        if not any(entry[0] == index for entry in saga.progress.done):
            saga.progress.done.append([index, track])

    def _settle_legacy(self, definition: SagaDefinition, saga: SagaState) -> None:
        """A saga stored before progress existed: its completed steps are the compensatable ones before its index."""
        if not saga.progress.legacy:
            return
        saga.progress.legacy = False
        if saga.status == Status.RUNNING or (saga.status == Status.NEEDS_ATTENTION and not saga.compensations):
            saga.progress.done = [
                [i, ""]
                for i in range(min(saga.step_index, definition.pivot_index + 1))
                if definition.is_compensatable(i)
            ]

    # -- waits, signals and children ---------------------------------------------------------

    def on_wake(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        command: Command,
        now: float,
        others: Others | None = None,
        child: SagaState | None = None,
    ) -> Transition:
        """A claimed wait: a timer fires, a signal wait consumes its signal or times out, a child is looked at."""
        transition = self._on_wake(definition, saga, command, now, others, child)
        step = definition.node(command.step_index).name
        for event in transition.events:
            if event.type in WAIT_END_EVENTS and event.step == step:
                event.since = command.first_attempt_at
        return transition

    def _on_wake(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        command: Command,
        now: float,
        others: Others | None,
        child: SagaState | None,
    ) -> Transition:
        self._settle_legacy(definition, saga)
        saga.updated_at = now
        others = others or Others()
        transition = Transition(others=others)
        node = definition.node(command.step_index)
        if saga.ended:
            return transition
        if saga.paused:
            # Held by a pause (claimed all the same, by a replica that raced the pause): hold it again;
            # resume makes it due.
            command.due_at = None
            transition.next_command = command
            return transition
        if command.track and saga.status == Status.NEEDS_ATTENTION:
            # Another branch stopped the saga for an operator; a retry enters the group again.
            if isinstance(node, ChildSaga):
                self._done(saga, command.step_index, command.track)
            return transition
        if command.direction == COMPENSATION:
            assert isinstance(node, ChildSaga)
            return self._on_child_compensation(definition, saga, node, command, child, now)
        if saga.progress.draining:
            if isinstance(node, ChildSaga):
                # The child may have acted: it is undone as a whole with the rest.
                self._done(saga, command.step_index, command.track)
            self._settle_branch(definition, saga, command.track, others, transition, now)
            return transition
        if isinstance(node, Timer):
            late = max(0.0, now - (command.wait_until or now))
            if command.wait_until is not None and now < command.wait_until:
                transition.next_command = self._schedule(saga, command, command.wait_until)
                return transition
            transition.events.append(
                Event(
                    EventType.TIMER_FIRED, now, node.name, message=f"{late * 1000:.0f} ms late", duration_ms=late * 1000
                )
            )
            if (
                command.wait_until is not None
                and command.wait_until >= saga.deadline_at
                and definition.before_pivot(command.step_index)
            ):
                self._unwind(definition, saga, transition, now, "saga deadline passed", others, track=command.track)
                return transition
            self._advance(definition, saga, command.step_index, command.track, now, transition)
            return transition
        if isinstance(node, WaitForSignal | Approval):
            if self._stored_signal(saga, node.signal_name) is not None:
                self._consume(definition, saga, command.step_index, command.track, now, transition, others)
                return transition
            until = command.wait_until or now
            if now < until:
                if (
                    isinstance(node, Approval)
                    and node.remind_after is not None
                    and command.attempt == 1
                    and (now >= command.first_attempt_at + node.remind_after)
                ):
                    transition.events.append(
                        Event(
                            EventType.APPROVAL_REMINDER,
                            now,
                            node.name,
                            message=(
                                f"waiting since {utc_clock(command.first_attempt_at)}; times out at {utc_clock(until)}"
                            ),
                        )
                    )
                    command = Command(
                        saga.saga_id,
                        command.step_index,
                        ACTION,
                        2,
                        command.first_attempt_at,
                        track=command.track,
                        wait_until=until,
                    )
                due = until
                if isinstance(node, Approval) and node.remind_after is not None and command.attempt == 1:
                    # Woken early (a resume, a signal of another name): the reminder keeps its time.
                    due = min(until, command.first_attempt_at + node.remind_after)
                transition.next_command = self._schedule(saga, command, due)
                return transition
            return self._timed_out(definition, saga, node, command, now, others, transition)
        assert isinstance(node, ChildSaga)
        return self._on_child_wake(definition, saga, node, command, child, now, others, transition)

    def _timed_out(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        node: WaitForSignal | Approval,
        command: Command,
        now: float,
        others: Others,
        transition: Transition,
    ) -> Transition:
        what = "approval" if isinstance(node, Approval) else f"signal {node.signal_name}"
        saga.last_error = f"{node.name}: {what} timed out at {utc_clock(command.wait_until or now)}"
        transition.events.append(
            Event(EventType.WAIT_TIMED_OUT, now, node.name, code="DEADLINE_EXCEEDED", message=saga.last_error)
        )
        on_timeout = OnTimeout.COMPENSATE if isinstance(node, Approval) else node.on_timeout
        if (
            command.wait_until is not None
            and command.wait_until >= saga.deadline_at
            and definition.before_pivot(command.step_index)
        ):
            # It was cut short by the saga deadline, which compensates whatever the wait says.
            on_timeout = OnTimeout.COMPENSATE
        if on_timeout is OnTimeout.CONTINUE:
            self._advance(definition, saga, command.step_index, command.track, now, transition)
        elif on_timeout is OnTimeout.FAIL or not definition.before_pivot(command.step_index):
            self._need_attention(saga, now, transition)
        else:
            self._unwind(definition, saga, transition, now, saga.last_error, others, track=command.track)
        return transition

    def _stored_signal(self, saga: SagaState, name: str) -> dict[str, Any] | None:
        return next((signal for signal in saga.progress.signals if signal["name"] == name), None)

    def _consume(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        index: int,
        track: str,
        now: float,
        transition: Transition,
        others: Others,
    ) -> None:
        node = definition.node(index)
        assert isinstance(node, WaitForSignal | Approval)
        signal = self._stored_signal(saga, node.signal_name)
        assert signal is not None
        saga.progress.signals.remove(signal)
        payload = base64.b64decode(signal["payload"])
        saga.results[node.name] = payload
        latency_ms = max(0.0, now - float(signal["at"])) * 1000
        if isinstance(node, Approval):
            decision = json.loads(base64.b64decode(signal["decision"])) if "decision" in signal else {}
            approved = bool(decision.get("approved"))
            reason = str(decision.get("reason", ""))
            verdict = "approved" if approved else "rejected"
            transition.events.append(
                Event(
                    EventType.APPROVAL_DECIDED,
                    now,
                    node.name,
                    code=verdict.upper(),
                    message=f"{verdict}" + (f": {reason}" if reason else ""),
                    duration_ms=latency_ms,
                    actor=str(signal.get("actor", "orchestrator")),
                )
            )
            if not approved:
                saga.last_error = f"{node.name} rejected by {signal.get('actor', '')}" + (
                    f": {reason}" if reason else ""
                )
                self._unwind(definition, saga, transition, now, saga.last_error, others, track=track)
                return
        else:
            transition.events.append(
                Event(
                    EventType.SIGNAL_CONSUMED,
                    now,
                    node.name,
                    code="OK",
                    message=f"signal {node.signal_name} ({signal['id']})",
                    duration_ms=latency_ms,
                    actor=str(signal.get("actor", "orchestrator")),
                )
            )
        self._advance(definition, saga, index, track, now, transition)

    def receive_signal(
        self, saga: SagaState, name: str, signal_id: str, payload: bytes, actor: str, now: float, decision: bytes = b""
    ) -> Transition:
        """Keep a signal with the saga until a wait consumes it; the dispatcher wakes the waits."""
        saga.updated_at = now
        stored: dict[str, Any] = {
            "name": name,
            "id": signal_id,
            "payload": base64.b64encode(payload).decode(),
            "at": now,
            "actor": actor,
        }
        if decision:
            stored["decision"] = base64.b64encode(decision).decode()
        saga.progress.signals.append(stored)
        if decision:
            verdict = json.loads(decision)
            step = name.removeprefix(approval_signal(""))
            what = "approve" if verdict.get("approved") else "reject"
            reason = str(verdict.get("reason", ""))
            message = f"decision: {what}" + (f" ({reason})" if reason else "")
            return Transition([Event(EventType.SIGNAL_RECEIVED, now, step, message=message, actor=actor)])
        return Transition([Event(EventType.SIGNAL_RECEIVED, now, message=f"{name} ({signal_id})", actor=actor)])

    def _start_child(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        index: int,
        track: str,
        node: ChildSaga,
        now: float,
        transition: Transition,
    ) -> None:
        try:
            child_input = node.build_input(self._context(definition, saga))
            payload = child_input.SerializeToString(deterministic=True)
            key = node.definition.business_key_of(child_input)
        except Exception as error:
            self._cannot_run(definition, saga, index, track, "building the child's input", error, now, transition)
            return
        child_deadline = saga.deadline_at
        if node.definition.deadline is not None:
            child_deadline = min(child_deadline, now + node.definition.deadline)
        transition.start_child = ChildStart(node.definition, key, payload, child_deadline, track, node.name)
        # The parent waits on its own row: the child's end wakes it, the saga deadline bounds it.
        self._put(transition, track, self._wait(saga, index, track, now, saga.deadline_at, due=saga.deadline_at))

    def child_started(self, saga: SagaState, node_name: str, child: SagaState, now: float, created: bool) -> Event:
        saga.progress.children[node_name] = child.saga_id
        how = "started" if created else "found"
        return Event(
            EventType.CHILD_STARTED,
            now,
            node_name,
            message=f"{how} child {child.saga_type} {child.saga_id} ({child.business_key})",
        )

    def _on_child_wake(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        node: ChildSaga,
        command: Command,
        child: SagaState | None,
        now: float,
        others: Others,
        transition: Transition,
    ) -> Transition:
        if child is None or child.parent_id != saga.saga_id:
            saga.last_error = f"{node.name}: the child saga is missing or belongs to another saga"
            transition.events.append(
                Event(EventType.STEP_FAILED, now, node.name, code="FAILED_PRECONDITION", message=saga.last_error)
            )
            self._unwind(definition, saga, transition, now, saga.last_error, others, track=command.track)
            return transition
        if child.status == Status.COMPLETED:
            saga.results[node.name] = encode_child_result(child.saga_id, child.business_key, child.input, child.results)
            transition.events.append(
                Event(
                    EventType.CHILD_ENDED, now, node.name, code="COMPLETED", message=f"child {child.saga_id} completed"
                )
            )
            self._done(saga, command.step_index, command.track)
            self._advance(definition, saga, command.step_index, command.track, now, transition)
            return transition
        if child.status == Status.TERMINATED:
            # Its effects may stand and nothing undid them: an operator decides, nothing is unwound.
            saga.last_error = (
                f"{node.name}: child {child.saga_id} was terminated ({child.last_error}); its effects may stand"
            )
            transition.events.append(
                Event(EventType.CHILD_ENDED, now, node.name, code=str(child.status), message=saga.last_error)
            )
            self._need_attention(saga, now, transition)
            return transition
        if child.status == Status.COMPENSATED:
            saga.last_error = f"{node.name}: child {child.saga_id} ended {child.status}: {child.last_error}"
            transition.events.append(
                Event(EventType.CHILD_ENDED, now, node.name, code=str(child.status), message=saga.last_error)
            )
            self._unwind(
                definition,
                saga,
                transition,
                now,
                f"{node.name} failed: child {child.status}",
                others,
                track=command.track,
            )
            return transition
        until = command.wait_until or saga.deadline_at
        if now >= until:
            saga.last_error = f"{node.name}: child {child.saga_id} did not end by the saga deadline"
            transition.events.append(
                Event(EventType.WAIT_TIMED_OUT, now, node.name, code="DEADLINE_EXCEEDED", message=saga.last_error)
            )
            if definition.before_pivot(command.step_index) and not child_past_pivot(node, child):
                self._done(saga, command.step_index, command.track)
                self._unwind(definition, saga, transition, now, saga.last_error, others, track=command.track)
            else:
                # Past its own pivot the child's order stands (a shipment made): an operator decides.
                self._need_attention(saga, now, transition)
            return transition
        transition.next_command = self._schedule(saga, command, until)
        return transition

    def _on_child_compensation(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        node: ChildSaga,
        command: Command,
        child: SagaState | None,
        now: float,
    ) -> Transition:
        """The parent undoes a child step: done once the child has compensated (or never acted)."""
        transition = Transition()
        if child is None or child.status in (Status.COMPENSATED, Status.TERMINATED):
            what = "never started" if child is None else f"child {child.saga_id} is {child.status}"
            transition.events.append(
                Event(EventType.COMPENSATION_SUCCEEDED, now, node.name, command.attempt, "OK", message=what)
            )
            saga.compensations = saga.compensations[1:]
            self._next_compensation(definition, saga, transition, now)
            return transition
        if child.status == Status.NEEDS_ATTENTION:
            saga.last_error = f"{node.name} compensation: child {child.saga_id} needs attention: {child.last_error}"
            transition.events.append(
                Event(
                    EventType.COMPENSATION_FAILED,
                    now,
                    node.name,
                    command.attempt,
                    "FAILED_PRECONDITION",
                    saga.last_error,
                )
            )
            self._need_attention(saga, now, transition)
            return transition
        # The child is still undoing (the dispatcher asked it to): wait for its end to wake us.
        until = command.wait_until or now + _CHILD_COMPENSATION_WAIT
        if now >= until:
            saga.last_error = f"{node.name} compensation: child {child.saga_id} did not finish compensating"
            self._need_attention(saga, now, transition)
            return transition
        transition.next_command = self._schedule(
            saga,
            Command(
                saga.saga_id,
                command.step_index,
                COMPENSATION,
                command.attempt,
                command.first_attempt_at,
                wait_until=until,
            ),
            until,
        )
        return transition

    def unwind_child(
        self, definition: SagaDefinition, child: SagaState, others: Others, actor: str, now: float
    ) -> Transition:
        """Undo a child saga as a whole for its parent, from any state short of its end: newest step first."""
        self._settle_legacy(definition, child)
        child.updated_at = now
        transition = Transition(
            [Event(EventType.SAGA_CANCEL_REQUESTED, now, message="its parent compensates", actor=actor)]
        )
        if (child.ended and child.status != Status.COMPLETED) or child.status == Status.COMPENSATING:
            return transition
        child.paused = False
        child.status = Status.RUNNING
        # A completed child being undone has not ended (again) until its compensation does.
        child.ended_at = None
        self._unwind(definition, child, transition, now, "its parent compensates", others)
        return transition

    # -- unwinding ---------------------------------------------------------------------------

    def _unwind(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        transition: Transition,
        now: float,
        reason: str,
        others: Others,
        *,
        track: str | None = None,
    ) -> None:
        """Stop every branch at its next step boundary, then compensate what completed."""
        saga.status = Status.COMPENSATING
        saga.cancel_requested = False
        draining = False
        # Commands this very transition gave other branches (entered together) are withdrawn too.
        for placed in transition.commands():
            if placed.track != track:
                self._withdraw(transition, placed)
        if transition.start_child is not None and transition.start_child.track != track:
            transition.start_child = None
        for other, command in others.commands.items():
            if other == track:
                continue
            if other in others.in_flight:
                draining = True  # its outcome is recorded when it returns, never abandoned
                continue
            transition.drop.append(other)
            if command.direction == ACTION and (
                command.uncertain or isinstance(definition.node(command.step_index), ChildSaga)
            ):
                self._done(saga, command.step_index, command.track)
        if draining:
            saga.progress.draining = reason or "a branch failed"
            transition.events.append(Event(EventType.BRANCHES_STOPPING, now, message=saga.progress.draining))
            return
        self._begin_compensation(definition, saga, transition, now, reason)

    def _withdraw(self, transition: Transition, command: Command) -> None:
        if transition.next_command is command:
            transition.next_command = transition.more.pop(0) if transition.more else None
        elif command in transition.more:
            transition.more.remove(command)

    def _settle_branch(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        track: str,
        others: Others,
        transition: Transition,
        now: float,
    ) -> None:
        """A branch's call came back while its group unwinds: once none is on the wire, compensate."""
        if any(other != track for other in others.commands):
            return
        reason = saga.progress.draining
        saga.progress.draining = ""
        self._begin_compensation(definition, saga, transition, now, reason)

    def _begin_compensation(
        self, definition: SagaDefinition, saga: SagaState, transition: Transition, now: float, reason: str
    ) -> None:
        """Compensate every completed compensatable node, in the documented order."""
        saga.status = Status.COMPENSATING
        saga.cancel_requested = False
        saga.compensations = compensation_order(definition, saga.progress.done)
        saga.progress.group = -1
        saga.progress.branches = {}
        transition.events.append(Event(EventType.COMPENSATION_STARTED, now, message=reason))
        self._next_compensation(definition, saga, transition, now)

    def _next_compensation(
        self, definition: SagaDefinition, saga: SagaState, transition: Transition, now: float
    ) -> None:
        if not saga.compensations:
            self._end(saga, Status.COMPENSATED, now, transition)
            return
        saga.step_index = saga.compensations[0]
        command = Command(saga.saga_id, saga.step_index, COMPENSATION, 1, now)
        if isinstance(definition.node(saga.step_index), ChildSaga):
            command.wait_until = now + _CHILD_COMPENSATION_WAIT
        transition.next_command = self._schedule(saga, command, now)

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
    # Each takes the saga's pending commands (every track) and which are on the wire now; it returns
    # the transition, whose commands replace the pending ones that are not on the wire.

    def pause(
        self, saga: SagaState, pending: Command | Others | None, actor: str, reason: str, now: float
    ) -> Transition:
        if saga.status not in IN_FLIGHT_STATUSES or saga.paused:
            raise _illegal(saga, OperatorCall.PAUSE)
        saga.paused = True
        saga.updated_at = now
        transition = Transition([Event(EventType.SAGA_PAUSED, now, message=reason, actor=actor)])
        for command in _commands(pending):
            command.due_at = None
            self._put(transition, command.track, command)
        return transition

    def resume(self, saga: SagaState, pending: Command | Others | None, actor: str, now: float) -> Transition:
        if not saga.paused:
            raise _illegal(saga, OperatorCall.RESUME)
        saga.paused = False
        saga.updated_at = now
        transition = Transition([Event(EventType.SAGA_RESUMED, now, actor=actor)])
        for command in _commands(pending):
            if command.due_at is None:
                # A wait looks at itself at once: a timer due while paused fires now, a kept signal is consumed.
                command.due_at = now
            self._put(transition, command.track, command)
        return transition

    def cancel(
        self,
        definition: SagaDefinition,
        saga: SagaState,
        pending: Command | Others | None,
        in_flight: bool,
        actor: str,
        reason: str,
        now: float,
    ) -> Transition:
        if saga.status != Status.RUNNING or saga.step_index > definition.pivot_index:
            raise _illegal(saga, OperatorCall.CANCEL)
        self._settle_legacy(definition, saga)
        saga.paused = False
        saga.updated_at = now
        transition = Transition([Event(EventType.SAGA_CANCEL_REQUESTED, now, message=reason, actor=actor)])
        others = pending if isinstance(pending, Others) else _single(pending, in_flight)
        transition.others = others
        main = others.commands.get("")
        if (
            saga.progress.group < 0
            and main is not None
            and "" in others.in_flight
            and isinstance(definition.node(main.step_index), Step)
        ):
            # The call on the wire decides: its outcome starts the compensation.
            saga.cancel_requested = True
            transition.next_command = main
            return transition
        saga.last_error = f"cancelled: {reason}" if reason else "cancelled"
        self._unwind(definition, saga, transition, now, "cancelled", others)
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

    def retry(self, saga: SagaState, actor: str, now: float, definition: SagaDefinition | None = None) -> Transition:
        if saga.status != Status.NEEDS_ATTENTION:
            raise _illegal(saga, OperatorCall.RETRY)
        saga.updated_at = now
        transition = Transition(
            [Event(EventType.SAGA_RETRIED, now, message=f"from step index {saga.step_index}", actor=actor)]
        )
        if saga.compensations:
            saga.status = Status.COMPENSATING
            if definition is not None:
                self._next_compensation(definition, saga, transition, now)
            else:
                transition.next_command = Command(saga.saga_id, saga.compensations[0], COMPENSATION, 1, now, due_at=now)
            return transition
        saga.status = Status.RUNNING
        if definition is not None:
            # The node is entered afresh: a failed wait waits again, a child step looks at its child
            # again, a step's condition is evaluated again.
            self._settle_legacy(definition, saga)
            self._enter(definition, saga, saga.step_index, "", now, transition)
            return transition
        transition.next_command = Command(saga.saga_id, saga.step_index, ACTION, 1, now, due_at=now)
        return transition


# How long a parent waits for a child it asked to compensate before an operator must look.
_CHILD_COMPENSATION_WAIT = 24 * 3600.0


def child_past_pivot(node: ChildSaga, child: SagaState) -> bool:
    """Whether a running child has passed its own pivot: then it only goes forward, and its parent may not cancel it."""
    return child.status == Status.RUNNING and child.step_index > node.definition.pivot_index


def compensation_order(definition: SagaDefinition, done: list[list[Any]]) -> list[int]:
    """The order compensations run in: newest first; a parallel group branch by branch.

    Within a group, the branches are undone in reverse order of their last completion, and the
    steps of each branch newest first. Nodes before and after the group keep their order in time.
    """
    blocks: list[tuple[int, list[tuple[int, str]]]] = []
    for index, track in done:
        group = definition.nodes[index].group
        if blocks and group >= 0 and blocks[-1][0] == group:
            blocks[-1][1].append((index, track))
        else:
            blocks.append((group, [(index, track)]))
    order: list[int] = []
    for group, entries in reversed(blocks):
        if group < 0:
            order += [index for index, _ in reversed(entries)]
            continue
        by_branch: dict[str, list[tuple[int, int]]] = {}
        for position, (index, track) in enumerate(entries):
            by_branch.setdefault(track, []).append((position, index))
        for _, steps in sorted(by_branch.items(), key=lambda item: item[1][-1][0], reverse=True):
            order += [index for _, index in reversed(steps)]
    return [index for index in order if definition.is_compensatable(index)]


def _first(definition: SagaDefinition, flat: Any) -> int:
    """The first node of the branch flat belongs to."""
    same = [f.index for f in definition.nodes if f.group == flat.group and f.branch == flat.branch]
    return min(same)


def _commands(pending: Command | Others | None) -> list[Command]:
    if pending is None:
        return []
    if isinstance(pending, Command):
        return [pending]
    return [command for track, command in sorted(pending.commands.items()) if track not in pending.in_flight]


def _single(pending: Command | None, in_flight: bool) -> Others:
    if pending is None:
        return Others()
    return Others({pending.track: pending}, frozenset({pending.track}) if in_flight else frozenset())


def _on(track: str, text: str) -> str:
    """A wait's description, with the branch it stands on."""
    return f"branch {track}: {text}" if track else text


def utc_clock(at: float) -> str:
    """A time as the history and the waits print it: UTC, to the second, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


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
