"""The orchestrator's closed vocabulary: saga statuses, call directions, history event types and operator calls."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ENDED_STATUSES",
    "IN_FLIGHT_STATUSES",
    "Direction",
    "EventType",
    "OperatorCall",
    "SagaStatus",
    "WaitKind",
    "effective_status",
]


class SagaStatus(StrEnum):
    """A saga's status, stored by value in the saga row; PAUSED is reported from the paused flag, never stored."""

    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"
    TERMINATED = "TERMINATED"
    PAUSED = "PAUSED"


ENDED_STATUSES = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.TERMINATED})
IN_FLIGHT_STATUSES = frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING})


def effective_status(status: str, paused: bool) -> SagaStatus:
    """The status a saga reports: PAUSED while its paused flag is set and it has not ended, else the stored one."""
    stored = SagaStatus(status)
    return SagaStatus.PAUSED if paused and stored not in ENDED_STATUSES else stored


class Direction(StrEnum):
    """Which way a step's call goes; stored by value in the outbox and part of its idempotency key."""

    ACTION = "action"
    COMPENSATION = "compensation"


class EventType(StrEnum):
    """The type of one history event, stored by value in the saga's append-only history."""

    SAGA_STARTED = "SagaStarted"
    STEP_SUCCEEDED = "StepSucceeded"
    STEP_FAILED = "StepFailed"
    STEP_RETRY_SCHEDULED = "StepRetryScheduled"
    COMPENSATION_STARTED = "CompensationStarted"
    COMPENSATION_SUCCEEDED = "CompensationSucceeded"
    COMPENSATION_FAILED = "CompensationFailed"
    COMPENSATION_RETRY_SCHEDULED = "CompensationRetryScheduled"
    SAGA_COMPLETED = "SagaCompleted"
    SAGA_COMPENSATED = "SagaCompensated"
    SAGA_NEEDS_ATTENTION = "SagaNeedsAttention"
    SAGA_PAUSED = "SagaPaused"
    SAGA_RESUMED = "SagaResumed"
    SAGA_CANCEL_REQUESTED = "SagaCancelRequested"
    SAGA_TERMINATED = "SagaTerminated"
    SAGA_RETRIED = "SagaRetried"
    # A call that was on the wire when its saga was terminated and then took effect (or ended
    # without a known outcome): the effect stands, and nothing undoes it.
    EFFECT_AFTER_TERMINATE = "EffectAfterTerminate"
    # Long-running step kinds: conditions, waits, signals, approvals, children and parallel branches.
    STEP_SKIPPED = "StepSkipped"
    WAIT_STARTED = "WaitStarted"
    WAIT_TIMED_OUT = "WaitTimedOut"
    TIMER_FIRED = "TimerFired"
    SIGNAL_RECEIVED = "SignalReceived"
    SIGNAL_CONSUMED = "SignalConsumed"
    APPROVAL_DECIDED = "ApprovalDecided"
    APPROVAL_REMINDER = "ApprovalReminder"
    CHILD_STARTED = "ChildStarted"
    CHILD_ENDED = "ChildEnded"
    BRANCHES_STARTED = "BranchesStarted"
    BRANCHES_STOPPING = "BranchesStopping"
    BRANCHES_COMPLETED = "BranchesCompleted"


class OperatorCall(StrEnum):
    """What an operator may do to a saga; the value names it in audit lines and refusal reasons."""

    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    TERMINATE = "terminate"
    RETRY = "retry"


class WaitKind(StrEnum):
    """What a waiting saga (or one of its branches) waits for; the label of the waiting-sagas metric."""

    TIMER = "timer"
    SIGNAL = "signal"
    APPROVAL = "approval"
    CHILD = "child"
