"""The `saga` CLI for sagas that wait, on a real stack: approve, reject, signal, show and ls of waits and children."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from devstack.stack import LocalStack
from sagactl.app import app
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.integration.test_cli import ENDED, as_json, get, ok, status, wait_saga, wait_status
from tests.integration.test_cli import stub as stub  # the fixture: a stub of this module's stack
from tests.orchestrator_helpers import definitions_env, new_order_id, order_request, start_stack

TOKEN = "cli-operator-token-0123456789abcdef"
REVIEWER_TOKEN = "cli-reviewer-token-0123456789abcdef"
CLIENT_TOKEN = "cli-client-token-0123456789abcdefgh"
# OrderSaga v2 (tests/conftest.py pins v1 for the other tests), with orders of 50.00 or more reviewed;
# SignalledOrder waits for a payment_ok signal, ParentOrder for a ShippingChild that waits for picked_up.
ORCHESTRATOR_ENV = {
    **definitions_env("SIGNALLED_ORDER_SAGA", "PARENT_ORDER_SAGA"),
    "ORDER_SAGA_VERSION": "2",
    "REVIEW_THRESHOLD": "5000",
    "OPERATOR_TOKENS": f"tester:{TOKEN},carol:{REVIEWER_TOKEN}:reviewer,shop:{CLIENT_TOKEN}:client",
}
REVIEWED = ("--amount", "90.00")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = start_stack(tmp_path_factory.mktemp("cli-long-running"), orchestrator_env=ORCHESTRATOR_ENV)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def saga(stack: LocalStack) -> Callable[..., Result]:
    """Run `saga ARGS` in-process against the module's stack, with the operator token set."""

    def run(*args: str, input: str | None = None, token: str | None = TOKEN, columns: int = 200) -> Result:
        env = {"SAGA_ADDRESS": stack.address, "SAGA_TOKEN": token, "SAGA_CA_FILE": None, "COLUMNS": str(columns)}
        return CliRunner().invoke(app, list(args), input=input, env=env)

    return run


def one_line(result: Result) -> str:
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def waiting_on(step: str) -> Callable[[pb.Saga], bool]:
    return lambda found: any(wait.step == step for wait in found.waits)


def reviewed_order(saga: Any, stub: Any, prefix: str) -> tuple[str, str]:
    """An order of OrderSaga v2 that waits for its fraud review: (order id, saga id)."""
    order_id = new_order_id(prefix)
    saga_id = as_json(ok(saga("order", "--order-id", order_id, *REVIEWED, "--no-wait", "--json")))["saga_id"]
    wait_saga(stub, saga_id, waiting_on("fraud_review"), "waiting for fraud_review")
    return order_id, saga_id


def started(stub: pb_grpc.OrchestratorServiceStub, saga_type: str, order_id: str) -> str:
    request = pb.StartSagaRequest(saga_type=saga_type, business_key=order_id)
    request.input.Pack(order_request(order_id))
    return stub.StartSaga(request, timeout=10).saga_id


# -- approvals ------------------------------------------------------------------------------------


