"""The `saga` command line: run the demo and the local stack, place orders, inspect and operate sagas."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from sagactl.client import (
    DEFAULT_ADDRESS,
    ENV_ADDRESS,
    ENV_CA_FILE,
    ENV_TOKEN,
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    BadOption,
    ClientConfig,
    ClientError,
    SagaClient,
    filter_request,
    health_of,
    open_channel,
    parse_duration,
    parse_statuses,
    stamp_ago,
)
from sagasuite.common.v1.common_pb2 import Address, LineItem
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

if TYPE_CHECKING:
    import grpc

    # Typer vendors Click (there is no click dependency); its classes are what TyperGroup's methods take.
    from typer._click import Command, Context

    from devstack.stack import LocalStack

__all__ = ["app", "main"]

ROOT_HELP = f"""Sagasuite: run the local stack, place orders, watch and operate sagas.

Every command but up and demo talks to the orchestrator at --address (env {ENV_ADDRESS}, default
{DEFAULT_ADDRESS}). With {ENV_TOKEN} (or --token) set, calls carry "authorization: Bearer <token>";
with {ENV_CA_FILE} (or --ca-file) naming a PEM CA bundle, they use TLS. Read commands take --json.

[bold]Exit codes[/]
  0  ok
  1  the saga ended badly (compensated, needs attention, terminated), or some calls of a batch were refused
  2  usage error (bad option or argument)
  3  the orchestrator is unreachable (or did not answer in time)
  4  refused by the orchestrator (invalid argument, not found, failed precondition, permission denied,
     unauthenticated)

[bold]Examples[/]
  saga up                                  run the local stack (Ctrl-C stops it)
  saga order --item BOOK-001:2             place an order and follow its saga
  saga ls --status needs_attention         sagas waiting for an operator
  saga show ord-1234                       one saga: steps, timeline, time bars
  saga retry --status needs_attention --yes
