"""The definition graph (a terminal tree, DOT and SVG) of the order saga's two versions, hostile names, and the
validate output, from SagaDefinitionInfo protos built here and a stand-in for the describe tool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import pytest
import typer
from google.protobuf import json_format
from typer.testing import CliRunner

from sagactl import definition_graph
from sagactl.definition_graph import (
    DefinitionNotFound,
    Described,
    DescribeFailed,
    NodeState,
    Problem,
    choose_definition,
    definition_dot,
    definition_svg,
    definition_tree_text,
    describe_command,
    duration_words,
    parse_described,
    problem_lines,
    run_describe,
    validate_report,
)
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb

SVG = "{http://www.w3.org/2000/svg}"
INVENTORY = "inventory/sagasuite.inventory.v1.InventoryService"
PAYMENT = "payment/sagasuite.payment.v1.PaymentService"
SHIPPING = "shipping/sagasuite.shipping.v1.ShippingService"
NOTIFY = "notify/sagasuite.notify.v1.NotifyService"
HOSTILE = '<script>alert("x")</script>&amp;'


def call(name: str, target: str, method: str, undo: str = "", **more: Any) -> pb.DefinitionNode:
    kind = "compensatable" if undo else "retriable"
    compensation = f"{target}/{undo}" if undo else ""
    return pb.DefinitionNode(
        name=name, kind="call", step_kind=kind, action=f"{target}/{method}", compensation=compensation, **more
    )


def definition(name: str, version: int, nodes: list[pb.DefinitionNode], **more: Any) -> pb.SagaDefinitionInfo:
    for index, node in enumerate(nodes):
        node.index = index
    return pb.SagaDefinitionInfo(
        name=name, version=version, input_type="sagasuite.orchestrator.v1.PlaceOrderRequest", nodes=nodes, **more
    )


def order_v1() -> pb.SagaDefinitionInfo:
    return definition(
        "OrderSaga",
        1,
        [
            call("reserve_stock", INVENTORY, "ReserveStock", "ReleaseStock"),
            call("charge_payment", PAYMENT, "Charge", "Refund"),
            call("create_shipment", SHIPPING, "CreateShipment", "CancelShipment", pivot=True),
            call("send_confirmation", NOTIFY, "SendConfirmation"),
        ],
    )


def order_v2() -> pb.SagaDefinitionInfo:
    return definition(
        "OrderSaga",
        2,
        [
            pb.DefinitionNode(name="reserve_and_charge", kind="parallel"),
            call("reserve_stock", INVENTORY, "ReserveStock", "ReleaseStock", group="reserve_and_charge", branch=1),
            call("charge_payment", PAYMENT, "Charge", "Refund", group="reserve_and_charge", branch=2),
            pb.DefinitionNode(
                name="fraud_review", kind="approval", signal="reviewer", timeout_seconds=86400, conditional=True
            ),
            pb.DefinitionNode(
                name="fulfilment", kind="child", step_kind="compensatable", child="FulfilmentSaga v1", pivot=True
            ),
        ],
        deadline_seconds=90000,
        latest=True,
    )


def hostile() -> pb.SagaDefinitionInfo:
    """Names and targets an attacker chose: markup, quotes, DOT escapes, a terminal escape, a NUL."""
    return definition(
        f"Evil{HOSTILE}",
        1,
        [
            call(HOSTILE, 'evil/x.Evil"Service', "Do\\N", "Undo"),
            pb.DefinitionNode(name="wait\x1b[2J\x00\u202e", kind="signal", signal="<b>", timeout_seconds=60),
        ],
    )


# -- the tree -----------------------------------------------------------------------------------


def test_the_tree_of_v1_is_the_sequence_with_each_action_and_its_compensation_in_80_columns() -> None:
    assert definition_tree_text(order_v1(), width=80) == (
        "OrderSaga v1\n"
        "input sagasuite.orchestrator.v1.PlaceOrderRequest\n"
        "├── reserve_stock      InventoryService.ReserveStock → ReleaseStock\n"
        "├── charge_payment     PaymentService.Charge → Refund\n"
        "├── create_shipment    ShippingService.CreateShipment → CancelShipment  ◆ pivot\n"
        "└── send_confirmation  NotifyService.SendConfirmation  ↻ retriable\n"
    )


def test_the_tree_of_v2_nests_the_branches_under_their_group_and_marks_waits_and_the_child() -> None:
    assert definition_tree_text(order_v2(), width=80) == (
        "OrderSaga v2  latest\n"
        "input sagasuite.orchestrator.v1.PlaceOrderRequest · deadline 1d1h\n"
        "├── reserve_and_charge  parallel: 2 branches, joined when all end\n"
        "│   ├── branch 1\n"
        "│   │   └── reserve_stock  InventoryService.ReserveStock → ReleaseStock\n"
        "│   └── branch 2\n"
        "│       └── charge_payment  PaymentService.Charge → Refund\n"
        "├── fraud_review        approval by reviewer, timeout 1d  ◇ conditional\n"
        "└── fulfilment          child saga FulfilmentSaga v1  ◆ pivot\n"
    )


def test_the_tree_wraps_inside_its_guides_at_any_width_and_shows_states() -> None:
    for width in (50, 80):
        text = definition_tree_text(hostile(), width=width, states={HOSTILE: NodeState.DONE})
        assert max(map(len, text.splitlines())) <= width, text
        # A terminal escape or a bidi override in a name is printed as text, never sent to the terminal.
        assert "\x1b" not in text and "\x00" not in text and "\u202e" not in text
        assert "\\x1b[2J\\x00\\u202e" in text and "✓" in text and "done" in text
    lines = definition_tree_text(order_v2(), width=80, states={"reserve_stock": "failed", "x": "bogus"}).splitlines()
    assert "✗ reserve_stock" in lines[4] and lines[5].strip("│ ") == "failed"  # wrapped under its guide
    assert "· charge_payment" in lines[7]  # a node the map leaves out is pending


# -- DOT ----------------------------------------------------------------------------------------


def test_the_dot_has_a_box_per_node_dashed_compensations_and_a_cluster_from_fork_to_join() -> None:
    dot = definition_dot(order_v2())
    assert dot.startswith("digraph saga {") and dot.count("{") == dot.count("}")
    for node in order_v2().nodes:
        assert re.search(rf"^\s*n{node.index} \[label=\"", dot, re.MULTILINE), node.name
    assert len(re.findall(r"-> n\d+_undo \[style=dashed", dot)) == 2
    assert "subgraph cluster_n0 {" in dot and "cluster_n0_b1" in dot and "cluster_n0_b2" in dot
    # Fork and join edges stand outside the branch clusters, so graphviz keeps the fork above them.
    branch_one = dot[dot.index("subgraph cluster_n0_b1") : dot.index("subgraph cluster_n0_b2")]
    assert "n0 ->" not in branch_one.split("}")[0]
    assert re.findall(r"(\w+) -> (\w+);", dot) == [
        ("n0", "n1"), ("n1", "n0_join"), ("n0", "n2"), ("n2", "n0_join"),
        ("start", "n0"), ("n0_join", "n3"), ("n3", "n4"), ("n4", "end"),
    ]  # fmt: skip
    v1 = definition_dot(order_v1())
    assert len(re.findall(r"style=dashed", v1)) == 3 and "penwidth=2" in v1 and "retriable" in v1


def test_the_dot_quotes_every_name() -> None:
    dot = definition_dot(hostile())
    # Quotes are escaped and backslashes doubled (so \N stays text, not graphviz's node name).
    assert '<script>alert(\\"x\\")</script>' in dot and 'Evil\\"Service.Do\\\\N' in dot
    assert not re.search(r"[\x00-\x08\x0b-\x1f\u202e]", dot)
    # Outside its quoted strings, no line holds a quote: no name ends a string early.
    assert '"' not in re.sub(r'"(?:[^"\\]|\\.)*"', "", dot)


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed")
def test_graphviz_reads_the_dot() -> None:
    for info in (order_v1(), order_v2(), hostile()):
        subprocess.run(["dot", "-Tsvg"], input=definition_dot(info), capture_output=True, text=True, check=True)


# -- SVG ----------------------------------------------------------------------------------------


def parsed(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def node_boxes(root: ET.Element) -> dict[str, ET.Element]:
    """Each node's group by its name."""
    return {group.attrib["data-node"]: group for group in root.iter(f"{SVG}g") if "data-node" in group.attrib}


