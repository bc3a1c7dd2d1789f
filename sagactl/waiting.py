"""The commands for sagas that wait: `saga approve` and `saga reject` decide approvals, `saga signal` signals."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sagactl.common import Json_, calls_orchestrator, fail, new_console, print_json, usage
from sagactl.completion import complete_saga_id
from sagactl.settings import EXIT_USAGE, ClientConfig

if TYPE_CHECKING:
    from google.protobuf.struct_pb2 import Struct

    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["commands", "default_signal_id"]

commands = typer.Typer()

SagaRef_ = Annotated[
    str,
    typer.Argument(
        metavar="ID",
        help="saga id (or any unique start of one), or the order id of one saga",
        show_default=False,
        autocompletion=complete_saga_id,
    ),
]
Step_ = Annotated[
    str,
    typer.Option(
        "--step",
        metavar="NAME",
        help="the approval step, e.g. fraud_review; may be left out when exactly one approval of the saga waits",
        show_default=False,
    ),
]

# The refusal of the other decision than the one recorded.
_DECIDED_OTHERWISE = "SIGNAL_ID_REUSED"

_DECISION_EPILOG = (
    "Without --step, the one approval the saga waits for now is decided; when it waits for none, or for "
    "several, the command names them and exits 2. A decision is made once: the same decision again is a "
    "repeat (reported as such; the first reason stands), the other one is refused (SIGNAL_ID_REUSED). "
    "Needs a token whose role is the approval's role or operator (--token, SAGA_TOKEN). "
    "Exits 0 when the decision is recorded (or was before), 2 on a usage error, 3 when the orchestrator is "
    "unreachable, 4 when it refused the decision.\n\n"
    "[bold]Examples[/]\n\n"
)


def _approval_step(saga: pb.Saga, step: str) -> str:
    """The approval to decide: --step, or the one approval the saga waits for now."""
    from sagactl.render import status_name

    if step:
        return step
    waiting = [wait.step for wait in saga.waits if wait.kind == "approval"]
    if len(waiting) == 1:
        return waiting[0]
    if not waiting:
        status = status_name(saga.status)
        fail(f"saga {saga.saga_id} ({status}) waits for no approval now: name the approval with --step", EXIT_USAGE)
    fail(
        f"saga {saga.saga_id} waits for {len(waiting)} approvals ({', '.join(waiting)}): choose one with --step",
        EXIT_USAGE,
    )


def _decide(saga_ref: str, step: str, reason: str, *, approve: bool, as_json: bool, config: ClientConfig) -> None:
    from rich.text import Text

    from sagactl.client import ClientError, SagaClient
    from sagactl.render import STATUS_STYLE, saga_dict, status_name

    command, decided = ("approve", "approved") if approve else ("reject", "rejected")
    with SagaClient(config) as client:
        target = client.resolve(saga_ref)
        chosen = _approval_step(target, step)
        try:
            answer = client.decide(target.saga_id, chosen, approve=approve, reason=reason)
        except ClientError as error:
            if error.reason != _DECIDED_OTHERWISE:
                raise
            # The orchestrator words it as a signal id used twice: say what it means for a decision.
            other = "rejected" if approve else "approved"
            raise ClientError(
                f"refused (FAILED_PRECONDITION {error.reason}): {chosen} of saga {target.saga_id} was {other} "
                "before, and a decision cannot be changed",
                error.exit_code,
                error.code,
                error.reason,
            ) from None
    saga = answer.saga
    if as_json:
        found = {"saga_id": saga.saga_id, "step": chosen, "decision": decided, "duplicate": answer.duplicate}
        print_json({**found, "saga": saga_dict(saga, history=False)})
        return
    status = status_name(saga.status)
    line = Text(f"{command}: {chosen} of saga {saga.saga_id} (order {saga.business_key}) ")
    line.append(f"was {decided} before, and that decision stands" if answer.duplicate else decided)
    line.append("; the saga is ")
    line.append(status, style=STATUS_STYLE.get(status, ""))
    new_console().print(line)


@commands.command(
    epilog=_DECISION_EPILOG + "  saga approve ord-42\n\n"
    "  saga approve 3f2a9c0e --step fraud_review --reason 'verified by phone, OPS-123'\n\n"
    "  saga approve ord-42 --json | jq .saga.status"
)
@calls_orchestrator
def approve(
    saga_ref: SagaRef_,
    step: Step_ = "",
    reason: Annotated[str, typer.Option(help="why, recorded in the saga's history")] = "",
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Approve a saga's approval step (OrderSaga v2's fraud_review, say): the saga goes on, with your token's
    name on record as the decider."""
    _decide(saga_ref, step, reason, approve=True, as_json=as_json, config=config)


