"""A saga definition (SagaDefinitionInfo) drawn as a terminal tree, DOT or SVG, and YAML files described offline."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sagactl.common import calls_orchestrator, fail, new_console
from sagactl.settings import EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE, ClientConfig

if TYPE_CHECKING:
    from rich.text import Text
    from rich.tree import Tree

    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

# rich, the contract and json_format load inside the functions that use them, so registering the
# commands (and their --help) costs none of them, as for every other command module.

__all__ = [
    "DESCRIBE_MODULE",
    "DefinitionNotFound",
    "DescribeFailed",
    "Described",
    "GraphFormat",
    "NodeState",
    "Problem",
    "choose_definition",
    "definition_dot",
    "definition_summary",
    "definition_svg",
    "definition_tree",
    "definition_tree_text",
    "describe_command",
    "duration_words",
    "parse_described",
    "problem_lines",
    "register",
    "run_describe",
    "validate_report",
]


class NodeState(StrEnum):
    """Where one node of one saga stands, for colouring a definition's graph on that saga's page."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"
    COMPENSATED = "compensated"
    SKIPPED = "skipped"


class GraphFormat(StrEnum):
    TREE = "tree"
    DOT = "dot"
    SVG = "svg"


# fill, stroke, text colour of a box in each state (GitHub's palette: readable in light pages).
_STATE_COLOURS: dict[NodeState, tuple[str, str, str]] = {
    NodeState.PENDING: ("#ffffff", "#8c959f", "#57606a"),
    NodeState.RUNNING: ("#ddf4ff", "#0969da", "#0a3069"),
    NodeState.WAITING: ("#fff8c5", "#9a6700", "#4d2d00"),
    NodeState.DONE: ("#dafbe1", "#1a7f37", "#044f1e"),
    NodeState.FAILED: ("#ffebe9", "#cf222e", "#82071e"),
    NodeState.COMPENSATED: ("#fbefff", "#8250df", "#3e1f79"),
    NodeState.SKIPPED: ("#f6f8fa", "#afb8c1", "#6e7781"),
}
_NEUTRAL = ("#ffffff", "#57606a", "#1f2328")
# The mark and style a state gets in the terminal tree.
_STATE_MARKS: dict[NodeState, tuple[str, str]] = {
    NodeState.PENDING: ("·", "dim"),
    NodeState.RUNNING: ("▶", "bold cyan"),
    NodeState.WAITING: ("⧗", "bold blue"),
    NodeState.DONE: ("✓", "bold green"),
    NodeState.FAILED: ("✗", "bold red"),
    NodeState.COMPENSATED: ("↩", "bold yellow"),
    NodeState.SKIPPED: ("-", "dim"),
}


# -- reading the flat node list -----------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """A parallel node with its branches, each a sequence of nodes."""

    node: pb.DefinitionNode
    branches: tuple[tuple[pb.DefinitionNode, ...], ...]


def _sequence(nodes: Iterable[pb.DefinitionNode]) -> list[pb.DefinitionNode | _Group]:
    """The main sequence: each parallel node holds the nodes that name it as their group, by branch.

    A node naming a group that does not precede it stays on the main sequence: a malformed listing
    is still drawn, never dropped.
    """
    order: list[pb.DefinitionNode | str] = []
    groups: dict[str, tuple[pb.DefinitionNode, dict[int, list[pb.DefinitionNode]]]] = {}
    for node in nodes:
        if node.group and node.group in groups:
            groups[node.group][1].setdefault(node.branch, []).append(node)
        elif node.kind == "parallel" and not node.group and node.name not in groups:
            groups[node.name] = (node, {})
            order.append(node.name)
        else:
            order.append(node)
    items: list[pb.DefinitionNode | _Group] = []
    for entry in order:
        if isinstance(entry, str):
            group, branches = groups[entry]
            items.append(_Group(group, tuple(tuple(branches[number]) for number in sorted(branches))))
        else:
            items.append(entry)
    return items


# -- words --------------------------------------------------------------------------------------


def _shown(text: str) -> str:
    """text with every character that is not printable as its escape: a terminal control sequence,
    a bidi override or a NUL in a name shows as text and cannot act, in a terminal or in XML."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration_words(seconds: float) -> str:
    """Seconds in words of at most two units: 90 -> "1m30s", 90000 -> "1d1h", 0.25 -> "250ms"."""
    if not math.isfinite(seconds) or seconds < 0:
        return f"{seconds:g}s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms" if seconds else "0s"
    if seconds < 60 and seconds != int(seconds):
        return f"{seconds:.3g}s"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts[:2])


@dataclass(frozen=True)
class _Call:
    """A call target "service/package.Service/Method" in parts."""

    target: str
    service: str = ""
    grpc_service: str = ""
    method: str = ""

    @classmethod
    def parse(cls, target: str) -> _Call:
        parts = target.split("/")
        if len(parts) == 3 and all(parts):
            return cls(target, parts[0], parts[1].rsplit(".", 1)[-1], parts[2])
        if len(parts) == 2 and all(parts):
            return cls(target, "", parts[0].rsplit(".", 1)[-1], parts[1])
        return cls(target)

    @property
    def short(self) -> str:
        """Service.Method, after the discovery name when the service's name does not say it."""
        if not self.method:
            return _shown(self.target)
        named = f"{self.grpc_service}.{self.method}"
        evident = self.grpc_service.lower().startswith(re.sub(r"[^a-z0-9]", "", self.service.lower()))
        return _shown(named if evident else f"{self.service}: {named}")

    def relative_to(self, action: _Call) -> str:
        """Only the method when the same service answers it (the tree's short form)."""
        if self.method and (self.service, self.grpc_service) == (action.service, action.grpc_service):
            return _shown(self.method)
        return self.short


