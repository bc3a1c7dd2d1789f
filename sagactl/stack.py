"""`saga up` and `saga demo`: run the local stack (devstack) in the foreground, or place the demo orders on it."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sagactl.common import new_console
from sagactl.settings import ENV_ADDRESS, ENV_TOKEN, EXIT_FAILED, ClientConfig

if TYPE_CHECKING:
    import grpc
    from rich.panel import Panel

    from devstack.stack import LocalStack
    from sagactl.client import SagaClient

__all__ = ["commands"]

commands = typer.Typer()


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
        from sagactl.client import open_channel

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
        from sagactl.client import ClientError, health_of
        from sagactl.render import status_name
        from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

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
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

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


@commands.command(
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
    from sagactl.client import SagaClient

    console = new_console()
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
            from rich.live import Live

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
