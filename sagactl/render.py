"""Sagas for the terminal (a header, step and timeline tables, proportional bars) and as JSON values."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagactl.settings import EXIT_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
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
    "SHORT_ID_LENGTH",
    "STATUS_STYLE",
    "STEP_STARTED",
    "age",
    "attempt_dict",
    "clock",
    "compact_duration",
    "definition_dict",
    "definition_list",
    "definition_nodes",
    "definition_summary",
    "error_json",
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
    "short_ids",
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
    """The first of several forms of the same content that fits the console's width, else the last.

    A form is a renderable, or a pair (what is measured, what is shown) when what is shown has parts that
    wrap to any width (notes under a table), which would never seem to fit.
    """

    def __init__(self, *forms: RenderableType | tuple[RenderableType, RenderableType]) -> None:
        self.forms = [form if isinstance(form, tuple) else (form, form) for form in forms]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        from rich.measure import Measurement

        for measured, shown in self.forms:
            # Measurement.get clamps to the width it is given: measure against more room than there is.
            wanted = Measurement.get(console, options.update_width(10 * options.max_width), measured).maximum
            if wanted <= options.max_width:
                yield shown
                return
        yield self.forms[-1][1]


class _Hanging:
    """A label and a text wrapped to the console's width, its later lines indented under the text's start,
    so that a long message reads as one block instead of running back to the first column."""

    def __init__(self, label: str, text: str, style: str = "", *, label_style: str = "", indent: int = 0) -> None:
        self.label = label
        self.text = text
        self.style = style
        self.label_style = label_style or style
        self.indent = indent

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        import textwrap

        from rich.text import Text

        # Under a label wider than a third of the line the text would be a narrow column: it hangs less.
        hang = len(self.label) if len(self.label) <= options.max_width // 3 else self.indent + 4
        lines = textwrap.wrap(
            self.label + self.text,
            max(10, options.max_width),
            subsequent_indent=" " * max(hang, self.indent),
            break_on_hyphens=False,
            drop_whitespace=True,
        ) or [self.label]
        for number, line in enumerate(lines):
            shown = Text(line, style=self.style, no_wrap=True)
            if number == 0:
                shown.stylize(self.label_style, 0, len(self.label))
            yield shown


def _attempts(saga: pb.Saga) -> list[tuple[pb.SagaStep, pb.StepAttempt]]:
    rows = [(step, attempt) for step in saga.steps for attempt in step.attempts]
    return sorted(rows, key=lambda row: _seconds(row[1].started_at))


def _held_step(saga: pb.Saga) -> str:
    """What a paused saga is held before: "charge_payment", "try 3 of charge_payment", "compensating ..."."""
    step = next((s for s in saga.steps if s.state in ("running", "compensating")), None)
    if step is None:
        return saga.current_step or "its next step"
    if step.state == "compensating":
        return f"compensating {step.name}"
    tries = sum(1 for attempt in step.attempts if attempt.direction == "action")
    return f"try {tries + 1} of {step.name}" if tries else step.name


def saga_header(saga: pb.Saga) -> RenderableType:
    """The saga's type, order, status and duration, then its id, parent, hold, last error and trace, each on a
    line of its own so the first fits 80 columns and no id is broken."""
    from rich.console import Group
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
    header.append(f"\n  saga {saga.saga_id}")
    if saga.parent_saga_id:
        header.append(f"\n  child of saga {saga.parent_saga_id}")
    lines: list[RenderableType] = [header]
    if saga.status == pb.SAGA_STATUS_PAUSED:
        lines.append(
            _Hanging("  paused: ", f"held before {_held_step(saga)}; saga resume {saga.saga_id} lets it go on", "blue")
        )
    if saga.last_error:
        lines.append(_Hanging("  last error: ", saga.last_error, "dim"))
    if saga.steps_maybe_applied:
        # Terminate compensates nothing: say what may still stand in the services.
        lines.append(
            _Hanging(
                "  effects that may still stand (not compensated): ",
                ", ".join(saga.steps_maybe_applied),
                "bold magenta",
            )
        )
    if saga.trace_id:
        lines.append(Text(f"  trace {saga.trace_id}", style="dim"))
    return Group(*lines)


def _direction_mark(attempt: pb.StepAttempt) -> str:
    return "↺" if attempt.direction == "compensation" else "→"


def _timeline_table(saga: pb.Saga, *, messages: bool, compact: bool = False) -> Table:
    """The calls as a table; compact: no box, the direction as an arrow, and names and codes folded rather
    than cut where even that is too wide."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold", box=None if compact else box.HEAVY_HEAD)
    # No column of nothing: without a message to show, the table has none.
    messages = messages and any(attempt.message for step in saga.steps for attempt in step.attempts)
    columns = (
        ("step", "try", "at ms", "took ms", "code")
        if compact
        else ("step", "direction", "try", "at ms", "took ms", "code")
    )
    for column in (*columns, *(("message",) if messages else ())):
        right = column in ("try", "at ms", "took ms")
        folds = compact and column in ("step", "code")
        table.add_column(
            column, justify="right" if right else "left", no_wrap=column != "message" and not folds, overflow="fold"
        )
    origin = _seconds(saga.created_at)
    for step, attempt in _attempts(saga):
        started = _seconds(attempt.started_at)
        took = (_seconds(attempt.ended_at) - started) * 1000
        code_style = "green" if attempt.code == "OK" else "red"
        named: list[RenderableType] = (
            [f"{_direction_mark(attempt)} {step.name}"] if compact else [step.name, attempt.direction]
        )
        row: list[RenderableType] = [
            *named,
            str(attempt.attempt),
            f"{(started - origin) * 1000:.1f}",
            f"{took:.1f}",
            Text(attempt.code, style=code_style),
        ]
        table.add_row(*row, *((Text(attempt.message),) if messages else ()))
    for step in saga.steps:
        if step.state in ("running", "compensating"):
            state = "paused" if saga.status == pb.SAGA_STATUS_PAUSED else step.state
            named = [f"{'↺' if step.state == 'compensating' else '→'} {step.name}"] if compact else [step.name, state]
            table.add_row(*named, "", "", "", Text("held" if state == "paused" else "in flight", style="cyan"))
    return table


