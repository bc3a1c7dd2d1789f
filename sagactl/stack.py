"""`saga up` and `saga demo`: run the local stack (devstack) in the foreground, or place the demo orders on it."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sagactl.common import fail, new_console
from sagactl.settings import DEFAULT_ADDRESS, ENV_ADDRESS, ENV_TOKEN, EXIT_FAILED, ClientConfig

if TYPE_CHECKING:
    import grpc
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from devstack.launcher import Supervisor
    from devstack.stack import LocalStack
    from sagactl.client import SagaClient

__all__ = ["commands"]

commands = typer.Typer()

# In --data-dir: the operator token kept between runs, and the lock a running `saga up` holds.
TOKEN_FILE = "operator.token"
LOCK_FILE = "saga-up.lock"
_TOKEN_RULE = "at least 16 characters of A-Z a-z 0-9 - . _ ~ + / ="
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@commands.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="where the stack keeps its SQLite files and logs (wiped)")] = Path(
        "var/demo"
    ),
) -> None:
    """Start the local stack with OrderSaga v2, place demo orders (success, decline, transient failure, out
    of stock, and two that wait for a fraud review: one approved with saga approve, one rejected with saga
    reject), print each saga's outcome, steps and timeline and the order's child saga, then stop everything.

    Exits 0 when every saga ended as the demo expects, 1 otherwise.

    Example: saga demo --data-dir /tmp/saga-demo
    """
    from sagactl.demo import run_demo
    from sagactl.render import status_name

    ended = run_demo(data_dir)
    if any(status_name(saga.status) != order.outcome for order, saga in ended):
        raise typer.Exit(EXIT_FAILED)


class _StopSignals:
    """Ctrl-C, SIGTERM and SIGHUP as a KeyboardInterrupt, held back while a process is being relaunched."""

    def __init__(self) -> None:
        self._holding = False
        self._pending = False

    def handle(self, signum: int, frame: object) -> None:
        if self._holding:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def held(self) -> Iterator[None]:
        """Within the block a stop waits, so no child is left launched but unknown; it comes at the block's end."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._pending:
                self._pending = False
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


def _is_token(token: str) -> bool:
    return len(token) >= 16 and re.fullmatch(r"[A-Za-z0-9._~+/=-]+", token) is not None