def rect(group: ET.Element) -> tuple[float, float, float, float]:
    first = group.find(f"{SVG}rect")
    assert first is not None
    return tuple(float(first.attrib[key]) for key in ("x", "y", "width", "height"))  # type: ignore[return-value]


def fill(group: ET.Element) -> str:
    first = group.find(f"{SVG}rect")
    assert first is not None
    return first.attrib["fill"]


def test_the_svg_of_v1_is_a_column_with_each_compensation_beside_its_action() -> None:
    root = parsed(definition_svg(order_v1()))
    assert root.tag == f"{SVG}svg"
    boxes = node_boxes(root)
    assert list(boxes) == [node.name for node in order_v1().nodes]
    tops = [rect(group)[1] for group in boxes.values()]
    assert tops == sorted(tops) and len(set(tops)) == 4  # top to bottom
    assert len({rect(group)[0] for group in boxes.values()}) == 1  # one column
    dashed = [line for line in root.iter(f"{SVG}line") if "compensation-edge" in line.attrib.get("class", "")]
    undo = [r for r in root.iter(f"{SVG}rect") if r.attrib.get("class") == "compensation"]
    assert len(undo) == 3 and len(dashed) == 4  # three in the drawing, one in the legend
    for name, box in zip(["reserve_stock", "charge_payment", "create_shipment"], undo, strict=True):
        x, y, width, height = rect(boxes[name])
        assert float(box.attrib["x"]) > x + width  # beside, to the right
        assert abs(float(box.attrib["y"]) + float(box.attrib["height"]) / 2 - (y + height / 2)) < 0.5
        assert "stroke-dasharray" in box.attrib
    texts = " ".join(text.text or "" for text in root.iter(f"{SVG}text"))
    for words in ("InventoryService.ReleaseStock", "ShippingService.CancelShipment", "pivot", "retriable"):
        assert words in texts