def _timeline_messages(saga: pb.Saga) -> RenderableType:
    """The calls' messages, one a block under the table; the same message of consecutive tries once."""
    from rich.console import Group

    notes: list[tuple[str, str, list[int]]] = []
    for step, attempt in _attempts(saga):
        if not attempt.message:
            continue
        last = notes[-1] if notes else None
        if last and (last[0], last[1]) == (f"{step.name} {attempt.direction}", attempt.message):
            last[2].append(attempt.attempt)
        else:
            notes.append((f"{step.name} {attempt.direction}", attempt.message, [attempt.attempt]))
    return Group(
        *(
            _Hanging(f"{where} {', '.join(map(str, tries))}: ", message, "dim", indent=2)
            for where, message, tries in notes
        )
    )


def saga_timeline(saga: pb.Saga) -> RenderableType:
    """One row per call: step, direction, attempt, start offset, duration, code and message (the
    messages under the table, wrapped, where it does not fit)."""
    from rich.console import Group

    messages = _timeline_messages(saga)
    narrow = _timeline_table(saga, messages=False)
    compact = _timeline_table(saga, messages=False, compact=True)
    return _Fitting(
        _timeline_table(saga, messages=True), (narrow, Group(narrow, messages)), (compact, Group(compact, messages))
    )