"""


@dataclass(frozen=True)
class _OptionalCommand:
    """A command whose code is in a package an installation may leave out: imported only when it runs."""

    module: str
    function: str
    # The one line `saga --help` lists, so listing the command does not import its package.
    summary: str

    @property
    def package(self) -> str:
        return self.module.partition(".")[0]


# The benchmark and the chaos harness live in bench/, which the Docker image does not copy (.dockerignore).
_OPTIONAL_COMMANDS = {
    "bench": _OptionalCommand(
        "bench.cli",
        "bench_command",
        "Benchmark the order saga through the orchestrator against the four calls alone (and peers).",
    ),
    "chaos": _OptionalCommand(
        "bench.cli",
        "chaos_command",
        "Run sagas while killing processes, then check every invariant from the services' own records.",
    ),
}


def _load_optional(name: str, optional: _OptionalCommand) -> Command:
    """The real `saga <name>` command; a one-line error (exit 2) when its package is not installed."""
    try:
        function = getattr(importlib.import_module(optional.module), optional.function)
    except ModuleNotFoundError as error:
        missing = (error.name or optional.package).partition(".")[0]
        where = (
            f"(the Docker image leaves {missing}/ out): run it from a source checkout after pip install -e '.[dev]'"
            if missing == optional.package
            else "(one of its own dependencies): install it, e.g. pip install -e '.[dev,bench]' in a checkout"
        )
        _fail(f"saga {name} needs the {missing!r} package, which this installation does not have {where}", 2)
    single = typer.Typer(add_completion=False, rich_markup_mode="rich")
    single.command(name)(function)
    return typer.main.get_command(single)


class _SagaGroup(TyperGroup):
    """The root command: lists the optional commands by their summaries and imports one only to run it."""

    def list_commands(self, ctx: Context) -> list[str]:
        listed = super().list_commands(ctx)
        return [*listed, *(name for name in _OPTIONAL_COMMANDS if name not in listed)]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = super().get_command(ctx, cmd_name)
        optional = _OPTIONAL_COMMANDS.get(cmd_name)
        if command is not None or optional is None:
            return command
        # A stand-in for the help listing only: resolve_command builds the real one.
        installed = importlib.util.find_spec(optional.package) is not None
        note = "" if installed else f" (needs the {optional.package} package: not installed here)"
        return TyperCommand(cmd_name, help=optional.summary + note)

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[str | None, Command | None, list[str]]:
        optional = _OPTIONAL_COMMANDS.get(args[0]) if args else None
        if optional is None or args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return args[0], _load_optional(args[0], optional), args[1:]


def _print_version(wanted: bool) -> None:
    if not wanted:
        return
    from sagactl.main import installed_version

    typer.echo(f"sagasuite {installed_version()}")
    raise typer.Exit()


app = typer.Typer(cls=_SagaGroup, help=ROOT_HELP, no_args_is_help=True, rich_markup_mode="rich")


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="print the sagasuite version and exit"),
    ] = False,
) -> None:
    """Sagasuite: run the local stack, place orders, watch and operate sagas."""


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

# What each operator call applies to: a batch without --status picks these.
APPLIES_TO: dict[str, list[int]] = {
    "retry": [pb.SAGA_STATUS_NEEDS_ATTENTION],
    "pause": [pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_COMPENSATING],
    "resume": [pb.SAGA_STATUS_PAUSED],
    "cancel": [pb.SAGA_STATUS_RUNNING],
    "terminate": [
        pb.SAGA_STATUS_RUNNING,
        pb.SAGA_STATUS_COMPENSATING,
        pb.SAGA_STATUS_PAUSED,
        pb.SAGA_STATUS_NEEDS_ATTENTION,
    ],
}
F = TypeVar("F", bound=Callable[..., Any])


# -- plumbing ------------------------------------------------------------------------------------


def _console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr); wide when the output is not a terminal, so tables are not cut."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def _fail(message: str, exit_code: int) -> NoReturn:
    print(f"saga: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(exit_code)


def _usage(message: str) -> NoReturn:
    raise typer.BadParameter(message)


def _print_json(value: object) -> None:
    from sagactl.render import json_text

    typer.echo(json_text(value))


def _reports_errors(command: F) -> F:
    """A failed call ends the command with its one-line error and exit code; Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ClientError as error:
            _fail(error.message, error.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _client(address: str, token: str, ca_file: str, timeout: float) -> SagaClient:
    return SagaClient(ClientConfig(address=address, token=token, ca_file=ca_file, timeout=timeout))


def _parse_duration(text: str, option: str) -> float:
    """Seconds in "90s", "10m", "1h30m", "2d"; a usage error otherwise."""
    try:
        return parse_duration(text, option)
    except BadOption as error:
        raise typer.BadParameter(error.message, param_hint=error.option) from None


def _parse_statuses(values: list[str] | None) -> list[int]:
    try:
        return parse_statuses(values)
    except BadOption as error:
        raise typer.BadParameter(error.message, param_hint=error.option) from None


def _filter_request(
    statuses: list[int], saga_type: str, order: str, since: str, older_than: str
) -> pb.ListSagasRequest:
    try:
        return filter_request(statuses, saga_type, order, since, older_than)
    except BadOption as error:
        raise typer.BadParameter(error.message, param_hint=error.option) from None


def _ended_well(saga: pb.Saga) -> bool:
    return saga.status == pb.SAGA_STATUS_COMPLETED


# -- demo ----------------------------------------------------------------------------------------


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="where the stack keeps its SQLite files and logs (wiped)")] = Path(
        "var/demo"
    ),
) -> None:
    """Start the local stack, place four demo orders (success, decline, transient failure, out of stock),
    print each saga's outcome and step timeline, then stop everything.

    Example: saga demo --data-dir /tmp/saga-demo
    """
    from sagactl.demo import run_demo
    from sagactl.render import status_name

    sagas = run_demo(data_dir)
    expected = ["COMPLETED", "COMPENSATED", "COMPLETED", "COMPENSATED"]
    if [status_name(s.status) for s in sagas] != expected:
        raise typer.Exit(1)


# -- up ------------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _database_url(db: str) -> str:
    if not db:
        return ""
    if db.startswith("postgres://"):
        db = "postgresql://" + db.removeprefix("postgres://")
    if not re.match(r"^(postgresql(\+\w+)?|sqlite(\+\w+)?)://", db):
        raise typer.BadParameter(
            "expected postgresql://user@host:port/database (or a sqlite:/// URL)", param_hint="--db"
        )
    return db


def _service_faults(rules: list[str] | None, services: list[str]) -> dict[str, dict[str, str]]:
    from svckit.faults import parse_faults

    env: dict[str, dict[str, str]] = {}
    for rule in rules or []:
        service, _, spec = rule.partition("=")
        if service not in services or not spec:
            raise typer.BadParameter(
                f"{rule!r}: expected SERVICE=Method:field=value with SERVICE one of {', '.join(services)}",
                param_hint="--faults",
            )
        try:
            parse_faults(spec)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--faults") from None
        previous = env.get(service, {}).get("FAULTS")
        env[service] = {"FAULTS": f"{previous};{spec}" if previous else spec}
    return env


def _operator_tokens(token: str, data_dir: Path) -> tuple[dict[str, str], str, str]:
    """The orchestrator's OPERATOR_TOKENS for `saga up`, the token the CLI may use, and a line telling it.

    Token settings already in the environment are the user's and are left alone.
    """
    if os.environ.get("OPERATOR_TOKENS") or os.environ.get("OPERATOR_TOKENS_FILE"):
        return {}, token, ""
    user = os.environ.get("USER", "")
    name = user if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", user) else "operator"
    if token:
        if len(token) < 16 or not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", token):
            raise typer.BadParameter(
                "must be at least 16 characters of A-Z a-z 0-9 - . _ ~ + / =", param_hint="--token"
            )
        return {"OPERATOR_TOKENS": f"{name}:{token}"}, token, f"operator token: from {ENV_TOKEN} (operator {name})"
    token = secrets.token_urlsafe(24)
    data_dir.mkdir(parents=True, exist_ok=True)
    token_file = data_dir / "operator.token"
    token_file.unlink(missing_ok=True)
    with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(token + "\n")
    note = f"operator token (also in {token_file}): export {ENV_TOKEN}={token}"
    return {"OPERATOR_TOKENS": f"{name}:{token}"}, token, note


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