def _detail(node: pb.DefinitionNode) -> str:
    """What the node does, in a few words (a call: its action)."""
    kind = node.kind
    if kind == "call":
        return _Call.parse(node.action).short
    if kind == "timer":
        waited = duration_words(node.timeout_seconds) if node.timeout_seconds else "until a time"
        return f"timer {waited}"
    if kind == "signal":
        return f"waits for signal {_shown(node.signal)}, timeout {duration_words(node.timeout_seconds)}"
    if kind == "approval":
        role = f" by {_shown(node.signal)}" if node.signal else ""
        return f"approval{role}, timeout {duration_words(node.timeout_seconds)}"
    if kind == "child":
        return f"child saga {_shown(node.child)}"
    if kind == "parallel":
        return "parallel"
    return _shown(kind) or "node"


def _marks(node: pb.DefinitionNode) -> list[str]:
    """The kind markers: retriable, pivot, conditional, what a wait's timeout does."""
    marks = []
    if node.step_kind == "retriable":
        marks.append("retriable")
    if node.pivot:
        marks.append("pivot")
    if node.conditional:
        marks.append("conditional")
    if node.on_timeout and node.kind == "signal":
        marks.append(f"on timeout {_shown(node.on_timeout)}")
    return marks


def _tooltip(node: pb.DefinitionNode) -> list[str]:
    """What a pointer over the node tells (one item a line): its name, full call targets and time limits."""
    lines = [node.name]
    if node.action:
        lines.append(f"action {node.action}")
    if node.compensation:
        lines.append(f"compensation {node.compensation}")
    if node.call_timeout_seconds:
        lines.append(f"each try {duration_words(node.call_timeout_seconds)}")
    if node.budget_seconds:
        lines.append(f"retried for up to {duration_words(node.budget_seconds)}")
    return lines


def _state_of(states: Mapping[str, NodeState | str] | None, name: str) -> NodeState | None:
    if states is None:
        return None
    value = states.get(name)
    try:
        return NodeState(value) if value is not None else NodeState.PENDING
    except ValueError:
        return NodeState.PENDING


def _header(definition: pb.SagaDefinitionInfo) -> str:
    return f"{_shown(definition.name)} v{definition.version}"


def _facts(definition: pb.SagaDefinitionInfo) -> list[str]:
    facts = []
    if definition.input_type:
        facts.append(f"input {_shown(definition.input_type)}")
    if definition.deadline_seconds:
        facts.append(f"deadline {duration_words(definition.deadline_seconds)}")
    return facts


# -- the terminal tree --------------------------------------------------------------------------

_MARK_STYLE = {"retriable": "cyan", "pivot": "bold magenta", "conditional": "yellow"}
_MARK_SYMBOL = {"retriable": "↻ ", "pivot": "◆ ", "conditional": "◇ "}
# Names on one level are padded to the same width (up to this), so their details line up.
_NAME_COLUMN = 22


def _node_label(
    node: pb.DefinitionNode, name_width: int, states: Mapping[str, NodeState | str] | None, branches: int = 0
) -> Text:
    from rich.text import Text

    label = Text()
    state = _state_of(states, node.name)
    if state is not None:
        mark, style = _STATE_MARKS[state]
        label.append(f"{mark} ", style=style)
    name = _shown(node.name)
    label.append(name, style="bold")
    label.append(" " * max(2, name_width - len(name) + 2))
    if node.kind == "call":
        action = _Call.parse(node.action)
        label.append(action.short)
        if node.compensation:
            label.append(" → ", style="dim")
            label.append(_Call.parse(node.compensation).relative_to(action), style="yellow")
    elif node.kind == "parallel":
        label.append(f"parallel: {branches} branches, joined when all end", style="dim")
    else:
        label.append(_detail(node))
    for mark in _marks(node):
        word = mark.split(" ")[0]
        label.append("  ")
        label.append(f"{_MARK_SYMBOL.get(word, '')}{mark}", style=_MARK_STYLE.get(word, "dim"))
    if state is not None and state is not NodeState.PENDING:
        label.append(f"  {state.value}", style=_STATE_MARKS[state][1])
    return label


def _name_width(nodes: Iterable[pb.DefinitionNode]) -> int:
    return min(_NAME_COLUMN, max((len(_shown(node.name)) for node in nodes), default=0))


def definition_tree(definition: pb.SagaDefinitionInfo, states: Mapping[str, NodeState | str] | None = None) -> Tree:
    """The definition as a rich Tree: the sequence, each parallel group with its branches, each call's
    action → compensation and the kind markers; with states, each node's state beside it."""
    from rich.text import Text
    from rich.tree import Tree

    title = Text(_header(definition), style="bold")
    if definition.latest:
        title.append("  latest", style="green")
    if definition.running:
        title.append(f"  {definition.running} running", style="cyan")
    facts = _facts(definition)
    if facts:
        title.append("\n" + " · ".join(facts), style="dim")
    tree = Tree(title, guide_style="dim")
    items = _sequence(definition.nodes)
    width = _name_width(item.node if isinstance(item, _Group) else item for item in items)
    for item in items:
        if isinstance(item, _Group):
            group = tree.add(_node_label(item.node, width, states, len(item.branches)))
            for number, branch in enumerate(item.branches, start=1):
                limb = group.add(Text(f"branch {number}", style="dim"))
                branch_width = _name_width(branch)
                for node in branch:
                    limb.add(_node_label(node, branch_width, states))
        else:
            tree.add(_node_label(item, width, states))
    if not items:
        tree.add(Text("no nodes", style="dim"))
    return tree


def definition_tree_text(
    definition: pb.SagaDefinitionInfo, *, width: int = 80, states: Mapping[str, NodeState | str] | None = None
) -> str:
    """The tree as plain text laid out at width columns (for a file, or a test)."""
    import io

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False, emoji=False).print(
        definition_tree(definition, states)
    )
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