class _Bars:
    """Each call as a bar on the saga's time axis, at most `width` columns of bars and never wider than the
    console: the step names stay whole, the bars give way."""

    def __init__(self, saga: pb.Saga, width: int) -> None:
        self.saga = saga
        self.width = width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        from rich.text import Text

        saga = self.saga
        attempts = _attempts(saga)
        if not attempts:
            yield Text("(no calls yet)", style="dim")
            return
        origin = _seconds(saga.created_at)
        end = max(_seconds(a.ended_at) for _, a in attempts)
        if saga.HasField("ended_at"):
            end = max(end, _seconds(saga.ended_at))
        span = max(end - origin, 1e-6)
        names = max(18, *(len(step.name) for step, _ in attempts))
        tries = max(2, *(len(str(attempt.attempt)) for _, attempt in attempts))
        took = [f" {(_seconds(a.ended_at) - _seconds(a.started_at)) * 1000:.1f} ms" for _, a in attempts]
        axis_end = f"{span * 1000:.0f} ms"
        # The label, a space, the bars (one column more for the last), the longest duration after them.
        room = options.max_width - (names + 2 + tries) - 1 - max(map(len, took)) - 1
        width = max(10, min(self.width, room))
        for (step, attempt), duration in zip(attempts, took, strict=True):
            start = int((_seconds(attempt.started_at) - origin) / span * width)
            length = max(1, round((_seconds(attempt.ended_at) - _seconds(attempt.started_at)) / span * width))
            bar = Text(f"{step.name:<{names}} {_direction_mark(attempt)}{attempt.attempt:<{tries}} ", no_wrap=True)
            bar.append(" " * start)
            style = "green" if attempt.code == "OK" else "red"
            if attempt.direction == "compensation":
                style = "yellow" if attempt.code == "OK" else "red"
            bar.append("█" * min(length, width - start + 1), style=style)
            bar.append(duration, style="dim")
            yield bar
        yield Text(f"{'':<{names + 2 + tries}} 0{'':<{width - 2}}{axis_end}", style="dim")


def saga_bars(saga: pb.Saga, width: int = 50) -> RenderableType:
    """Each call as a bar placed on the saga's time axis, so a slow step or a retry storm stands out; at most
    width columns of bars, fewer where the console is narrower."""
    return _Bars(saga, width)


# -- steps, lists, events and stats -------------------------------------------------------------