class _StackMonitor:
    """Polls the stack's processes (alive, health) and the orchestrator's saga counts for the panel."""

    def __init__(self, stack: LocalStack, client: SagaClient, database: str) -> None:
        self.stack = stack
        self.client = client
        self.database = database
        self.channels: dict[str, grpc.Channel] = {
            name: open_channel(process.address) for name, process in stack.processes().items()
        }
        self.health: dict[str, str] = {}
        self.counts: dict[str, int] | None = None
        self.died: set[str] = set()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def poll(self) -> list[str]:
        """Look again; returns a line per change of a process's state."""
        from sagactl.render import status_name

        changes = []
        for name, process in self.stack.processes().items():
            if process.is_running():
                state = health_of(self.channels[name])
            else:
                state = f"EXITED ({process.popen.returncode if process.popen else '?'})"
                self.died.add(name)
            if self.health.get(name) not in (None, state):
                changes.append(f"{name}: {self.health[name]} → {state} (log: {process.log_path})")
            self.health[name] = state
        try:
            stats = self.client.stats(pb.GetSagaStatsRequest())
            self.counts = {status_name(c.status): c.count for c in stats.counts}
        except ClientError:
            self.counts = None
        return changes

    def panel(self) -> Panel:
        from sagactl.render import IN_FLIGHT, STATUS_STYLE

        table = Table(show_edge=False, pad_edge=False, header_style="bold", box=None)
        for column in ("process", "address", "pid", "health", "log"):
            table.add_column(column)
        for name, process in self.stack.processes().items():
            state = self.health.get(name, "?")
            style = "green" if state == "SERVING" else "red"
            table.add_row(
                name,
                f"127.0.0.1:{process.port}",
                str(process.pid),
                Text(state, style=style),
                Text(str(process.log_path), style="dim"),
            )
        sagas = Text("sagas  ", style="bold")
        if self.counts is None:
            sagas.append("(orchestrator not answering)", style="red")
        else:
            in_flight = sum(self.counts.get(name, 0) for name in IN_FLIGHT)
            sagas.append(f"in flight {in_flight}", style="bold cyan")
            detail = ", ".join(f"{name.lower()} {self.counts.get(name, 0)}" for name in IN_FLIGHT)
            sagas.append(f" ({detail})")
            for name in ("COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED"):
                sagas.append(" · ")
                sagas.append(f"{name.lower().replace('_', ' ')} {self.counts.get(name, 0)}", style=STATUS_STYLE[name])
        where = Text(f"data {self.stack.config.data_dir} · orchestrator database {self.database}", style="dim")
        return Panel(
            Group(table, Text(""), sagas, where),
            title="sagasuite local stack",
            subtitle=f"{ENV_ADDRESS}={self.stack.address} · Ctrl-C stops everything",
            expand=False,
        )


def _stop_stack(stack: LocalStack) -> None:
    """SIGTERM the orchestrator, then every service at once, and wait for each; a second Ctrl-C kills the rest."""
    try:
        if stack.orchestrator is not None:
            stack.orchestrator.stop()
        for process in stack.services.values():
            if process.is_running() and process.popen is not None:
                process.popen.send_signal(signal.SIGTERM)
        stack.stop()
    except KeyboardInterrupt:
        for process in stack.processes().values():
            process.kill()