def _lock_data_dir(data_dir: Path) -> int:
    """Hold DATA_DIR/saga-up.lock for as long as this process lives (the descriptor it returns stays open).

    Another `saga up` holding it ends the command at once, before anything in the folder is touched.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        fail(f"cannot use --data-dir {data_dir}: {error.strerror or error}", EXIT_FAILED)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 32).decode(errors="replace").strip()
        os.close(descriptor)
        who = f"pid {holder}" if holder.isdigit() else "another process"
        fail(
            f"{data_dir} is in use by another saga up ({who}): stop that one first, or choose another --data-dir",
            EXIT_FAILED,
        )
    # The holder's pid, for the message of the next one refused.
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def _wipe(data_dir: Path) -> None:
    """--fresh: every file of the stack goes, but the lock this run holds and the operator token."""
    for entry in data_dir.iterdir():
        if entry.name in (LOCK_FILE, TOKEN_FILE):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _kept_token(data_dir: Path) -> tuple[str, bool]:
    """The token kept in DATA_DIR/operator.token (made, mode 0600, on the first run) and whether it is new."""
    path = data_dir / TOKEN_FILE
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = None
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror or error}", EXIT_FAILED)
    if kept is not None:
        if not _is_token(kept):
            fail(f"{path} does not hold a token ({_TOKEN_RULE}): fix it, or delete it for a new one", EXIT_FAILED)
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # it grants operator calls: for its owner's eyes only
        return kept, False
    token = secrets.token_urlsafe(24)
    # Under the data folder's lock: nothing else writes it meanwhile.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(token + "\n")
    return token, True


@dataclass(frozen=True)
class _Tokens:
    """What the orchestrator is given for operator calls, the token `saga up` itself sends, and a line saying so."""

    orchestrator_env: dict[str, str]
    token: str
    note: str


def _chosen_token(given: str) -> tuple[str, str]:
    """The token --token or else SAGA_TOKEN names (empty when neither does) and which one it was; a usage error
    for one that is not a token."""
    token, source = (given, "--token") if given else (os.environ.get(ENV_TOKEN, ""), ENV_TOKEN)
    if token and not _is_token(token):
        raise typer.BadParameter(f"must be {_TOKEN_RULE}", param_hint=source)
    return token, source


def _operator_tokens(token: str, source: str, data_dir: Path) -> _Tokens:
    """The operator token: the one chosen (--token, SAGA_TOKEN), else the one kept in the data folder.

    Token settings already in the environment (OPERATOR_TOKENS, OPERATOR_TOKENS_FILE) are the user's and are
    left alone.
    """
    for variable in ("OPERATOR_TOKENS", "OPERATOR_TOKENS_FILE"):
        if os.environ.get(variable):
            return _Tokens({}, token, f"operator tokens: {variable} from the environment")
    user = os.environ.get("USER", "")
    name = user if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", user) else "operator"
    if token:
        note = f"operator token: from {source} (operator name {name})"
    else:
        token, new = _kept_token(data_dir)
        kept = "new, kept in" if new else "kept in"
        note = f"operator token ({kept} {data_dir / TOKEN_FILE}): export {ENV_TOKEN}={token}"
    return _Tokens({"OPERATOR_TOKENS": f"{name}:{token}"}, token, note)


def _order_hint(address: str) -> str:
    """How to place an order on this stack from another terminal."""
    if address == (os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS):
        return "try `saga order`"
    return f"try `saga order --address {address}` (or export {ENV_ADDRESS}={address})"


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


class _StackMonitor:
    """Watches the stack for the panel: restarts what crashed (a Supervisor), polls health and saga counts."""

    def __init__(self, stack: LocalStack, token: str, database: str) -> None:
        from devstack.launcher import RestartBackoff, Supervisor

        self.stack = stack
        self.token = token
        self.database = database
        self.supervisor: Supervisor = Supervisor(stack.processes(), RestartBackoff())
        self.channels: dict[str, grpc.Channel] = {}
        for name in self.supervisor.watched:
            self._reconnect(name)
        self.client = self._new_client()
        self.health: dict[str, str] = {}
        self.counts: dict[str, int] | None = None
        # Processes that crashed at least once while the stack ran: `saga up` then exits 1.
        self.died: set[str] = set()

    def _new_client(self) -> SagaClient:
        from sagactl.client import SagaClient

        return SagaClient(ClientConfig(address=self.stack.address, token=self.token))

    def _reconnect(self, name: str) -> None:
        # A fresh channel to a process that came back: the old one may be deep in its reconnect backoff.
        from sagactl.client import open_channel

        if name in self.channels:
            self.channels[name].close()
        self.channels[name] = open_channel(self.supervisor.watched[name].process.address)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.client.close()

    def supervise(self) -> list[str]:
        """Restart what is due; a line for each exit, relaunch and return."""
        from devstack.launcher import EventKind

        lines = []
        for event in self.supervisor.check():
            lines.append(event.text)
            if event.kind is EventKind.EXITED:
                self.died.add(event.name)
                self.health.pop(event.name, None)
            elif event.kind is EventKind.BACK:
                self._reconnect(event.name)
                if event.name == "orchestrator":
                    self.client.close()
                    self.client = self._new_client()
        return lines

    def poll(self) -> list[str]:
        """Look again at each running process's health and at the saga counts; a line per change of health."""
        from devstack.launcher import Phase
        from sagactl.client import ClientError, health_of
        from sagactl.render import status_name
        from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

        changes = []
        for name, watch in self.supervisor.watched.items():
            if watch.phase is not Phase.UP or not watch.process.is_running():
                continue  # the supervisor reports it
            state = health_of(self.channels[name])
            if self.health.get(name) not in (None, state):
                changes.append(f"{name}: {self.health[name]} → {state} (log: {watch.process.log_path})")
            self.health[name] = state
        try:
            stats = self.client.stats(pb.GetSagaStatsRequest())
            self.counts = {status_name(c.status): c.count for c in stats.counts}
        except ClientError:
            self.counts = None
        return changes

    def state(self, name: str) -> tuple[str, str]:
        """A process's state for the panel, and its style."""
        from devstack.launcher import Phase, exit_text

        watch = self.supervisor.watched[name]
        if watch.phase is Phase.WAITING:
            code = watch.last_exit
            # As `EXITED (-9 SIGKILL)`: the return code people search for, and what it means.
            exited = f"EXITED ({code} {exit_text(code)})" if code is not None and code < 0 else f"EXITED ({code})"
            return f"{exited} · restarting in {_seconds(self.supervisor.restart_in(name))}", "red"
        if watch.phase is Phase.STARTING:
            return "STARTING", "yellow"
        state = self.health.get(name, "?")
        return state, "green" if state == "SERVING" else "red"

    def metrics_addresses(self) -> dict[str, str]:
        """Each process's Prometheus endpoint, for those that serve one."""
        return {
            name: f"http://127.0.0.1:{watch.process.metrics_port}/metrics"
            for name, watch in self.supervisor.watched.items()
            if watch.process.metrics_port is not None
        }

    def panel(self, width: int = 200) -> Panel:
        """The status panel for a terminal this wide: the log column goes first when the rows would not fit
        (the panel then names the logs' folder), so that no address or port is ever cut."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        from sagactl.render import IN_FLIGHT, STATUS_STYLE

        table = self._table(with_logs=True)
        logs_apart = _rendered_width(table) + _PANEL_FRAME > width
        if logs_apart:
            table = self._table(with_logs=False)
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
        folders = sorted({str(watch.process.log_path.parent) for watch in self.supervisor.watched.values()})
        logs = f" · logs in {', '.join(folders)}" if logs_apart else ""
        where = Text(f"data {self.stack.config.data_dir}{logs} · orchestrator database {self.database}", style="dim")
        return Panel(
            Group(table, Text(""), sagas, where),
            title="sagasuite local stack",
            subtitle=f"{ENV_ADDRESS}={self.stack.address} · Ctrl-C stops everything",
            expand=False,
        )

    def _table(self, *, with_logs: bool) -> Table:
        """One row per process: address, pid, health, restarts, the metrics port with --metrics, the log file."""
        from rich.table import Table
        from rich.text import Text

        from devstack.launcher import Phase

        metrics = self.metrics_addresses()
        columns = ("process", "address", "pid", "health", "restarts", *(["metrics"] if metrics else []))
        table = Table(show_edge=False, pad_edge=False, header_style="bold", box=None)
        for column in (*columns, *(["log"] if with_logs else [])):
            table.add_column(column, justify="right" if column == "restarts" else "left", no_wrap=column != "log")
        for name, watch in self.supervisor.watched.items():
            process = watch.process
            state, style = self.state(name)
            row: list[str | Text] = [
                name,
                f"127.0.0.1:{process.port}",
                str(process.pid) if watch.phase is not Phase.WAITING else "-",
                Text(state, style=style),
                Text(str(watch.restarts), style="yellow" if watch.restarts else "dim"),
            ]
            if metrics:
                row.append(f":{process.metrics_port}" if process.metrics_port is not None else "-")
            if with_logs:
                row.append(Text(str(process.log_path), style="dim"))
            table.add_row(*row)
        return table


# A panel's borders and padding, around its content.
_PANEL_FRAME = 4


def _rendered_width(renderable: Table) -> int:
    """How many columns the table takes when nothing limits it."""
    import io

    from rich.console import Console

    probe = Console(width=1000, file=io.StringIO(), color_system=None)
    with probe.capture() as captured:
        probe.print(renderable)
    return max((len(line.rstrip()) for line in captured.get().splitlines()), default=0)


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


def _run_until_stopped(monitor: _StackMonitor, refresh: float, console: Console, stops: _StopSignals) -> None:
    """Supervise and refresh until Ctrl-C (a KeyboardInterrupt): the panel live on a terminal, else change lines."""
    live = None
    if console.is_terminal:
        from rich.live import Live

        live = Live(monitor.panel(console.width), console=console, refresh_per_second=4)
        live.start()
    try:
        next_poll = time.monotonic() + refresh
        while True:
            with stops.held():
                lines = monitor.supervise()
            if time.monotonic() >= next_poll:
                lines += monitor.poll()
                next_poll = time.monotonic() + refresh
            for line in lines:
                (live.console if live else console).print(line, soft_wrap=True)
            if live is not None:
                live.update(monitor.panel(live.console.width))
            due = monitor.supervisor.seconds_to_next()
            pause = next_poll - time.monotonic() if due is None else min(due, next_poll - time.monotonic())
            time.sleep(max(0.02, pause))
    finally:
        if live is not None:
            live.stop()


@commands.command(
    epilog="[bold]Examples[/]\n\n"
    "  saga up\n\n"
    "  saga up --db postgresql://postgres@127.0.0.1:5432/sagas\n\n"
    "  saga up --fresh --faults payment=Charge:error_rate=0.3\n\n"
    "  saga up --port 60050 --service-port-base 0 --metrics"
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
    fresh: Annotated[bool, typer.Option("--fresh", help="wipe --data-dir first (the operator token stays)")] = False,
    faults: Annotated[
        list[str] | None,
        typer.Option(help="fault injection, SERVICE=Method:field=value,...; repeatable", show_default=False),
    ] = None,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="every process serves Prometheus metrics on a free port, printed")
    ] = False,
    refresh: Annotated[float, typer.Option(min=0.1, help="seconds between status refreshes")] = 1.0,
    token: Annotated[
        str,
        typer.Option(
            "--token",
            show_default=False,
            help=f"operator token the orchestrator accepts (at least 16 characters); default: {ENV_TOKEN}, "
            f"else the one kept in DATA_DIR/{TOKEN_FILE}",
        ),
    ] = "",
) -> None:
    """Run the local stack in the foreground: the four services and the orchestrator on loopback, with a
    live status panel (each process, its port, health, sagas in flight). Ctrl-C stops everything.

    Services keep SQLite files in --data-dir, kept between runs (so sagas in flight resume); the orchestrator
    too unless --db names a PostgreSQL database. One saga up at a time uses a data folder: a second one is
    refused at once, naming the first one's pid.

    A process that exits while the stack runs (a crash, a kill -9) is started again on its own port, after
    0.5 s, then 1, 2, 4 ... up to 30 s while it keeps failing; the panel shows its restarts.

    Operator calls (retry, pause, resume, cancel, terminate) need a token: the orchestrator accepts --token,
    else SAGA_TOKEN, else the one kept in DATA_DIR/operator.token (made on the first run, mode 0600, the
    same on every run after), unless OPERATOR_TOKENS or OPERATOR_TOKENS_FILE is set in the environment.

    Exits 0 after a clean stop, 1 when a process failed to start, crashed while running (even when it came
    back) or the data folder is in use, 2 on a usage error.
    """
    from devstack.stack import SERVICES, LocalStack, StackConfig

    console = new_console()
    database_url = _database_url(db)
    names = list(SERVICES)
    service_env = _service_faults(faults, names)
    chosen_token, token_source = _chosen_token(token)
    # Before anything in the folder is touched: a second `saga up` on it stops here.
    lock = _lock_data_dir(data_dir)
    try:
        if fresh:
            _wipe(data_dir)
        ports = {name: service_port_base + offset for offset, name in enumerate(names)} if service_port_base else {}
        tokens = _operator_tokens(chosen_token, token_source, data_dir)
        config = StackConfig(
            data_dir,
            orchestrator_port=port,
            orchestrator_database_url=database_url,
            service_env=service_env,
            orchestrator_env=tokens.orchestrator_env,
            common_env={"METRICS_PORT": "0"} if metrics else {},
            service_ports=ports,
        )
        stack = LocalStack(config)
        database = _safe_url(database_url) if database_url else f"SQLite in {data_dir / 'orchestrator'}"
        _run_stack(stack, tokens, database, refresh, console)
    finally:
        os.close(lock)


def _run_stack(stack: LocalStack, tokens: _Tokens, database: str, refresh: float, console: Console) -> None:
    """Start the stack, show it and keep it up until a stop signal, then stop every process."""
    from devstack.launcher import ProcessFailed

    # Ctrl-C, SIGTERM and a closed terminal (SIGHUP) all stop the stack, even when SIGINT was ignored
    # at start (a background job): the children run in sessions of their own and would outlive us.
    stops = _StopSignals()
    previous_handlers = {signum: signal.signal(signum, stops.handle) for signum in _STOP_SIGNALS}
    healthy = True
    monitor: _StackMonitor | None = None
    console.print(f"starting the local stack in {stack.config.data_dir} ...")
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
        monitor = _StackMonitor(stack, tokens.token, database)
        monitor.poll()
        if not console.is_terminal:
            # Without a terminal there is no live panel: show it once, then report changes line by line.
            console.print(monitor.panel(console.width))
        if tokens.note:
            console.print(tokens.note, soft_wrap=True)
        for name, url in monitor.metrics_addresses().items():
            console.print(f"metrics: {name} {url}", soft_wrap=True)
        console.print(f"ready: orchestrator at {stack.address}; {_order_hint(stack.address)} · Ctrl-C stops everything")
        _run_until_stopped(monitor, refresh, console, stops)
    except KeyboardInterrupt:
        pass
    finally:
        if monitor is not None:
            healthy = not monitor.died
            monitor.close()
        console.print("stopping ...")
        _stop_stack(stack)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    console.print("stopped")
    if not healthy:
        raise typer.Exit(EXIT_FAILED)
