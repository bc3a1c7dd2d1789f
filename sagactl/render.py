"""Sagas for the terminal (a header, step and timeline tables, proportional bars) and as JSON values."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Iterator

    from google.protobuf.timestamp_pb2 import Timestamp
    from rich.console import Console, ConsoleOptions, RenderableType
    from rich.table import Table
    from rich.text import Text

# rich is imported inside the functions that draw, so the JSON forms (saga --json) run without it.

__all__ = [
    "CHILD_MARK",
    "IN_FLIGHT",
    "STATUS_STYLE",
    "age",
    "attempt_dict",
    "definition_dict",
    "definition_list",
    "definition_nodes",
    "definition_summary",
    "event_dict",
    "event_line",
    "json_text",
    "list_dict",
    "saga_bars",
    "saga_children",
    "saga_dict",
    "saga_header",
    "saga_history",
    "saga_input",
    "saga_list",
    "saga_results",
    "saga_steps",
    "saga_timeline",
    "saga_waits",
    "stats_dict",
    "stats_view",
    "status_name",
    "step_kind",
    "took_seconds",
    "wait_dict",
]

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
    return pb.SagaStatus.Name(status).removeprefix("SAGA_STATUS_")


def _seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


class _Fitting:
    """A table where the console is wide enough for it, else the narrow form of the same content."""

    def __init__(self, wide: Table, narrow: RenderableType) -> None:
        self.wide = wide
        self.narrow = narrow

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        from rich.measure import Measurement

        # Measurement.get clamps to the width it is given: measure against more room than there is.
        wanted = Measurement.get(console, options.update_width(10 * options.max_width), self.wide).maximum
        yield self.wide if wanted <= options.max_width else self.narrow


def _attempts(saga: pb.Saga) -> list[tuple[pb.SagaStep, pb.StepAttempt]]:
    rows = [(step, attempt) for step in saga.steps for attempt in step.attempts]
    return sorted(rows, key=lambda row: _seconds(row[1].started_at))


def saga_header(saga: pb.Saga) -> Text:
    from rich.text import Text

    status = status_name(saga.status)
    ended = saga.HasField("ended_at")
    took = (_seconds(saga.ended_at) - _seconds(saga.created_at)) * 1000 if ended else None
    header = Text()
    header.append(f"{saga.saga_type} v{saga.definition_version}  ", style="bold")
    header.append(f"order {saga.business_key}  ")
    header.append(status, style=STATUS_STYLE.get(status, "bold"))
    if took is not None:
        header.append(f"  in {took:.1f} ms")
    # On a line of its own, so the first fits 80 columns and the id is never broken.
    header.append(f"\n  saga {saga.saga_id}")
    if saga.parent_saga_id:
        header.append(f"\n  child of saga {saga.parent_saga_id}")
    if saga.last_error:
        header.append(f"\n  last error: {saga.last_error}", style="dim")
    if saga.steps_maybe_applied:
        # Terminate compensates nothing: say what may still stand in the services.
        header.append(
            f"\n  effects that may still stand (not compensated): {', '.join(saga.steps_maybe_applied)}",
            style="bold magenta",
        )
    if saga.trace_id:
        header.append(f"\n  trace {saga.trace_id}", style="dim")
    return header


def _timeline_table(saga: pb.Saga, *, messages: bool) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("step", "direction", "try", "at ms", "took ms", "code", *(("message",) if messages else ())):
        right = column in ("try", "at ms", "took ms")
        table.add_column(column, justify="right" if right else "left", no_wrap=column != "message")
    origin = _seconds(saga.created_at)
    for step, attempt in _attempts(saga):
        started = _seconds(attempt.started_at)
        took = (_seconds(attempt.ended_at) - started) * 1000
        code_style = "green" if attempt.code == "OK" else "red"
        row: list[RenderableType] = [
            step.name,
            attempt.direction,
            str(attempt.attempt),
            f"{(started - origin) * 1000:.1f}",
            f"{took:.1f}",
            Text(attempt.code, style=code_style),
        ]
        table.add_row(*row, *((attempt.message[:80],) if messages else ()))
    for step in saga.steps:
        if step.state in ("running", "compensating"):
            table.add_row(step.name, step.state, "", "", "", Text("in flight", style="cyan"))
    return table


def _timeline_messages(saga: pb.Saga) -> Text:
    from rich.text import Text

    with_message = [(step, attempt) for step, attempt in _attempts(saga) if attempt.message]
    lines = [f"{step.name} {attempt.direction} {attempt.attempt}: {attempt.message}" for step, attempt in with_message]
    return Text("\n".join(lines), style="dim")


def saga_timeline(saga: pb.Saga) -> RenderableType:
    """One row per call: step, direction, attempt, start offset, duration, code and message (the
    messages under the table where it does not fit)."""
    from rich.console import Group

    narrow = Group(_timeline_table(saga, messages=False), _timeline_messages(saga))
    return _Fitting(_timeline_table(saga, messages=True), narrow)


def saga_bars(saga: pb.Saga, width: int = 50) -> RenderableType:
    """Each call as a bar placed on the saga's time axis, so a slow step or a retry storm stands out."""
    from rich.console import Group
    from rich.text import Text

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