# -- DOT ----------------------------------------------------------------------------------------


def _dot_text(text: str) -> str:
    """A piece of a quoted DOT string: backslashes doubled (so \\N, \\G or \\l in a name stay text), quotes escaped."""
    return _shown(text).replace("\\", "\\\\").replace('"', '\\"')


def _dot_label(*lines: str) -> str:
    return '"' + "\\n".join(_dot_text(line) for line in lines if line) + '"'


def _dot_style(state: NodeState | None, style: str = "rounded") -> str:
    """The style attributes of a box: filled in the state's colours when there is a state."""
    if state is None:
        return f'style="{style}"'
    fill, stroke, text = _STATE_COLOURS[state]
    return f'style="{style},filled", fillcolor="{fill}", color="{stroke}", fontcolor="{text}"'


def definition_dot(definition: pb.SagaDefinitionInfo, states: Mapping[str, NodeState | str] | None = None) -> str:
    """The definition in graphviz DOT: boxes top to bottom, each compensation beside its action on a dashed
    edge, each parallel group a cluster from its fork to its join with a cluster per branch."""
    title = " · ".join([_header(definition), *_facts(definition)])
    lines = [
        "digraph saga {",
        f'  graph [rankdir=TB, label={_dot_label(title)}, labelloc=t, fontname="Helvetica", fontsize=14,'
        " nodesep=0.4, ranksep=0.35];",
        '  node [shape=box, style=rounded, fontname="Helvetica", fontsize=11, margin="0.15,0.06"];',
        '  edge [fontname="Helvetica", fontsize=9, color="#57606a"];',
        '  start [shape=circle, label="", width=0.18, style=filled, fillcolor="#1f2328"];',
        '  end [shape=doublecircle, label="", width=0.12, style=filled, fillcolor="#1f2328"];',
    ]

    def box(node: pb.DefinitionNode, indent: str) -> str:
        """Declare node (and its compensation beside it); return its id."""
        ident = f"n{node.index}"
        state = _state_of(states, node.name)
        lines.append(
            f"{indent}{ident} [label={_dot_label(node.name, _detail(node), ' · '.join(_marks(node)))}, "
            f"tooltip={_dot_label(*_tooltip(node))}{', penwidth=2' if node.pivot else ''}, {_dot_style(state)}];"
        )
        if node.kind == "call" and node.compensation:
            undo = f"{ident}_undo"
            undo_state = NodeState.COMPENSATED if state is NodeState.COMPENSATED else None
            lines.append(
                f"{indent}{undo} [label={_dot_label('compensation', _Call.parse(node.compensation).short)}, "
                f'fontsize=10, color="#8250df", {_dot_style(undo_state, "rounded,dashed")}];'
            )
            lines.append(f"{indent}{{ rank=same; {ident}; {undo}; }}")
            lines.append(f"{indent}{ident} -> {undo} [style=dashed, arrowhead=empty];")
        return ident

    previous = "start"
    for item in _sequence(definition.nodes):
        if isinstance(item, _Group):
            group = item.node
            fork, join = f"n{group.index}", f"n{group.index}_join"
            fork_state = _state_of(states, group.name)
            lines.append(f"  subgraph cluster_{fork} {{")
            lines.append(
                f'    label={_dot_label("parallel " + group.name)}; style="rounded,filled"; fillcolor="#f6f8fa";'
                ' color="#8c959f"; fontsize=11;'
            )
            bar = 'shape=box, height=0.2, fontsize=9, style=filled, fillcolor="#1f2328", fontcolor="#ffffff"'
            fork_bar = bar if fork_state is None else f"shape=box, height=0.2, fontsize=9, {_dot_style(fork_state)}"
            lines.append(f"    {fork} [label={_dot_label('fork ' + group.name)}, {fork_bar}];")
            lines.append(f'    {join} [label="join", {bar}];')
            for number, branch in enumerate(item.branches, start=1):
                lines.append(f"    subgraph cluster_{fork}_b{number} {{")
                lines.append(f'      label="branch {number}"; style="rounded"; color="#d0d7de"; fontsize=9;')
                # Only the branch's own nodes and edges inside its cluster: an edge from the fork
                # declared there would pull the fork into the branch.
                idents = [box(node, "      ") for node in branch]
                lines.extend(f"      {before} -> {after};" for before, after in pairwise(idents))
                lines.append("    }")
                if idents:
                    lines.append(f"    {fork} -> {idents[0]};")
                    lines.append(f"    {idents[-1]} -> {join};")
                else:
                    lines.append(f"    {fork} -> {join};")
            lines.append("  }")
            lines.append(f"  {previous} -> {fork};")
            previous = join
        else:
            ident = box(item, "  ")
            lines.append(f"  {previous} -> {ident};")
            previous = ident
    lines.append(f"  {previous} -> end;")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- SVG ----------------------------------------------------------------------------------------

_FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
_NAME_SIZE, _DETAIL_SIZE, _SMALL_SIZE = 13.0, 11.0, 9.5
_PAD = 12.0
_BOX_H = 58.0
_UNDO_H = 40.0
_UNDO_GAP = 46.0  # between an action and its compensation: the dashed arrow's length
_STEP_GAP = 30.0  # between two boxes of a sequence: the arrow's length
_BRANCH_GAP = 30.0
_GROUP_PAD = 16.0
_BAR_H = 6.0
_MARGIN = 20.0
_MIN_BOX_W, _MAX_CHARS = 150.0, 44
_NARROW, _WIDE = set("iljtfrI.,:;|!'()[] "), set("mwMW@%")