def test_approve_by_order_id_then_show_the_order_and_its_child(saga: Any, stub: Any) -> None:
    order_id, saga_id = reviewed_order(saga, stub, "cli-approve")

    text = ok(saga("show", order_id)).stdout
    assert "\nwaiting for\n" in text and "approval fraud_review by reviewer since" in text, text
    assert f"saga approve|reject {saga_id} --step fraud_review" in text
    assert re.search(r"⧗ │ fraud_review\s*│ approval\s*│ waiting", text), text
    assert re.search(r"│\s+reserve_stock\s*│ branch 1\s*│ succeeded", text), text
    shown = as_json(ok(saga("show", order_id, "--json")))
    (wait,) = shown["waits"]
    assert (wait["kind"], wait["step"], wait["signal"], wait["branch"]) == ("approval", "fraud_review", "reviewer", 0)
    assert wait["since"] and wait["until"] and wait["description"].startswith("approval fraud_review")
    kinds = {step["name"]: (step["kind"], step["group"], step["branch"]) for step in shown["steps"]}
    assert kinds["charge_payment"] == ("call", "reserve_and_charge", 2) and kinds["fulfilment"][0] == "child"
    assert (shown["parent_saga_id"], shown["children"]) == ("", [])

    # A decision needs a token of the approval's role (or operator's).
    assert "UNAUTHENTICATED" in one_line(ok(saga("approve", order_id, token=None), code=4))
    assert "APPROVAL_ROLE_REQUIRED" in one_line(ok(saga("approve", order_id, token=CLIENT_TOKEN), code=4))

    decided = ok(saga("approve", order_id, "--reason", "known customer", token=REVIEWER_TOKEN)).stdout
    assert re.fullmatch(
        rf"approve: fraud_review of saga {saga_id} \(order {order_id}\) approved; the saga is (RUNNING|COMPLETED)\n",
        decided,
    ), decided
    wait_status(stub, saga_id, ENDED)
    again = as_json(ok(saga("approve", saga_id, "--step", "fraud_review", "--json")))
    assert (again["saga_id"], again["decision"], again["duplicate"]) == (saga_id, "approved", True)
    assert again["saga"]["status"] == "COMPLETED" and "history" not in again["saga"]
    assert (
        "was approved before, and that decision stands" in ok(saga("approve", saga_id, "--step", "fraud_review")).stdout
    )
    changed = one_line(ok(saga("reject", saga_id, "--step", "fraud_review", "--reason", "second thoughts"), code=4))
    assert "SIGNAL_ID_REUSED" in changed and "was approved before, and a decision cannot be changed" in changed
    # Nothing waits any more: the step must be named.
    assert "waits for no approval now" in one_line(ok(saga("approve", saga_id), code=2))

    history = as_json(ok(saga("show", saga_id, "--json")))["history"]
    decision = next(event for event in history if event["type"] == "ApprovalDecided")
    assert (decision["code"], decision["actor"]) == ("APPROVED", "carol")

    # The order id names the OrderSaga and its FulfilmentSaga child: show takes the order's.
    text = ok(saga("show", order_id)).stdout
    assert text.startswith("OrderSaga v2  ") and "\nchildren\n" in text and "waiting for" not in text, text
    child = as_json(ok(saga("show", order_id, "--json")))["children"]
    assert [(c["step"], c["saga_type"], c["status"]) for c in child] == [("fulfilment", "FulfilmentSaga", "COMPLETED")]
    child_id = child[0]["saga_id"]
    assert re.search(rf"fulfilment\s*│ {child_id}\s*│ FulfilmentSaga\s*│ COMPLETED", text), text
    child_text = ok(saga("show", child_id)).stdout
    assert child_text.startswith("FulfilmentSaga v1  ") and f"\n  child of saga {saga_id}\n" in child_text
    assert as_json(ok(saga("show", child_id, "--json")))["parent_saga_id"] == saga_id

    # ls marks the child, by short ids; on 80 columns too, with nothing cut.
    listed = as_json(ok(saga("ls", "--order", order_id, "--json")))["sagas"]
    assert {s["saga_type"]: s["parent_saga_id"] for s in listed} == {"FulfilmentSaga": saga_id, "OrderSaga": ""}
    assert [c["saga_id"] for s in listed for c in s["children"]] == [child_id]
    wide = ok(saga("ls", "--order", order_id)).stdout
    assert re.search(rf"^{child_id[:8]}\s+↳ FulfilmentSaga v1\s+{order_id}\s+COMPLETED", wide, re.M), wide
    assert re.search(rf"^{saga_id[:8]}\s+OrderSaga v2\s+{order_id}\s+COMPLETED", wide, re.M), wide
    narrow = ok(saga("ls", "--order", order_id, columns=80)).stdout
    assert max(map(len, narrow.splitlines())) <= 80 and "…" not in narrow, narrow
    assert re.search(rf"^{child_id[:8]}\s+↳ Fulfilment(Saga)? v1\s.*COMPLETED", narrow, re.M), narrow
    assert re.search(rf"^{saga_id[:8]}\s+Order(Saga)? v2\s.*COMPLETED", narrow, re.M), narrow
    # A short id names its saga in every command.
    assert ok(saga("show", child_id[:8])).stdout == child_text