# -- steps, lists, events and stats -------------------------------------------------------------

STATE_MARK = {
    "succeeded": ("✓", "green"),
    "failed": ("✗", "red"),
    "compensated": ("↺", "yellow"),
    "compensating": ("↺", "cyan"),
    "running": ("…", "cyan"),
    "waiting": ("⧗", "cyan"),
    "pending": ("·", "dim"),
    "skipped": ("-", "dim"),
}


def age(seconds: float) -> str:
    """A short human duration: 850ms, 12s, 5m 3s, 2h 10m, 3d 4h."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    whole = int(seconds)
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            rest = (whole % size) // small_size
            return f"{whole // size}{unit} {rest}{small}" if rest else f"{whole // size}{unit}"
    return f"{whole}s"


def took_seconds(saga: pb.Saga, now: float) -> float:
    """How long the saga ran (until now while it is in flight)."""
    end = _seconds(saga.ended_at) if saga.HasField("ended_at") else now
    return max(0.0, end - _seconds(saga.created_at))


def _steps_table(saga: pb.Saga, *, errors: bool) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("", "step", "kind", "state", "tries", "undo", "total ms", *(("last error",) if errors else ())):
        right = column in ("tries", "undo", "total ms")
        table.add_column(column, justify="right" if right else "left", no_wrap=column != "last error")
    for step in saga.steps:
        mark, style = STATE_MARK.get(step.state, ("?", ""))
        tries = sum(1 for a in step.attempts if a.direction == "action")
        undo = sum(1 for a in step.attempts if a.direction == "compensation")
        spent = sum(_seconds(a.ended_at) - _seconds(a.started_at) for a in step.attempts) * 1000
        retry_style = "bold red" if tries > 1 or undo > 1 else ""
        row: list[RenderableType] = [
            Text(mark, style=style),
            # A branch's steps sit under their parallel group.
            f"  {step.name}" if step.group else step.name,
            Text(step_kind(step), style="dim"),
            Text(step.state, style=style),
            Text(str(tries) if tries else "", style=retry_style),
            Text(str(undo) if undo else "", style=retry_style),
            f"{spent:.1f}" if step.attempts else "",
        ]
        table.add_row(*row, *((Text(step.last_error[:80], style="dim"),) if errors else ()))
    return table


def _step_errors(saga: pb.Saga) -> Text:
    from rich.text import Text

    return Text("\n".join(f"{step.name}: {step.last_error}" for step in saga.steps if step.last_error), style="dim")


def saga_steps(saga: pb.Saga) -> RenderableType:
    """One row per step: what it is where not a plain call, its state, forward tries, compensation
    tries, time spent and last error (the errors under the table where it does not fit)."""
    from rich.console import Group

    return _Fitting(_steps_table(saga, errors=True), Group(_steps_table(saga, errors=False), _step_errors(saga)))


def step_kind(step: pb.SagaStep) -> str:
    """What a step is, where it is not a plain call on the main sequence: "approval", "branch 2", "timer, branch 1"."""
    kind = "" if step.kind in ("", "call") else step.kind
    branch = f"branch {step.branch}" if step.branch else ""
    return ", ".join(part for part in (kind, branch) if part)


# The command that ends a wait of each kind, for the line under its description.
_WAIT_HINTS = {
    "approval": "saga approve|reject {saga_id} --step {step}",
    "signal": "saga signal {saga_id} {signal}",
    "child": "saga show {child_saga_id}",
}


def saga_waits(saga: pb.Saga) -> Text:
    """What the saga waits for, a wait a line, each with the command that ends it (or shows it)."""
    from rich.text import Text

    lines = Text()
    for wait in saga.waits:
        if lines:
            lines.append("\n")
        lines.append(f"⧗ {wait.description}", style="cyan")
        hint = _WAIT_HINTS.get(wait.kind)
        if hint:
            command = hint.format(
                saga_id=saga.saga_id, step=wait.step, signal=wait.signal, child_saga_id=wait.child_saga_id
            )
            lines.append(f"\n   {command}", style="dim")
    return lines


def saga_children(saga: pb.Saga) -> Table:
    """The sagas this one started, oldest first: the step that started each, its id, type and status."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("step", "saga id", "type", "status"):
        table.add_column(column, no_wrap=column == "saga id")
    for child in saga.children:
        status = status_name(child.status) if child.status else ""
        table.add_row(child.step, child.saga_id, child.saga_type, Text(status, style=STATUS_STYLE.get(status, "")))
    return table