def test_the_svg_of_v2_puts_the_branches_side_by_side_between_fork_and_join() -> None:
    root = parsed(definition_svg(order_v2()))
    boxes = node_boxes(root)
    assert sorted(boxes) == sorted(node.name for node in order_v2().nodes)
    assert boxes["reserve_and_charge"].attrib["data-kind"] == "parallel"
    reserve, charge = rect(boxes["reserve_stock"]), rect(boxes["charge_payment"])
    assert reserve[1] == charge[1] and charge[0] > reserve[0] + reserve[2]  # side by side
    fork = rect(boxes["reserve_and_charge"])
    join = next(r for r in root.iter(f"{SVG}rect") if r.attrib.get("class") == "join")
    group = next(r for r in root.iter(f"{SVG}rect") if r.attrib.get("class") == "parallel-group")
    assert fork[1] < reserve[1] and float(join.attrib["y"]) > reserve[1] + reserve[3]
    group_bottom = float(group.attrib["y"]) + float(group.attrib["height"])
    review, child = rect(boxes["fraud_review"]), rect(boxes["fulfilment"])
    assert group_bottom < review[1] < child[1]
    assert "conditional" in " ".join(t.text or "" for t in boxes["fraud_review"].iter(f"{SVG}text"))
    assert boxes["fraud_review"].find(f"{SVG}path") is not None  # the condition's diamond
    assert len(boxes["fulfilment"].findall(f"{SVG}rect")) == 2  # a child saga: a double border


def test_the_svg_escapes_every_name() -> None:
    svg = definition_svg(hostile(), {HOSTILE: "done"}, id_prefix='x"><script>')
    root = parsed(svg)
    assert not [element for element in root.iter() if element.tag.split("}")[-1] in ("script", "b", "foreignObject")]
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    boxes = node_boxes(root)
    assert HOSTILE in boxes and boxes[HOSTILE].attrib["data-state"] == "done"
    assert "wait\\x1b[2J\\x00\\u202e" in boxes  # a control character is shown as its escape
    assert {element.attrib["id"] for element in root.iter() if "id" in element.attrib} <= {
        "xscript-title", "xscript-arrow", "xscript-undo", "xscript-node-0", "xscript-node-1",
    }  # fmt: skip
    title = root.find(f"{SVG}title")
    assert title is not None and title.text == f"Evil{HOSTILE} v1"


def test_the_svg_colours_nodes_by_state_for_one_sagas_page() -> None:
    states = {"reserve_and_charge": NodeState.DONE, "reserve_stock": NodeState.COMPENSATED, "charge_payment": "failed"}
    root = parsed(definition_svg(order_v2(), states, id_prefix="saga-1"))
    boxes = node_boxes(root)
    assert {name: group.attrib["data-state"] for name, group in boxes.items()} == {
        "reserve_and_charge": "done", "reserve_stock": "compensated", "charge_payment": "failed",
        "fraud_review": "pending", "fulfilment": "pending",
    }  # fmt: skip
    assert "state-failed" in boxes["charge_payment"].attrib["class"].split()
    fills = {name: fill(group) for name, group in boxes.items()}
    assert fills["reserve_stock"] != fills["fraud_review"] != fills["charge_payment"]
    undo = boxes["reserve_stock"].find(f"{SVG}rect[@class='compensation']")
    assert undo is not None and undo.attrib["fill"] == fills["reserve_stock"]  # undone: its compensation ran
    legend = {r.attrib["class"] for r in root.iter(f"{SVG}rect") if r.attrib.get("class", "").startswith("legend-")}
    assert legend == {f"legend-{state.value}" for state in NodeState}
    # Without states nothing is marked, and two drawings on one page keep their ids apart.
    plain = parsed(definition_svg(order_v2(), legend=False))
    assert not [g for g in plain.iter(f"{SVG}g") if "data-state" in g.attrib]
    assert {e.attrib["id"] for e in root.iter() if "id" in e.attrib}.isdisjoint(
        {e.attrib["id"] for e in plain.iter() if "id" in e.attrib}
    )


