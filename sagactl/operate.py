"""The operator commands: `saga retry`, `pause`, `resume`, `cancel` and `terminate`, on one saga or a batch."""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from sagactl.common import (
    FILTERS,
    Json_,
    OlderThan_,
    Order_,
    Since_,
    Statuses_,
    Type_,
    calls_orchestrator,
    filter_request,
    new_console,
    parse_statuses,
    print_json,
    usage,
)
from sagactl.completion import complete_saga_id
from sagactl.roothelp import COMMANDS
from sagactl.settings import EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, ClientConfig

if TYPE_CHECKING:
    from sagactl.client import ClientError
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["commands"]

commands = typer.Typer()

SagaRef_ = Annotated[
    str | None,
    typer.Argument(
        metavar="ID",
        help="saga id (or any unique start of one) or order id; leave out and give filters for a batch",
        show_default=False,
        autocompletion=complete_saga_id,
    ),
]
All_ = Annotated[
    bool, typer.Option("--all", help="a batch of every saga the operation applies to", rich_help_panel=FILTERS)
]
Yes_ = Annotated[bool, typer.Option("--yes", "-y", help="do not ask before a batch")]
Reason_ = Annotated[str, typer.Option(help="why, recorded in the saga's history (terminate requires it)")]


@dataclass(frozen=True)
class _Operation:
    """What an operator call applies to, and the reason its examples give ("" for a call that takes none)."""

    # The --status words a batch without --status picks.
    applies_to: tuple[str, ...]
    reason_example: str = ""
    reason_required: bool = False

    @property
    def takes_reason(self) -> bool:
        return bool(self.reason_example)


_OPERATIONS = {
    "retry": _Operation(("needs_attention",)),
    "pause": _Operation(("running", "compensating"), reason_example=" --reason 'payment provider incident'"),
    "resume": _Operation(("paused",)),
    "cancel": _Operation(("running",), reason_example=" --reason 'customer changed their mind'"),
    "terminate": _Operation(
        ("running", "compensating", "paused", "needs_attention"),
        reason_example=" --reason 'fixed by hand'",
        reason_required=True,
    ),
}


def _outcome(operation: str, saga: pb.Saga) -> tuple[str, str]:
    """What became of the saga, from the orchestrator's answer: a phrase for a line and a word for a batch's.

    A cancel answers before anything is undone: while the call on the wire decides, the saga is still RUNNING.
    """
    from sagactl.render import status_name
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    status = status_name(saga.status)
    if operation == "cancel" and saga.status == pb.SAGA_STATUS_RUNNING:
        waiting_for = f" ({saga.current_step})" if saga.current_step else ""
        return f"cancel requested: it compensates once its call in flight{waiting_for} returns", "cancel requested"
    if operation == "cancel" and saga.status == pb.SAGA_STATUS_COMPENSATING:
        return "is compensating: what it did is being undone", "compensating"
    return f"is now {status}", status


def _stopped(operation: str, error: ClientError, done: int, matched: int) -> ClientError:
    """A batch's first refusal of the caller (no token, or one without the role): every other call would be
    refused the same way, so the batch stops there, once, with exit 4."""
    from sagactl.client import ClientError

    where = "at the first saga, nothing done" if not done else f"after {done} of them"
    return ClientError(
        f"{error.message}; {operation} of {matched} saga(s) stopped {where}", EXIT_REFUSED, error.code, error.reason
    )