def _text_width(text: str, size: float, *, bold: bool = False) -> float:
    """An over- rather than underestimate of text's width in a sans-serif font (no font metrics here)."""
    em = 0.0
    for char in text:
        if char in _NARROW:
            em += 0.32
        elif char in _WIDE:
            em += 0.88
        elif char.isupper() or char.isdigit():
            em += 0.66
        elif ord(char) > 0x2E80:  # CJK and the like: a full em
            em += 1.0
        else:
            em += 0.56
    return em * size * (1.08 if bold else 1.0)


def _xml(text: str) -> str:
    """text for XML content or a quoted attribute: shown (no control character can reach the XML) and escaped."""
    shown = _shown(text)
    return (
        shown.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#39;")
    )


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


@dataclass
class _Box:
    """One node's box (and its compensation's) as laid out: anchor is the x of the action box's centre."""

    node: pb.DefinitionNode
    name: str
    detail: str
    marks: str
    undo: str
    width: float
    undo_width: float

    @property
    def left(self) -> float:
        return self.width / 2

    @property
    def right(self) -> float:
        return self.width / 2 + (_UNDO_GAP + self.undo_width if self.undo else 0.0)

    @property
    def height(self) -> float:
        return _BOX_H


def _box(node: pb.DefinitionNode) -> _Box:
    name = _clip(_shown(node.name), _MAX_CHARS - 8)
    detail = _clip(_detail(node), _MAX_CHARS)
    marks = _clip(" · ".join(_marks(node)), _MAX_CHARS)
    tag = node.kind.upper() if node.kind in ("call", "timer", "signal", "approval", "child") else ""
    wanted = max(
        _text_width(name, _NAME_SIZE, bold=True) + (_text_width(tag, _SMALL_SIZE) + 14 if tag else 0),
        _text_width(detail, _DETAIL_SIZE),
        _text_width(marks, _SMALL_SIZE),
    )
    undo = _clip(_Call.parse(node.compensation).short, _MAX_CHARS) if node.kind == "call" and node.compensation else ""
    undo_width = max(_text_width(undo, _DETAIL_SIZE), _text_width("compensation", _SMALL_SIZE)) + 2 * _PAD
    return _Box(node, name, detail, marks, undo, max(_MIN_BOX_W, wanted + 2 * _PAD), undo_width if undo else 0.0)


def _same_width(boxes: list[_Box]) -> list[_Box]:
    """The boxes of one column (and their compensations) made as wide as the widest, so the column reads as one."""
    widest = max((box.width for box in boxes), default=_MIN_BOX_W)
    widest_undo = max((box.undo_width for box in boxes), default=0.0)
    for box in boxes:
        box.width = widest
        box.undo_width = widest_undo if box.undo else 0.0
    return boxes


@dataclass
class _Column:
    """A sequence of boxes under one anchor: its extent left and right of it, and its height."""

    boxes: list[_Box]

    @property
    def left(self) -> float:
        return max((box.left for box in self.boxes), default=_MIN_BOX_W / 2)

    @property
    def right(self) -> float:
        return max((box.right for box in self.boxes), default=_MIN_BOX_W / 2)

    @property
    def height(self) -> float:
        return sum(box.height for box in self.boxes) + _STEP_GAP * max(0, len(self.boxes) - 1)


_LABEL_H = 22.0  # the group's label above its fork bar
_FORK_TO_BRANCH = 30.0


@dataclass
class _Fork:
    """A parallel group: branches side by side between its fork bar and its join bar, in a cluster."""

    node: pb.DefinitionNode
    label: str
    branches: list[_Column]
    anchors: list[float] = field(default_factory=list)  # each branch's anchor, from the cluster's left edge
    inner_width: float = 0.0

    def __post_init__(self) -> None:
        x = _GROUP_PAD
        for column in self.branches:
            self.anchors.append(x + column.left)
            x += column.left + column.right + _BRANCH_GAP
        self.inner_width = max(
            x - _BRANCH_GAP + _GROUP_PAD, _text_width(self.label, _DETAIL_SIZE, bold=True) + 2 * _GROUP_PAD
        )

    @property
    def centre(self) -> float:
        return (self.anchors[0] + self.anchors[-1]) / 2 if self.anchors else self.inner_width / 2

    @property
    def left(self) -> float:
        return self.centre

    @property
    def right(self) -> float:
        return self.inner_width - self.centre

    @property
    def branches_height(self) -> float:
        return max((column.height for column in self.branches), default=0.0)

    @property
    def height(self) -> float:
        return _LABEL_H + _BAR_H + _FORK_TO_BRANCH + self.branches_height + _FORK_TO_BRANCH + _BAR_H + _GROUP_PAD