def test_reject_needs_a_reason_and_compensates(saga: Any, stub: Any) -> None:
    order_id, saga_id = reviewed_order(saga, stub, "cli-reject")
    assert "--reason" in ok(saga("reject", order_id), code=2).stderr
    decided = as_json(ok(saga("reject", order_id, "--reason", "stolen card", "--json")))
    assert (decided["step"], decided["decision"], decided["duplicate"]) == ("fraud_review", "rejected", False)
    assert status(wait_status(stub, saga_id, ENDED)) == "COMPENSATED"
    text = ok(saga("show", saga_id)).stdout
    assert "last error: fraud_review rejected by tester: stolen card" in text, text
    assert re.search(r"✗ │ fraud_review\s*│ approval\s*│ failed", text), text
    assert re.search(r"↺ │\s+charge_payment\s*│ branch 2\s*│ compensated", text), text
    assert "was rejected before" in ok(saga("reject", saga_id, "--step", "fraud_review", "--reason", "again")).stdout


# -- signals and children -------------------------------------------------------------------------


def test_signal_is_delivered_once_by_id_or_by_type_and_key(saga: Any, stub: Any) -> None:
    order_id = new_order_id("cli-signal")
    saga_id = started(stub, "SignalledOrder", order_id)
    refused = one_line(ok(saga("signal", saga_id, "no_such_signal"), code=4))
    assert "SIGNAL_NOT_AWAITED" in refused and "payment_ok" in refused

    # Sent before the saga's wait began (it cools off first): kept, and consumed when the wait begins.
    payload = '{"token": "tok_visa", "note": "confirmed"}'
    first = ok(saga("signal", order_id, "payment_ok", "--payload", payload)).stdout
    signal_id = re.fullmatch(rf"signal: payment_ok delivered to saga {saga_id} \(signal id (cli-[0-9a-f]+)\)\n", first)
    assert signal_id, first
    # The same command again is the same delivery; so is the same payload by type and key, keys in another order.
    again = ok(saga("signal", order_id, "payment_ok", "--payload", payload)).stdout
    assert "before, at" in again and "a repeat, not sent again" in again and signal_id.group(1) in again, again
    by_key = as_json(
        ok(
            saga(
                "signal", "--type", "SignalledOrder", "--key", order_id, "payment_ok",
                "--payload-file", "-", "--json",
                input='{"note": "confirmed", "token": "tok_visa"}',
            )
        )
    )  # fmt: skip
    assert by_key["saga_id"] == saga_id and by_key["duplicate"] is True and by_key["signal_id"] == signal_id.group(1)
    assert by_key["name"] == "payment_ok" and by_key["received_at"].endswith("Z")
    reused = one_line(ok(saga("signal", saga_id, "payment_ok", "--signal-id", signal_id.group(1)), code=4))
    assert "SIGNAL_ID_REUSED" in reused

    # The payload reached the charge step: the saga charged the token it carried.
    assert status(wait_status(stub, saga_id, ENDED)) == "COMPLETED"
    history = [event.type for event in get(stub, saga_id).history]
    assert history.count("SignalReceived") == 1 and history.count("SignalConsumed") == 1, history
    assert "SAGA_ENDED" in one_line(ok(saga("signal", saga_id, "payment_ok", "--signal-id", "late-1"), code=4))