def _json_value(text: str) -> object:
    """A view's JSON text as a value, for --json output; the text itself should it not parse."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def saga_input(saga: pb.Saga) -> Text:
    """The saga's input as one line of compact JSON: print it with no_wrap and overflow="ellipsis" to cut it
    to the terminal's width."""
    from rich.text import Text

    if saga.input_truncated:
        return Text("(larger than the orchestrator shows, 64 KiB: not shown)", style="dim")
    if not saga.input_json:
        return Text("(not available: the orchestrator has not loaded this saga's definition)", style="dim")
    return Text(saga.input_json)


def saga_results(saga: pb.Saga) -> Table:
    """Each step that has a result, with its result as one line of compact JSON, cut to the terminal."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    # The names stay whole; the results give way to the terminal's width.
    table.add_column("step", no_wrap=True, min_width=max((len(step.name) for step in saga.steps), default=4))
    table.add_column("result", no_wrap=True, overflow="ellipsis", ratio=1)
    for step in saga.steps:
        if step.result_truncated:
            table.add_row(step.name, Text("(larger than 64 KiB: not shown)", style="dim"))
        elif step.result_json:
            # Text, not markup: a participant's strings may hold brackets.
            table.add_row(step.name, Text(step.result_json))
    return table


# Marks a child saga (one another saga started) in a listing.
CHILD_MARK = "↳ "


class _SagaListing:
    """The rows of a listing: a table, or two lines a saga for a terminal the table does not fit
    (80 columns), so that no saga id, which the other commands take, is ever cut."""

    def __init__(self, sagas: list[pb.Saga], now: float) -> None:
        self.sagas = sagas
        self.now = now

    def _cells(self, saga: pb.Saga) -> tuple[str, str, str, str, str, str]:
        kind = f"{CHILD_MARK if saga.parent_saga_id else ''}{saga.saga_type} v{saga.definition_version}"
        took = age(took_seconds(saga, self.now)) + ("" if saga.HasField("ended_at") else "…")
        return kind, saga.business_key, status_name(saga.status), saga.current_step, self._age(saga), took

    def _age(self, saga: pb.Saga) -> str:
        return age(max(0.0, self.now - _seconds(saga.created_at)))

    def table(self) -> Table:
        from rich.table import Table
        from rich.text import Text

        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for column in ("saga id", "type", "order", "status", "step", "age", "took"):
            right = column in ("age", "took")
            table.add_column(column, justify="right" if right else "left", no_wrap=column != "step")
        for saga in self.sagas:
            kind, order, status, step, created, took = self._cells(saga)
            table.add_row(
                saga.saga_id, kind, order, Text(status, style=STATUS_STYLE.get(status, "")), step, created, took
            )
        return table

    def stacked(self) -> Text:
        from rich.text import Text

        lines = Text()
        lines.append(f"{'saga id':<32}  {'status':<15}  {'age':>6}  {'took':>6}", style="bold")
        for saga in self.sagas:
            kind, order, status, step, created, took = self._cells(saga)
            lines.append(f"\n{saga.saga_id}  ")
            lines.append(f"{status:<15}", style=STATUS_STYLE.get(status, ""))
            lines.append(f"  {created:>6}  {took:>6}\n")
            detail = f"  {kind} · order {order}" + (f" · at {step}" if step else "")
            lines.append(detail, style="dim")
        return lines


def saga_list(sagas: list[pb.Saga], now: float) -> RenderableType:
    """A listing: one saga a row, as ListSagas returns them (newest first); a child saga's type is marked ↳."""
    listing = _SagaListing(sagas, now)
    return _Fitting(listing.table(), listing.stacked())