@app.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga up\n\n"
    "  saga up --db postgresql://postgres@127.0.0.1:5432/sagas\n\n"
    "  saga up --fresh --faults payment=Charge:error_rate=0.3\n\n"
    "  saga up --port 60050 --service-port-base 0"
)
def up(
    port: Annotated[int, typer.Option(min=0, max=65535, help="orchestrator port")] = 50050,
    service_port_base: Annotated[
        int,
        typer.Option(
            min=0, max=65532, help="inventory gets this port, payment the next, then shipping, notify; 0: free ports"
        ),
    ] = 50051,
    db: Annotated[
        str, typer.Option(help="orchestrator database URL, e.g. postgresql://user@host/db (default: SQLite file)")
    ] = "",
    data_dir: Annotated[Path, typer.Option(help="where the processes keep SQLite files and logs")] = Path("var/stack"),
    fresh: Annotated[bool, typer.Option("--fresh", help="wipe --data-dir first")] = False,
    faults: Annotated[
        list[str] | None,
        typer.Option(help="fault injection, SERVICE=Method:field=value,...; repeatable", show_default=False),
    ] = None,
    refresh: Annotated[float, typer.Option(min=0.1, help="seconds between status refreshes")] = 1.0,
    token: Annotated[
        str,
        typer.Option(
            "--token",
            envvar=ENV_TOKEN,
            show_default=False,
            help="operator token the orchestrator accepts (at least 16 characters); default: a new one",
        ),
    ] = "",
) -> None:
    """Run the local stack in the foreground: the four services and the orchestrator on loopback, with a
    live status panel (each process, its port, health, sagas in flight). Ctrl-C stops everything.

    Services keep SQLite files in --data-dir, kept between runs (so sagas in flight resume); the
    orchestrator too unless --db names a PostgreSQL database. Operator calls (retry, pause, resume,
    cancel, terminate) need a token: the orchestrator accepts --token (SAGA_TOKEN), or a new one that is
    printed and written to DATA_DIR/operator.token, unless OPERATOR_TOKENS or OPERATOR_TOKENS_FILE is set
    in the environment. Exits 0 after a clean stop, 1 when a process failed to start or died while
    running, 2 on a usage error.
    """
    from devstack.launcher import ProcessFailed
    from devstack.stack import SERVICES, LocalStack, StackConfig

    console = _console()
    database_url = _database_url(db)
    names = list(SERVICES)
    service_env = _service_faults(faults, names)
    if fresh:
        shutil.rmtree(data_dir, ignore_errors=True)
    ports = {name: service_port_base + offset for offset, name in enumerate(names)} if service_port_base else {}
    orchestrator_env, token, token_note = _operator_tokens(token, data_dir)
    config = StackConfig(
        data_dir,
        orchestrator_port=port,
        orchestrator_database_url=database_url,
        service_env=service_env,
        orchestrator_env=orchestrator_env,
        service_ports=ports,
    )
    stack = LocalStack(config)
    database = _safe_url(database_url) if database_url else f"SQLite in {data_dir / 'orchestrator'}"
    # Ctrl-C, SIGTERM and a closed terminal (SIGHUP) all stop the stack, even when SIGINT was ignored
    # at start (a background job): the children run in sessions of their own and would outlive us.
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous_handlers = {signum: signal.signal(signum, _raise_interrupt) for signum in stop_signals}
    healthy = True
    monitor: _StackMonitor | None = None
    console.print(f"starting the local stack in {data_dir} ...")
    try:
        try:
            stack.start()
        except ProcessFailed as error:
            lines = str(error).splitlines()
            _stop_stack(stack)
            print(f"saga: error: {lines[0] if lines else error}", file=sys.stderr)
            print("\n".join(lines[1:]), file=sys.stderr)
            print("(a port in use? choose others with --port and --service-port-base)", file=sys.stderr, flush=True)
            raise typer.Exit(EXIT_FAILED) from None
        client = SagaClient(ClientConfig(address=stack.address, token=token))
        monitor = _StackMonitor(stack, client, database)
        monitor.poll()
        if not console.is_terminal:
            # Without a terminal there is no live panel: show it once, then report changes line by line.
            console.print(monitor.panel())
        if token_note:
            console.print(token_note, soft_wrap=True)
        console.print(f"ready: orchestrator at {stack.address}; try `saga order` · Ctrl-C stops everything")
        if console.is_terminal:
            with Live(monitor.panel(), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(refresh)
                    for change in monitor.poll():
                        live.console.print(change)
                    live.update(monitor.panel())
        else:
            while True:
                time.sleep(refresh)
                for change in monitor.poll():
                    console.print(change)
    except KeyboardInterrupt:
        pass
    finally:
        if monitor is not None:
            healthy = not monitor.died
            monitor.close()
            monitor.client.close()
        console.print("stopping ...")
        _stop_stack(stack)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    console.print("stopped")
    if not healthy:
        raise typer.Exit(EXIT_FAILED)


# -- order ---------------------------------------------------------------------------------------

_DEFAULT_ADDRESS = Address(
    recipient_name="Ada Lovelace",
    street="12 St James's Square",
    city="London",
    postal_code="SW1Y 4JH",
    country_code="GB",
)
_UNIT_PRICE_MINOR = 2999


def _parse_item(text: str) -> LineItem:
    sku, _, quantity = text.partition(":")
    try:
        count = int(quantity) if quantity else 1
    except ValueError:
        count = 0
    if not sku or count < 1:
        raise typer.BadParameter(f"{text!r}: expected SKU or SKU:QUANTITY, e.g. BOOK-001:2", param_hint="--item")
    return LineItem(sku=sku, quantity=count)


def _minor_units(amount: str) -> int:
    try:
        value = Decimal(amount) * 100
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value != value.to_integral_value():
        raise typer.BadParameter(f"{amount!r}: expected an amount like 29.99", param_hint="--amount")
    return int(value)


def _read_order_file(path: Path) -> pb.PlaceOrderRequest:
    from google.protobuf import json_format  # only `saga order --file` parses protobuf JSON

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--file") from None
    request = pb.PlaceOrderRequest()
    try:
        json_format.Parse(text, request)
    except json_format.ParseError as error:
        raise typer.BadParameter(f"{path} is not a PlaceOrderRequest in JSON: {error}", param_hint="--file") from None
    return request


def _build_order(
    file: Path | None,
    order_id: str | None,
    items: list[str] | None,
    amount: str | None,
    currency: str | None,
    payment_token: str | None,
    email: str | None,
    name: str | None,
    street: str | None,
    city: str | None,
    postal_code: str | None,
    country: str | None,
    deadline: int | None,
) -> pb.PlaceOrderRequest:
    """The file's order (when given) with the flags on top; what neither gives comes from the defaults."""
    request = _read_order_file(file) if file else pb.PlaceOrderRequest()
    if order_id is not None:
        request.order_id = order_id
    if not request.order_id:
        request.order_id = f"ord-{uuid.uuid4().hex[:12]}"
    if items:
        del request.items[:]
        request.items.extend(_parse_item(item) for item in items)
    if not request.items:
        request.items.append(LineItem(sku="BOOK-001", quantity=1))
    if amount is not None:
        request.amount.minor_units = _minor_units(amount)
    if currency is not None:
        request.amount.currency_code = currency.upper()
    if not request.HasField("amount") or not request.amount.minor_units:
        request.amount.minor_units = _UNIT_PRICE_MINOR * sum(item.quantity for item in request.items)
    if not request.amount.currency_code:
        request.amount.currency_code = "EUR"
    if payment_token is not None:
        request.payment_token = payment_token
    request.payment_token = request.payment_token or "tok_visa"
    if email is not None:
        request.customer_email = email
    request.customer_email = request.customer_email or "ada@example.com"
    shipping = request.shipping_address
    for field, value in (
        ("recipient_name", name),
        ("street", street),
        ("city", city),
        ("postal_code", postal_code),
        ("country_code", country),
    ):
        if value is not None:
            setattr(shipping, field, value)
        elif not getattr(shipping, field):
            setattr(shipping, field, getattr(_DEFAULT_ADDRESS, field))
    if deadline is not None:
        request.deadline_seconds = deadline
    return request


def _progress(saga: pb.Saga, started: float) -> RenderableType:
    from sagactl.render import STATUS_STYLE, saga_steps, status_name

    status = status_name(saga.status)
    line = Text()
    line.append(f"saga {saga.saga_id}  order {saga.business_key}  ")
    line.append(status, style=STATUS_STYLE.get(status, "bold"))
    line.append(f"  {time.monotonic() - started:.1f}s", style="dim")
    if saga.current_step and not saga.HasField("ended_at"):
        line.append(f"  at {saga.current_step}", style="cyan")
    return Group(Spinner("dots", text=line), saga_steps(saga))


def _follow(client: SagaClient, saga_id: str, console: Console | None) -> pb.Saga:
    """Follow the saga until it ends or needs attention (events, or a live step table in a terminal)."""
    saga = client.get_saga(saga_id)
    if console is None:
        for _ in client.watch(saga_id):
            pass
    elif console.is_terminal:
        started = time.monotonic()
        with Live(_progress(saga, started), console=console, refresh_per_second=10, transient=True) as live:
            for _ in client.watch(saga_id):
                saga = client.get_saga(saga_id)
                live.update(_progress(saga, started))
    else:
        _print_events(client, saga, 0, console, as_json=False)
    return client.get_saga(saga_id)


def _print_events(client: SagaClient, saga: pb.Saga, after: int, console: Console, *, as_json: bool) -> None:
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


@app.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga order\n\n"
    "  saga order --order-id ord-42 --item BOOK-001:2 --item MUG-042 --amount 59.98 --currency EUR\n\n"
    "  saga order --payment-token tok_declined          (compensated: exits 1)\n\n"
    "  saga order --file order.json --no-wait --json\n\n"
    '  echo \'{"orderId": "ord-7", "items": [{"sku": "TEE-007", "quantity": 1}]}\' | saga order --file -'
)
@_reports_errors
def order(
    order_id: Annotated[
        str | None, typer.Option(help="order id, the saga's business key", show_default="a new ord-<hex>")
    ] = None,
    item: Annotated[
        list[str] | None,
        typer.Option("--item", "-i", help="SKU or SKU:QUANTITY; repeatable", show_default="BOOK-001:1"),
    ] = None,
    amount: Annotated[
        str | None, typer.Option(help="amount to charge, e.g. 29.99", show_default="29.99 per unit")
    ] = None,
    currency: Annotated[str | None, typer.Option(help="ISO 4217 currency", show_default="EUR")] = None,
    payment_token: Annotated[
        str | None,
        typer.Option(help="tok_declined and tok_insufficient_funds are refused", show_default="tok_visa"),
    ] = None,
    email: Annotated[str | None, typer.Option(help="customer e-mail", show_default="ada@example.com")] = None,
    name: Annotated[str | None, typer.Option(help="recipient name", show_default="Ada Lovelace")] = None,
    street: Annotated[str | None, typer.Option(help="street", show_default="12 St James's Square")] = None,
    city: Annotated[str | None, typer.Option(help="city", show_default="London")] = None,
    postal_code: Annotated[str | None, typer.Option(help="postal code", show_default="SW1Y 4JH")] = None,
    country: Annotated[str | None, typer.Option(help="ISO 3166 country code", show_default="GB")] = None,
    deadline: Annotated[
        int | None, typer.Option(min=0, help="seconds before the saga is compensated; 0: server default")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="PlaceOrderRequest as JSON ('-' reads stdin); flags override it", show_default=False
        ),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="print the saga id and return at once")] = False,
    as_json: Json_ = False,
    address: Address_ = DEFAULT_ADDRESS,
    token: Token_ = "",
    ca_file: CaFile_ = "",
    timeout: Timeout_ = 10.0,
) -> None:
    """Place an order: print the saga id, then follow the saga to its end.

    Exits 0 when the saga completed, 1 when it ended otherwise (compensated, needs attention,
    terminated), 4 when the order is refused (invalid, or the order id is taken by a different order).
    """
    from sagactl.render import saga_dict, saga_header, saga_steps, status_name

    request = _build_order(
        file, order_id, item, amount, currency, payment_token, email, name, street, city, postal_code, country, deadline
    )
    console = _console()
    with _client(address, token, ca_file, timeout) as client:
        placed = client.place_order(request)
        summary: dict[str, object] = {
            "saga_id": placed.saga_id,
            "order_id": request.order_id,
            "created": placed.created,
            "status": status_name(placed.status),
        }
        if not as_json:
            verb = "placed order" if placed.created else "order already placed:"
            console.print(f"{verb} {request.order_id} → saga [bold]{placed.saga_id}[/]")
        if no_wait:
            if as_json:
                _print_json(summary)
            return
        try:
            saga = _follow(client, placed.saga_id, None if as_json else console)
        except KeyboardInterrupt:
            print(f"stopped following; the saga goes on: saga watch {placed.saga_id}", file=sys.stderr)
            raise typer.Exit(130) from None
    if as_json:
        _print_json({**summary, "status": status_name(saga.status), "saga": saga_dict(saga, history=False)})
    else:
        console.print(saga_header(saga))
        console.print(saga_steps(saga))
    if not _ended_well(saga):
        raise typer.Exit(EXIT_FAILED)