def test_an_empty_or_malformed_listing_is_still_drawn() -> None:
    stray = definition("Odd", 1, [pb.DefinitionNode(name="lost", kind="call", group="nowhere", branch=1)])
    no_branches = definition("Bare", 1, [pb.DefinitionNode(name="fork_alone", kind="parallel")])
    for info in (definition("Empty", 1, []), stray, no_branches):
        assert len(node_boxes(parsed(definition_svg(info)))) == len(info.nodes)
        assert definition_dot(info).endswith("}\n")
        assert definition_tree_text(info, width=80).startswith(f"{info.name} v1\n")


def test_durations_read_in_at_most_two_units() -> None:
    assert [duration_words(s) for s in (0, 0.25, 1.5, 90, 3600, 90000, 7 * 86400)] == [
        "0s", "250ms", "1.5s", "1m30s", "1h", "1d1h", "7d",
    ]  # fmt: skip


# -- choosing, describing, validating -----------------------------------------------------------


def test_the_definition_drawn_is_the_one_named_at_its_latest_version_unless_told() -> None:
    fulfilment = definition("FulfilmentSaga", 1, [])
    both = [order_v1(), order_v2(), fulfilment]
    assert choose_definition(both, "OrderSaga").version == 2
    assert choose_definition(both, "OrderSaga", 1).version == 1
    assert choose_definition([order_v1(), order_v2()], "").version == 2  # the only name there is
    assert choose_definition([fulfilment], "").name == "FulfilmentSaga"
    for name, version, message in (
        ("Nope", 0, "no definition named 'Nope' (there are: FulfilmentSaga, OrderSaga)"),
        ("OrderSaga", 3, "OrderSaga has no version 3 (there are v1, v2)"),
        ("", 0, "name the definition to draw: there are 2 (FulfilmentSaga, OrderSaga)"),
    ):
        with pytest.raises(DefinitionNotFound) as raised:
            choose_definition(both, name, version)
        assert raised.value.message == message


def answer(problems: list[dict[str, Any]], definitions: Sequence[pb.SagaDefinitionInfo] = ()) -> str:
    return json.dumps({"problems": problems, "definitions": [json_format.MessageToDict(d) for d in definitions]})


V2_SUMMARY = "OrderSaga v2: 5 nodes (1 parallel, 2 calls, 1 approval, 1 child)"
PROBLEMS: list[dict[str, Any]] = [
    {"file": "sagas/order.yaml", "line": 12, "column": 7, "message": "step charge has no compensate:",
     "hint": "add compensate: with a call, or kind: retriable after the pivot"},
    {"file": "sagas/order.yaml", "line": 30, "column": 0, "message": "wait review has no timeout", "hint": ""},
    {"file": "sagas/other.yaml", "line": 0, "column": 0, "message": "not YAML:\x1b[2J"},
]  # fmt: skip


def test_validate_prints_each_problem_where_it_is_with_its_hint_and_exits_1() -> None:
    described = parse_described(answer(PROBLEMS), "", 1)
    assert described.problems[0] == Problem("sagas/order.yaml", 12, 7, PROBLEMS[0]["message"], PROBLEMS[0]["hint"])
    lines, exit_code = validate_report(described)
    assert exit_code == 1
    assert lines == [
        "sagas/order.yaml:12:7: step charge has no compensate:",
        "    hint: add compensate: with a call, or kind: retriable after the pivot",
        "sagas/order.yaml:30: wait review has no timeout",
        "sagas/other.yaml: not YAML:\\x1b[2J",
        "3 problems in 2 files",
    ]
    assert problem_lines([]) == []


def test_validate_of_valid_files_prints_a_line_a_definition_and_exits_0() -> None:
    described = parse_described(answer([], [order_v1(), order_v2()]))
    assert [json_format.MessageToDict(d) for d in described.definitions] == [
        json_format.MessageToDict(d) for d in (order_v1(), order_v2())
    ]
    lines, exit_code = validate_report(described)
    assert exit_code == 0
    assert lines == [
        "ok  OrderSaga v1: 4 nodes (4 calls)",
        f"ok  {V2_SUMMARY}",
    ]
    assert validate_report(Described([], [])) == (["no definition found in the files given"], 1)