def event_line(event: pb.HistoryEvent, status: int | None, origin: float) -> Text:
    """One history event on one line: offset from the saga's start, type, step, attempt, code, message,
    and the status it led to when given."""
    from rich.text import Text

    line = Text()
    line.append(f"{(_seconds(event.at) - origin) * 1000:>9.1f} ms  ", style="dim")
    bad = event.code not in ("", "OK") or event.type in ("SagaNeedsAttention", "SagaTerminated", "EffectAfterTerminate")
    line.append(f"{event.type:<27}", style="red" if bad else "bold")
    line.append(f" {event.step:<18}")
    line.append(f" #{event.attempt}" if event.attempt else "   ")
    if event.code:
        line.append(f" {event.code}", style="green" if event.code == "OK" else "red")
    if event.message:
        line.append(f" {event.message[:120]}", style="dim")
    if event.actor and event.actor != "orchestrator":
        line.append(f" [{event.actor}]", style="magenta")
    if status is not None:
        name = status_name(status)
        line.append(f"  → {name}", style=STATUS_STYLE.get(name, ""))
    return line


def saga_history(saga: pb.Saga) -> Table:
    """The whole history, one event a row."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("seq", "at ms", "event", "step", "try", "code", "message", "actor"):
        table.add_column(column, justify="right" if column in ("seq", "at ms", "try") else "left")
    origin = _seconds(saga.created_at)
    for event in saga.history:
        table.add_row(
            str(event.seq),
            f"{(_seconds(event.at) - origin) * 1000:.1f}",
            event.type,
            event.step,
            str(event.attempt) if event.attempt else "",
            Text(event.code, style="green" if event.code == "OK" else "red"),
            event.message[:100],
            event.actor,
        )
    return table


IN_FLIGHT = ("RUNNING", "COMPENSATING", "PAUSED")


def stats_view(stats: pb.GetSagaStatsResponse, now: float) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    counts = {status_name(c.status): c.count for c in stats.counts}
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("status")
    table.add_column("sagas", justify="right")
    for name in ("RUNNING", "COMPENSATING", "PAUSED", "COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED"):
        if counts.get(name):
            table.add_row(Text(name, style=STATUS_STYLE.get(name, "")), str(counts[name]))
    table.add_row(Text("total", style="bold"), str(sum(counts.values())))
    latency = Text("completion latency  ", style="bold")
    if any(counts.get(name) for name in ("COMPLETED", "COMPENSATED", "TERMINATED")):
        latency.append(
            f"p50 {stats.completion_p50_ms:.1f} ms  p95 {stats.completion_p95_ms:.1f} ms  "
            f"p99 {stats.completion_p99_ms:.1f} ms"
        )
    else:
        latency.append("(no ended sagas)", style="dim")
    oldest = Text("oldest in flight    ", style="bold")
    if stats.HasField("oldest_in_flight"):
        saga = stats.oldest_in_flight
        status = status_name(saga.status)
        oldest.append(f"{saga.saga_id}  order {saga.business_key}  ")
        oldest.append(status, style=STATUS_STYLE.get(status, ""))
        oldest.append(f"  at {saga.current_step or '-'}  age {age(max(0.0, now - _seconds(saga.created_at)))}")
    else:
        oldest.append("(none)", style="dim")
    return Group(table, Text(""), latency, oldest)


# -- JSON forms ----------------------------------------------------------------------------------


def _stamp(message: object, name: str) -> str | None:
    if not message.HasField(name):  # type: ignore[attr-defined]
        return None
    return str(getattr(message, name).ToJsonString())


def attempt_dict(attempt: pb.StepAttempt) -> dict[str, object]:
    return {
        "direction": attempt.direction,
        "attempt": attempt.attempt,
        "started_at": _stamp(attempt, "started_at"),
        "ended_at": _stamp(attempt, "ended_at"),
        "duration_ms": round((_seconds(attempt.ended_at) - _seconds(attempt.started_at)) * 1000, 3),
        "code": attempt.code,
        "message": attempt.message,
    }


def event_dict(event: pb.HistoryEvent, status: int | None = None) -> dict[str, object]:
    found: dict[str, object] = {
        "seq": event.seq,
        "at": _stamp(event, "at"),
        "type": event.type,
        "step": event.step,
        "attempt": event.attempt,
        "code": event.code,
        "message": event.message,
        "actor": event.actor,
    }
    if status is not None:
        found["status"] = status_name(status)
    return found


def wait_dict(wait: pb.SagaWait) -> dict[str, object]:
    return {
        "kind": wait.kind,
        "step": wait.step,
        "branch": wait.branch,
        "signal": wait.signal,
        "since": _stamp(wait, "since"),
        "until": _stamp(wait, "until"),
        "child_saga_id": wait.child_saga_id,
        "description": wait.description,
    }


def saga_dict(saga: pb.Saga, *, history: bool = True, steps: bool = True) -> dict[str, object]:
    """The saga as plain JSON values: statuses by name, times as RFC 3339 strings (null when unset)."""
    found: dict[str, object] = {
        "saga_id": saga.saga_id,
        "saga_type": saga.saga_type,
        "definition_version": saga.definition_version,
        "business_key": saga.business_key,
        "status": status_name(saga.status),
        "created_at": _stamp(saga, "created_at"),
        "updated_at": _stamp(saga, "updated_at"),
        "ended_at": _stamp(saga, "ended_at"),
        "deadline_at": _stamp(saga, "deadline_at"),
        "duration_ms": (
            round((_seconds(saga.ended_at) - _seconds(saga.created_at)) * 1000, 3)
            if saga.HasField("ended_at")
            else None
        ),
        "current_step": saga.current_step,
        "last_error": saga.last_error,
        "trace_id": saga.trace_id,
        "steps_maybe_applied": list(saga.steps_maybe_applied),
        "parent_saga_id": saga.parent_saga_id,
        "children": [
            {
                "step": child.step,
                "saga_id": child.saga_id,
                "saga_type": child.saga_type,
                # ListSagas leaves a child's status out.
                "status": status_name(child.status) if child.status else None,
            }
            for child in saga.children
        ],
        "waits": [wait_dict(wait) for wait in saga.waits],
    }
    if steps:
        # GetSaga's input and results, as JSON values (null when the orchestrator left them out).
        found["input"] = _json_value(saga.input_json) if saga.input_json else None
        found["input_truncated"] = saga.input_truncated
        found["contract_hash"] = saga.contract_hash
        found["steps"] = [
            {
                "name": step.name,
                "index": step.index,
                "kind": step.kind,
                "group": step.group,
                "branch": step.branch,
                "child_saga_id": step.child_saga_id,
                "state": step.state,
                "last_error": step.last_error,
                "attempts": [attempt_dict(a) for a in step.attempts],
                "result": _json_value(step.result_json) if step.result_json else None,
                "result_truncated": step.result_truncated,
            }
            for step in saga.steps
        ]
    if history:
        found["history"] = [event_dict(e) for e in saga.history]
    return found


def list_dict(sagas: list[pb.Saga], next_page_token: str) -> dict[str, object]:
    """A page of sagas as `saga ls --json` prints it: each without steps or history."""
    return {"sagas": [saga_dict(s, history=False, steps=False) for s in sagas], "next_page_token": next_page_token}


def json_text(value: object) -> str:
    """How every --json command prints a value: indented, non-ASCII kept."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def stats_dict(stats: pb.GetSagaStatsResponse) -> dict[str, object]:
    counts = {status_name(c.status): c.count for c in stats.counts}
    return {
        "counts": counts,
        "total": sum(counts.values()),
        "in_flight": sum(counts.get(name, 0) for name in IN_FLIGHT),
        "completion_ms": {
            "p50": stats.completion_p50_ms,
            "p95": stats.completion_p95_ms,
            "p99": stats.completion_p99_ms,
        },
        "oldest_in_flight": (
            saga_dict(stats.oldest_in_flight, history=False) if stats.HasField("oldest_in_flight") else None
        ),
    }


