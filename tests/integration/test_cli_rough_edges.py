"""The CLI's rough edges, on a real stack: short ids resolved by any unique prefix in every command, `saga ls` at
80 columns, --json errors as one line of JSON, a batch without a token stopped at once, `saga watch` with clock
times and step starts, and the wording of cancel and of a paused saga."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner, Result

from devstack.stack import LocalStack
from sagactl.app import app
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.integration.test_cli import ENDED, as_json, get, ok, placed, status, wait_saga, wait_status
from tests.orchestrator_helpers import frozen, new_order_id, order_request, start_stack

TOKEN = "rough-edges-token-0123456789abcdef"
FAULTS = {
    # Orders marked rough-attn are refused once by notify, non-retryably: the saga needs attention.
    "notify": "SendConfirmation:fail_first=1,code=FAILED_PRECONDITION,order_contains=rough-attn",
}
STEPS = ["reserve_stock", "charge_payment", "create_shipment", "send_confirmation"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = start_stack(
        tmp_path_factory.mktemp("cli-rough"), faults=FAULTS, orchestrator_env={"OPERATOR_TOKENS": f"tester:{TOKEN}"}
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
def saga(stack: LocalStack) -> Callable[..., Result]:
    """Run `saga ARGS` in-process against the module's stack, with the operator token set."""

    def run(*args: str, token: str | None = TOKEN, columns: int = 200) -> Result:
        env = {"SAGA_ADDRESS": stack.address, "SAGA_TOKEN": token, "SAGA_CA_FILE": None, "COLUMNS": str(columns)}
        return CliRunner().invoke(app, list(args), env=env)

    return run


@pytest.fixture(scope="module")
def many(stub: pb_grpc.OrchestratorServiceStub) -> list[str]:
    """Seventeen ended sagas: two of them, at least, share their first character (there are sixteen)."""
    ids = [stub.PlaceOrder(order_request(new_order_id("rough-many")), timeout=10).saga_id for _ in range(17)]
    for saga_id in ids:
        wait_status(stub, saga_id, ENDED)
    return ids


def json_error(result: Result, code: int) -> dict[str, Any]:
    """The one line of JSON a --json command prints on stderr when it fails."""
    assert result.exit_code == code and result.stdout == "", (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    error: dict[str, Any] = json.loads(result.stderr)["error"]
    assert error["exit_code"] == code
    return error


def shortest_unique(saga_id: str, others: list[str]) -> str:
    length = next(n for n in range(1, 33) if not any(o.startswith(saga_id[:n]) for o in others if o != saga_id))
    return saga_id[:length]


# -- short ids -------------------------------------------------------------------------------------


def test_any_unique_start_of_an_id_names_the_saga_in_every_command(saga: Any, stub: Any, many: list[str]) -> None:
    everyone = [s["saga_id"] for s in as_json(ok(saga("ls", "--all", "--json")))["sagas"]]
    saga_id = many[0]
    prefix = shortest_unique(saga_id, everyone)
    for given in (prefix, saga_id[:8], saga_id[:8].upper(), saga_id):
        assert as_json(ok(saga("show", given, "--json")))["saga_id"] == saga_id, given
    assert ok(saga("show", saga_id[:8])).stdout == ok(saga("show", saga_id)).stdout
    watched = [json.loads(line) for line in ok(saga("watch", saga_id[:8], "--json")).stdout.splitlines()]
    assert watched[-1]["type"] == "SagaCompleted"
    # An operator call and a signal by a short id reach the saga (and are refused for what it is: ended).
    assert "ILLEGAL_STATE_FOR_PAUSE" in ok(saga("pause", saga_id[:8]), code=4).stderr
    assert "SAGA_ENDED" in ok(saga("signal", saga_id[:8], "payment_ok"), code=4).stderr
    assert "waits for no approval now" in ok(saga("approve", saga_id[:8]), code=2).stderr


def test_a_start_no_id_has_or_several_share_is_refused_with_exit_4(saga: Any, many: list[str]) -> None:
    everyone = [s["saga_id"] for s in as_json(ok(saga("ls", "--all", "--json")))["sagas"]]
    missing = next(f"{c}{d}" * 4 for c in "0123456789abcdef" for d in "0123456789abcdef"
                   if not any(s.startswith(f"{c}{d}" * 4) for s in everyone))  # fmt: skip
    error = json_error(saga("show", missing, "--json"), 4)
    assert (error["code"], error["reason"]) == ("NOT_FOUND", "SAGA_NOT_FOUND")
    assert f"no saga id starts with '{missing}'" in error["message"]
    assert f"no saga id starts with '{missing}'" in ok(saga("cancel", missing), code=4).stderr

    shared = next(c for c in "0123456789abcdef" if sum(s.startswith(c) for s in everyone) >= 2)
    sharing = [s for s in everyone if s.startswith(shared)]
    text = ok(saga("show", shared), code=4).stderr
    assert text.count("\n") == 1 and f"sagas start with '{shared}'; give more characters: " in text, text
    assert f"ambiguous: {len(sharing) if len(sharing) < 5 else '5 or more'} sagas" in text
    assert sum(s in text for s in sharing) == min(len(sharing), 3)
    error = json_error(saga("terminate", shared, "--reason", "x", "--json"), 4)
    assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "SAGA_ID_AMBIGUOUS")


