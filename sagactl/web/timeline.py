"""A saga's Gantt timeline as SVG, drawn on the server: each step a row, its attempts, backoffs, waits and children."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from markupsafe import Markup, escape

from sagactl.render import age
from sagactl.web.views import seconds, short_id
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

__all__ = ["gantt_svg"]

_WIDTH = 1000.0
_LABEL_W = 230.0
_PLOT_LEFT = _LABEL_W + 10.0
_PLOT_RIGHT = _WIDTH - 24.0
_TOP = 34.0
_ROW_H = 28.0
_BAR_H = 14.0
_MIN_BAR = 2.0
_FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"

# fill, stroke of each kind of bar (the definition graph's palette).
_COLOURS = {
    "action-ok": ("#2da44e", "#1a7f37"),
    "action-failed": ("#ff8182", "#cf222e"),
    "compensation-ok": ("#c297ff", "#8250df"),
    "compensation-failed": ("#ff8182", "#8250df"),
    "in-flight": ("#80ccff", "#0969da"),
    "wait": ("#fae17d", "#9a6700"),
    "child": ("#b6e3ff", "#0969da"),
    "group": ("#d0d7de", "#57606a"),
}
# The events that end a wait of a step, whichever way it ends.
_WAIT_ENDS = frozenset({"SignalReceived", "SignalConsumed", "ApprovalDecided", "WaitTimedOut", "TimerFired"})
_BRANCHES_END = frozenset({"BranchesCompleted", "BranchesStopping"})


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class _Axis:
    """Maps a moment of the saga to an x on the plot."""

    origin: float
    end: float

    @property
    def span(self) -> float:
        return max(self.end - self.origin, 1e-3)

    def x(self, moment: float) -> float:
        share = min(max((moment - self.origin) / self.span, 0.0), 1.0)
        return _PLOT_LEFT + share * (_PLOT_RIGHT - _PLOT_LEFT)

    def ticks(self, count: int = 5) -> Iterator[tuple[float, str]]:
        for number in range(count + 1):
            offset = self.span * number / count
            yield self.x(self.origin + offset), "0" if number == 0 else age(offset)


class _Drawing:
    """Collects SVG elements; every text reaches it through escape()."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(
        self, x: float, y: float, text: str, *, size: float = 11.0, colour: str = "#1f2328", extra: str = ""
    ) -> None:
        self.add(f'<text x="{_n(x)}" y="{_n(y)}" font-size="{_n(size)}" fill="{colour}"{extra}>{escape(text)}</text>')

    def bar(self, x1: float, x2: float, y: float, kind: str, classes: str, tip: str, step: str) -> None:
        fill, stroke = _COLOURS[kind]
        width = max(x2 - x1, _MIN_BAR)
        self.add(
            f'<rect class="bar {classes}" data-step="{escape(step)}" x="{_n(x1)}" y="{_n(y)}" width="{_n(width)}" '
            f'height="{_n(_BAR_H)}" rx="3" fill="{fill}" stroke="{stroke}" stroke-width="1">'
            f"<title>{escape(tip)}</title></rect>"
        )


def _first_after(
    history: list[pb.HistoryEvent], index: int, types: frozenset[str], step: str
) -> pb.HistoryEvent | None:
    return next((event for event in history[index + 1 :] if event.type in types and event.step == step), None)


def _wait_spans(saga: pb.Saga, step: pb.SagaStep, now: float) -> list[tuple[float, float, bool, str]]:
    """(start, end, still open, what ended it) of each wait the step made, from the history and the open waits."""
    history = list(saga.history)
    spans = []
    for index, event in enumerate(history):
        if event.type == "WaitStarted" and event.step == step.name:
            ended = _first_after(history, index, _WAIT_ENDS, step.name)
            if ended is not None:
                spans.append((seconds(event.at), seconds(ended.at), False, f"{ended.type} {ended.message}".strip()))
            else:
                spans.append((seconds(event.at), now, True, "still waiting"))
    if not spans:
        spans = [(seconds(wait.since), now, True, "still waiting") for wait in saga.waits if wait.step == step.name]
    return spans


def _child_span(saga: pb.Saga, step: pb.SagaStep, now: float) -> tuple[float, float, bool] | None:
    history = list(saga.history)
    for index, event in enumerate(history):
        if event.type == "ChildStarted" and event.step == step.name:
            ended = _first_after(history, index, frozenset({"ChildEnded"}), step.name)
            return seconds(event.at), seconds(ended.at) if ended else now, ended is None
    return None


def _group_span(saga: pb.Saga, step: pb.SagaStep, now: float) -> tuple[float, float] | None:
    history = list(saga.history)
    for index, event in enumerate(history):
        if event.type == "BranchesStarted" and event.step == step.name:
            ended = _first_after(history, index, _BRANCHES_END, step.name)
            return seconds(event.at), seconds(ended.at) if ended else now
    return None


def _label(step: pb.SagaStep) -> str:
    if step.kind == "parallel":
        return f"{step.name} (parallel)"
    if step.group:
        return f"branch {step.branch} · {step.name}"
    return step.name


