"""What the `saga` commands share: the connection and filter options, the console, and how a failure ends a command."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from sagactl.settings import DEFAULT_ADDRESS, ENV_ADDRESS, ENV_CA_FILE, ENV_TOKEN, ClientConfig

if TYPE_CHECKING:
    from rich.console import Console

    from sagactl.client import SagaClient
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

# Only typer is imported here: grpc, the contract and rich load inside the commands that use them, so
# building the command tree (and a command's --help) costs none of them.

__all__ = [
    "CONNECTION",
    "FILTERS",
    "Address_",
    "CaFile_",
    "Json_",
    "OlderThan_",
    "Order_",
    "Since_",
    "Statuses_",
    "Timeout_",
    "Token_",
    "Type_",
    "calls_orchestrator",
    "ended_well",
    "fail",
    "filter_request",
    "new_console",
    "parse_duration",
    "parse_statuses",
    "print_events",
    "print_json",
    "usage",
]

CONNECTION = "Connection"
FILTERS = "Filters"

Address_ = Annotated[
    str,
    typer.Option("--address", "-a", envvar=ENV_ADDRESS, help="orchestrator host:port", rich_help_panel=CONNECTION),
]
Token_ = Annotated[
    str,
    typer.Option(
        "--token",
        envvar=ENV_TOKEN,
        show_default=False,
        help="bearer token sent as 'authorization: Bearer <token>'",
        rich_help_panel=CONNECTION,
    ),
]
CaFile_ = Annotated[
    str,
    typer.Option(
        "--ca-file",
        envvar=ENV_CA_FILE,
        show_default=False,
        help="PEM CA bundle: connect with TLS",
        rich_help_panel=CONNECTION,
    ),
]
Timeout_ = Annotated[
    float, typer.Option("--timeout", min=0.1, help="seconds to wait for each call", rich_help_panel=CONNECTION)
]
Json_ = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
Statuses_ = Annotated[
    list[str] | None,
    typer.Option(
        "--status",
        "-s",
        help="running, compensating, paused, completed, compensated, needs_attention, terminated, "
        "in_flight or ended; repeat or separate with commas",
        rich_help_panel=FILTERS,
        show_default=False,
    ),
]
Type_ = Annotated[str, typer.Option("--type", help="saga type, e.g. OrderSaga", rich_help_panel=FILTERS)]
Order_ = Annotated[str, typer.Option("--order", help="order id (business key)", rich_help_panel=FILTERS)]
Since_ = Annotated[
    str, typer.Option("--since", help="created within this long, e.g. 30s, 10m, 2h, 1d", rich_help_panel=FILTERS)
]
OlderThan_ = Annotated[
    str, typer.Option("--older-than", help="created more than this long ago, e.g. 1h", rich_help_panel=FILTERS)
]

P = ParamSpec("P")
T = TypeVar("T")


def new_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr); wide when the output is not a terminal, so tables are not cut."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def fail(message: str, exit_code: int) -> NoReturn:
    """End the command with a one-line error on stderr."""
    print(f"saga: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(exit_code)


def usage(message: str) -> NoReturn:
    """End the command with typer's usage error (exit 2)."""
    raise typer.BadParameter(message)


def print_json(value: object) -> None:
    from sagactl.render import json_text

    typer.echo(json_text(value))


def _connection(
    address: Address_ = DEFAULT_ADDRESS, token: Token_ = "", ca_file: CaFile_ = "", timeout: Timeout_ = 10.0
) -> None:
    """Declares the connection options, once: calls_orchestrator gives every command these parameters."""


_CONNECTION_PARAMETERS = list(inspect.signature(_connection, eval_str=True).parameters.values())


def calls_orchestrator(command: Callable[..., None]) -> Callable[..., None]:
    """command as a typer command that calls the orchestrator.

    It gets --address, --token, --ca-file and --timeout after its own options and receives them as its
    keyword `config: ClientConfig`; a failed call ends it with its one-line error and exit code, Ctrl-C with 130.
    """
    own = inspect.signature(command, eval_str=True)

    @functools.wraps(command)
    def wrapper(*args: Any, address: str, token: str, ca_file: str, timeout: float, **kwargs: Any) -> None:
        from sagactl.client import ClientError

        try:
            command(*args, config=ClientConfig(address, token, ca_file, timeout), **kwargs)
        except ClientError as error:
            fail(error.message, error.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    # typer reads a command's options from its signature.
    kept = [parameter for name, parameter in own.parameters.items() if name != "config"]
    wrapper.__signature__ = own.replace(parameters=kept + _CONNECTION_PARAMETERS)  # type: ignore[attr-defined]
    return wrapper


def _checked(parse: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """parse's result; typer's usage error, naming the option, for a value it refused."""
    from sagactl.client import BadOption

    try:
        return parse(*args, **kwargs)
    except BadOption as error:
        raise typer.BadParameter(error.message, param_hint=error.option) from None


def parse_duration(text: str, option: str) -> float:
    """Seconds in "90s", "10m", "1h30m", "2d"; a usage error otherwise."""
    from sagactl.client import parse_duration

    return _checked(parse_duration, text, option)


def parse_statuses(values: list[str] | None) -> list[int]:
    """The statuses the --status words select; a usage error for a word it does not know."""
    from sagactl.client import parse_statuses

    return _checked(parse_statuses, values)


def filter_request(statuses: list[int], saga_type: str, order: str, since: str, older_than: str) -> pb.ListSagasRequest:
    """A ListSagasRequest for the filter options; a usage error for a duration it cannot read."""
    from sagactl.client import filter_request

    return _checked(filter_request, statuses, saga_type, order, since, older_than)


def ended_well(saga: pb.Saga) -> bool:
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    return saga.status == pb.SAGA_STATUS_COMPLETED


def print_events(client: SagaClient, saga: pb.Saga, after: int, console: Console, *, as_json: bool) -> None:
    """Each event as it comes, one a line (JSON or text); the text names a status when it changes."""
    from sagactl.render import event_dict, event_line

    origin = saga.created_at.ToNanoseconds() / 1e9
    shown: int | None = None
    for response in client.watch(saga.saga_id, after):
        # The server folds the history into the status each event left behind: no need to again here.
        status = response.status
        if as_json:
            typer.echo(json.dumps(event_dict(response.event, status), ensure_ascii=False))
            continue
        console.print(event_line(response.event, status if status != shown else None, origin), soft_wrap=True)
        shown = status
