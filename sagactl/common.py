"""What the `saga` commands share: the connection and filter options, the console, and how a failure ends a command."""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer

from sagactl.completion import complete_status
from sagactl.settings import DEFAULT_ADDRESS, ENV_ADDRESS, ENV_CA_FILE, ENV_TOKEN, ClientConfig

if TYPE_CHECKING:
    from rich.console import Console

    from sagactl.client import SagaClient
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

# Only typer (and sagactl.completion, which imports nothing more) is imported here: grpc, the contract and rich
# load inside the commands that use them, so building the command tree (and a command's --help) costs none of them.

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
    "StepStarts",
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
    "report_error",
    "run_reporting_errors",
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
        autocompletion=complete_status,
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


# Whether the command running was given --json: its errors are then one line of JSON on stderr too. Set for
# each run by run_reporting_errors (from the arguments) and by calls_orchestrator (from the parsed option).
_JSON_ERRORS: contextvars.ContextVar[bool] = contextvars.ContextVar("json_errors", default=False)


def report_error(message: str, exit_code: int, *, code: str = "", reason: str = "") -> None:
    """Print an error as one line on stderr: `saga: error: <message>`, or with --json
    {"error": {"code", "reason", "message", "exit_code"}} (sagactl.render.error_json)."""
    if _JSON_ERRORS.get():
        from sagactl.render import error_json

        line = error_json(message, exit_code, code, reason)
    else:
        line = f"saga: error: {message}"
    print(line, file=sys.stderr, flush=True)


def fail(message: str, exit_code: int, *, code: str = "", reason: str = "") -> NoReturn:
    """End the command with a one-line error on stderr (JSON with --json)."""
    report_error(message, exit_code, code=code, reason=reason)
    raise typer.Exit(exit_code)