def _attempt_tip(step: pb.SagaStep, attempt: pb.StepAttempt, ended: float) -> str:
    spent = (ended - seconds(attempt.started_at)) * 1000
    outcome = attempt.code or "in flight"
    message = f": {attempt.message}" if attempt.message else ""
    return f"{step.name} {attempt.direction} #{attempt.attempt} {outcome}, {spent:.1f} ms{message}"


def _draw_calls(drawing: _Drawing, axis: _Axis, step: pb.SagaStep, y: float, now: float) -> None:
    previous: dict[str, pb.StepAttempt] = {}
    for attempt in step.attempts:
        start = seconds(attempt.started_at)
        done = attempt.HasField("ended_at")
        end = seconds(attempt.ended_at) if done else now
        before = previous.get(attempt.direction)
        if before is not None and before.HasField("ended_at"):
            gap_from, gap_to = axis.x(seconds(before.ended_at)), axis.x(start)
            if gap_to - gap_from >= 1:
                waited = age(max(0.0, start - seconds(before.ended_at)))
                drawing.add(
                    f'<line class="backoff" data-step="{escape(step.name)}" x1="{_n(gap_from)}" '
                    f'y1="{_n(y + _BAR_H / 2)}" x2="{_n(gap_to)}" y2="{_n(y + _BAR_H / 2)}" stroke="#8c959f" '
                    f'stroke-width="1.5" stroke-dasharray="3 3"><title>backoff {escape(waited)} before '
                    f"{escape(attempt.direction)} #{attempt.attempt}</title></line>"
                )
        previous[attempt.direction] = attempt
        if not done:
            kind = "in-flight"
        else:
            kind = f"{attempt.direction}-{'ok' if attempt.code == 'OK' else 'failed'}"
        outcome = "ok" if attempt.code == "OK" else ("running" if not done else "failed")
        drawing.bar(
            axis.x(start), axis.x(end), y, kind, f"attempt {attempt.direction} {outcome}",
            _attempt_tip(step, attempt, end), step.name,
        )  # fmt: skip


def _draw_row(drawing: _Drawing, axis: _Axis, saga: pb.Saga, step: pb.SagaStep, y: float, now: float) -> None:
    ink = "#6e7781" if step.state in ("skipped", "pending") else "#1f2328"
    indent = 14.0 if step.group else 0.0
    drawing.text(10 + indent, y + 11, _label(step)[:34], size=11.5, colour=ink,
                 extra=' font-weight="600"' if not step.group else "")  # fmt: skip
    if step.kind == "parallel":
        span = _group_span(saga, step, now)
        if span:
            x1, x2 = axis.x(span[0]), axis.x(span[1])
            drawing.add(
                f'<path class="group-span" d="M{_n(x1)} {_n(y + 12)} V{_n(y + 4)} H{_n(x2)} V{_n(y + 12)}" '
                f'fill="none" stroke="#57606a" stroke-width="1.5"><title>{escape(step.name)}: branches from '
                f"start to join</title></path>"
            )
        return
    if step.kind in ("timer", "signal", "approval"):
        for start, end, still, ended_by in _wait_spans(saga, step, now):
            tip = f"{step.name}: {step.kind} wait, {age(max(0.0, end - start))}; {ended_by}"
            drawing.bar(axis.x(start), axis.x(end), y, "wait", f"wait{' open' if still else ''}", tip, step.name)
    elif step.kind == "child":
        child_span = _child_span(saga, step, now)
        if child_span:
            start, end, still = child_span
            child = step.child_saga_id
            tip = f"{step.name}: child saga {child}, {age(max(0.0, end - start))}{' so far' if still else ''}"
            if child:
                drawing.add(f'<a class="child-link" href="/sagas/{escape(child)}">')
            drawing.bar(axis.x(start), axis.x(end), y, "child", f"child{' open' if still else ''}", tip, step.name)
            if child:
                drawing.text(min(axis.x(end) + 6, _PLOT_RIGHT - 90), y + 11, f"child {short_id(child)} ↗",
                             size=10, colour="#0969da")  # fmt: skip
                drawing.add("</a>")
    _draw_calls(drawing, axis, step, y, now)
    if step.state == "skipped":
        drawing.text(_PLOT_LEFT + 4, y + 11, "skipped", size=10, colour="#6e7781", extra=' font-style="italic"')