@commands.command(
    epilog=_DECISION_EPILOG + "  saga reject ord-42 --reason 'stolen card'\n\n"
    "  saga reject 3f2a9c0e --step fraud_review --reason 'address does not match' --json"
)
@calls_orchestrator
def reject(
    saga_ref: SagaRef_,
    reason: Annotated[str, typer.Option(help="why, recorded in the saga's history (required)")] = "",
    step: Step_ = "",
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Reject a saga's approval step: the saga compensates, with your token's name and the reason on record."""
    if not reason.strip():
        usage("reject needs --reason: it is recorded in the saga's history")
    _decide(saga_ref, step, reason, approve=False, as_json=as_json, config=config)


def default_signal_id(name: str, payload: Struct) -> str:
    """The signal id of a signal sent without --signal-id: the same name and payload give the same id, so
    running the same command again is the same delivery."""
    digest = hashlib.sha256(name.encode() + b"\0" + payload.SerializeToString(deterministic=True)).hexdigest()
    return f"cli-{digest[:32]}"


def _refuse_constant(text: str) -> None:
    raise ValueError(f"{text} is not a JSON number")


def _payload(text: str, file: str) -> Struct:
    """The signal's payload: the JSON object of --payload or --payload-file (- for stdin); {} for neither."""
    from google.protobuf import json_format
    from google.protobuf.struct_pb2 import Struct

    if text and file:
        raise typer.BadParameter("give --payload or --payload-file, not both", param_hint="--payload")
    option = "--payload-file" if file else "--payload"
    if file:
        try:
            text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        except OSError as error:
            raise typer.BadParameter(f"cannot read {file}: {error.strerror}", param_hint=option) from None
        except UnicodeDecodeError:
            raise typer.BadParameter(f"{file} is not UTF-8 text", param_hint=option) from None
    payload = Struct()
    if not text.strip():
        return payload
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:
        raise typer.BadParameter(f"not JSON: {error}", param_hint=option) from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"expected a JSON object, got {type(value).__name__}", param_hint=option)
    json_format.ParseDict(value, payload)
    return payload


@commands.command(
    "signal",
    epilog="A signal that comes before the saga reaches its wait is kept and consumed when the wait begins. "
    "Without --signal-id the signal id is derived from the name and the payload, so running the same command "
    "again is the same delivery (reported as a repeat, not delivered twice); give --signal-id to tell "
    "deliveries of the same signal apart. An order id of OrderSaga v2 means the order's saga: its "
    "FulfilmentSaga child is addressed with --type FulfilmentSaga --key ORDER_ID. "
    "Exits 0 when the signal is recorded (or was before), 2 on a usage error, 3 when the orchestrator is "
    "unreachable, 4 when it refused the signal (the saga ended, or never waits for NAME).\n\n"
    "[bold]Examples[/]\n\n"
    '  saga signal 3f2a9c0e payment_ok --payload \'{"reference": "pay-981"}\'\n\n'
    "  saga signal --type FulfilmentSaga --key ord-42 picked_up --signal-id courier-7781\n\n"
    "  echo '{\"ship_at\": 1767225600}' | saga signal ord-42 schedule --payload-file - --json",
)
@calls_orchestrator
def signal_saga(
    saga_ref: Annotated[
        str | None,
        typer.Argument(
            metavar="ID",
            help="saga id (or a unique start of one) or order id; left out with --type and --key",
            show_default=False,
            autocompletion=complete_saga_id,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="the signal's name, as the saga's wait names it")
    ] = None,
    payload: Annotated[
        str, typer.Option(metavar="JSON", help="a JSON object the saga's later steps read", show_default=False)
    ] = "",
    payload_file: Annotated[
        str, typer.Option(metavar="FILE|-", help="read the JSON object from FILE (- for stdin)", show_default=False)
    ] = "",
    signal_id: Annotated[
        str, typer.Option(help="this delivery's id (default: derived from NAME and the payload)", show_default=False)
    ] = "",
    saga_type: Annotated[
        str, typer.Option("--type", help="address the saga by type, with --key", show_default=False)
    ] = "",
    key: Annotated[str, typer.Option("--key", help="... and business key (order id)", show_default=False)] = "",
    as_json: Json_ = False,
    *,
    config: ClientConfig,
) -> None:
    """Send a named signal with a JSON payload to a saga that waits for it (or will), by id or by type and
    business key; each signal id is delivered once."""
    from sagactl.client import SagaClient
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    by_key = bool(saga_type or key)
    if by_key and not (saga_type and key):
        usage("--type and --key go together: the saga's type and its business key")
    if by_key and name is not None:
        usage("give NAME alone with --type and --key, not an ID too")
    if by_key:
        saga_ref, name = None, saga_ref
    if not name:
        usage("give the saga's ID and the signal NAME, or --type, --key and NAME")
    body = _payload(payload, payload_file)
    request = pb.SignalSagaRequest(
        saga_type=saga_type, business_key=key, name=name, signal_id=signal_id or default_signal_id(name, body)
    )
    request.payload.CopyFrom(body)
    with SagaClient(config) as client:
        if saga_ref is not None:
            request.saga_id = client.resolve_id(saga_ref)
        answer = client.signal(request)
    received = answer.received_at.ToJsonString()
    if as_json:
        print_json(
            {
                "saga_id": answer.saga_id,
                "name": name,
                "signal_id": request.signal_id,
                "duplicate": answer.duplicate,
                "received_at": received,
            }
        )
        return
    if answer.duplicate:
        line = f"signal: {name} was delivered to saga {answer.saga_id} before, at {received}: a repeat, not sent again"
    else:
        line = f"signal: {name} delivered to saga {answer.saga_id}"
    new_console().print(f"{line} (signal id {request.signal_id})", markup=False)
