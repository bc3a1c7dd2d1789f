"""The CLI's rough edges, on a real stack: short ids resolved by any unique prefix in every command, `saga ls` at
80 columns, --json errors as one line of JSON and usage errors as one line, a batch without a token stopped at
once, `saga watch` with clock times and step starts, the wording of cancel and of a paused saga, `saga stats`
consistent at 80 columns, help at 80 columns without `<bool>`, and `saga up` at 80 columns (whole addresses, the
metrics addresses, the --port hint, the folder locked, a kill -9 restarted, the token kept).

The demo at 80 columns is tests/integration/test_cli_long_running.py's demo test; `saga up` with --token, and the
orchestrator killed too, are in tests/integration/test_saga_up.py."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner, Result

from devstack.stack import LocalStack
from sagactl.app import app
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.integration.test_cli import ENDED, as_json, get, ok, placed, status, wait_saga, wait_status
from tests.integration.test_saga_up import SAGA, _env, _free_port, _Up, start_up  # noqa: F401 (a fixture, used by up_80)
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
    # Every operator call, a signal and a decision by a short id reach the saga (and are refused for what it is:
    # ended), each naming it by its whole id.
    for operation in ("retry", "pause", "resume", "cancel"):
        refused = ok(saga(operation, prefix), code=4).stderr
        assert f"ILLEGAL_STATE_FOR_{operation.upper()}" in refused and saga_id in refused, refused
    assert "ILLEGAL_STATE_FOR_TERMINATE" in ok(saga("terminate", prefix, "--reason", "x"), code=4).stderr
    assert "SAGA_ENDED" in ok(saga("signal", prefix, "payment_ok"), code=4).stderr
    assert f"saga {saga_id} (COMPLETED) waits for no approval now" in ok(saga("approve", prefix), code=2).stderr
    assert "waits for no approval now" in ok(saga("reject", prefix, "--reason", "x"), code=2).stderr


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


def test_usage_errors_are_one_line_naming_the_help(saga: Any) -> None:
    for args, message in (
        (["show"], "Missing argument 'ID'. (see saga show --help)"),
        (["ls", "--bogus"], "No such option: --bogus (see saga ls --help)"),
        (["ls", "--status", "sleeping"], "unknown status 'sleeping'"),
        (["reject", "abc"], "reject needs --reason"),
    ):
        result = saga(*args, columns=80)
        assert result.exit_code == 2 and result.stdout == "", (args, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("saga: error: "), (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    error = json_error(saga("ls", "--bogus", "--json"), 2)
    assert (error["code"], error["reason"]) == ("USAGE", "NO_SUCH_OPTION")


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


# -- stats -------------------------------------------------------------------------------------------


def test_stats_at_80_columns_counts_needs_attention_apart_from_in_flight(saga: Any, stub: Any) -> None:
    saga_id = stub.PlaceOrder(order_request(new_order_id("rough-attn-stats")), timeout=10).saga_id
    assert status(wait_status(stub, saga_id, ENDED)) == "NEEDS_ATTENTION"
    try:
        figures = as_json(ok(saga("stats", "--json")))
        text = ok(saga("stats", columns=80)).stdout
        counts = figures["counts"]
        assert figures["in_flight"] == sum(counts.get(s, 0) for s in ("RUNNING", "COMPENSATING", "PAUSED"))
        assert figures["needs_attention"] == counts["NEEDS_ATTENTION"] >= 1
        assert figures["oldest_needs_attention"]["status"] == "NEEDS_ATTENTION"
        if figures["oldest_in_flight"] is not None:
            assert figures["oldest_in_flight"]["status"] in ("RUNNING", "COMPENSATING")
        else:
            assert figures["in_flight"] == counts.get("PAUSED", 0)
        assert max(map(len, text.splitlines())) <= 80 and "…" not in text, text
        assert re.search(rf"^needs attention\s+{figures['needs_attention']}\s*$", text, re.MULTILINE), text
        oldest = figures["oldest_needs_attention"]["saga_id"]
        assert re.search(rf"^oldest needs attention\s+{oldest}", text, re.MULTILINE), text
    finally:
        # Later tests count the sagas that need attention: this one is retried (notify refuses each order once).
        ok(saga("retry", saga_id))
        assert status(wait_status(stub, saga_id, ENDED)) == "COMPLETED"


# -- help ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["up", "ls", "show", "watch", "stats", "retry", "signal"])
def test_help_at_80_columns_fills_its_lines_and_shows_flags_bare(command: str) -> None:
    shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    assert "<bool>" not in shown.stdout and max(map(len, shown.stdout.splitlines())) <= 80, shown.stdout
    # The prose before the option boxes: each line of a paragraph but its last is filled (no line of the
    # docstring's own breaks kept, which gave one long line and one short one).
    prose = shown.stdout[: shown.stdout.index("╭")].splitlines()
    for line, following in itertools.pairwise(prose):
        if line.strip() and following.strip() and not line.lstrip().startswith("Usage:"):
            assert len(line.rstrip()) >= 60, f"{line!r} is followed by {following!r}:\n{shown.stdout}"


# -- saga up at 80 columns -----------------------------------------------------------------------------


@pytest.fixture
def up_80(tmp_path: Path, start_up: Callable[..., _Up]) -> Callable[..., _Up]:  # noqa: F811 (the fixture)
    """`saga up` at an 80-column terminal, on this test's data folder, stopped when the test ends."""
    return lambda *args: start_up(tmp_path, *args, env=_env(COLUMNS="80"))