# -- definitions ---------------------------------------------------------------------------------


def definition_dict(info: pb.SagaDefinitionInfo) -> dict[str, object]:
    """One loaded definition version as `saga definitions list|show --json` prints it: every field."""
    from google.protobuf import json_format

    found: dict[str, object] = json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # int64 is a string in the proto3 JSON mapping; a count reads better as a number.
    found["running"] = info.running
    return found


def _seconds_text(seconds: float) -> str:
    return age(seconds) if seconds else ""


def definition_list(definitions: list[pb.SagaDefinitionInfo]) -> Table:
    """One row per loaded version: name, version, where it came from, whether new starts get it, how many
    of its sagas have not ended, and how many steps it has."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("name", "version", "source", "latest", "running", "steps"):
        right = column in ("version", "running", "steps")
        table.add_column(column, justify="right" if right else "left", no_wrap=column != "source")
    for info in definitions:
        table.add_row(
            Text(info.name),
            str(info.version),
            Text(info.source),  # a file's path, which may hold brackets: not markup
            Text("✓ latest", style="green") if info.latest else "",
            str(info.running),
            str(len(info.nodes)),
        )
    return table


def definition_summary(info: pb.SagaDefinitionInfo) -> Text:
    """The header of `saga definitions show`: name and version, source, input, deadline, services and hashes."""
    from rich.text import Text

    header = Text()
    header.append(f"{info.name} v{info.version}", style="bold")
    if info.latest:
        header.append("  latest: new sagas start on it", style="green")
    rows = [
        ("source", info.source),
        ("input", info.input_type),
        ("deadline", age(info.deadline_seconds) if info.deadline_seconds else "the start's, or the default"),
        ("services", ", ".join(info.services) or "none"),
        ("running", f"{info.running} saga(s) not ended"),
        ("fingerprint", info.fingerprint),
        ("contract", info.contract_hash),
    ]
    for label, value in rows:
        if value:
            header.append(f"\n  {label:<12}{value}")
    return header


def _short_call(path: str) -> str:
    """service/package.Service/Method as service/Service/Method: the package is in --json."""
    service, _, method = path.partition("/")
    qualified, _, name = method.partition("/")
    return f"{service}/{qualified.rsplit('.', 1)[-1]}/{name}" if name else path


def _node_kind(node: pb.DefinitionNode) -> str:
    if node.kind == "call":
        return f"call, {node.step_kind}"
    if node.kind == "signal":
        return f"signal {node.signal}"
    if node.kind == "approval":
        return f"approval by {node.signal}"
    if node.kind == "child":
        return f"child {node.child}"
    return node.kind


def _node_timeout(node: pb.DefinitionNode) -> str:
    if node.kind == "call":
        return f"{age(node.call_timeout_seconds)} a try, {age(node.budget_seconds)} in all"
    if node.kind == "timer" and not node.timeout_seconds:
        return "until a time"
    return _seconds_text(node.timeout_seconds)


def _node_notes(node: pb.DefinitionNode) -> Text:
    from rich.text import Text

    notes = Text()
    if node.pivot:
        notes.append("◆ pivot", style="bold yellow")
    for note in (
        "conditional" if node.conditional else "",
        f"on timeout: {node.on_timeout}" if node.on_timeout else "",
    ):
        if note:
            notes.append(("  " if notes else "") + note, style="dim")
    return notes


def _nodes_table(info: pb.SagaDefinitionInfo) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("#", "node", "kind", "action", "compensation", "timeout", ""):
        table.add_column(column, justify="right" if column == "#" else "left", no_wrap=True)
    for node in info.nodes:
        # Text throughout, not markup: names and calls come from a YAML file and may hold brackets.
        table.add_row(
            str(node.index),
            Text(_node_name(node)),
            Text(_node_kind(node), style="dim"),
            Text(_short_call(node.action) if node.action else ""),
            Text(_short_call(node.compensation) if node.compensation else ""),
            Text(_node_timeout(node)),
            _node_notes(node),
        )
    return table


def _node_name(node: pb.DefinitionNode) -> str:
    # A branch's nodes sit under their parallel group.
    return f"  {node.name} (branch {node.branch})" if node.group else node.name


def _nodes_stacked(info: pb.SagaDefinitionInfo) -> Text:
    from rich.text import Text

    lines = Text()
    for node in info.nodes:
        if lines:
            lines.append("\n")
        lines.append(f"{node.index:>2} {_node_name(node)}", style="bold")
        lines.append(f"  {_node_kind(node)}  ", style="dim")
        lines.append_text(_node_notes(node))
        indent = "       " if node.group else "     "
        for label, value in (
            ("action", _short_call(node.action) if node.action else ""),
            ("compensation", _short_call(node.compensation) if node.compensation else ""),
            ("timeout", _node_timeout(node)),
        ):
            if value:
                lines.append(f"\n{indent}{label:<13} {value}")
    return lines


def definition_nodes(info: pb.SagaDefinitionInfo) -> RenderableType:
    """The nodes in flat order, a branch's under its parallel group: kind, action and compensation, timeouts,
    and the pivot (the last node that can be compensated); a few lines a node where the table does not fit."""
    return _Fitting(_nodes_table(info), _nodes_stacked(info))