class _Svg:
    """Collects SVG elements; every text that reaches it goes through _xml."""

    def __init__(self, prefix: str, states: Mapping[str, NodeState | str] | None) -> None:
        self.prefix = prefix
        self.states = states
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, text: str, size: float, colour: str, **attributes: str) -> None:
        extra = "".join(f' {key.replace("_", "-")}="{value}"' for key, value in attributes.items())
        self.add(f'<text x="{_n(x)}" y="{_n(y)}" font-size="{_n(size)}" fill="{colour}"{extra}>{_xml(text)}</text>')

    def arrow(self, x1: float, y1: float, x2: float, y2: float, *, dashed: bool = False) -> None:
        if dashed:
            self.add(
                f'<line class="compensation-edge" x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" '
                f'stroke="#8250df" stroke-width="1.3" stroke-dasharray="5 4" marker-end="url(#{self.prefix}-undo)"/>'
            )
        else:
            self.add(
                f'<line class="edge" x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" '
                f'stroke="#57606a" stroke-width="1.3" marker-end="url(#{self.prefix}-arrow)"/>'
            )

    def node_group(self, node: pb.DefinitionNode) -> tuple[str, NodeState | None]:
        state = _state_of(self.states, node.name)
        classes = f"node kind-{re.sub(r'[^a-z0-9-]', '', node.kind.lower()) or 'unknown'}"
        if state is not None:
            classes += f" state-{state.value}"
        state_attribute = f' data-state="{state.value}"' if state is not None else ""
        self.add(
            f'<g id="{self.prefix}-node-{node.index}" class="{classes}" data-node="{_xml(node.name)}" '
            f'data-kind="{_xml(node.kind)}"{state_attribute}>'
        )
        lines = _tooltip(node)
        if state is not None:
            lines[0] += f" ({state.value})"
        self.add(f"<title>{chr(10).join(_xml(line) for line in lines)}</title>")
        return "</g>", state

    def box(self, box: _Box, anchor: float, top: float) -> None:
        node = box.node
        close, state = self.node_group(node)
        fill, stroke, ink = _STATE_COLOURS[state] if state is not None else _NEUTRAL
        x = anchor - box.width / 2
        dash = ' stroke-dasharray="2 3"' if state is NodeState.SKIPPED else ""
        self.add(
            f'<rect x="{_n(x)}" y="{_n(top)}" width="{_n(box.width)}" height="{_n(box.height)}" rx="8" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{"2.6" if node.pivot else "1.3"}"{dash}/>'
        )
        if node.kind == "child":  # a saga of its own: a second border inside
            self.add(
                f'<rect x="{_n(x + 3)}" y="{_n(top + 3)}" width="{_n(box.width - 6)}" height="{_n(box.height - 6)}" '
                f'rx="6" fill="none" stroke="{stroke}" stroke-width="0.8"/>'
            )
        if node.conditional:  # a diamond on the left edge: it runs only when its condition holds
            cy = top + box.height / 2
            self.add(
                f'<path d="M{_n(x - 7)} {_n(cy)} L{_n(x)} {_n(cy - 7)} L{_n(x + 7)} {_n(cy)} L{_n(x)} {_n(cy + 7)} Z" '
                f'fill="#fff8c5" stroke="#9a6700" stroke-width="1.2"/>'
            )
        lines_top = top + (18.0 if box.marks else 24.0)
        self.text(x + _PAD, lines_top, box.name, _NAME_SIZE, ink, font_weight="600")
        if node.kind in ("call", "timer", "signal", "approval", "child"):
            self.text(
                x + box.width - _PAD, top + 15, node.kind.upper(), _SMALL_SIZE, "#6e7781",
                text_anchor="end", letter_spacing="0.5",
            )  # fmt: skip
        self.text(x + _PAD, lines_top + 16, box.detail, _DETAIL_SIZE, ink)
        if box.marks:
            colour = "#8250df" if node.pivot else "#9a6700"
            self.text(x + _PAD, lines_top + 31, box.marks, _SMALL_SIZE, colour, font_weight="600")
        if box.undo:
            self.undo(box, anchor, top, state)
        self.add(close)

    def undo(self, box: _Box, anchor: float, top: float, state: NodeState | None) -> None:
        undo_state = NodeState.COMPENSATED if state is NodeState.COMPENSATED else None
        fill, stroke, ink = _STATE_COLOURS[undo_state] if undo_state else ("#ffffff", "#8250df", "#3e1f79")
        x = anchor + box.width / 2 + _UNDO_GAP
        y = top + (box.height - _UNDO_H) / 2
        self.arrow(anchor + box.width / 2, top + box.height / 2, x - 2, top + box.height / 2, dashed=True)
        self.add(
            f'<rect class="compensation" x="{_n(x)}" y="{_n(y)}" width="{_n(box.undo_width)}" height="{_n(_UNDO_H)}" '
            f'rx="6" fill="{fill}" stroke="{stroke}" stroke-width="1.2" stroke-dasharray="5 4"/>'
        )
        self.text(x + _PAD, y + 14, "compensation", _SMALL_SIZE, "#8250df", letter_spacing="0.3")
        self.text(x + _PAD, y + 30, box.undo, _DETAIL_SIZE, ink)

    def column(self, column: _Column, anchor: float, top: float) -> float:
        """Draw the boxes one under another; the y below the last."""
        y = top
        for position, box in enumerate(column.boxes):
            if position:
                self.arrow(anchor, y - _STEP_GAP, anchor, y - 2)
            self.box(box, anchor, y)
            y += box.height + _STEP_GAP
        return y - _STEP_GAP if column.boxes else top

    def fork(self, fork: _Fork, anchor: float, top: float) -> None:
        left = anchor - fork.centre
        self.add(
            f'<rect class="parallel-group" x="{_n(left)}" y="{_n(top)}" width="{_n(fork.inner_width)}" '
            f'height="{_n(fork.height)}" rx="10" fill="#f6f8fa" stroke="#8c959f" stroke-width="1"/>'
        )
        self.text(left + _GROUP_PAD, top + 16, fork.label, _DETAIL_SIZE, "#57606a", font_weight="600")
        bar_left = left + fork.anchors[0] - 24 if fork.anchors else left + _GROUP_PAD
        bar_right = left + fork.anchors[-1] + 24 if fork.anchors else left + fork.inner_width - _GROUP_PAD
        fork_y = top + _LABEL_H
        close, state = self.node_group(fork.node)
        bar_fill = _STATE_COLOURS[state][1] if state is not None else "#1f2328"
        self.add(
            f'<rect x="{_n(bar_left)}" y="{_n(fork_y)}" width="{_n(bar_right - bar_left)}" height="{_n(_BAR_H)}" '
            f'rx="2" fill="{bar_fill}"/>'
        )
        self.add(close)
        branch_top = fork_y + _BAR_H + _FORK_TO_BRANCH
        join_y = branch_top + fork.branches_height + _FORK_TO_BRANCH
        for number, (column, offset) in enumerate(zip(fork.branches, fork.anchors, strict=True), start=1):
            x = left + offset
            self.arrow(x, fork_y + _BAR_H, x, branch_top - 2)
            self.text(x + 6, fork_y + _BAR_H + 14, f"branch {number}", _SMALL_SIZE, "#6e7781")
            bottom = self.column(column, x, branch_top)
            self.arrow(x, bottom, x, join_y - 2)
        self.add(
            f'<rect class="join" x="{_n(bar_left)}" y="{_n(join_y)}" width="{_n(bar_right - bar_left)}" '
            f'height="{_n(_BAR_H)}" rx="2" fill="#1f2328"><title>join {_xml(fork.node.name)}</title></rect>'
        )


