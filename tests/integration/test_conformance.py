"""The conformance kit against real processes: the four suite services, the loyalty service and its broken variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from conformance import Check, Outcome, Report, load_definition, run_conformance
from devstack.launcher import ManagedProcess
from devstack.orders import order_request
from devstack.stack import SERVICES
from orchestrator.definition import SagaContext, SagaDefinition, Step, rpc
from orchestrator.sagas.order import ORDER_SAGA, order_saga_v2
from tests.loyalty.build import LoyaltyBuild, build_loyalty, import_loyalty
from tests.loyalty.process import LoyaltyProcess
from tests.loyalty.saga import loyalty_saga

REPO_ROOT = Path(__file__).resolve().parents[2]
# The checks every call step gets in each direction it has; a compensatable step adds the two of its order.
EVERY_DIRECTION = {Check.REPLAY, Check.KEY_REUSE, Check.CONCURRENT, Check.REASONS, Check.DEADLINE, Check.HEALTH,
                   Check.REFLECTION}  # fmt: skip
LOYALTY_TYPE = "loyalty.v1.LoyaltyService"


def new_order(unique: str) -> Message:
    return order_request(f"conf-{unique}")


def failures(report: Report) -> str:
    return "\n".join(result.line() for result in report.failures) or "(no failure)"


def rows(report: Report, step: str) -> dict[tuple[Check, str], Outcome]:
    return {(r.check, r.direction): r.outcome for r in report if r.step == step}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The four suite services as real processes (no orchestrator): discovery name -> address."""
    base = tmp_path_factory.mktemp("suite")
    processes = [
        ManagedProcess(name, module, {"HOST": "127.0.0.1", "PORT": "0", "DATA_DIR": str(base / name)}, base / "logs")
        for name, module in SERVICES.items()
    ]
    try:
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready(60)
        yield {process.name: process.address for process in processes}
    finally:
        for process in processes:
            process.stop(timeout=10)


@pytest.fixture(scope="module")
def loyalty_build(tmp_path_factory: pytest.TempPathFactory) -> LoyaltyBuild:
    return build_loyalty(tmp_path_factory.mktemp("loyalty-build"))


@pytest.fixture(scope="module")
def loyalty(tmp_path_factory: pytest.TempPathFactory, loyalty_build: LoyaltyBuild) -> Iterator[dict[str, str]]:
    """The loyalty service and its broken variants, by variant ("" for the one that conforms) -> address."""
    base = tmp_path_factory.mktemp("loyalty")
    variants = {"": "loyalty", "no-replay": "loyalty-no-replay", "ignores-deadline": "loyalty-ignores-deadline"}
    processes = {broken: LoyaltyProcess(name, base, loyalty_build, broken=broken) for broken, name in variants.items()}
    try:
        for process in processes.values():
            process.launch()
        for process in processes.values():
            process.wait_ready(60)
        yield {broken: process.address for broken, process in processes.items()}
    finally:
        for process in processes.values():
            process.stop()


@pytest.fixture(scope="module")
def loyalty_messages(loyalty_build: LoyaltyBuild) -> ModuleType:
    return import_loyalty(loyalty_build)[0]


@pytest.fixture(scope="module")
def loyalty_definition(loyalty_messages: ModuleType) -> SagaDefinition:
    return loyalty_saga(loyalty_messages)


def test_the_four_suite_services_honour_the_contract_of_the_order_saga(suite: dict[str, str]) -> None:
    report = run_conformance(ORDER_SAGA, suite, new_order)
    assert report.passed, failures(report)
    assert report.exit_code == 0
    compensatable = {(check, "action") for check in EVERY_DIRECTION} | {
        (check, "compensation") for check in EVERY_DIRECTION
    }
    compensatable |= {(Check.COMPENSATION_FIRST, "compensation"), (Check.LATE_ACTION, "action")}
    for step in ("reserve_stock", "charge_payment", "create_shipment"):
        assert set(rows(report, step)) == compensatable, step
    # The confirmation has no compensation: its action alone is checked.
    assert set(rows(report, "send_confirmation")) == {(check, "action") for check in EVERY_DIRECTION}
    late = report.find(Check.LATE_ACTION, "charge_payment", "action")
    assert "ORDER_REFUNDED" in late.reason, late.line()
    reuse = report.find(Check.KEY_REUSE, "create_shipment", "compensation")
    assert "IDEMPOTENCY_KEY_REUSED" in reuse.reason, reuse.line()