# -- reading -------------------------------------------------------------------------------------


@app.command(
    "ls",
    epilog="[bold]Examples[/]\n\n"
    "  saga ls\n\n"
    "  saga ls --status needs_attention --since 1h\n\n"
    "  saga ls --status in_flight --older-than 10m --type OrderSaga\n\n"
    "  saga ls --order ord-42 --json\n\n"
    "  saga ls --limit 100 --page-token <token printed under the previous page>\n\n"
    "  saga ls --all --json",
)
@_reports_errors
def list_sagas(
    status: Statuses_ = None,
    saga_type: Type_ = "",
    order: Order_ = "",
    since: Since_ = "",
    older_than: OlderThan_ = "",
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=500, help="sagas per page")] = 20,
    page_token: Annotated[str, typer.Option(help="continue after a previous page")] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="every page, not just one")] = False,
    as_json: Json_ = False,
    address: Address_ = DEFAULT_ADDRESS,
    token: Token_ = "",
    ca_file: CaFile_ = "",
    timeout: Timeout_ = 10.0,
) -> None:
    """List sagas, newest first, filtered by status, type, age and order id; one page at a time."""
    from sagactl.render import list_dict, saga_list

    request = _filter_request(_parse_statuses(status), saga_type, order, since, older_than)
    request.page_size = limit
    request.page_token = page_token
    with _client(address, token, ca_file, timeout) as client:
        sagas, next_token = client.list_page(request, all_pages=all_pages)
    if as_json:
        _print_json(list_dict(sagas, next_token))
        return
    console = _console()
    if not sagas:
        console.print("no sagas match", style="dim")
        return
    console.print(saga_list(sagas, time.time()))
    if next_token:
        console.print(f"more: add --page-token {next_token}", style="dim", soft_wrap=True)