def _prefix(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", text) or "saga"


def definition_svg(
    definition: pb.SagaDefinitionInfo,
    states: Mapping[str, NodeState | str] | None = None,
    *,
    id_prefix: str = "saga",
    legend: bool = True,
) -> str:
    """The definition as a standalone SVG document, laid out top to bottom by this code (no graphviz).

    Branches stand side by side between a fork and a join bar; each compensation sits beside its action
    at the end of a dashed arrow. Every node is a `<g class="node kind-… [state-…]" data-node="name">`.
    states (node name → NodeState; nodes left out are pending) colours the nodes for one saga's page:
    a compensated node's compensation is coloured with it. id_prefix keeps the ids of two drawings on
    one HTML page apart. All text is escaped: a name is text, never markup.
    """
    prefix = _prefix(id_prefix)
    items: list[_Box | _Fork] = []
    for entry in _sequence(definition.nodes):
        if isinstance(entry, _Group):
            columns = [_Column(_same_width([_box(node) for node in branch])) for branch in entry.branches]
            items.append(_Fork(entry.node, _clip(f"parallel {_shown(entry.node.name)}", _MAX_CHARS), columns))
        else:
            items.append(_box(entry))
    _same_width([item for item in items if isinstance(item, _Box)])
    title = _clip(_header(definition), 60)
    subtitle = _clip(" · ".join(_facts(definition)), 90)
    left = max([item.left for item in items] or [_MIN_BOX_W / 2])
    right = max([item.right for item in items] or [_MIN_BOX_W / 2])
    header_width = max(_text_width(title, 16, bold=True), _text_width(subtitle, _DETAIL_SIZE))
    width = max(2 * _MARGIN + left + right, 2 * _MARGIN + header_width)
    anchor = _MARGIN + left
    header = 30.0 + (18.0 if subtitle else 0.0)

    svg = _Svg(prefix, states)
    svg.text(_MARGIN, 28, title, 16, "#1f2328", font_weight="700")
    if subtitle:
        svg.text(_MARGIN, 46, subtitle, _DETAIL_SIZE, "#57606a")
    y = header + 12
    svg.add(f'<circle class="start" cx="{_n(anchor)}" cy="{_n(y + 7)}" r="7" fill="#1f2328"/>')
    y += 14
    for item in items:
        svg.arrow(anchor, y, anchor, y + _STEP_GAP - 2)
        y += _STEP_GAP
        if isinstance(item, _Fork):
            svg.fork(item, anchor, y)
        else:
            svg.box(item, anchor, y)
        y += item.height
    svg.arrow(anchor, y, anchor, y + _STEP_GAP - 2)
    y += _STEP_GAP
    svg.add(f'<circle class="end" cx="{_n(anchor)}" cy="{_n(y + 8)}" r="8" fill="none" stroke="#1f2328"/>')
    svg.add(f'<circle cx="{_n(anchor)}" cy="{_n(y + 8)}" r="4.5" fill="#1f2328"/>')
    y += 16
    if legend:
        y = _legend(svg, y + 22, states is not None, width)
    height = y + _MARGIN

    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(width)} {_n(height)}" role="img" aria-labelledby="{prefix}-title" '
        f'font-family="{_xml(_FONT)}">'
    )
    defs = (
        f'<title id="{prefix}-title">{_xml(_header(definition))}</title>'
        "<defs>"
        f'<marker id="{prefix}-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0 0 L10 5 L0 10 Z" fill="#57606a"/></marker>'
        f'<marker id="{prefix}-undo" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M0 0 L10 5 L0 10" fill="none" stroke="#8250df" stroke-width="1.5"/>'
        "</marker></defs>"
        f'<rect width="{_n(width)}" height="{_n(height)}" fill="#ffffff"/>'
    )
    return "\n".join([head, defs, *svg.parts, "</svg>"]) + "\n"


def _legend(svg: _Svg, y: float, with_states: bool, width: float) -> float:
    """A line explaining the arrows (and, with states, the colours); the y below it."""
    x = _MARGIN
    svg.arrow(x, y - 4, x + 26, y - 4)
    svg.text(x + 32, y, "runs next", _SMALL_SIZE, "#57606a")
    x += 32 + _text_width("runs next", _SMALL_SIZE) + 18
    svg.arrow(x, y - 4, x + 26, y - 4, dashed=True)
    words = "compensation: undoes its action, newest first, when a later step fails"
    svg.text(x + 32, y, words, _SMALL_SIZE, "#57606a")
    if not with_states:
        return y + 6
    y += 20
    x = _MARGIN
    for state in NodeState:
        fill, stroke, _ = _STATE_COLOURS[state]
        step = 20 + _text_width(state.value, _SMALL_SIZE) + 14
        if x + step > width - _MARGIN:
            x, y = _MARGIN, y + 18
        svg.add(
            f'<rect class="legend-{state.value}" x="{_n(x)}" y="{_n(y - 10)}" width="14" height="12" rx="3" '
            f'fill="{fill}" stroke="{stroke}"/>'
        )
        svg.text(x + 20, y, state.value, _SMALL_SIZE, "#57606a")
        x += step
    return y + 6