def _operate(
    operation: str,
    saga_ref: str | None,
    reason: str,
    statuses: list[str] | None,
    saga_type: str,
    order: str,
    since: str,
    older_than: str,
    every: bool,
    yes: bool,
    as_json: bool,
    config: ClientConfig,
) -> None:
    from rich.text import Text

    from sagactl.client import AUTH_REFUSALS, ClientError, SagaClient
    from sagactl.render import STATUS_STYLE, saga_dict, saga_list, status_name

    filtered = bool(statuses or saga_type or order or since or older_than or every)
    if saga_ref and filtered:
        usage("give a saga ID or filters (--status, --type, --order, --since, --older-than, --all), not both")
    if not saga_ref and not filtered:
        usage("give a saga ID, or filters (--status, --type, --order, --since, --older-than) or --all for a batch")
    console = new_console()
    with SagaClient(config) as client:
        if saga_ref:
            saga = client.operate(operation, client.resolve_id(saga_ref), reason)
            if as_json:
                print_json(saga_dict(saga, history=False))
            else:
                outcome, _ = _outcome(operation, saga)
                line = Text(f"{operation}: saga {saga.saga_id} (order {saga.business_key}) ")
                line.append(outcome, style=STATUS_STYLE.get(status_name(saga.status), ""))
                console.print(line)
                if saga.steps_maybe_applied:
                    # Terminate compensates nothing: name what may still stand in the services.
                    standing = ", ".join(saga.steps_maybe_applied)
                    console.print(Text(f"effects that may still stand (not compensated): {standing}", style="magenta"))
            return
        chosen = parse_statuses(statuses) or parse_statuses(list(_OPERATIONS[operation].applies_to))
        request = filter_request(chosen, saga_type, order, since, older_than)
        request.page_size = 500
        matched = list(client.list_all(request))
        if not matched:
            if as_json:
                print_json({"operation": operation, "matched": 0, "succeeded": 0, "failed": 0, "results": []})
            else:
                console.print("no sagas match", style="dim")
            return
        if not yes:
            err = new_console(stderr=True)
            err.print(saga_list(matched[:10], time.time()))
            if len(matched) > 10:
                err.print(f"... and {len(matched) - 10} more", style="dim")
            try:
                confirmed = typer.confirm(f"{operation} {len(matched)} saga(s)?", default=False, err=True)
            except typer.Abort:
                confirmed = False
            if not confirmed:
                print("nothing done", file=sys.stderr)
                raise typer.Exit(EXIT_FAILED)
        results: list[dict[str, object]] = []
        for saga in matched:
            try:
                after = client.operate(operation, saga.saga_id, reason)
            except ClientError as error:
                if error.exit_code == EXIT_UNREACHABLE:
                    raise
                if error.code in AUTH_REFUSALS:
                    raise _stopped(operation, error, sum(1 for r in results if r["ok"]), len(matched)) from None
                results.append({"saga_id": saga.saga_id, "ok": False, "error": error.message})
                if not as_json:
                    console.print(Text(f"✗ {saga.saga_id} {error.message}", style="red"), soft_wrap=True)
                continue
            results.append({"saga_id": saga.saga_id, "ok": True, "status": status_name(after.status)})
            if not as_json:
                console.print(f"✓ {saga.saga_id} → {_outcome(operation, after)[1]}")
    failed = sum(1 for r in results if not r["ok"])
    if as_json:
        print_json(
            {
                "operation": operation,
                "matched": len(matched),
                "succeeded": len(results) - failed,
                "failed": failed,
                "results": results,
            }
        )
    else:
        console.print(f"{operation}: {len(results) - failed} done, {failed} refused")
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _epilog(operation: str, reason_example: str) -> str:
    applies = ", ".join(_OPERATIONS[operation].applies_to)
    return (
        f"A batch (filters instead of an ID) lists the matching sagas, asks for confirmation (--yes skips it) "
        f"and runs the call on each; without --status it picks the sagas the call applies to ({applies}). "
        f"A refusal of the caller (no token, an invalid one, or one without the operator role) stops a batch at "
        f"once. Exits 0 when every call went through, 1 when a batch had refusals of some sagas (or was "
        f"declined), 4 when the call on one ID was refused, or a batch was refused its caller.\n\n"
        f"[bold]Examples[/]\n\n"
        f"  saga {operation} 3f2a9c0e{reason_example}\n\n"
        f"  saga {operation} --type OrderSaga --since 1h{reason_example}\n\n"
        f"  saga {operation} --all --yes --json{reason_example}"
    )


def _register(operation: str, spec: _Operation) -> None:
    """Register `saga <operation>`: one saga by ID, or a filtered batch; --reason where the call takes one."""

    def command(
        saga_ref: SagaRef_ = None,
        reason: Reason_ = "",
        status: Statuses_ = None,
        saga_type: Type_ = "",
        order: Order_ = "",
        since: Since_ = "",
        older_than: OlderThan_ = "",
        every: All_ = False,
        yes: Yes_ = False,
        as_json: Json_ = False,
        *,
        config: ClientConfig,
    ) -> None:
        if spec.reason_required and not reason.strip():
            usage(f"{operation} needs --reason: it is recorded in the saga's history")
        _operate(operation, saga_ref, reason, status, saga_type, order, since, older_than, every, yes, as_json, config)

    if not spec.takes_reason:
        # A call that takes no reason has no --reason option: typer reads the parameters from this signature.
        signature = inspect.signature(command, eval_str=True)
        kept = [parameter for parameter in signature.parameters.values() if parameter.name != "reason"]
        command.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    command.__doc__ = COMMANDS[operation]
    commands.command(operation, epilog=_epilog(operation, spec.reason_example))(calls_orchestrator(command))


for _operation, _spec in _OPERATIONS.items():
    _register(_operation, _spec)
