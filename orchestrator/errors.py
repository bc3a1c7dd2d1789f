"""The orchestrator's refusals, one class per condition carrying its data; converted to a status only at the edge."""

from __future__ import annotations

from svckit.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted

__all__ = [
    "ApprovalAlreadyDecided",
    "ApprovalRoleRequired",
    "BusinessKeyConflict",
    "IllegalState",
    "SagaEnded",
    "SagaNotFound",
    "SignalIdReused",
    "SignalNotAwaited",
    "SignalTargetNotFound",
    "TooManySignals",
]


class SagaNotFound(NotFound):
    """No saga has this id."""

    def __init__(self, saga_id: str) -> None:
        super().__init__("SAGA_NOT_FOUND", f"no saga {saga_id}", {"saga_id": saga_id})
        self.saga_id = saga_id


class BusinessKeyConflict(FailedPrecondition):
    """A saga of this type exists for the business key already, started with a different payload."""

    def __init__(self, saga_type: str, business_key: str, existing_saga_id: str) -> None:
        super().__init__(
            "BUSINESS_KEY_CONFLICT",
            f"{saga_type} {business_key!r} already exists with a different payload (saga {existing_saga_id})",
            {"saga_id": existing_saga_id, "business_key": business_key},
        )
        self.saga_type = saga_type
        self.business_key = business_key
        self.existing_saga_id = existing_saga_id


class IllegalState(FailedPrecondition):
    """An operator call that does not apply to the saga's (effective) status; applies_to says to what it does."""

    def __init__(self, operation: str, saga_id: str, status: str, applies_to: str) -> None:
        # Plain strings, not enum members: they go into protobuf fields and must compare as text.
        operation, status = str(operation), str(status)
        super().__init__(
            f"ILLEGAL_STATE_FOR_{operation.upper()}",
            f"cannot {operation} saga {saga_id} in status {status}: {operation} applies to {applies_to}",
            {"saga_id": saga_id, "status": status},
        )
        self.operation = operation
        self.saga_id = saga_id
        self.status = status
        self.applies_to = applies_to


class SignalTargetNotFound(NotFound):
    """No saga has this id, or no saga of this type has this business key."""

    def __init__(self, saga_id: str, saga_type: str, business_key: str) -> None:
        where = f"saga {saga_id}" if saga_id else f"{saga_type} saga with business key {business_key!r}"
        super().__init__("SAGA_NOT_FOUND", f"no {where}", {"saga_id": saga_id, "business_key": business_key})


class SagaEnded(FailedPrecondition):
    """A signal or decision for a saga that has ended: nothing waits any more."""

    def __init__(self, saga_id: str, status: str) -> None:
        super().__init__(
            "SAGA_ENDED",
            f"saga {saga_id} has ended ({status}); it takes no more signals",
            {"saga_id": saga_id, "status": str(status)},
        )


class SignalNotAwaited(FailedPrecondition):
    """A signal whose name no wait of the saga's definition consumes (or a decision for a step that is no approval)."""

    def __init__(self, saga_id: str, definition: str, name: str, awaited: list[str]) -> None:
        names = ", ".join(awaited) or "none"
        super().__init__(
            "SIGNAL_NOT_AWAITED",
            f"{definition} never waits for {name!r} (saga {saga_id}); it waits for: {names}",
            {"saga_id": saga_id, "signal": name},
        )


class SignalIdReused(FailedPrecondition):
    """A signal id delivered before with another name or payload: a signal id names one delivery."""

    def __init__(self, saga_id: str, signal_id: str) -> None:
        super().__init__(
            "SIGNAL_ID_REUSED",
            f"signal id {signal_id!r} was delivered to saga {saga_id} with another name or payload; "
            "use a new id for a new signal",
            {"saga_id": saga_id, "signal_id": signal_id},
        )


class ApprovalAlreadyDecided(FailedPrecondition):
    """The other decision for an approval that was decided already: a decision is final.

    Its reason stays SIGNAL_ID_REUSED (a decision is the approval's one signal), the message says it plainly.
    """

    def __init__(self, saga_id: str, step: str) -> None:
        super().__init__(
            "SIGNAL_ID_REUSED",
            f"approval {step} of saga {saga_id} was decided already, the other way; a decision is final",
            {"saga_id": saga_id, "step": step},
        )


class ApprovalRoleRequired(PermissionDenied):
    """The caller's token role may not decide this approval."""

    def __init__(self, saga_id: str, step: str, role: str) -> None:
        super().__init__(
            "APPROVAL_ROLE_REQUIRED",
            f"approval {step} of saga {saga_id} is decided by role {role!r} (or operator)",
            {"saga_id": saga_id, "step": step, "role": role},
        )


class TooManySignals(ResourceExhausted):
    """A saga already keeps as many unconsumed signals as it may."""

    def __init__(self, saga_id: str, kept: int) -> None:
        super().__init__(
            "TOO_MANY_SIGNALS",
            f"saga {saga_id} keeps {kept} signals that no wait consumed yet; it takes no more until one is",
            {"saga_id": saga_id},
        )