def test_nodes_that_are_not_calls_are_skipped_and_a_service_can_be_checked_alone(suite: dict[str, str]) -> None:
    # v2: a parallel group, an approval whose condition this order does not meet, and a child saga.
    definition = order_saga_v2(review_threshold=1, review_timeout=3600)
    report = run_conformance(definition, suite, new_order, services={"payment"})
    assert report.passed, failures(report)
    skipped = {r.step: r.reason for r in report if r.check is Check.NOT_A_CALL}
    assert set(skipped) == {"reserve_and_charge", "fraud_review", "fulfilment"}
    assert "FulfilmentSaga v1" in skipped["fulfilment"]
    # reserve_stock ran before charge_payment in every check, but only payment's calls were checked.
    assert {r.step for r in report if r.check is not Check.NOT_A_CALL} == {"charge_payment"}
    with pytest.raises(ValueError, match="no target"):
        run_conformance(definition, {"payment": suite["payment"]}, new_order)
    with pytest.raises(ValueError, match="same business key"):
        run_conformance(definition, suite, lambda unique: order_request("always-the-same"))


def test_the_loyalty_service_honours_the_contract(
    suite: dict[str, str], loyalty: dict[str, str], loyalty_definition: SagaDefinition
) -> None:
    targets = {"inventory": suite["inventory"], "loyalty": loyalty[""]}
    report = run_conformance(loyalty_definition, targets, new_order)
    assert report.passed, failures(report)
    award = rows(report, "award_points")
    assert all(outcome is Outcome.PASS for outcome in award.values()) and len(award) == 2 * len(EVERY_DIRECTION) + 2
    reflection = report.find(Check.REFLECTION, "award_points", "action")
    assert "AwardPoints(loyalty.v1.AwardPointsRequest) returns loyalty.v1.AwardPointsResponse" in reflection.reason


def test_a_compensation_that_needs_its_actions_result_fails_the_compensation_first_check(
    suite: dict[str, str], loyalty: dict[str, str], loyalty_messages: ModuleType, loyalty_definition: SagaDefinition
) -> None:
    # A revocation whose request reads the award: the orchestrator also compensates an award that timed out.
    def revoke_by_award(s: SagaContext) -> Any:
        award_id = s.result("award_points").award.award_id
        return loyalty_messages.RevokePointsRequest(order_id=s.input.order_id, reason=f"revoke {award_id}")

    reserve, award = loyalty_definition.steps
    assert isinstance(award, Step)
    revoke = rpc("loyalty", loyalty_messages, "RevokePoints", revoke_by_award)
    definition = SagaDefinition(
        name="NeedsResult",
        version=1,
        input_type=loyalty_definition.input_type,
        steps=(reserve, Step("award_points", action=award.action, compensation=revoke)),
        business_key=loyalty_definition.business_key,
    )
    targets = {"inventory": suite["inventory"], "loyalty": loyalty[""]}
    report = run_conformance(definition, targets, new_order, services={"loyalty"})
    assert [(r.check, r.direction) for r in report.failures] == [(Check.COMPENSATION_FIRST, "compensation")]
    assert "needs the action's result" in report.failures[0].reason, report.failures[0].line()