@app.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga show 3f2a9c0e...\n\n"
    "  saga show ord-42                 (an order id works too)\n\n"
    "  saga show ord-42 --history\n\n"
    "  saga show ord-42 --json"
)
@_reports_errors
def show(
    saga_ref: Annotated[str, typer.Argument(metavar="ID", help="saga id, or the order id of one saga")],
    history: Annotated[bool, typer.Option("--history", help="also print every history event")] = False,
    width: Annotated[int, typer.Option(min=10, max=400, help="width of the time bars")] = 50,
    as_json: Json_ = False,
    address: Address_ = DEFAULT_ADDRESS,
    token: Token_ = "",
    ca_file: CaFile_ = "",
    timeout: Timeout_ = 10.0,
) -> None:
    """Describe one saga: its header, each step's state and tries, every call as a timeline table
    (attempts, durations, codes, messages, compensations), and the calls as bars on the saga's time axis,
    so a slow step or a retry storm stands out.
    """
    from sagactl.render import saga_bars, saga_dict, saga_header, saga_history, saga_steps, saga_timeline

    with _client(address, token, ca_file, timeout) as client:
        saga = client.resolve(saga_ref)
    if as_json:
        _print_json(saga_dict(saga))
        return
    console = _console()
    console.print(saga_header(saga))
    console.print()
    console.print(Text("steps", style="bold underline"))
    console.print(saga_steps(saga))
    console.print()
    console.print(Text("timeline", style="bold underline"))
    console.print(saga_timeline(saga))
    console.print()
    console.print(Text("time bars", style="bold underline"))
    console.print(saga_bars(saga, width), soft_wrap=True)
    if history:
        console.print()
        console.print(Text("history", style="bold underline"))
        console.print(saga_history(saga))


