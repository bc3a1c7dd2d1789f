"""The `saga` CLI against a real local stack: each command through its text output, its --json form and exit code."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner, Result

from devstack.stack import LocalStack
from sagactl.app import app
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.orchestrator_helpers import frozen, new_order_id, start_stack

TOKEN = "cli-test-token-0123456789abcdef"
FAULTS = {
    # Orders marked cli-slow spend a second in ReserveStock (its call timeout is 2 s): long enough to be caught running.
    "inventory": "ReserveStock:latency_ms=1000,order_contains=cli-slow",
    # Orders marked cli-flaky are charged on the third try (UNAVAILABLE is retried).
    "payment": "Charge:fail_first=2,order_contains=cli-flaky",
    # Orders marked cli-attn are refused once by notify, non-retryably: the saga needs attention.
    "notify": "SendConfirmation:fail_first=1,code=FAILED_PRECONDITION,order_contains=cli-attn",
}
ENDED = {"COMPLETED", "COMPENSATED", "NEEDS_ATTENTION", "TERMINATED"}
WAIT_SECONDS = 30.0
PANEL_ROW = r"(inventory|payment|shipping|notify|orchestrator)\s+127\.0\.0\.1:(\d+)\s+(\d+)\s+SERVING"
COMMANDS = [
    "up",
    "order",
    "ls",
    "show",
    "watch",
    "stats",
    "retry",
    "pause",
    "resume",
    "cancel",
    "terminate",
    "approve",
    "reject",
    "signal",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = start_stack(
        tmp_path_factory.mktemp("cli"),
        faults=FAULTS,
        orchestrator_env={"OPERATOR_TOKENS": f"tester:{TOKEN}"},
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def stub(stack: LocalStack) -> Iterator[pb_grpc.OrchestratorServiceStub]:
    with grpc.insecure_channel(stack.address) as channel:
        yield pb_grpc.OrchestratorServiceStub(channel)


@pytest.fixture
def saga(stack: LocalStack) -> Any:
    """Run `saga ARGS` in-process against the module's stack, with the operator token set."""

    def run(*args: str, input: str | None = None, token: str | None = TOKEN, address: str | None = None) -> Result:
        env = {"SAGA_ADDRESS": address or stack.address, "SAGA_TOKEN": token, "SAGA_CA_FILE": None, "COLUMNS": "200"}
        return CliRunner().invoke(app, list(args), input=input, env=env)

    return run


def ok(result: Result, code: int = 0) -> Result:
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def get(stub: pb_grpc.OrchestratorServiceStub, saga_id: str) -> pb.Saga:
    return stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10).saga


def status(saga: pb.Saga) -> str:
    return pb.SagaStatus.Name(saga.status).removeprefix("SAGA_STATUS_")


