"""YAML definitions on a real orchestrator: v2 in YAML, hot reload, a failed reload, a version kept while it runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from devstack.orders import order_request
from devstack.stack import LocalStack
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.orchestrator_helpers import OPERATOR_TOKEN, YAML_SAGAS, poll, start_stack

ENDED = {pb.SAGA_STATUS_COMPLETED, pb.SAGA_STATUS_COMPENSATED, pb.SAGA_STATUS_NEEDS_ATTENTION}
WITHIN = 60.0  # seconds a wait here may take on a busy machine
TOKEN = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("definitions")
    for name in ("order-v1.yaml", "order-v2.yaml", "fulfilment-v1.yaml"):
        shutil.copy(YAML_SAGAS / name, path / name)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Iterator[LocalStack]:
    env = {
        "SAGA_DEFINITIONS_DIR": str(folder),
        "DEFINITIONS_RELOAD_INTERVAL_SECONDS": "0.2",
        "ORDER_SAGA_VERSION": "2",
        "REVIEW_THRESHOLD": "5000",
    }
    running = start_stack(tmp_path_factory.mktemp("yaml-stack"), orchestrator_env=env)
    yield running
    running.stop()


@pytest.fixture
def orchestrator(stack: LocalStack) -> Iterator[pb_grpc.OrchestratorServiceStub]:
    with grpc.insecure_channel(stack.address) as channel:
        yield pb_grpc.OrchestratorServiceStub(channel)


def saga(orchestrator: pb_grpc.OrchestratorServiceStub, saga_id: str) -> pb.Saga:
    return orchestrator.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10).saga


def ended(orchestrator: pb_grpc.OrchestratorServiceStub, saga_id: str) -> pb.Saga:
    found = poll(saga_id, lambda: (s := saga(orchestrator, saga_id)).status in ENDED and s, within=WITHIN)
    assert isinstance(found, pb.Saga)
    return found


def definitions(orchestrator: pb_grpc.OrchestratorServiceStub, name: str) -> dict[int, pb.SagaDefinitionInfo]:
    listed = orchestrator.ListDefinitions(pb.ListDefinitionsRequest(name=name), timeout=10)
    return {info.version: info for info in listed.definitions}


def start(orchestrator: pb_grpc.OrchestratorServiceStub, saga_type: str, order_id: str, minor_units: int) -> str:
    packed = any_pb2.Any()
    packed.Pack(order_request(order_id, items=[("BOOK-001", 1)], minor_units=minor_units))
    request = pb.StartSagaRequest(saga_type=saga_type, business_key=order_id, input=packed)
    return str(orchestrator.StartSaga(request, timeout=10).saga_id)


def test_v2_in_yaml_reviews_a_large_order_and_runs_its_fulfilment_child(
    orchestrator: pb_grpc.OrchestratorServiceStub,
) -> None:
    small = ended(
        orchestrator, orchestrator.PlaceOrder(order_request("yaml-small", minor_units=2000), timeout=10).saga_id
    )
    assert small.status == pb.SAGA_STATUS_COMPLETED and small.definition_version == 2
    assert {s.name: s.state for s in small.steps}["fraud_review"] == "skipped"
    assert [child.saga_type for child in small.children] == ["FulfilmentSaga"]
    large_id = orchestrator.PlaceOrder(order_request("yaml-large", minor_units=9000), timeout=10).saga_id
    poll(
        "the review to wait",
        lambda: any(w.kind == "approval" for w in saga(orchestrator, large_id).waits),
        within=WITHIN,
    )
    orchestrator.DecideApproval(
        pb.DecideApprovalRequest(saga_id=large_id, step="fraud_review", approve=False, reason="looks odd"),
        timeout=10,
        metadata=TOKEN,
    )
    large = ended(orchestrator, large_id)
    assert large.status == pb.SAGA_STATUS_COMPENSATED
    assert {s.name: s.state for s in large.steps}["reserve_stock"] == "compensated"
    info = definitions(orchestrator, "OrderSaga")[2]
    assert info.source.endswith("order-v2.yaml") and info.fingerprint and info.contract_hash == large.contract_hash


def test_a_new_version_is_picked_up_without_a_restart_and_running_sagas_keep_theirs(
    orchestrator: pb_grpc.OrchestratorServiceStub, folder: Path
) -> None:
    text = (YAML_SAGAS / "order-v1.yaml").read_text()
    (folder / "greeting-v1.yaml").write_text(text.replace("name: OrderSaga", "name: GreetingOrder"))
    poll("GreetingOrder v1 to load", lambda: definitions(orchestrator, "GreetingOrder"), within=WITHIN)
    first = ended(orchestrator, start(orchestrator, "GreetingOrder", "greet-1", 2000))
    assert first.status == pb.SAGA_STATUS_COMPLETED and first.definition_version == 1
    # v2 of it: the confirmation goes out without a tracking number.
    v2 = text.replace("name: OrderSaga", "name: GreetingOrder").replace("version: '1'", "version: '2'")
    v2 = v2.replace("tracking_number: ${ $results.create_shipment.shipment.tracking_number }", "tracking_number: none")
    (folder / "greeting-v2.yaml").write_text(v2)
    poll("GreetingOrder v2 to load", lambda: 2 in definitions(orchestrator, "GreetingOrder"), within=WITHIN)
    second = ended(orchestrator, start(orchestrator, "GreetingOrder", "greet-2", 2000))
    assert second.status == pb.SAGA_STATUS_COMPLETED and second.definition_version == 2
    assert definitions(orchestrator, "GreetingOrder")[1].fingerprint  # v1 stays registered


def test_a_broken_file_keeps_the_set_in_force(
    orchestrator: pb_grpc.OrchestratorServiceStub, folder: Path, stack: LocalStack
) -> None:
    before = {
        (d.name, d.version, d.fingerprint)
        for d in orchestrator.ListDefinitions(pb.ListDefinitionsRequest()).definitions
    }
    broken = (YAML_SAGAS / "order-v1.yaml").read_text().replace("name: OrderSaga", "name: Broken")
    (folder / "broken-v1.yaml").write_text(broken.replace("method: Charge\n", "method: Chrage\n"))
    log = stack.orchestrator.log_path if stack.orchestrator else None
    assert log is not None
    poll("the failed reload to be logged", lambda: "broken-v1.yaml" in log.read_text(), within=WITHIN)
    assert "has no method Chrage" in log.read_text()
    after = {
        (d.name, d.version, d.fingerprint)
        for d in orchestrator.ListDefinitions(pb.ListDefinitionsRequest()).definitions
    }
    assert after == before
    (folder / "broken-v1.yaml").unlink()


def test_a_version_that_changed_while_its_sagas_run_is_refused(
    orchestrator: pb_grpc.OrchestratorServiceStub, folder: Path, stack: LocalStack
) -> None:
    # A large order waits for its review: a saga that runs on OrderSaga v2.
    waiting = orchestrator.PlaceOrder(order_request("yaml-waits", minor_units=9000), timeout=10).saga_id
    poll(
        "the review to wait",
        lambda: any(w.kind == "approval" for w in saga(orchestrator, waiting).waits),
        within=WITHIN,
    )
    original = (folder / "order-v2.yaml").read_text()
    (folder / "order-v2.yaml").write_text(original.replace("reason: order saga compensated", "reason: changed"))
    assert stack.orchestrator is not None
    log = stack.orchestrator.log_path
    poll("the refusal to be logged", lambda: "still run on OrderSaga v2" in log.read_text(), within=WITHIN)
    assert "give the change a new version (3)" in log.read_text()
    (folder / "order-v2.yaml").write_text(original)
    orchestrator.DecideApproval(
        pb.DecideApprovalRequest(saga_id=waiting, step="fraud_review", approve=True, reason="fine"),
        timeout=10,
        metadata=TOKEN,
    )
    assert ended(orchestrator, waiting).status == pb.SAGA_STATUS_COMPLETED