def test_up_at_80_columns_shows_whole_addresses_restarts_a_killed_process_and_keeps_its_token(
    tmp_path: Path, up_80: Callable[..., _Up]
) -> None:
    up = up_80("--metrics")
    token = up.wait_for(r"operator token \(new, kept in \S+operator\.token\): export SAGA_TOKEN=(\S+)").group(1)
    rows = up.panel_rows()
    panel = [line for line in up.output().splitlines() if line.startswith(("╭", "│", "╰"))]
    assert panel and max(map(len, panel)) <= 80 and "…" not in "".join(panel), up.output()
    assert sorted(rows) == ["inventory", "notify", "orchestrator", "payment", "shipping"], up.output()
    assert rows["orchestrator"][0] == up.port
    # The log column made way for the addresses: the panel names the logs' folder.
    assert f"logs in {tmp_path / 'logs'}" in " ".join(" ".join(line.strip("│ ") for line in panel).split())
    metrics = re.findall(r"^metrics: (\w+) http://127\.0\.0\.1:\d+/metrics$", up.output(), re.MULTILINE)
    assert sorted(metrics) == sorted(rows), up.output()
    # Not the default port: the hint names the address that reaches this stack (wrapped at 80 columns).
    up.wait_for(rf"export SAGA_ADDRESS={re.escape(up.address)}\)")
    assert f"try `saga order --address {up.address}`" in " ".join(up.output().split())

    # A second saga up on the folder is refused at once, in one line, the first one's token untouched.
    second = subprocess.run(
        [*SAGA, "up", "--port", str(_free_port()), "--service-port-base", "0", "--data-dir", str(tmp_path)],
        env=_env(COLUMNS="80"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (second.returncode, second.stdout, second.stderr.count("\n")) == (1, "", 1), second
    assert f"in use by another saga up (pid {up.process.pid})" in second.stderr
    assert (tmp_path / "operator.token").read_text().strip() == token

    # kill -9 of a service: it is started again with a backoff, and the panel's lines say so.
    os.kill(rows["shipping"][1], signal.SIGKILL)
    up.wait_for(r"shipping: exited \(SIGKILL\); restarting in 0\.5 s")
    up.wait_for(rf"shipping: back on 127\.0\.0\.1:{rows['shipping'][0]} \(pid \d+, restart 1\)")
    assert up.stop() == 1, up.output()

    # The next run keeps the token an exported SAGA_TOKEN holds.
    again = up_80()
    again.wait_for(rf"operator token \(kept in \S+operator\.token\): export SAGA_TOKEN={re.escape(token)}$")
    again.panel_rows()
    assert again.stop() == 0, again.output()