def wait_saga(
    stub: pb_grpc.OrchestratorServiceStub, saga_id: str, condition: Callable[[pb.Saga], bool], what: str
) -> pb.Saga:
    """Poll GetSaga until condition holds; fail with the saga's history after WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = get(stub, saga_id)
        if condition(found):
            return found
        if time.monotonic() > deadline:
            history = "\n".join(f"  {e.seq} {e.type} {e.step} {e.code} {e.message}" for e in found.history)
            pytest.fail(f"saga {saga_id} is {status(found)}, not {what}, after {WAIT_SECONDS:.0f}s:\n{history}")
        time.sleep(0.05)


def wait_status(stub: pb_grpc.OrchestratorServiceStub, saga_id: str, wanted: set[str]) -> pb.Saga:
    return wait_saga(stub, saga_id, lambda found: status(found) in wanted, str(wanted))


def placed(saga: Any, prefix: str, *extra: str) -> tuple[str, str]:
    """Place an order with --no-wait --json; returns (order id, saga id)."""
    order_id = new_order_id(prefix)
    reply = as_json(ok(saga("order", "--order-id", order_id, "--no-wait", "--json", *extra)))
    assert reply["order_id"] == order_id and reply["created"] is True
    return order_id, reply["saga_id"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- order ---------------------------------------------------------------------------------------


def test_order_prints_the_saga_id_then_follows_it_to_completion(saga: Any, stub: Any) -> None:
    order_id = new_order_id("cli-order")
    result = ok(saga("order", "--order-id", order_id, "--item", "BOOK-001:2", "--item", "MUG-042"))
    first = result.stdout.splitlines()[0]
    saga_id = re.search(r"saga ([0-9a-f]{32})", first)
    assert saga_id and order_id in first, result.stdout
    assert "SagaCompleted" in result.stdout and "COMPLETED" in result.stdout
    assert re.search(r"✓ .*send_confirmation .*succeeded", result.stdout), result.stdout
    assert status(get(stub, saga_id.group(1))) == "COMPLETED"

    reply = as_json(ok(saga("order", "--order-id", new_order_id("cli-order"), "--json")))
    assert reply["status"] == "COMPLETED" and reply["created"] is True
    assert [s["state"] for s in reply["saga"]["steps"]] == ["succeeded"] * 4
    assert reply["saga"]["saga_id"] == reply["saga_id"] and reply["saga"]["duration_ms"] > 0


def test_a_declined_order_exits_1_and_a_conflicting_one_is_refused_with_4(saga: Any, stub: Any) -> None:
    order_id = new_order_id("cli-declined")
    result = ok(saga("order", "--order-id", order_id, "--payment-token", "tok_declined"), code=1)
    assert "COMPENSATED" in result.stdout and "card was declined" in result.stdout
    assert "CompensationSucceeded" in result.stdout

    # The same order id again with the same order: the same saga, not a new one.
    again = as_json(ok(saga("order", "--order-id", order_id, "--payment-token", "tok_declined", "--json"), code=1))
    assert again["created"] is False and again["status"] == "COMPENSATED"
    # ... and with a different order: refused, one line on stderr.
    refused = ok(saga("order", "--order-id", order_id, "--json"), code=4)
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "BUSINESS_KEY_CONFLICT" in refused.stderr, refused.stderr
    invalid = ok(saga("order", "--email", "not-an-email"), code=4)
    assert "INVALID_ARGUMENT" in invalid.stderr and "customer_email" in invalid.stderr
    assert "--item" in ok(saga("order", "--item", "BOOK-001:0"), code=2).stderr


def test_order_from_a_json_file_with_flags_on_top_and_no_wait(saga: Any, stub: Any, tmp_path: Path) -> None:
    order_id = new_order_id("cli-file")
    order_file = tmp_path / "order.json"
    order_file.write_text(json.dumps({"orderId": order_id, "items": [{"sku": "TEE-007", "quantity": 3}]}))
    reply = as_json(ok(saga("order", "--file", str(order_file), "--currency", "usd", "--no-wait", "--json")))
    assert set(reply) == {"saga_id", "order_id", "created", "status"}
    assert reply["order_id"] == order_id and reply["created"] is True
    assert status(wait_status(stub, reply["saga_id"], ENDED)) == "COMPLETED"
    text = ok(saga("order", "--file", "-", "--no-wait", input=json.dumps({"orderId": new_order_id("cli-stdin")})))
    assert re.fullmatch(r"placed order cli-stdin-\w+ → saga [0-9a-f]{32}\n", text.stdout), text.stdout
    wait_status(stub, text.stdout.split()[-1], ENDED)
    assert "not a PlaceOrderRequest" in ok(saga("order", "--file", "-", input="{nope"), code=2).stderr


# -- show and watch ------------------------------------------------------------------------------


def test_show_gives_steps_timeline_and_bars_so_retries_stand_out(saga: Any, stub: Any) -> None:
    order_id, saga_id = placed(saga, "cli-flaky")
    wait_status(stub, saga_id, ENDED)

    text = ok(saga("show", saga_id)).stdout
    assert f"order {order_id}" in text and "COMPLETED" in text
    for section in ("steps", "timeline", "time bars"):
        assert f"\n{section}\n" in text, text
    charge_row = next(line for line in text.splitlines() if "charge_payment" in line and "succeeded" in line)
    assert re.search(r"succeeded\s*│\s*3\s*│", charge_row), charge_row
    assert len(re.findall(r"charge_payment\s*│ action\s*│\s*\d\s*│.*UNAVAILABLE", text)) == 2, text
    assert re.search(r"charge_payment\s+→3\s+█", text), text
    assert "SagaStarted" not in text
    assert "SagaStarted" in ok(saga("show", saga_id, "--history")).stdout
    # An order id finds its saga too.
    assert ok(saga("show", order_id)).stdout == text

    shown = as_json(ok(saga("show", saga_id, "--json")))
    assert shown["saga_id"] == saga_id and shown["business_key"] == order_id and shown["status"] == "COMPLETED"
    charge = next(s for s in shown["steps"] if s["name"] == "charge_payment")
    assert [a["code"] for a in charge["attempts"]] == ["UNAVAILABLE", "UNAVAILABLE", "OK"]
    assert all(a["direction"] == "action" and a["duration_ms"] >= 0 for a in charge["attempts"])
    assert [e["seq"] for e in shown["history"]] == list(range(1, len(shown["history"]) + 1))
    assert shown["ended_at"] and shown["created_at"]

    _, declined = placed(saga, "cli-show-declined", "--payment-token", "tok_declined")
    wait_status(stub, declined, ENDED)
    text = ok(saga("show", declined)).stdout
    assert re.search(r"reserve_stock\s*│ compensation", text) and "↺1" in text, text
    assert "FAILED_PRECONDITION" in text
    assert "SAGA_NOT_FOUND" in ok(saga("show", "no-such-saga"), code=4).stderr


def test_watch_streams_events_until_the_saga_ends(saga: Any, stub: Any) -> None:
    _, saga_id = placed(saga, "cli-slow-watch")
    lines = ok(saga("watch", saga_id, "--json")).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["type"] == "SagaStarted" and events[0]["status"] == "RUNNING"
    assert events[-1]["type"] == "SagaCompleted" and events[-1]["status"] == "COMPLETED"
    assert [e["step"] for e in events if e["type"] == "StepSucceeded"] == [
        "reserve_stock",
        "charge_payment",
        "create_shipment",
        "send_confirmation",
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    tail = ok(saga("watch", saga_id, "--json", "--after", str(len(events) - 1))).stdout.splitlines()
    assert [json.loads(line)["type"] for line in tail] == ["SagaCompleted"]

    _, declined = placed(saga, "cli-watch-declined", "--payment-token", "tok_declined")
    text = ok(saga("watch", declined), code=1).stdout
    assert text.startswith(f"watching saga {declined}")
    assert "→ RUNNING" in text and "→ COMPENSATING" in text and "→ COMPENSATED" in text, text
    assert text.index("→ RUNNING") < text.index("→ COMPENSATING") < text.index("CompensationSucceeded")


# -- ls and stats ----------------------------------------------------------------------------------


def test_ls_lists_newest_first_filters_and_pages(saga: Any, stub: Any) -> None:
    ids = [placed(saga, "cli-ls") for _ in range(3)]
    for _, saga_id in ids:
        wait_status(stub, saga_id, ENDED)
    newest_first = [saga_id for _, saga_id in reversed(ids)]

    page = as_json(ok(saga("ls", "--limit", "2", "--json")))
    assert [s["saga_id"] for s in page["sagas"]] == newest_first[:2] and page["next_page_token"]
    assert {s["status"] for s in page["sagas"]} == {"COMPLETED"} and "steps" not in page["sagas"][0]
    following = as_json(ok(saga("ls", "--limit", "2", "--page-token", page["next_page_token"], "--json")))
    assert following["sagas"][0]["saga_id"] == newest_first[2]
    everything = as_json(ok(saga("ls", "--all", "--limit", "2", "--json")))
    assert [s["saga_id"] for s in everything["sagas"]][:3] == newest_first and everything["next_page_token"] == ""

    text = ok(saga("ls", "--limit", "2")).stdout
    # Short ids: the first 8 characters, more where two on the page start alike.
    rows = [line for line in text.splitlines() if re.match(r"[0-9a-f]{8,31} ", line)]
    shown = [row.split()[0] for row in rows]
    assert [full[: len(short)] for short, full in zip(shown, newest_first, strict=False)] == shown and len(shown) == 2
    assert f"--page-token {page['next_page_token']}" in text

    order_id, saga_id = ids[0]
    by_order = as_json(ok(saga("ls", "--order", order_id, "--status", "completed,compensated", "--json")))
    assert [s["saga_id"] for s in by_order["sagas"]] == [saga_id]
    assert as_json(ok(saga("ls", "--order", order_id, "-s", "needs_attention", "--json")))["sagas"] == []
    assert saga_id[:8] in ok(saga("ls", "--order", order_id, "--since", "10m", "--type", "OrderSaga")).stdout
    assert ok(saga("ls", "--order", order_id, "--older-than", "1h")).stdout.strip() == "no sagas match"
    assert ok(saga("ls", "--type", "NoSuchSaga", "--json")).stdout.strip().startswith('{\n  "sagas": []')
    assert "unknown status" in ok(saga("ls", "--status", "bogus"), code=2).stderr
    assert "not a duration" in ok(saga("ls", "--since", "5 parsecs"), code=2).stderr


def test_stats_counts_in_flight_and_needs_attention_apart_each_with_its_oldest(
    saga: Any, stub: Any, stack: LocalStack
) -> None:
    assert ok(saga("order", "--order-id", new_order_id("cli-stats"))).stdout  # one ended saga, for the latencies
    # A saga that needs attention is not in flight: the figures must not mix them up (nor its oldest).
    attention_order = new_order_id("cli-attn-stats")
    assert "NEEDS_ATTENTION" in ok(saga("order", "--order-id", attention_order), code=1).stdout
    # Inventory is frozen: the saga stays in flight, and nothing moves between stats and ls.
    with frozen(stack.services["inventory"]):
        _, saga_id = placed(saga, "cli-slow-stats")
        stats = as_json(ok(saga("stats", "--json")))
        listed = as_json(ok(saga("ls", "--all", "--json")))["sagas"]
        text = ok(saga("stats")).stdout
    by_status: dict[str, int] = {}
    for found in listed:
        by_status[found["status"]] = by_status.get(found["status"], 0) + 1
    assert stats["counts"] == by_status and stats["total"] == len(listed)
    assert stats["in_flight"] == sum(by_status.get(name, 0) for name in ("RUNNING", "COMPENSATING", "PAUSED")) == 1
    assert stats["oldest_in_flight"]["saga_id"] == saga_id and stats["oldest_in_flight"]["status"] == "RUNNING"
    attention = [found for found in listed if found["status"] == "NEEDS_ATTENTION"]
    assert stats["needs_attention"] == len(attention) >= 1
    oldest_attention = min(attention, key=lambda found: found["created_at"])
    assert stats["oldest_needs_attention"]["saga_id"] == oldest_attention["saga_id"]
    assert stats["oldest_needs_attention"]["status"] == "NEEDS_ATTENTION"
    assert 0 < stats["completion_ms"]["p50"] <= stats["completion_ms"]["p95"] <= stats["completion_ms"]["p99"]

    assert re.search(r"^in flight\s+1 \(running 1, compensating 0, paused 0\)\s*$", text, re.MULTILINE), text
    assert re.search(rf"^needs attention\s+{len(attention)}\s*$", text, re.MULTILINE), text
    assert re.search(r"completion latency\s+p50 [\d.]+ ms\s+p95 [\d.]+ ms\s+p99 [\d.]+ ms", text), text
    assert re.search(rf"^oldest in flight\s+{saga_id}\s+OrderSaga · order cli-slow-stats\S*\s+RUNNING", text, re.M)
    assert re.search(rf"^oldest needs attention\s+{oldest_attention['saga_id']}\s.*NEEDS_ATTENTION", text, re.M)
    assert re.search(r"COMPLETED\s*│\s*\d+", text), text

    wait_status(stub, saga_id, ENDED)
    since = as_json(ok(saga("stats", "--since", "1s", "--json")))
    assert since["total"] <= stats["total"] and since["in_flight"] <= since["total"]
    # The sagas that need attention are retried (notify refuses each order once): later tests find none.
    for found in attention:
        ok(saga("retry", found["saga_id"]))
        assert status(wait_status(stub, found["saga_id"], ENDED)) == "COMPLETED"
    after = as_json(ok(saga("stats", "--json")))
    assert (after["needs_attention"], after["oldest_needs_attention"]) == (0, None)


# -- operating -------------------------------------------------------------------------------------


def test_pause_and_resume_one_saga_with_the_operator_token(saga: Any, stub: Any, stack: LocalStack) -> None:
    # Inventory is frozen: the saga cannot get past its first step before it is paused.
    with frozen(stack.services["inventory"]):
        order_id, saga_id = placed(saga, "cli-slow-pause")
        missing = ok(saga("pause", saga_id, token=None), code=4)
        assert "UNAUTHENTICATED" in missing.stderr and missing.stderr.count("\n") == 1
        assert "INVALID_TOKEN" in ok(saga("pause", saga_id, token="x" * 20), code=4).stderr

        text = ok(saga("pause", order_id, "--reason", "checking the address")).stdout
    assert text == f"pause: saga {saga_id} (order {order_id}) is now PAUSED\n"
    assert "ILLEGAL_STATE_FOR_PAUSE" in ok(saga("pause", saga_id), code=4).stderr
    shown = as_json(ok(saga("show", saga_id, "--json")))
    assert shown["status"] == "PAUSED"
    paused_event = next(e for e in shown["history"] if e["type"] == "SagaPaused")
    assert (paused_event["actor"], paused_event["message"]) == ("tester", "checking the address")

    resumed = as_json(ok(saga("resume", saga_id, "--json")))
    assert resumed["saga_id"] == saga_id and resumed["status"] in ("RUNNING", "COMPLETED")
    assert status(wait_status(stub, saga_id, ENDED)) == "COMPLETED"


def test_retry_of_a_saga_that_needs_attention_as_a_batch(saga: Any, stub: Any) -> None:
    order_id = new_order_id("cli-attn")
    result = ok(saga("order", "--order-id", order_id), code=1)
    assert "NEEDS_ATTENTION" in result.stdout
    listed = as_json(ok(saga("ls", "--status", "needs_attention", "--json")))["sagas"]
    assert [s["business_key"] for s in listed] == [order_id]
    saga_id = listed[0]["saga_id"]

    text = ok(saga("retry", "--status", "needs_attention", "--yes")).stdout
    assert re.search(rf"✓ {saga_id} → (RUNNING|COMPLETED)", text) and "retry: 1 done, 0 refused" in text, text
    assert status(wait_status(stub, saga_id, ENDED)) == "COMPLETED"
    assert "COMPLETED" in ok(saga("watch", saga_id)).stdout
    nothing = as_json(ok(saga("retry", "--all", "--yes", "--json")))
    assert nothing == {"operation": "retry", "matched": 0, "succeeded": 0, "failed": 0, "results": []}


def test_batch_cancel_and_terminate_ask_first_and_report_each_saga(saga: Any, stub: Any, stack: LocalStack) -> None:
    inventory = stack.services["inventory"]
    # Inventory is frozen: the sagas cannot get past their first step while the batch runs.
    with frozen(inventory):
        first = [placed(saga, "cli-slow-batch")[1] for _ in range(2)]
        declined = ok(saga("cancel", "--status", "running", "--reason", "dup", input="n\n"), code=1)
        assert "cancel 2 saga(s)?" in declined.stderr and "nothing done" in declined.stderr
        assert all(sid[:8] in declined.stderr for sid in first)  # listed by their short ids
        assert {status(get(stub, sid)) for sid in first} <= {"RUNNING"}

        report = as_json(ok(saga("cancel", "--status", "running", "--reason", "dup", "--yes", "--json")))
    assert (report["matched"], report["succeeded"], report["failed"]) == (2, 2, 0)
    assert sorted(r["saga_id"] for r in report["results"]) == sorted(first)
    for sid in first:
        assert status(wait_status(stub, sid, ENDED)) == "COMPENSATED"

    with frozen(inventory):
        second = [placed(saga, "cli-slow-batch")[1] for _ in range(2)]
        text = ok(saga("terminate", "--all", "--reason", "handled by hand", input="y\n")).stdout
    assert "terminate: 2 done, 0 refused" in text and all(f"✓ {sid} → TERMINATED" in text for sid in second)
    assert {status(get(stub, sid)) for sid in second} == {"TERMINATED"}
    assert "--reason" in ok(saga("terminate", second[0]), code=2).stderr

    # A batch some of whose calls are refused: every saga reported, and exit 1.
    refused = as_json(ok(saga("resume", "--status", "terminated", "--yes", "--json"), code=1))
    assert refused["failed"] == refused["matched"] >= 2 and refused["succeeded"] == 0
    assert all("ILLEGAL_STATE_FOR_RESUME" in r["error"] for r in refused["results"])
    assert "not both" in ok(saga("pause", second[0], "--all"), code=2).stderr
    assert "give a saga ID" in ok(saga("pause"), code=2).stderr


# -- errors, TLS and help --------------------------------------------------------------------------


def error_message(result: Result) -> str:
    """The message of the one-line error on stderr: `saga: error: ...`, or with --json the JSON object's."""
    if result.stderr.startswith("{"):
        return str(json.loads(result.stderr)["error"]["message"])
    assert result.stderr.startswith("saga: error: "), result.stderr
    return result.stderr.removeprefix("saga: error: ")