# -- describing YAML files offline --------------------------------------------------------------

# The lead's loader: `python -m orchestrator.declarative describe FILE...` prints
# {"problems": [{file, line, column, message, hint}], "definitions": [SagaDefinitionInfo as JSON]}.
# It runs as a process because the CLI knows the orchestrator only through its contract.
DESCRIBE_MODULE = "orchestrator.declarative"
_DESCRIBE_TIMEOUT = 120.0


class DescribeFailed(Exception):
    """The describe tool did not run, or printed something that is not its JSON answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DefinitionNotFound(LookupError):
    """No definition of that name (or version) among those given, naming those there are."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a definition file, where it is and how to fix it."""

    file: str
    line: int
    column: int
    message: str
    hint: str = ""

    @property
    def where(self) -> str:
        """file:line:column, leaving out a position the tool did not know (0)."""
        parts = [_shown(self.file) or "<input>"]
        if self.line > 0:
            parts.append(str(self.line))
            if self.column > 0:
                parts.append(str(self.column))
        return ":".join(parts)


@dataclass(frozen=True)
class Described:
    """What the describe tool found in the files: the problems, and the definitions they hold."""

    problems: list[Problem]
    definitions: list[pb.SagaDefinitionInfo]


def describe_command(paths: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", DESCRIBE_MODULE, "describe", *paths]


def _number(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def parse_described(stdout: str, stderr: str = "", returncode: int = 0) -> Described:
    """The describe tool's JSON answer; DescribeFailed naming what went wrong when it is not one."""
    from google.protobuf import json_format

    from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

    try:
        answer = json.loads(stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
        if "No module named" in last and DESCRIBE_MODULE.partition(".")[0] in last:
            raise DescribeFailed(
                f"this installation has no {DESCRIBE_MODULE} module to read YAML definitions with ({_shown(last)})"
            )
        said = f": {_shown(_clip(last, 300))}" if last else " and printed no JSON answer"
        raise DescribeFailed(f"python -m {DESCRIBE_MODULE} describe failed (exit {returncode}){said}")
    problems = [
        Problem(
            file=str(entry.get("file", "")),
            line=_number(entry.get("line")),
            column=_number(entry.get("column")),
            message=str(entry.get("message", "")),
            hint=str(entry.get("hint", "") or ""),
        )
        for entry in answer.get("problems") or []
        if isinstance(entry, dict)
    ]
    definitions = []
    for entry in answer.get("definitions") or []:
        try:
            definitions.append(json_format.ParseDict(entry, pb.SagaDefinitionInfo(), ignore_unknown_fields=True))
        except json_format.ParseError as error:
            raise DescribeFailed(f"python -m {DESCRIBE_MODULE} describe printed a definition this CLI cannot read: "
                                 f"{_shown(_clip(str(error), 300))}") from None  # fmt: skip
    return Described(problems, definitions)


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def run_describe(paths: Sequence[str], run: Runner | None = None) -> Described:
    """Run the describe tool over the files with this Python (run: a stand-in for subprocess.run); read its answer."""
    command = describe_command(paths)
    try:
        done = (run or subprocess.run)(command, capture_output=True, text=True, timeout=_DESCRIBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise DescribeFailed(f"python -m {DESCRIBE_MODULE} describe did not answer in {_DESCRIBE_TIMEOUT:g}s") from None
    except OSError as error:
        raise DescribeFailed(f"cannot run {command[0]}: {error.strerror}") from None
    return parse_described(done.stdout or "", done.stderr or "", done.returncode)


def problem_lines(problems: Iterable[Problem]) -> list[str]:
    """Each problem as `file:line:column: message`, its hint indented on the next line."""
    lines = []
    for problem in problems:
        lines.append(f"{problem.where}: {_shown(problem.message)}")
        if problem.hint:
            lines.append(f"    hint: {_shown(problem.hint)}")
    return lines


def definition_summary(definition: pb.SagaDefinitionInfo) -> str:
    """One line: name and version, its nodes by kind, the services it calls, where it came from."""
    counts: dict[str, int] = {}
    for node in definition.nodes:
        counts[node.kind] = counts.get(node.kind, 0) + 1
    kinds = ", ".join(f"{count} {_shown(kind)}{'s' if count > 1 else ''}" for kind, count in counts.items())
    parts = [f"{_header(definition)}: {len(definition.nodes)} nodes ({kinds})" if kinds else f"{_header(definition)}"]
    if definition.services:
        parts.append("calls " + ", ".join(_shown(service) for service in definition.services))
    if definition.source:
        parts.append(f"from {_shown(definition.source)}")
    return "; ".join(parts)


def validate_report(described: Described) -> tuple[list[str], int]:
    """What `saga definitions validate` prints, and its exit code: the problems and 1, or a line a definition and 0."""
    if described.problems:
        count = len(described.problems)
        files = len({problem.file for problem in described.problems})
        summary = f"{count} problem{'s' if count > 1 else ''} in {files} file{'s' if files > 1 else ''}"
        return [*problem_lines(described.problems), summary], EXIT_FAILED
    if not described.definitions:
        return ["no definition found in the files given"], EXIT_FAILED
    return [f"ok  {definition_summary(definition)}" for definition in described.definitions], 0


def choose_definition(
    definitions: Sequence[pb.SagaDefinitionInfo], name: str, version: int | None = None
) -> pb.SagaDefinitionInfo:
    """The definition of that name (the only name there is when name is empty) and version (else the
    latest, else the highest); DefinitionNotFound naming what there is."""
    names = sorted({definition.name for definition in definitions})
    if not name:
        if len(names) != 1:
            there = ", ".join(_shown(n) for n in names) if names else "none"
            raise DefinitionNotFound(f"name the definition to draw: there are {len(names)} ({there})")
        name = names[0]
    named = [definition for definition in definitions if definition.name == name]
    if not named:
        there = ", ".join(_shown(n) for n in names) if names else "none"
        raise DefinitionNotFound(f"no definition named {_shown(name)!r} (there are: {there})")
    if version is not None:
        chosen = [definition for definition in named if definition.version == version]
        if not chosen:
            versions = ", ".join(f"v{definition.version}" for definition in sorted(named, key=lambda d: d.version))
            raise DefinitionNotFound(f"{_shown(name)} has no version {version} (there are {versions})")
        return chosen[0]
    latest = [definition for definition in named if definition.latest]
    return latest[0] if latest else max(named, key=lambda definition: definition.version)


# -- the commands -------------------------------------------------------------------------------

# Paragraphs without line breaks inside: typer's rich help keeps a docstring's breaks, mid-sentence.
_GRAPH_HELP = (
    "Draw a saga definition: a tree in the terminal, DOT for graphviz, or SVG for the docs and the console.\n\n"
    "The tree shows the sequence, each parallel group with its branches, each call as action → compensation, "
    "and the markers: ◆ pivot (the last step that can be undone), ↻ retriable, ◇ conditional; waits show their "
    "timeouts and children their definitions."
)
_VALIDATE_HELP = (
    "Check YAML saga definition files offline, as the orchestrator loads them: each problem with its place.\n\n"
    "The files are read by python -m orchestrator.declarative describe, the loader the orchestrator itself uses, "
    "so what passes here loads there (given the same descriptor sets)."
)
_GRAPH_EPILOG = (
    "The tree fits 80 columns; DOT is for graphviz (dot -Tpng), SVG is drawn here, with no graphviz "
    "needed. With --file, the YAML file is read offline (python -m orchestrator.declarative describe): "
    "no orchestrator is called, and a file with problems prints them as validate does and exits 1. "
    "A definition or version that is not there exits 4 (not loaded), or 2 (not in the --file).\n\n"
    "[bold]Examples[/]\n\n"
    "  saga definitions graph OrderSaga\n\n"
    "  saga definitions graph OrderSaga --version 1 --format svg --output order-v1.svg\n\n"
    "  saga definitions graph OrderSaga --format dot | dot -Tpng -o order.png\n\n"
    "  saga definitions graph --file sagas/order-v2.yaml --format svg -o order-v2.svg"
)
_VALIDATE_EPILOG = (
    "Each problem is printed as file:line:column: message, with how to fix it on the next line. Exits 0 "
    "when every file is valid (a line per definition), 1 when any problem is found, 2 on a usage error.\n\n"
    "[bold]Examples[/]\n\n"
    "  saga definitions validate sagas/order-v1.yaml sagas/order-v2.yaml\n\n"
    "  saga definitions validate sagas/*.yaml"
)


def _described(paths: Sequence[str]) -> Described:
    try:
        return run_describe(paths)
    except DescribeFailed as error:
        fail(error.message, EXIT_FAILED)


def _write(text: str, output: Path | None, what: str) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror}", EXIT_USAGE)
    typer.echo(f"wrote {what} to {output}", err=True)


def _graph(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME",
            help="the definition, e.g. OrderSaga; may be left out when there is only one",
            show_default=False,
        ),
    ] = "",
    version: Annotated[
        int | None,
        typer.Option("--version", min=1, help="the version (default: the one new sagas start on)", show_default=False),
    ] = None,
    output_format: Annotated[GraphFormat, typer.Option("--format", "-f", help="what to draw")] = GraphFormat.TREE,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", dir_okay=False, help="write to this file, not stdout", show_default=False),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", exists=True, dir_okay=False, help="draw a YAML definition file, offline", show_default=False
        ),
    ] = None,
    *,
    config: ClientConfig,
) -> None:
    """`saga definitions graph` (its help is _GRAPH_HELP)."""
    if file is not None:
        described = _described([str(file)])
        if described.problems:
            for line in problem_lines(described.problems):
                typer.echo(line, err=True)
            raise typer.Exit(EXIT_FAILED)
        definitions, missing_exit = described.definitions, EXIT_USAGE
    else:
        from sagactl.client import SagaClient

        # Every name, not only NAME: a name that is not loaded is answered with those that are.
        with SagaClient(config) as client:
            definitions, missing_exit = client.definitions(), EXIT_REFUSED  # as `saga definitions show`
    try:
        definition = choose_definition(definitions, name, version)
    except DefinitionNotFound as error:
        fail(error.message, missing_exit)
    what = f"{_header(definition)} as {output_format.value}"
    if output_format is GraphFormat.DOT:
        _write(definition_dot(definition), output, what)
    elif output_format is GraphFormat.SVG:
        _write(definition_svg(definition), output, what)
    elif output is not None:
        _write(definition_tree_text(definition), output, what)
    else:
        new_console().print(definition_tree(definition))


def _validate(
    files: Annotated[
        list[Path],
        typer.Argument(metavar="FILE", exists=True, help="YAML definition files", show_default=False),
    ],
) -> None:
    """`saga definitions validate` (its help is _VALIDATE_HELP)."""
    lines, exit_code = validate_report(_described([str(path) for path in files]))
    for line in lines:
        typer.echo(line)
    raise typer.Exit(exit_code)


def register(app: typer.Typer) -> None:
    """Add `graph` and `validate` to the `saga definitions` sub-app."""
    app.command("graph", help=_GRAPH_HELP, epilog=_GRAPH_EPILOG)(calls_orchestrator(_graph))
    app.command("validate", help=_VALIDATE_HELP, epilog=_VALIDATE_EPILOG)(_validate)