def test_ls_fits_80_columns_with_short_ids_and_compact_times(saga: Any, many: list[str]) -> None:
    text = ok(saga("ls", "--limit", "20", columns=80)).stdout
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in text, text
    assert lines[0].split()[:3] == ["saga", "id", "type"] and lines[0].split()[-2:] == ["age", "took"]
    shown = [line.split()[0] for line in lines[1:] if re.match(r"[0-9a-f]{8,32}\s", line)]
    newest = [s["saga_id"] for s in as_json(ok(saga("ls", "--limit", "20", "--json")))["sagas"]]
    assert len(shown) == len(newest) >= 17 and len(set(shown)) == len(shown), text
    assert all(full.startswith(short) for short, full in zip(shown, newest, strict=True))
    for line in lines[1:]:
        if re.match(r"[0-9a-f]{8,32}\s", line):
            assert re.search(r"\s(\d+ms|\d+\.\d+s|\d+[smhd])\s+(\d+ms|\d+\.\d+s|\d+[smhd]|-)$", line.rstrip()), line


# -- errors with --json, and a batch refused its caller ------------------------------------------------


def test_json_errors_are_one_line_of_json_and_the_token_hint_names_saga_token(saga: Any, many: list[str]) -> None:
    refused = json_error(saga("pause", many[0], "--json", token=None), 4)
    assert (refused["code"], refused["reason"]) == ("UNAUTHENTICATED", "TOKEN_REQUIRED")
    assert refused["message"].endswith("this call needs a token: set SAGA_TOKEN (or --token)")
    assert "authorization" not in refused["message"]
    plain = ok(saga("pause", many[0], token=None), code=4).stderr
    assert plain == f"saga: error: {refused['message']}\n"
    usage = json_error(saga("ls", "--since", "soon", "--json"), 2)
    assert (usage["code"], usage["reason"]) == ("USAGE", "BAD_PARAMETER") and "--since" in usage["message"]
    state = json_error(saga("resume", many[0], "--json"), 4)
    assert (state["code"], state["reason"]) == ("FAILED_PRECONDITION", "ILLEGAL_STATE_FOR_RESUME")


def test_a_batch_without_a_token_stops_once_with_exit_4(saga: Any, stub: Any) -> None:
    attention = []
    for _ in range(2):
        order_id = new_order_id("rough-attn")
        attention.append(stub.PlaceOrder(order_request(order_id), timeout=10).saga_id)
    for saga_id in attention:
        assert status(wait_status(stub, saga_id, ENDED)) == "NEEDS_ATTENTION"

    refused = ok(saga("retry", "--status", "needs_attention", "--yes", token=None), code=4)
    assert refused.stdout == "" and refused.stderr.count("\n") == 1, (refused.stdout, refused.stderr)
    assert "UNAUTHENTICATED TOKEN_REQUIRED" in refused.stderr and "set SAGA_TOKEN (or --token)" in refused.stderr
    assert "retry of 2 saga(s) stopped at the first saga, nothing done" in refused.stderr
    error = json_error(saga("retry", "--status", "needs_attention", "--yes", "--json", token=None), 4)
    assert error["reason"] == "TOKEN_REQUIRED"
    assert {status(get(stub, saga_id)) for saga_id in attention} == {"NEEDS_ATTENTION"}

    report = as_json(ok(saga("retry", "--status", "needs_attention", "--yes", "--json")))
    assert (report["matched"], report["succeeded"]) == (2, 2)
    for saga_id in attention:
        assert status(wait_status(stub, saga_id, ENDED)) == "COMPLETED"


