"""Shell completion for `saga`: saga ids and order ids asked of the orchestrator, and the --status words."""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

import typer

from sagactl.settings import DEFAULT_ADDRESS, ENV_ADDRESS, ENV_CA_FILE, ENV_TOKEN

if TYPE_CHECKING:
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

# Only typer here, as in sagactl.common: grpc and the contract load when a completion is asked for, so the
# commands that attach these callbacks build (and print --help) without them.

__all__ = ["COMPLETION_SECONDS", "SUGGESTED", "complete_saga_id", "complete_status"]

# A shell waits for its completions: past this, it gets none rather than a hang.
COMPLETION_SECONDS = 1.0
# At most this many sagas are offered: the newest that match.
SUGGESTED = 20
# ListSagasRequest.saga_id_prefix takes lowercase hex, 1-32 characters.
_ID_PREFIX = re.compile(r"[0-9a-f]{1,32}")


def _connection(ctx: typer.Context) -> tuple[str, str, str]:
    """The address, token and CA file the command being completed would use: its options, else the variables."""
    params = ctx.params

    def value(name: str, variable: str, default: str = "") -> str:
        given = params.get(name)
        return given if isinstance(given, str) and given else os.environ.get(variable) or default

    return value("address", ENV_ADDRESS, DEFAULT_ADDRESS), value("token", ENV_TOKEN), value("ca_file", ENV_CA_FILE)


def _description(saga: pb.Saga, now: float) -> str:
    from sagactl.render import age, status_name

    created = saga.created_at.ToNanoseconds() / 1e9
    return f"{status_name(saga.status)} {saga.saga_type} order {saga.business_key} · {age(max(0.0, now - created))} ago"


def complete_saga_id(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """The newest sagas whose id, or order id (business key), starts with what was typed, each with its status,
    type and age; asked of the orchestrator with a short deadline, and nothing at all when it does not answer.

    For typer's `autocompletion=` of a saga id argument (one that takes an id or an order id).
    """
    try:
        return _sagas_matching(ctx, incomplete)
    except Exception:
        # A shell's completion must never print an error or a traceback: no suggestion is the failure.
        return []


def _sagas_matching(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    from sagactl.client import open_channel
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

    address, token, ca_file = _connection(ctx)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    requests = []
    if not incomplete or _ID_PREFIX.fullmatch(incomplete):
        requests.append(("id", pb.ListSagasRequest(saga_id_prefix=incomplete, page_size=SUGGESTED)))
    if incomplete:
        requests.append(("key", pb.ListSagasRequest(business_key_prefix=incomplete, page_size=SUGGESTED)))
    deadline = time.monotonic() + COMPLETION_SECONDS
    found: dict[str, str] = {}
    now = time.time()
    with open_channel(address, ca_file) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        for by, request in requests:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply = stub.ListSagas(request, timeout=left, metadata=metadata)
            except Exception:
                continue  # the other lookup may still answer
            for saga in reply.sagas:
                value = saga.saga_id if by == "id" else saga.business_key
                # An order id with several sagas (an order and its child) is offered once, for its newest.
                found.setdefault(value, _description(saga, now))
    return list(found.items())[:SUGGESTED]


def complete_status(incomplete: str) -> list[tuple[str, str]]:
    """The --status words that complete the last of the comma-separated words typed, the earlier ones kept.

    For typer's `autocompletion=` of a --status option.
    """
    from sagactl.client import STATUS_WORDS

    done, _, last = incomplete.rpartition(",")
    typed = {word.strip().lower() for word in done.split(",") if word.strip()}
    prefix = f"{done}," if done else ""
    return [
        (prefix + word, _STATUS_HELP.get(word, ""))
        for word in STATUS_WORDS
        if word.startswith(last.lower()) and word not in typed
    ]


_STATUS_HELP = {
    "in_flight": "running, compensating or paused",
    "ended": "completed, compensated or terminated",
    "attention": "needs_attention",
}