def test_an_unreachable_orchestrator_is_one_line_and_exit_3(saga: Any) -> None:
    address = f"127.0.0.1:{free_port()}"
    for args in (["ls"], ["show", "x"], ["stats", "--json"], ["order"], ["watch", "x"], ["pause", "x"]):
        result = ok(saga(*args, address=address), code=3)
        assert result.stdout == ""
        assert error_message(result).startswith(f"orchestrator at {address} is unreachable")
        assert result.stderr.count("\n") == 1, result.stderr


def test_an_empty_or_blank_address_is_one_usage_line_and_exit_2(saga: Any) -> None:
    for address in ("", "   "):
        for args in (["ls"], ["stats", "--json"], ["order", "--no-wait"], ["pause", "x"]):
            result = ok(saga(*args, "--address", address), code=2)
            assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
            assert error_message(result).startswith("the orchestrator address (--address or SAGA_ADDRESS)")


def test_ca_file_connects_with_tls(saga: Any, start_process: Any, tmp_path: Path) -> None:
    from devstack.devcerts import issue, make_ca

    ca = make_ca("saga cli test CA")
    ca_file = ca.write(tmp_path, "ca")[0]
    cert_file, key_file = issue(ca, "orchestrator", ("localhost", "127.0.0.1")).write(tmp_path, "orchestrator")
    # An orchestrator alone is enough for reads; the services' addresses are never dialled.
    unused = {f"{name}_ADDR": "127.0.0.1:9" for name in ("INVENTORY", "PAYMENT", "SHIPPING", "NOTIFY")}
    process = start_process(
        "orchestrator", TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(key_file), DATA_DIR=str(tmp_path), **unused
    )
    stats = as_json(ok(saga("stats", "--json", "--ca-file", str(ca_file), address=process.address)))
    assert stats["total"] == 0 and stats["oldest_in_flight"] is None and stats["oldest_needs_attention"] is None
    no_tls = ok(saga("ls", address=process.address), code=3)
    assert "is unreachable" in no_tls.stderr
    missing = ok(saga("ls", "--ca-file", str(tmp_path / "missing.pem"), address=process.address), code=2)
    assert "cannot read CA file" in missing.stderr