# -- watch ---------------------------------------------------------------------------------------------


def test_watch_tells_when_each_step_starts_with_clock_times(saga: Any, stub: Any, many: list[str]) -> None:
    saga_id = many[1]
    found = get(stub, saga_id)
    lines = ok(saga("watch", saga_id)).stdout.splitlines()
    assert lines[0] == f"watching saga {saga_id} (order {found.business_key}); times are UTC; Ctrl-C stops watching"
    events = [line for line in lines[1:] if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)]
    kinds = [(line.split()[3], line.split()[4] if len(line.split()) > 4 else "") for line in events]
    started = [step for kind, step in kinds if kind == "StepStarted"]
    assert started == STEPS, lines
    for step in STEPS:
        assert kinds.index(("StepStarted", step)) < kinds.index(("StepSucceeded", step)), lines
    # The clock time beside the offset is the event's own, in UTC.
    first = events[0]
    created = datetime.fromtimestamp(found.created_at.ToNanoseconds() / 1e9, tz=UTC)
    assert first.split()[3] == "SagaStarted" and re.match(r"\d\d:\d\d:\d\d\.\d{3} +\d+\.\d ms ", first), first
    assert abs(datetime.strptime(first.split()[0], "%H:%M:%S.%f").replace(
        year=created.year, month=created.month, day=created.day, tzinfo=UTC) - created).total_seconds() < 1  # fmt: skip
    # --json stays the history: no derived events.
    history = [json.loads(line)["type"] for line in ok(saga("watch", saga_id, "--json")).stdout.splitlines()]
    assert "StepStarted" not in history and history[0] == "SagaStarted"


# -- wording ----------------------------------------------------------------------------------------


def test_cancel_says_a_cancel_was_requested_while_the_call_decides(saga: Any, stub: Any, stack: LocalStack) -> None:
    # Inventory is frozen: the first call is on the wire when the saga is cancelled.
    with frozen(stack.services["inventory"]):
        order_id, saga_id = placed(saga, "rough-cancel")
        text = ok(saga("cancel", saga_id[:8], "--reason", "customer changed their mind")).stdout
    assert text == (
        f"cancel: saga {saga_id} (order {order_id}) cancel requested: it compensates once its call in flight "
        "(reserve_stock) returns\n"
    ), text
    assert "is now RUNNING" not in text
    assert status(wait_status(stub, saga_id, ENDED)) == "COMPENSATED"


def test_a_paused_saga_shows_what_it_is_held_before(saga: Any, stub: Any, stack: LocalStack) -> None:
    with frozen(stack.services["inventory"]):
        _, saga_id = placed(saga, "rough-pause")
        ok(saga("pause", saga_id, "--reason", "checking"))
    # The call on the wire at the pause ends (or times out); then nothing moves until the saga is resumed.
    wait_saga(
        stub,
        saga_id,
        lambda found: any(e.type in ("StepSucceeded", "StepRetryScheduled", "StepFailed") for e in found.history),
        "past its first call",
    )
    text = ok(saga("show", saga_id)).stdout
    flat = " ".join(text.split())
    assert re.search(rf"paused: held before (try \d+ of )?\w+; saga resume {saga_id} lets it go on", flat), text
    steps = text[text.index("\nsteps\n") : text.index("\ntimeline\n")]
    assert re.search(r"‖ │ \w+\s*│\s*│ paused", steps) and "running" not in steps, steps
    ok(saga("resume", saga_id))
    assert status(wait_status(stub, saga_id, ENDED)) == "COMPLETED"
    assert isinstance(pb.SAGA_STATUS_PAUSED, int)