@app.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga watch 3f2a9c0e...\n\n"
    "  saga watch ord-42 --json | jq .type\n\n"
    "  saga watch ord-42 --after 12"
)
@_reports_errors
def watch(
    saga_ref: Annotated[str, typer.Argument(metavar="ID", help="saga id, or the order id of one saga")],
    after: Annotated[int, typer.Option(min=0, help="only events after this sequence number")] = 0,
    as_json: Json_ = False,
    address: Address_ = DEFAULT_ADDRESS,
    token: Token_ = "",
    ca_file: CaFile_ = "",
    timeout: Timeout_ = 10.0,
) -> None:
    """Print a saga's events as they happen (its history so far first) until it ends or needs attention.

    With --json, one JSON object per event and line. Exits 0 when the saga completed, 1 when it ended
    otherwise.
    """
    from sagactl.render import saga_header

    console = _console()
    with _client(address, token, ca_file, timeout) as client:
        saga = client.resolve(saga_ref)
        if not as_json:
            console.print(f"watching saga {saga.saga_id} (order {saga.business_key}); Ctrl-C stops watching")
        _print_events(client, saga, after, console, as_json=as_json)
        saga = client.get_saga(saga.saga_id)
    if not as_json:
        console.print(saga_header(saga))
    if not _ended_well(saga):
        raise typer.Exit(EXIT_FAILED)


@app.command(
    epilog="[bold]Examples[/]\n\n  saga stats\n\n  saga stats --since 1h\n\n  saga stats --json | jq .in_flight"
)
@_reports_errors
def stats(
    since: Annotated[str, typer.Option(help="only sagas created within this long, e.g. 1h")] = "",
    as_json: Json_ = False,
    address: Address_ = DEFAULT_ADDRESS,
    token: Token_ = "",
    ca_file: CaFile_ = "",
    timeout: Timeout_ = 10.0,
) -> None:
    """Saga counts by status, completion-latency percentiles (p50, p95, p99) and the oldest saga in flight."""
    from sagactl.render import stats_dict, stats_view

    request = pb.GetSagaStatsRequest()
    if since:
        request.created_after.CopyFrom(stamp_ago(_parse_duration(since, "--since")))
    with _client(address, token, ca_file, timeout) as client:
        response = client.stats(request)
    if as_json:
        _print_json(stats_dict(response))
    else:
        _console().print(stats_view(response, time.time()))