def _markers(drawing: _Drawing, axis: _Axis, saga: pb.Saga, bottom: float, now: float) -> None:
    """Paused stretches as bands, the start of compensation as a line, and the end."""
    paused_since: float | None = None
    for event in saga.history:
        if event.type == "SagaPaused":
            paused_since = seconds(event.at)
        elif event.type == "SagaResumed" and paused_since is not None:
            _band(drawing, axis, paused_since, seconds(event.at), bottom)
            paused_since = None
    if paused_since is not None:
        _band(drawing, axis, paused_since, now, bottom)
    for event in saga.history:
        if event.type == "CompensationStarted":
            x = axis.x(seconds(event.at))
            drawing.add(
                f'<line class="compensation-start" x1="{_n(x)}" y1="{_n(_TOP - 6)}" x2="{_n(x)}" y2="{_n(bottom)}" '
                f'stroke="#8250df" stroke-width="1.2" stroke-dasharray="4 3"><title>compensation started: '
                f"{escape(event.message)}</title></line>"
            )
            # Left of the line where the label would run off the plot.
            anchor = ' text-anchor="end"' if x > _PLOT_RIGHT - 80 else ""
            drawing.text(x - 4 if anchor else x + 4, _TOP - 8, "compensation began", size=10, colour="#8250df",
                         extra=anchor)  # fmt: skip
    if saga.HasField("ended_at"):
        x = axis.x(seconds(saga.ended_at))
        drawing.add(
            f'<line class="saga-end" x1="{_n(x)}" y1="{_n(_TOP - 6)}" x2="{_n(x)}" y2="{_n(bottom)}" stroke="#1f2328" '
            f'stroke-width="1.2"/>'
        )


def _band(drawing: _Drawing, axis: _Axis, start: float, end: float, bottom: float) -> None:
    x1, x2 = axis.x(start), axis.x(end)
    drawing.add(
        f'<rect class="paused" x="{_n(x1)}" y="{_n(_TOP - 4)}" width="{_n(max(x2 - x1, _MIN_BAR))}" '
        f'height="{_n(bottom - _TOP + 4)}" fill="#afb8c1" fill-opacity="0.25"><title>paused {escape(age(end - start))}'
        "</title></rect>"
    )


_LEGEND = (
    ("action-ok", "call succeeded"),
    ("action-failed", "call failed"),
    ("compensation-ok", "compensation"),
    ("in-flight", "in flight"),
    ("wait", "wait"),
    ("child", "child saga"),
)


def _legend(drawing: _Drawing, y: float) -> None:
    x = 10.0
    for kind, words in _LEGEND:
        fill, stroke = _COLOURS[kind]
        drawing.add(
            f'<rect x="{_n(x)}" y="{_n(y - 9)}" width="14" height="10" rx="2" fill="{fill}" stroke="{stroke}"/>'
        )
        drawing.text(x + 19, y, words, size=10, colour="#57606a")
        x += 19 + len(words) * 6.0 + 18
    drawing.add(
        f'<line x1="{_n(x)}" y1="{_n(y - 4)}" x2="{_n(x + 22)}" y2="{_n(y - 4)}" stroke="#8c959f" stroke-width="1.5" '
        'stroke-dasharray="3 3"/>'
    )
    drawing.text(x + 27, y, "backoff before a retry", size=10, colour="#57606a")


def gantt_svg(saga: pb.Saga, now: float) -> Markup:
    """The saga's timeline: a row per step (a parallel group's branches each on rows of their own), every attempt a
    bar on the saga's time axis (compensations in purple), the backoff before each retry dashed, waits and child
    sagas as spans (a child linked to its page), paused stretches shaded, and where compensation began."""
    origin = seconds(saga.created_at)
    end = seconds(saga.ended_at) if saga.HasField("ended_at") else now
    axis = _Axis(origin, max(end, origin + 1e-3))
    steps = list(saga.steps)
    bottom = _TOP + _ROW_H * max(len(steps), 1)
    height = bottom + 44
    drawing = _Drawing()
    for row in range(1, len(steps), 2):  # every other row shaded, under everything else
        top = _n(_TOP + row * _ROW_H)
        drawing.add(f'<rect x="0" y="{top}" width="{_n(_WIDTH)}" height="{_n(_ROW_H)}" fill="#f6f8fa"/>')
    for x, label in axis.ticks():
        drawing.add(
            f'<line class="tick" x1="{_n(x)}" y1="{_n(_TOP - 4)}" x2="{_n(x)}" y2="{_n(bottom)}" stroke="#eaeef2"/>'
        )
        drawing.text(x, 16, label, size=10, colour="#57606a", extra=' text-anchor="middle"')
    drawing.text(10, 16, f"{'took' if saga.HasField('ended_at') else 'so far'} {age(end - origin)}", size=10,
                 colour="#57606a")  # fmt: skip
    for row, step in enumerate(steps):
        y = _TOP + row * _ROW_H + (_ROW_H - _BAR_H) / 2
        _draw_row(drawing, axis, saga, step, y, now)
    if not steps:
        drawing.text(_PLOT_LEFT, _TOP + 14, "no steps", colour="#6e7781")
    _markers(drawing, axis, saga, bottom, now)
    _legend(drawing, bottom + 30)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="gantt" width="{_n(_WIDTH)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(_WIDTH)} {_n(height)}" role="img" aria-label="timeline of saga {escape(saga.saga_id)}" '
        f'font-family="{escape(_FONT)}">'
    )
    return Markup("\n".join([head, *drawing.parts, "</svg>"]))