def _command_path(ctx: Any) -> str:
    """`saga ls` for the context of `saga ls`, whatever name the program was started under."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["saga", *reversed(names)])


def _usage_line(error: typer.TyperException) -> str:
    """A usage error typer would draw as a box, as one line: what is wrong, and where the help is."""
    if isinstance(error, typer.BadParameter) and error.param is None and error.param_hint is None:
        text = error.message  # usage(): the command's own words, not "Invalid value: ..."
    else:
        text = error.format_message()
    ctx = getattr(error, "ctx", None)
    where = f" (see {_command_path(ctx)} --help)" if ctx is not None else ""
    return " ".join(text.split()) + where


def run_reporting_errors(run: Callable[[], object], args: Sequence[str]) -> int:
    """Run the command tree (run: typer's main without its standalone mode) and return the exit code, with a
    usage error reported as every other error is: one line on stderr, JSON when the arguments have --json
    (typer would draw a box of five lines). Help asked for by giving no arguments stays as typer prints it."""
    given = list(args)
    options = given[: given.index("--")] if "--" in given else given
    token = _JSON_ERRORS.set("--json" in options)
    try:
        outcome = run()
    except typer.Abort:
        report_error("aborted", 1, code="ABORTED")
        return 1
    except typer.TyperException as error:
        if type(error).__name__ != "NoArgsIsHelpError":
            # NoSuchOption -> NO_SUCH_OPTION: the kind of usage error, for scripts.
            kind = re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).upper()
            report_error(_usage_line(error), error.exit_code, code="USAGE", reason=kind)
        return error.exit_code
    finally:
        _JSON_ERRORS.reset(token)
    return outcome if isinstance(outcome, int) else 0


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

        # The parsed --json, more exact than the arguments run_reporting_errors looked at.
        json_errors = _JSON_ERRORS.set(bool(kwargs.get("as_json", _JSON_ERRORS.get())))
        try:
            command(*args, config=ClientConfig(address, token, ca_file, timeout), **kwargs)
        except ClientError as error:
            fail(error.message, error.exit_code, code=error.code_name, reason=error.reason)
        except KeyboardInterrupt:
            report_error("interrupted", 130, code="INTERRUPTED")
            raise typer.Exit(130) from None
        finally:
            _JSON_ERRORS.reset(json_errors)

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


# Wait events that end a wait, and the codes with which the saga goes on to the next step.
_WAIT_ENDS = {"TimerFired", "SignalConsumed", "ApprovalDecided", "ChildEnded"}
_WAIT_ENDED_WELL = {"", "OK", "APPROVED", "COMPLETED"}
# Operator events after which nothing held is started any more.
_STOPS = {"SagaCancelRequested", "SagaTerminated", "SagaNeedsAttention", "CompensationStarted"}


class StepStarts:
    """The steps a watch sees begin, derived from the events it receives.

    The history records when a call ended (StepSucceeded, StepFailed with its attempt), not when it
    began, and the CLI adds no write to the orchestrator to say so. A call step begins when the saga
    starts (its first step), when the step before it on its track is done (succeeded, skipped, its wait
    ended well), when its parallel group starts (the first step of each branch) or ends (the step after
    the group), when a paused saga that held it resumes, and when a saga is retried (the step that
    failed). Waits, children and groups have events of their own (WaitStarted, ChildStarted,
    BranchesStarted). A conditional step may be skipped by the transition that reached it: its start
    is told once the next event is not its StepSkipped, before that event.
    """

    def __init__(self, steps: Sequence[pb.SagaStep], conditional: Collection[str] = (), *, paused: bool = False):
        self._steps = list(steps)
        self._conditional = set(conditional)
        self._paused = paused
        self._held: list[pb.HistoryEvent] = []
        self._pending: list[pb.HistoryEvent] = []
        self._last_failed = ""

    def before(self, event: pb.HistoryEvent) -> list[pb.HistoryEvent]:
        """Starts derived before this event that it confirms (a conditional step it does not skip)."""
        confirmed = [start for start in self._pending if (event.type, event.step) != ("StepSkipped", start.step)]
        self._pending = []
        return self._unless_held(confirmed)

    def after(self, event: pb.HistoryEvent) -> list[pb.HistoryEvent]:
        """The starts this event implies, to show after it."""
        kind = event.type
        begun: list[tuple[str, int]] = []
        if kind == "SagaStarted":
            begun = [(name, 1) for name in self._firsts("")]
        elif kind in ("StepSucceeded", "StepSkipped", "BranchesCompleted") or (
            kind in _WAIT_ENDS and event.code in _WAIT_ENDED_WELL
        ):
            begun = [(name, 1) for name in self._next(event.step)]
        elif kind == "BranchesStarted":
            begun = [(name, 1) for name in self._firsts(event.step)]
        elif kind == "SagaRetried" and self._last_failed:
            begun = [(self._last_failed, 0)]
        if kind == "StepFailed":
            self._last_failed = event.step
        elif kind == "CompensationFailed":
            self._last_failed = ""
        if kind == "SagaPaused":
            self._paused = True
        elif kind == "SagaResumed":
            self._paused = False
            resumed = [self._started(start.step, 0, event) for start in self._held]
            self._held = []
            return resumed
        elif kind in _STOPS:
            self._held = []
        starts = [self._started(name, attempt, event) for name, attempt in begun if self._is_call(name)]
        self._pending += [start for start in starts if start.step in self._conditional]
        return self._unless_held([start for start in starts if start.step not in self._conditional])

    def _unless_held(self, starts: list[pb.HistoryEvent]) -> list[pb.HistoryEvent]:
        # A paused saga holds the step it came to: it begins when the saga is resumed.
        if self._paused:
            self._held += starts
            return []
        return starts

    def _is_call(self, name: str) -> bool:
        return any(step.name == name and step.kind in ("", "call") for step in self._steps)

    def _firsts(self, group: str) -> list[str]:
        """The first step of the main sequence (group "", all of branch 0), or of each branch of a group."""
        firsts: dict[int, str] = {}
        for step in self._steps:
            if step.group == group and step.branch not in firsts:
                firsts[step.branch] = step.name
        return list(firsts.values())

    def _next(self, name: str) -> list[str]:
        """The step after this one on its track (the main sequence, or its branch), if any."""
        position = next((i for i, step in enumerate(self._steps) if step.name == name), None)
        if position is None:
            return []
        done = self._steps[position]
        after = (s for s in self._steps[position + 1 :] if (s.group, s.branch) == (done.group, done.branch))
        following = next(after, None)
        return [following.name] if following is not None else []

    @staticmethod
    def _started(step: str, attempt: int, cause: pb.HistoryEvent) -> pb.HistoryEvent:
        from sagactl.render import STEP_STARTED
        from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

        started = pb.HistoryEvent(type=STEP_STARTED, step=step, attempt=attempt, actor="orchestrator")
        started.at.CopyFrom(cause.at)
        return started


def _conditional_steps(client: SagaClient, saga: pb.Saga) -> set[str]:
    """The steps of the saga's definition that run only when a condition holds; none known when the
    orchestrator does not say (its definition is not loaded, or the call is refused)."""
    from sagactl.client import ClientError

    try:
        loaded = client.definitions(saga.saga_type)
    except ClientError:
        return set()
    version = next((info for info in loaded if info.version == saga.definition_version), None)
    return {node.name for node in version.nodes if node.conditional} if version else set()


def print_events(client: SagaClient, saga: pb.Saga, after: int, console: Console, *, as_json: bool) -> None:
    """Each event as it comes, one a line (JSON or text); the text names a status when it changes, and tells
    when a step begins (StepStarted, derived: see StepStarts). --json gives the history's events alone."""
    from sagactl.render import event_dict, event_line
    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    origin = saga.created_at.ToNanoseconds() / 1e9
    shown: int | None = None
    starts = None
    if not as_json:
        # Watching from the start, the saga was not paused before its first event; from later, as it is now.
        paused = after > 0 and saga.status == pb.SAGA_STATUS_PAUSED
        starts = StepStarts(saga.steps, _conditional_steps(client, saga), paused=paused)
    for response in client.watch(saga.saga_id, after):
        # The server folds the history into the status each event left behind: no need to again here.
        status = response.status
        if starts is None:
            typer.echo(json.dumps(event_dict(response.event, status), ensure_ascii=False))
            continue
        for started in starts.before(response.event):
            console.print(event_line(started, None, origin), soft_wrap=True)
        console.print(event_line(response.event, status if status != shown else None, origin), soft_wrap=True)
        shown = status
        for started in starts.after(response.event):
            console.print(event_line(started, None, origin), soft_wrap=True)
