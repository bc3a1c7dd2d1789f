"""The orchestrator's refusals, one class per condition carrying its data; converted to a status only at the edge."""

from __future__ import annotations

from svckit.errors import FailedPrecondition, NotFound

__all__ = ["BusinessKeyConflict", "IllegalState", "SagaNotFound"]


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