STATE_MARK = {
    "succeeded": ("✓", "green"),
    "failed": ("✗", "red"),
    "compensated": ("↺", "yellow"),
    "compensating": ("↺", "cyan"),
    "running": ("…", "cyan"),
    "paused": ("‖", "blue"),
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


def compact_duration(seconds: float) -> str:
    """A duration in at most five characters, for columns: 850ms, 2.1s, 42s, 3m, 5h, 12d."""
    if seconds < 0.9995:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


# The fewest characters of a saga id a listing shows; more where two ids on the page share them.
SHORT_ID_LENGTH = 8


def short_ids(saga_ids: list[str], minimum: int = SHORT_ID_LENGTH) -> list[str]:
    """Each id cut to the fewest characters (at least minimum) that no other id of the list starts with."""
    needed: dict[str, int] = {}
    ordered = sorted(set(saga_ids))
    # In sorted order an id shares its longest common start with one of its neighbours.
    for left, right in itertools.pairwise(ordered):
        shared = next((i for i, pair in enumerate(zip(left, right, strict=False)) if len(set(pair)) > 1), len(left))
        for saga_id in (left, right):
            needed[saga_id] = max(needed.get(saga_id, 0), shared + 1)
    return [saga_id[: max(minimum, needed.get(saga_id, 0))] for saga_id in saga_ids]


def _step_state(saga: pb.Saga, step: pb.SagaStep) -> str:
    """The step's state as shown: a paused saga's next step is held ("paused"), not running."""
    if saga.status == pb.SAGA_STATUS_PAUSED and step.state in ("running", "compensating"):
        return "paused"
    return step.state


def _steps_table(saga: pb.Saga, *, errors: bool, compact: bool = False) -> Table:
    """The steps as a table; compact: no box, and names folded rather than cut where even that is too wide."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold", box=None if compact else box.HEAVY_HEAD)
    for column in ("", "step", "kind", "state", "tries", "undo", "total ms", *(("last error",) if errors else ())):
        right = column in ("tries", "undo", "total ms")
        wraps = column == "last error" or (compact and column in ("step", "kind"))
        table.add_column(column, justify="right" if right else "left", no_wrap=not wraps, overflow="fold")
    for step in saga.steps:
        state = _step_state(saga, step)
        mark, style = STATE_MARK.get(state, ("?", ""))
        tries = sum(1 for a in step.attempts if a.direction == "action")
        undo = sum(1 for a in step.attempts if a.direction == "compensation")
        spent = sum(_seconds(a.ended_at) - _seconds(a.started_at) for a in step.attempts) * 1000
        retry_style = "bold red" if tries > 1 or undo > 1 else ""
        row: list[RenderableType] = [
            Text(mark, style=style),
            # A branch's steps sit under their parallel group.
            f"  {step.name}" if step.group else step.name,
            Text(step_kind(step), style="dim"),
            Text(state, style=style),
            Text(str(tries) if tries else "", style=retry_style),
            Text(str(undo) if undo else "", style=retry_style),
            f"{spent:.1f}" if step.attempts else "",
        ]
        table.add_row(*row, *((Text(step.last_error, style="dim"),) if errors else ()))
    return table


def _step_errors(saga: pb.Saga) -> RenderableType:
    """Each step's last error as a block under the table, wrapped under its own start."""
    from rich.console import Group

    return Group(
        *(_Hanging(f"{step.name}: ", step.last_error, "dim", indent=2) for step in saga.steps if step.last_error)
    )


def saga_steps(saga: pb.Saga) -> RenderableType:
    """One row per step: what it is where not a plain call, its state, forward tries, compensation
    tries, time spent and last error (the errors under the table, wrapped, where it does not fit)."""
    from rich.console import Group

    errors = _step_errors(saga)
    narrow = _steps_table(saga, errors=False)
    compact = _steps_table(saga, errors=False, compact=True)
    return _Fitting(_steps_table(saga, errors=True), (narrow, Group(narrow, errors)), (compact, Group(compact, errors)))


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


def saga_waits(saga: pb.Saga) -> RenderableType:
    """What the saga waits for, a wait a block, each with the command that ends it (or shows it)."""
    from rich.console import Group
    from rich.text import Text

    lines: list[RenderableType] = []
    for wait in saga.waits:
        lines.append(_Hanging("⧗ ", wait.description, "cyan"))
        hint = _WAIT_HINTS.get(wait.kind)
        if hint:
            command = hint.format(
                saga_id=saga.saga_id, step=wait.step, signal=wait.signal, child_saga_id=wait.child_saga_id
            )
            lines.append(Text(f"   {command}", style="dim"))
    return Group(*lines)


def _children_table(saga: pb.Saga, ids: list[str]) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("step", "saga id", "type", "status"):
        table.add_column(column, no_wrap=True, overflow="fold")
    for child, shown in zip(saga.children, ids, strict=True):
        status = status_name(child.status) if child.status else ""
        table.add_row(child.step, shown, child.saga_type, Text(status, style=STATUS_STYLE.get(status, "")))
    return table


def saga_children(saga: pb.Saga) -> RenderableType:
    """The sagas this one started, oldest first: the step that started each, its id (short where the whole
    one does not fit: any unique start of an id names the saga), type and status."""
    whole = [child.saga_id for child in saga.children]
    return _Fitting(_children_table(saga, whole), _children_table(saga, short_ids(whole)))


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


def _short_type(name: str) -> str:
    """A saga type as a listing shows it where the whole name does not fit: OrderSaga as Order."""
    return name.removesuffix("Saga") or name


@dataclass(frozen=True)
class _ListedSaga:
    """The cells of one saga in a listing."""

    short_id: str
    kind: str
    short_kind: str
    order: str
    status: str
    step: str
    age: str
    took: str


class _SagaListing:
    """A listing laid out for the console's width: short ids (any unique start of an id names the saga),
    compact ages and durations, and where the columns do not fit, the type abbreviated, then the order ids
    wrapped in their column, then left out; two lines a saga on a very narrow console. Nothing is cut."""

    # Columns are two spaces apart: no box, so that 80 columns hold the six that matter.
    _GAP = 2
    _HEADERS = {"short_id": "saga id", "kind": "type", "short_kind": "type"}
    # An order column narrower than this is left out rather than wrapped into slivers.
    _NARROWEST_ORDER = 10

    def __init__(self, sagas: list[pb.Saga], now: float) -> None:
        self.rows: list[_ListedSaga] = []
        for saga, short in zip(sagas, short_ids([saga.saga_id for saga in sagas]), strict=True):
            mark = CHILD_MARK if saga.parent_saga_id else ""
            ended = saga.HasField("ended_at")
            self.rows.append(
                _ListedSaga(
                    short_id=short,
                    kind=f"{mark}{saga.saga_type} v{saga.definition_version}",
                    short_kind=f"{mark}{_short_type(saga.saga_type)} v{saga.definition_version}",
                    order=saga.business_key,
                    status=status_name(saga.status),
                    step=saga.current_step,
                    age=compact_duration(max(0.0, now - _seconds(saga.created_at))),
                    # In flight it has taken as long as its age says: "-" rather than a figure that grows.
                    took=compact_duration(took_seconds(saga, now)) if ended else "-",
                )
            )

    def _width(self, column: str) -> int:
        from rich.cells import cell_len

        header = self._HEADERS.get(column, column)
        return max([cell_len(header), *(cell_len(getattr(row, column)) for row in self.rows)])

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        room = options.max_width
        fixed = ["short_id", "status", "step", "age", "took"]
        for kind in ("kind", "short_kind"):
            columns = [*fixed[:1], kind, "order", *fixed[1:]]
            widths = {column: self._width(column) for column in columns}
            if sum(widths.values()) + self._GAP * (len(columns) - 1) <= room:
                yield self._table(widths)
                return
        widths = {column: self._width(column) for column in ["short_id", "short_kind", *fixed[1:]]}
        left = room - sum(widths.values()) - self._GAP * len(widths)
        if left >= self._NARROWEST_ORDER:
            yield self._table({**widths, "order": left})
        elif left + self._GAP >= 0:
            yield self._table(widths)
        else:
            yield self.stacked()

    def _table(self, widths: dict[str, int]) -> Table:
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold", show_edge=False)
        order = ["short_id", "kind", "short_kind", "order", "status", "step", "age", "took"]
        shown = [column for column in order if column in widths]
        for column in shown:
            header = self._HEADERS.get(column, column)
            right = column in ("age", "took")
            table.add_column(
                header,
                justify="right" if right else "left",
                width=widths[column],
                no_wrap=column != "order",
                overflow="fold",
            )
        for row in self.rows:
            cells: list[RenderableType] = []
            for column in shown:
                value = getattr(row, column)
                cells.append(Text(value, style=STATUS_STYLE.get(value, "")) if column == "status" else Text(value))
            table.add_row(*cells)
        return table

    def stacked(self) -> RenderableType:
        """Two lines a saga: id, status, age and took, then type, order and step (wrapped under their start)."""
        from rich.console import Group
        from rich.text import Text

        ids = max([len("saga id"), *(len(row.short_id) for row in self.rows)])
        lines: list[RenderableType] = [
            Text(f"{'saga id':<{ids}}  {'status':<15}  {'age':>5}  {'took':>5}", style="bold")
        ]
        for row in self.rows:
            first = Text(f"{row.short_id:<{ids}}  ")
            first.append(f"{row.status:<15}", style=STATUS_STYLE.get(row.status, ""))
            first.append(f"  {row.age:>5}  {row.took:>5}")
            detail = f"{row.short_kind} · order {row.order}" + (f" · at {row.step}" if row.step else "")
            lines += [first, _Hanging("  ", detail, "dim")]
        return Group(*lines)


def saga_list(sagas: list[pb.Saga], now: float) -> RenderableType:
    """A listing: one saga a row, as ListSagas returns them (newest first), with short ids; a child saga's
    type is marked ↳. It fits the console (80 columns) without cutting anything: see _SagaListing."""
    return _SagaListing(sagas, now)


def clock(stamp: Timestamp) -> str:
    """A timestamp as a UTC time of day to the millisecond: 07:49:29.123."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(_seconds(stamp), tz=UTC).strftime("%H:%M:%S.%f")[:-3]


# Event types that mark a saga going wrong, drawn in red.
_BAD_EVENTS = ("SagaNeedsAttention", "SagaTerminated", "EffectAfterTerminate")
# The event type a watch derives when a step begins: the history records no such event (see common.StepStarts).
STEP_STARTED = "StepStarted"


def event_line(event: pb.HistoryEvent, status: int | None, origin: float) -> Text:
    """One history event on one line: its UTC clock time and offset from the saga's start, type, step,
    attempt, code, message, and the status it led to when given. A derived StepStarted (seq 0) is dim."""
    from rich.text import Text

    line = Text()
    line.append(f"{clock(event.at)} {(_seconds(event.at) - origin) * 1000:>9.1f} ms ", style="dim")
    bad = event.code not in ("", "OK") or event.type in _BAD_EVENTS
    style = "cyan" if event.type == STEP_STARTED else "red" if bad else "bold"
    line.append(f"{event.type:<21}", style=style)
    line.append(f" {event.step:<17}")
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


def _oldest(saga: pb.Saga, now: float) -> Text:
    """One saga for a line of `saga stats`: id, type, order, status, step, age, and the last error if any."""
    from rich.text import Text

    status = status_name(saga.status)
    line = Text(f"{saga.saga_id}  {saga.saga_type} · order {saga.business_key}  ")
    line.append(status, style=STATUS_STYLE.get(status, ""))
    line.append(f"  at {saga.current_step or '-'} · age {age(max(0.0, now - _seconds(saga.created_at)))}")
    if saga.last_error:
        line.append(f" · {saga.last_error}", style="red")
    return line


def stats_view(stats: pb.GetSagaStatsResponse, now: float) -> RenderableType:
    """`saga stats`: counts by status, then the in-flight and needs-attention figures with the oldest of each."""
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

    # Every figure is the server's, over the same sagas (one created_after): none contradicts another.
    figures = Table.grid(padding=(0, 2))
    figures.add_column(style="bold", no_wrap=True)
    figures.add_column()
    in_flight = Text(str(stats.in_flight), style="bold cyan" if stats.in_flight else "")
    in_flight.append(" (" + ", ".join(f"{name.lower()} {counts.get(name, 0)}" for name in IN_FLIGHT) + ")")
    figures.add_row("in flight", in_flight)
    figures.add_row(
        "needs attention", Text(str(stats.needs_attention), style="bold red" if stats.needs_attention else "")
    )
    if any(counts.get(name) for name in ("COMPLETED", "COMPENSATED", "TERMINATED")):
        latency = Text(
            f"p50 {stats.completion_p50_ms:.1f} ms  p95 {stats.completion_p95_ms:.1f} ms  "
            f"p99 {stats.completion_p99_ms:.1f} ms"
        )
    else:
        latency = Text("(no ended sagas)", style="dim")
    figures.add_row("completion latency", latency)
    if stats.HasField("oldest_in_flight"):
        figures.add_row("oldest in flight", _oldest(stats.oldest_in_flight, now))
    else:
        # The oldest in flight is the oldest running or compensating saga: a paused one is counted, not named.
        none = "(none running or compensating)" if stats.in_flight else "(none)"
        figures.add_row("oldest in flight", Text(none, style="dim"))
    if stats.HasField("oldest_needs_attention"):
        figures.add_row("oldest needs attention", _oldest(stats.oldest_needs_attention, now))
    else:
        figures.add_row("oldest needs attention", Text("(none)", style="dim"))
    return Group(table, Text(""), figures)


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


# The code an error names when no gRPC status stands behind it, by exit code.
_ERROR_CODE_BY_EXIT = {
    EXIT_FAILED: "FAILED",
    EXIT_USAGE: "USAGE",
    EXIT_UNREACHABLE: "UNAVAILABLE",
    EXIT_REFUSED: "REFUSED",
    130: "INTERRUPTED",
}


def error_json(message: str, exit_code: int, code: str = "", reason: str = "") -> str:
    """How a --json command reports an error on stderr: one line of
    {"error": {"code", "reason", "message", "exit_code"}}, the message the same as without --json; code is the
    gRPC status code's name, or without one what the exit code means (USAGE for 2)."""
    found = {
        "code": code or _ERROR_CODE_BY_EXIT.get(exit_code, "FAILED"),
        "reason": reason,
        "message": message,
        "exit_code": exit_code,
    }
    return json.dumps({"error": found}, ensure_ascii=False)


def stats_dict(stats: pb.GetSagaStatsResponse) -> dict[str, object]:
    """`saga stats --json`: the counts and every figure as the server gave them, over the same sagas."""
    counts = {status_name(c.status): c.count for c in stats.counts}

    def oldest(field: str) -> dict[str, object] | None:
        return saga_dict(getattr(stats, field), history=False) if stats.HasField(field) else None

    return {
        "counts": counts,
        "total": sum(counts.values()),
        "in_flight": stats.in_flight,
        "needs_attention": stats.needs_attention,
        "completion_ms": {
            "p50": stats.completion_p50_ms,
            "p95": stats.completion_p95_ms,
            "p99": stats.completion_p99_ms,
        },
        "oldest_in_flight": oldest("oldest_in_flight"),
        "oldest_needs_attention": oldest("oldest_needs_attention"),
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
