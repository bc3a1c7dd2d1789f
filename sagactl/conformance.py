"""The `saga conformance` command: the participant conformance kit against live services, a table and an exit code."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sagactl.common import Json_, fail, new_console, print_json, usage
from sagactl.settings import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE

if TYPE_CHECKING:
    from conformance import Report

__all__ = ["commands", "parse_targets"]

commands = typer.Typer()

# A discovery name (what a definition's calls name, `inventory`, `loyalty`), then host:port.
_TARGET = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_.-]{0,62})=(?P<address>[^\s=]+:[0-9]{1,5})$")

_EPILOG = (
    "The kit calls the services directly, never the orchestrator: each check acts on a fresh entity (the "
    "input with its business key made unique), runs the steps before the checked one for real, in order, and "
    "sends the requests the definition builds under keys shaped like the orchestrator's "
    "(<saga>/<step>/<direction>) in the idempotency-key header. Every service the definition calls needs a "
    "--target. Point it at test instances: it leaves reservations, charges and tombstones behind. "
    "What each check means: docs/participant-contract.md. "
    "Exits 0 when every check passes, 1 when one fails, 2 on a usage error (a definition that does not load, "
    "a missing target), 3 when a target cannot be reached.\n\n"
    "[bold]Examples[/]\n\n"
    "  saga conformance --definition loyalty-v1.yaml --target loyalty=127.0.0.1:7070 "
    "--target inventory=127.0.0.1:50051\n\n"
    "  saga conformance -d orchestrator.sagas.order:ORDER_SAGA --input order.json "
    "-t inventory=... -t payment=... -t shipping=... -t notify=...\n\n"
    "  saga conformance -d loyalty-v1.yaml -t loyalty=... -t inventory=... --service loyalty --json"
)


def parse_targets(values: list[str]) -> dict[str, str]:
    """NAME=host:port options as a map; a usage error naming the bad one."""
    targets: dict[str, str] = {}
    for value in values:
        found = _TARGET.match(value)
        if found is None:
            usage(f"--target {value!r}: expected NAME=host:port, e.g. loyalty=127.0.0.1:7070")
        name = found.group("name")
        if name in targets:
            usage(f"--target {name} is given twice ({targets[name]} and {found.group('address')})")
        targets[name] = found.group("address")
    return targets


def _read_input(path: str) -> str:
    if not path:
        return ""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--input") from None
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{path} is not UTF-8 text", param_hint="--input") from None


def _report_dict(report: Report) -> dict[str, object]:
    return {
        "definition": report.definition,
        "passed": report.passed,
        "results": [
            {
                "check": result.check.name,
                "step": result.step,
                "direction": result.direction,
                "service": result.service,
                "outcome": result.outcome.value,
                "reason": result.reason,
            }
            for result in report.results
        ],
    }


@commands.command("conformance", epilog=_EPILOG)
def conformance_command(
    definition: Annotated[
        str,
        typer.Option(
            "--definition",
            "-d",
            metavar="FILE|MODULE:ATTR",
            help="a YAML definition file, or a Python SagaDefinition as module:attribute",
            show_default=False,
        ),
    ],
    target: Annotated[
        list[str],
        typer.Option(
            "--target",
            "-t",
            metavar="NAME=HOST:PORT",
            help="where a service the definition calls listens; repeat for each service",
            show_default=False,
        ),
    ],
    input_file: Annotated[
        str,
        typer.Option(
            "--input",
            metavar="FILE",
            help="a JSON example of the definition's input (- for stdin); required for a Python definition, "
            "a YAML one uses its saga.example otherwise",
            show_default=False,
        ),
    ] = "",
    key_field: Annotated[
        str,
        typer.Option(
            "--key-field", metavar="FIELD", help="the string field of --input made unique for each check's entity"
        ),
    ] = "order_id",
    service: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            metavar="NAME",
            help="check only the calls of this service (the others still run as earlier steps); repeatable",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="seconds to wait for each call")] = 10.0,
    as_json: Json_ = False,
) -> None:
    """Check that the services a saga definition calls honour the participant contract, for each call step's
    action and compensation: replays byte for byte, key reuse refused, 20 concurrent duplicates run once,
    compensation before action, refusals with a reason, health, reflection, expired deadlines.

    A step's request is built as the orchestrator builds it; steps that are not calls (timers, waits, approvals,
    parallel groups, child sagas) are listed as skipped, and a condition (when) is not evaluated: the step is
    checked all the same."""
    from conformance import TargetUnreachable, load_definition, run_conformance

    targets = parse_targets(target)
    example = _read_input(input_file)
    # As the Python tools that take module:attribute do: a module in the current folder can be named.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        source = load_definition(definition, example=example, key_field=key_field, targets=targets)
        report = run_conformance(
            source.definition, targets, source.make_input, timeout=timeout, services=service or None
        )
    except ValueError as error:
        fail(str(error), EXIT_USAGE)
    except TargetUnreachable as error:
        fail(str(error), EXIT_UNREACHABLE)
    if as_json:
        print_json(_report_dict(report))
    else:
        report.print(new_console())
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)