def test_the_loyalty_service_refuses_bad_input_clearly(loyalty: dict[str, str], loyalty_messages: ModuleType) -> None:
    pb = loyalty_messages
    with grpc.insecure_channel(loyalty[""]) as channel:
        award = channel.unary_unary(
            "/loyalty.v1.LoyaltyService/AwardPoints", request_serializer=None, response_deserializer=None
        )

        def refusal(request: bytes, *metadata: tuple[str, str]) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as info:
                award(request, metadata=metadata, timeout=10)
            error = info.value
            assert isinstance(error, grpc.Call)
            return error.code(), error.details() or ""

        good = pb.AwardPointsRequest(order_id="ord-bad-input", customer="ada", points=5).SerializeToString()
        assert refusal(good) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "idempotency-key: metadata header is required on this mutating call",
        )
        bad = pb.AwardPointsRequest(order_id="no spaces", customer="a\x00", points=0).SerializeToString()
        code, message = refusal(bad, ("idempotency-key", "k-bad-fields"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert all(name in message for name in ("order_id", "customer", "points")), message
        assert refusal(b"\xff\xff\xff", ("idempotency-key", "k-malformed")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "request: is not a valid loyalty.v1.AwardPointsRequest",
        )


def test_a_loyalty_service_that_does_not_replay_keys_fails_with_a_clear_line(
    suite: dict[str, str], loyalty: dict[str, str], loyalty_definition: SagaDefinition
) -> None:
    targets = {"inventory": suite["inventory"], "loyalty": loyalty["no-replay"]}
    report = run_conformance(loyalty_definition, targets, new_order)
    assert not report.passed and report.exit_code == 1
    failed = {(r.check, r.step, r.direction) for r in report.failures}
    for direction in ("action", "compensation"):
        for check in (Check.REPLAY, Check.KEY_REUSE, Check.CONCURRENT):
            assert (check, "award_points", direction) in failed, failures(report)
    # The suite's own step still passes: the failures are the broken service's alone.
    assert not any(r.step == "reserve_stock" for r in report.failures), failures(report)
    replay = report.find(Check.REPLAY, "award_points", "action")
    expected = "FAIL award_points action: same key replays the answer: the repeat under the same key answered "
    assert replay.line().startswith(expected + "FAILED_PRECONDITION ORDER_ALREADY_AWARDED"), replay.line()
    assert "ran again instead of replaying" in replay.reason
    revoke = report.find(Check.REPLAY, "award_points", "compensation")
    assert "was_awarded: True then unset" in revoke.reason, revoke.line()
    reuse = report.find(Check.KEY_REUSE, "award_points", "action")
    assert "was accepted (OK)" in reuse.reason, reuse.line()


def test_a_loyalty_service_that_commits_past_its_deadline_fails_the_deadline_check(
    suite: dict[str, str], loyalty: dict[str, str], loyalty_definition: SagaDefinition
) -> None:
    targets = {"inventory": suite["inventory"], "loyalty": loyalty["ignores-deadline"]}
    report = run_conformance(loyalty_definition, targets, new_order, services={"loyalty"})
    failed = {(r.check, r.direction) for r in report.failures}
    assert failed == {(Check.DEADLINE, "action"), (Check.DEADLINE, "compensation")}, failures(report)
    line = report.find(Check.DEADLINE, "award_points", "action").reason
    assert "committed all the same" in line and "IDEMPOTENCY_KEY_REUSED" in line, line


def test_a_yaml_definition_with_its_descriptor_set_and_example(
    tmp_path: Path, loyalty: dict[str, str], loyalty_build: LoyaltyBuild
) -> None:
    definition_file = tmp_path / "loyalty-v1.yaml"
    definition_file.write_text(
        f"""\
document: {{dsl: '1.0.0', namespace: loyalty, name: LoyaltyAward, version: '1'}}
saga:
  input: loyalty.v1.AwardPointsRequest
  contract: {{descriptorSet: {loyalty_build.descriptor_set}}}
  key: ${{ .order_id }}
  example: {{order_id: ord-yaml, customer: ada@example.com, points: 30}}
do:
  - award_points:
      call: grpc
      with:
        service: {{name: {LOYALTY_TYPE}, host: loyalty}}
        method: AwardPoints
        arguments: {{order_id: "${{ .order_id }}", customer: "${{ .customer }}", points: "${{ .points }}"}}
      compensate:
        call: grpc
        with:
          service: {{name: {LOYALTY_TYPE}, host: loyalty}}
          method: RevokePoints
          arguments: {{order_id: "${{ .order_id }}", reason: saga compensated}}
"""
    )
    source = load_definition(str(definition_file))
    assert isinstance(source.definition.nodes[0].node, Step)
    report = run_conformance(source.definition, {"loyalty": loyalty[""]}, source.make_input)
    assert report.passed, failures(report)


def test_saga_conformance_on_the_command_line(
    suite: dict[str, str], loyalty: dict[str, str], loyalty_definition: SagaDefinition, tmp_path: Path
) -> None:
    example = tmp_path / "order.json"
    example.write_text(json_format.MessageToJson(order_request("ord-cli")))

    def saga(loyalty_address: str, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; from sagactl.main import main; main()"]
        command += ["conformance", "--definition", "tests.loyalty.saga:LOYALTY_SAGA", "--input", str(example)]
        command += ["--target", f"inventory={suite['inventory']}", "--target", f"loyalty={loyalty_address}", *extra]
        env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO_ROOT)}
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)

    conforming = saga(loyalty[""])
    assert conforming.returncode == 0, conforming.stdout + conforming.stderr
    assert "Participant conformance: LoyaltyOrderSaga v1" in conforming.stdout
    assert "LoyaltyOrderSaga v1: conforms" in conforming.stdout
    broken = saga(loyalty["no-replay"], "--service", "loyalty", "--json")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    answer = json.loads(broken.stdout)
    assert answer["passed"] is False
    failed = {(r["check"], r["direction"]) for r in answer["results"] if r["outcome"] == "fail"}
    assert ("REPLAY", "action") in failed and ("KEY_REUSE", "compensation") in failed
    missing = saga(loyalty[""], "--target", "nowhere=bad")
    assert missing.returncode == 2 and "NAME=host:port" in missing.stderr, missing.stderr


def test_saga_conformance_passes_for_the_yaml_order_saga_against_the_suite(suite: dict[str, str]) -> None:
    # The suite's own YAML definition, its saga.example as the input: what the tutorial runs.
    command = [sys.executable, "-c", "import sys; sys.argv[0] = 'saga'; from sagactl.main import main; main()"]
    command += ["conformance", "--definition", "orchestrator/sagas/yaml/order-v1.yaml"]
    for name in ("inventory", "payment", "shipping", "notify"):
        command += ["--target", f"{name}={suite[name]}"]
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OrderSaga v1: conforms" in result.stdout