# -- operating -----------------------------------------------------------------------------------


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
    from sagactl.render import STATUS_STYLE, saga_dict, saga_list, status_name

    filtered = bool(statuses or saga_type or order or since or older_than or every)
    if saga_ref and filtered:
        _usage("give a saga ID or filters (--status, --type, --order, --since, --older-than, --all), not both")
    if not saga_ref and not filtered:
        _usage("give a saga ID, or filters (--status, --type, --order, --since, --older-than) or --all for a batch")
    console = _console()
    with SagaClient(config) as client:
        if saga_ref:
            target = client.resolve(saga_ref)
            saga = client.operate(operation, target.saga_id, reason)
            if as_json:
                _print_json(saga_dict(saga, history=False))
            else:
                status = status_name(saga.status)
                line = Text(f"{operation}: saga {saga.saga_id} (order {saga.business_key}) is now ")
                line.append(status, style=STATUS_STYLE.get(status, ""))
                console.print(line)
                if saga.steps_maybe_applied:
                    # Terminate compensates nothing: name what may still stand in the services.
                    standing = ", ".join(saga.steps_maybe_applied)
                    console.print(Text(f"effects that may still stand (not compensated): {standing}", style="magenta"))
            return
        request = _filter_request(
            _parse_statuses(statuses) or APPLIES_TO[operation], saga_type, order, since, older_than
        )
        request.page_size = 500
        matched = list(client.list_all(request))
        if not matched:
            if as_json:
                _print_json({"operation": operation, "matched": 0, "succeeded": 0, "failed": 0, "results": []})
            else:
                console.print("no sagas match", style="dim")
            return
        if not yes:
            err = _console(stderr=True)
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
                results.append({"saga_id": saga.saga_id, "ok": False, "error": error.message})
                if not as_json:
                    console.print(Text(f"✗ {saga.saga_id} {error.message}", style="red"), soft_wrap=True)
                continue
            results.append({"saga_id": saga.saga_id, "ok": True, "status": status_name(after.status)})
            if not as_json:
                console.print(f"✓ {saga.saga_id} → {status_name(after.status)}")
    failed = sum(1 for r in results if not r["ok"])
    if as_json:
        _print_json(
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


SagaRef_ = Annotated[
    str | None,
    typer.Argument(
        metavar="ID", help="saga id or order id; leave out and give filters for a batch", show_default=False
    ),
]
All_ = Annotated[
    bool, typer.Option("--all", help="a batch of every saga the operation applies to", rich_help_panel=FILTERS)
]
Yes_ = Annotated[bool, typer.Option("--yes", "-y", help="do not ask before a batch")]
Reason_ = Annotated[str, typer.Option(help="why, recorded in the saga's history (terminate requires it)")]


def _operation_epilog(operation: str, reason: str = "") -> str:
    # The status's own name, not sagactl.render's: building the help must not import the server stack.
    applies = ", ".join(pb.SagaStatus.Name(s).removeprefix("SAGA_STATUS_").lower() for s in APPLIES_TO[operation])
    return (
        f"A batch (filters instead of an ID) lists the matching sagas, asks for confirmation (--yes skips it) "
        f"and runs the call on each; without --status it picks the sagas the call applies to ({applies}). "
        f"Exits 0 when every call went through, 1 when a batch had refusals (or was declined), 4 when the "
        f"call on one ID was refused.\n\n"
        f"[bold]Examples[/]\n\n"
        f"  saga {operation} 3f2a9c0e...{reason}\n\n"
        f"  saga {operation} --type OrderSaga --since 1h{reason}\n\n"
        f"  saga {operation} --all --yes --json{reason}"
    )


def _operation_command(
    operation: str, summary: str, *, reason_example: str = "", reason_required: bool = False
) -> None:
    """Register `saga <operation>`: one saga by ID, or a filtered batch; a reason where the call takes one."""
    if reason_example:

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
            address: Address_ = DEFAULT_ADDRESS,
            token: Token_ = "",
            ca_file: CaFile_ = "",
            timeout: Timeout_ = 10.0,
        ) -> None:
            if reason_required and not reason.strip():
                _usage(f"{operation} needs --reason: it is recorded in the saga's history")
            config = ClientConfig(address, token, ca_file, timeout)
            _operate(
                operation, saga_ref, reason, status, saga_type, order, since, older_than, every, yes, as_json, config
            )

    else:

        def command(  # type: ignore[misc]
            saga_ref: SagaRef_ = None,
            status: Statuses_ = None,
            saga_type: Type_ = "",
            order: Order_ = "",
            since: Since_ = "",
            older_than: OlderThan_ = "",
            every: All_ = False,
            yes: Yes_ = False,
            as_json: Json_ = False,
            address: Address_ = DEFAULT_ADDRESS,
            token: Token_ = "",
            ca_file: CaFile_ = "",
            timeout: Timeout_ = 10.0,
        ) -> None:
            config = ClientConfig(address, token, ca_file, timeout)
            _operate(operation, saga_ref, "", status, saga_type, order, since, older_than, every, yes, as_json, config)

    command.__doc__ = summary
    app.command(operation, epilog=_operation_epilog(operation, reason_example))(_reports_errors(command))


_operation_command("retry", "Run a saga that needs attention again from the step that failed.")
_operation_command(
    "pause",
    "Hold a running (or compensating) saga after its current call, until it is resumed.",
    reason_example=" --reason 'payment provider incident'",
)
_operation_command("resume", "Let a paused saga go on.")
_operation_command(
    "cancel",
    "Compensate a running saga now (only before its pivot step, the shipment, has succeeded).",
    reason_example=" --reason 'customer changed their mind'",
)
_operation_command(
    "terminate",
    "Stop a saga where it stands, without compensating; the reason is recorded.",
    reason_example=" --reason 'fixed by hand'",
    reason_required=True,
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
