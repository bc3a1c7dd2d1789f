"""The idempotency key of a call: the metadata header that carries it and the key of a saga step's call."""

from __future__ import annotations

__all__ = ["IDEMPOTENCY_HEADER", "step_key"]

# The gRPC metadata header every mutating call carries its key in.
IDEMPOTENCY_HEADER = "idempotency-key"


def step_key(saga_id: str, step: str, direction: str) -> str:
    """The key of one step's call in one direction ("action" or "compensation"): `<saga>/<step>/<direction>`.

    Independent of the attempt on purpose: a resend is the same command, and the service replays it.
    """
    return f"{saga_id}/{step}/{direction}"