def test_every_command_has_help_with_examples(saga: Any) -> None:
    top = ok(saga("--help")).stdout
    for code in ("0", "1", "2", "3", "4"):
        assert re.search(rf"^[\s│]+{code}\s+\w", top, re.MULTILINE), top
    for variable in ("SAGA_ADDRESS", "SAGA_TOKEN", "SAGA_CA_FILE"):
        assert variable in top
    for command in COMMANDS:
        assert re.search(rf"^│ {command} +\w", top, re.MULTILINE), f"{command} not listed:\n{top}"
        text = ok(saga(command, "--help")).stdout
        assert "Examples" in text and f"saga {command}" in text, f"{command}:\n{text}"


# -- up --------------------------------------------------------------------------------------------


class _Lines:
    """The lines a child process prints, read on a thread so waiting for one is bounded."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, within: float) -> None:
        deadline = time.monotonic() + within
        while not any(text in line for line in self.seen):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no line with {text!r} within {within:.0f}s:\n{''.join(self.seen)}")
            self.seen.append(line)

    def rest(self, within: float) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        return "".join(self.seen)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_up_runs_the_stack_until_ctrl_c_then_stops_every_process(
    database: str, tmp_path: Path, saga: Any, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    script = Path(sys.executable).parent / "saga"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sagactl.app"]
    args = ["up", "--port", str(port), "--service-port-base", "0", "--data-dir", str(tmp_path), "--refresh", "0.3"]
    database_url = ""
    if database == "postgresql":
        database_url = request.getfixturevalue("postgres_url")
        args += ["--db", database_url]
    env = {**os.environ, "SAGA_TOKEN": TOKEN, "COLUMNS": "200"}
    env.pop("OPERATOR_TOKENS", None)
    env.pop("OPERATOR_TOKENS_FILE", None)
    process = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = _Lines(process)
    try:
        lines.wait_for("ready: orchestrator at", within=90)
        panel = "".join(lines.seen)
        rows = re.findall(PANEL_ROW, panel)
        assert sorted(name for name, _, _ in rows) == sorted(
            ["inventory", "payment", "shipping", "notify", "orchestrator"]
        ), panel
        assert ("orchestrator", str(port)) in {(name, found) for name, found, _ in rows}
        pids = [int(pid) for _, _, pid in rows]
        assert "sagas  in flight 0" in panel and f"SAGA_ADDRESS=127.0.0.1:{port}" in panel
        if database_url:
            assert "orchestrator database postgresql" in panel, panel

        order_id = new_order_id("cli-up")
        reply = as_json(ok(saga("order", "--order-id", order_id, "--json", address=f"127.0.0.1:{port}")))
        assert reply["status"] == "COMPLETED"
        # `saga up` gave the orchestrator the operator token from SAGA_TOKEN: the call is judged on the saga.
        refused = ok(saga("cancel", reply["saga_id"], address=f"127.0.0.1:{port}"), code=4)
        assert "ILLEGAL_STATE_FOR_CANCEL" in refused.stderr, refused.stderr
        if database_url:
            import sqlalchemy

            engine = sqlalchemy.create_engine(database_url)
            with engine.connect() as connection:
                found = connection.exec_driver_sql(
                    "select status from saga where business_key = %(key)s", {"key": order_id}
                ).scalar()
            engine.dispose()
            assert found == "COMPLETED"

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, lines.rest(1)
        output = lines.rest(5)
        assert "stopping" in output and output.rstrip().endswith("stopped"), output
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if not _gone(pid)] == [], output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_client_certificate_reaches_an_orchestrator_that_requires_one(start_process: Any, tmp_path: Path) -> None:
    from devstack.devcerts import issue, make_ca

    ca = make_ca("saga cli mtls CA")
    ca_file = ca.write(tmp_path, "ca")[0]
    cert_file, key_file = issue(ca, "orchestrator", ("localhost", "127.0.0.1")).write(tmp_path, "orchestrator")
    client_cert, client_key = issue(ca, "operator", ("operator",)).write(tmp_path, "operator")
    unused = {f"{name}_ADDR": "127.0.0.1:9" for name in ("INVENTORY", "PAYMENT", "SHIPPING", "NOTIFY")}
    process = start_process(
        "orchestrator",
        TLS_CERT_FILE=str(cert_file),
        TLS_KEY_FILE=str(key_file),
        TLS_CLIENT_CA_FILE=str(ca_file),
        DATA_DIR=str(tmp_path),
        **unused,
    )
    base = {"SAGA_ADDRESS": process.address, "SAGA_CA_FILE": str(ca_file), "SAGA_TOKEN": None, "COLUMNS": "200"}
    without = CliRunner().invoke(app, ["stats", "--json"], env={**base, "SAGA_CERT_FILE": None, "SAGA_KEY_FILE": None})
    assert without.exit_code == 3, without.stderr
    mutual = {**base, "SAGA_CERT_FILE": str(client_cert), "SAGA_KEY_FILE": str(client_key)}
    stats = as_json(ok(CliRunner().invoke(app, ["stats", "--json"], env=mutual)))
    assert stats["total"] == 0
    half = CliRunner().invoke(app, ["stats"], env={**base, "SAGA_CERT_FILE": str(client_cert), "SAGA_KEY_FILE": None})
    assert half.exit_code == 2 and "go together" in half.stderr