def test_signal_refuses_bad_arguments_as_usage_errors(saga: Any, tmp_path: Path) -> None:
    usage_errors = {
        ("signal", "x", "payment_ok", "--payload", "[1]"): "expected a JSON object, got list",
        ("signal", "x", "payment_ok", "--payload", "{nope"): "not JSON",
        ("signal", "x", "payment_ok", "--payload", '{"a": NaN}'): "NaN is not a JSON number",
        ("signal", "x", "payment_ok", "--payload", "{}", "--payload-file", "-"): "not both",
        ("signal", "x", "payment_ok", "--payload-file", str(tmp_path / "missing.json")): "cannot read",
        ("signal", "--type", "SignalledOrder", "payment_ok"): "--type and --key go together",
        ("signal", "--type", "SignalledOrder", "--key", "k", "x", "payment_ok"): "give NAME alone",
        ("signal", "x"): "give the saga's ID and the signal NAME",
    }
    for args, message in usage_errors.items():
        result = ok(saga(*args), code=2)
        assert message in " ".join(result.stderr.replace("│", " ").split()), (args, result.stderr)


def test_show_a_parent_waiting_for_its_child_and_signal_the_child_by_type_and_key(saga: Any, stub: Any) -> None:
    order_id = new_order_id("cli-parent")
    parent_id = started(stub, "ParentOrder", order_id)
    parent = wait_saga(stub, parent_id, waiting_on("shipping"), "waiting for its child")
    child_id = parent.children[0].saga_id
    wait_saga(stub, child_id, waiting_on("await_pickup"), "its child waiting for picked_up")

    # The order id names the parent and its child: show takes the parent.
    text = ok(saga("show", order_id)).stdout
    assert text.startswith("ParentOrder v1  ") and f"child ShippingChild {child_id} running since" in text, text
    assert f"saga show {child_id}" in text and re.search(
        rf"shipping\s*│ {child_id}\s*│ ShippingChild\s*│ RUNNING", text
    )
    child_text = ok(saga("show", child_id)).stdout
    assert f"child of saga {parent_id}" in child_text and "signal picked_up since" in child_text, child_text
    assert f"saga signal {child_id} picked_up" in child_text

    answer = ok(saga("signal", "--type", "ShippingChild", "--key", order_id, "picked_up", "--signal-id", "pickup-1"))
    assert answer.stdout == f"signal: picked_up delivered to saga {child_id} (signal id pickup-1)\n"
    assert status(wait_status(stub, parent_id, ENDED)) == "COMPLETED"
    assert status(get(stub, child_id)) == "COMPLETED"


# -- the demo -------------------------------------------------------------------------------------


def test_the_demo_approves_one_order_rejects_another_and_shows_the_child(tmp_path: Path) -> None:
    # The demo runs OrderSaga v2 whatever the environment says (tests/conftest.py pins v1).
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("ORDER_SAGA_VERSION", None)
    demo = subprocess.run(
        [sys.executable, "-m", "sagactl.main", "demo", "--data-dir", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = demo.stdout
    assert demo.returncode == 0, f"{output}\n{demo.stderr}"
    lines = output.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    flat = " ".join(output.split())
    approved = re.search(r"\$ saga approve ([0-9a-f]{32}) --reason 'verified by phone'", output)
    rejected = re.search(r"\$ saga reject ([0-9a-f]{32}) --reason 'card reported stolen'", output)
    assert approved and rejected, output
    assert f"approve: fraud_review of saga {approved.group(1)}" in flat and " approved; the saga is" in flat
    assert f"reject: fraud_review of saga {rejected.group(1)}" in flat and " rejected; the saga is" in flat
    assert "fraud review, approved: COMPLETED" in output and "fraud review, rejected: COMPENSATED" in output
    assert "last error: fraud_review rejected by demo: card reported stolen" in flat
    # The approved order's child saga, linked both ways.
    assert "child saga, started by step fulfilment:" in output
    assert f"child of saga {approved.group(1)}" in output
    assert re.search(r"fulfilment\s*│ [0-9a-f]{32}\s*│ FulfilmentSaga\s*│ COMPLETED", output), output