def test_the_describe_tool_runs_as_this_python_and_a_broken_answer_is_a_clear_failure() -> None:
    seen: list[list[str]] = []

    def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        assert options["capture_output"] and options["text"] and options["timeout"] > 0
        return subprocess.CompletedProcess(command, 1, answer(PROBLEMS[:1]), "")

    assert run_describe(["a.yaml", "b.yaml"], run).problems[0].line == 12
    assert seen == [[sys.executable, "-m", "orchestrator.declarative", "describe", "a.yaml", "b.yaml"]]
    assert describe_command(["x"]) == [*seen[0][:4], "x"]
    for stdout, stderr, message in (
        ("", "Traceback...\nValueError: boom\n", "describe failed (exit 1): ValueError: boom"),
        ("[]", "", "describe failed (exit 1) and printed no JSON answer"),
        ("", "ModuleNotFoundError: No module named 'orchestrator'", "this installation has no orchestrator."),
        ('{"definitions": [{"nodes": 3}]}', "", "printed a definition this CLI cannot read"),
    ):
        with pytest.raises(DescribeFailed, match=re.escape(message)):
            parse_described(stdout, stderr, 1)


def test_the_commands_draw_a_file_offline_and_validate(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    app = typer.Typer()
    definition_graph.register(app)
    answers = {"good.yaml": Described([], [order_v2()]), "bad.yaml": parse_described(answer(PROBLEMS[:1]))}
    monkeypatch.setattr(definition_graph, "run_describe", lambda paths: answers[paths[-1].rsplit("/", 1)[-1]])
    for name in answers:
        (tmp_path / name).write_text("document: {}\n")
    runner = CliRunner()
    drawn = runner.invoke(app, ["graph", "--file", str(tmp_path / "good.yaml")], env={"COLUMNS": "80"})
    assert drawn.exit_code == 0 and "│   │   └── reserve_stock" in drawn.stdout, drawn.output
    svg_file = tmp_path / "out.svg"
    written = runner.invoke(app, ["graph", "OrderSaga", "--file", str(tmp_path / "good.yaml"), "-f", "svg", "-o",
                                  str(svg_file)])  # fmt: skip
    assert written.exit_code == 0 and len(node_boxes(parsed(svg_file.read_text()))) == 5, written.output
    missing = runner.invoke(app, ["graph", "Nope", "--file", str(tmp_path / "good.yaml")])
    assert missing.exit_code == 2 and "no definition named 'Nope'" in missing.stderr
    refused = runner.invoke(app, ["graph", "--file", str(tmp_path / "bad.yaml"), "-f", "dot"])
    assert refused.exit_code == 1 and "order.yaml:12:7: step charge" in refused.stderr and refused.stdout == ""
    valid = runner.invoke(app, ["validate", str(tmp_path / "good.yaml")])
    assert valid.exit_code == 0 and valid.stdout == f"ok  {V2_SUMMARY}\n"
    invalid = runner.invoke(app, ["validate", str(tmp_path / "bad.yaml")])
    assert invalid.exit_code == 1 and invalid.stdout.splitlines()[-1] == "1 problem in 1 file"
    assert runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")]).exit_code == 2


class LoadedDefinitions:
    """A stand-in for SagaClient that has OrderSaga v1 and v2 loaded."""

    def __init__(self, config: object) -> None:
        self.config = config

    def __enter__(self) -> LoadedDefinitions:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def definitions(self, name: str = "") -> list[pb.SagaDefinitionInfo]:
        return [d for d in (order_v1(), order_v2()) if d.name == name or not name]


def test_the_graph_command_draws_a_loaded_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    import sagactl.client

    monkeypatch.setattr(sagactl.client, "SagaClient", LoadedDefinitions)
    app = typer.Typer()
    definition_graph.register(app)
    runner = CliRunner()
    latest = runner.invoke(app, ["graph", "OrderSaga"], env={"COLUMNS": "80"})
    assert latest.exit_code == 0 and latest.stdout.startswith("OrderSaga v2"), latest.output
    dot = runner.invoke(app, ["graph", "OrderSaga", "--version", "1", "--format", "dot"])
    assert dot.exit_code == 0 and dot.stdout == definition_dot(order_v1())
    for args, message in ((["Nope"], "no definition named 'Nope'"), (["OrderSaga", "--version", "7"], "no version 7")):
        missing = runner.invoke(app, ["graph", *args])
        assert missing.exit_code == 4 and message in missing.stderr, missing.output
