"""Terminal rendering of sagas: a header, a step timeline table and a proportional bar view."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["STATUS_STYLE", "saga_bars", "saga_header", "saga_timeline", "status_name"]

STATUS_STYLE = {
    "COMPLETED": "bold green",
    "COMPENSATED": "bold yellow",
    "NEEDS_ATTENTION": "bold red",
    "TERMINATED": "bold magenta",
    "RUNNING": "bold cyan",
    "COMPENSATING": "bold yellow",
    "PAUSED": "bold blue",
}


def status_name(status: int) -> str:
    return pb.SagaStatus.Name(status).removeprefix("SAGA_STATUS_")  # type: ignore[arg-type]


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def _attempts(saga: pb.Saga) -> list[tuple[pb.SagaStep, pb.StepAttempt]]:
    rows = [(step, attempt) for step in saga.steps for attempt in step.attempts]
    return sorted(rows, key=lambda row: _seconds(row[1].started_at))


def saga_header(saga: pb.Saga) -> Text:
    status = status_name(saga.status)
    ended = saga.HasField("ended_at")
    took = (_seconds(saga.ended_at) - _seconds(saga.created_at)) * 1000 if ended else None
    header = Text()
    header.append(f"{saga.saga_type} v{saga.definition_version}  ", style="bold")
    header.append(f"order {saga.business_key}  saga {saga.saga_id}  ")
    header.append(status, style=STATUS_STYLE.get(status, "bold"))
    if took is not None:
        header.append(f"  in {took:.1f} ms")
    if saga.last_error:
        header.append(f"\n  last error: {saga.last_error}", style="dim")
    if saga.trace_id:
        header.append(f"\n  trace {saga.trace_id}", style="dim")
    return header


def saga_timeline(saga: pb.Saga) -> Table:
    """One row per call: step, direction, attempt, start offset, duration, code and message."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("step", "direction", "try", "at ms", "took ms", "code", "message"):
        table.add_column(column, justify="right" if column in ("try", "at ms", "took ms") else "left")
    origin = _seconds(saga.created_at)
    for step, attempt in _attempts(saga):
        started = _seconds(attempt.started_at)
        took = (_seconds(attempt.ended_at) - started) * 1000
        code_style = "green" if attempt.code == "OK" else "red"
        table.add_row(
            step.name,
            attempt.direction,
            str(attempt.attempt),
            f"{(started - origin) * 1000:.1f}",
            f"{took:.1f}",
            Text(attempt.code, style=code_style),
            attempt.message[:80],
        )
    for step in saga.steps:
        if step.state in ("running", "compensating"):
            table.add_row(step.name, step.state, "", "", "", Text("in flight", style="cyan"), "")
    return table


def saga_bars(saga: pb.Saga, width: int = 50) -> RenderableType:
    """Each call as a bar placed on the saga's time axis, so a slow step or a retry storm stands out."""
    attempts = _attempts(saga)
    if not attempts:
        return Text("(no calls yet)", style="dim")
    origin = _seconds(saga.created_at)
    end = max(_seconds(a.ended_at) for _, a in attempts)
    if saga.HasField("ended_at"):
        end = max(end, _seconds(saga.ended_at))
    span = max(end - origin, 1e-6)
    lines = []
    for step, attempt in attempts:
        start = int((_seconds(attempt.started_at) - origin) / span * width)
        length = max(1, round((_seconds(attempt.ended_at) - _seconds(attempt.started_at)) / span * width))
        label = f"{step.name[:18]:<18} {'↺' if attempt.direction == 'compensation' else '→'}{attempt.attempt:<2}"
        bar = Text(label + " ")
        bar.append(" " * start)
        style = "green" if attempt.code == "OK" else "red"
        if attempt.direction == "compensation":
            style = "yellow" if attempt.code == "OK" else "red"
        bar.append("█" * min(length, width - start + 1), style=style)
        bar.append(f" {(_seconds(attempt.ended_at) - _seconds(attempt.started_at)) * 1000:.1f} ms", style="dim")
        lines.append(bar)
    lines.append(Text(f"{'':<22} 0{'':<{width - 2}}{span * 1000:.0f} ms", style="dim"))
    return Group(*lines)
