"""A YAML saga against a service outside the suite, built from its own proto, with no Python in the orchestrator."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from google.protobuf import any_pb2

from devstack.launcher import ManagedProcess
from devstack.orders import order_request
from devstack.stack import SERVICES, LocalStack
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.integration.test_consul_stack import PROCESS_ENV, ConsulAgent
from tests.loyalty.build import LoyaltyBuild, build_loyalty, import_loyalty
from tests.loyalty.process import LoyaltyProcess
from tests.orchestrator_helpers import poll, start_stack

ENDED = {
    pb.SAGA_STATUS_COMPLETED,
    pb.SAGA_STATUS_COMPENSATED,
    pb.SAGA_STATUS_NEEDS_ATTENTION,
    pb.SAGA_STATUS_TERMINATED,
}

# Stock, then loyalty points (undone by revoking them), then the charge: a declined card unwinds
# the points and the stock. The loyalty contract comes from its own descriptor set.
LOYALTY_SAGA = """\
document:
  dsl: '1.0.0'
  namespace: shop
  name: LoyaltyOrder
  version: '1'
saga:
  input: sagasuite.orchestrator.v1.PlaceOrderRequest
  contract:
    descriptorSet: suite
  key: ${ .order_id }
  example:
    order_id: example-order
    customer_email: ada@example.com
    items: [{sku: BOOK-001, quantity: 1}]
    amount: {currency_code: EUR, minor_units: 2999}
    payment_token: tok_visa
do:
  - reserve_stock:
      call: grpc
      with:
        service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
        method: ReserveStock
        arguments:
          order_id: ${ .order_id }
          items: ${ .items }
      compensate:
        call: grpc
        with:
          service: {name: sagasuite.inventory.v1.InventoryService, host: inventory}
          method: ReleaseStock
          arguments: {order_id: "${ .order_id }", reason: loyalty order compensated}
  - award_points:
      call: grpc
      with:
        proto: {endpoint: "file://loyalty.binpb"}
        service: {name: loyalty.v1.LoyaltyService, host: loyalty}
        method: AwardPoints
        arguments:
          order_id: ${ .order_id }
          customer: ${ .customer_email }
          points: ${ .amount.minor_units / 100 | floor }
      compensate:
        call: grpc
        with:
          proto: {endpoint: "file://loyalty.binpb"}
          service: {name: loyalty.v1.LoyaltyService, host: loyalty}
          method: RevokePoints
          arguments: {order_id: "${ .order_id }", reason: "${ \\"payment failed: \\" + $saga.id }"}
  - charge_payment:
      call: grpc
      with:
        service: {name: sagasuite.payment.v1.PaymentService, host: payment}
        method: Charge
        arguments:
          order_id: ${ .order_id }
          amount: ${ .amount }
          payment_token: ${ .payment_token }
      compensate:
        call: grpc
        with:
          service: {name: sagasuite.payment.v1.PaymentService, host: payment}
          method: Refund
          arguments: {order_id: "${ .order_id }", reason: loyalty order compensated}
"""


@pytest.fixture(scope="module")
def loyalty_build(tmp_path_factory: pytest.TempPathFactory) -> LoyaltyBuild:
    return build_loyalty(tmp_path_factory.mktemp("loyalty-build"))


def definitions_dir(root: Path, build: LoyaltyBuild) -> Path:
    folder = root / "definitions"
    folder.mkdir()
    (folder / "loyalty.binpb").write_bytes(build.descriptor_set.read_bytes())
    (folder / "loyalty-order-v1.yaml").write_text(LOYALTY_SAGA)
    return folder


def start(orchestrator: pb_grpc.OrchestratorServiceStub, order_id: str, token: str = "tok_visa") -> str:
    order = order_request(order_id, items=[("BOOK-001", 1)], minor_units=2999, currency="EUR", token=token)
    packed = any_pb2.Any()
    packed.Pack(order)
    response = orchestrator.StartSaga(
        pb.StartSagaRequest(saga_type="LoyaltyOrder", business_key=order_id, input=packed), timeout=10
    )
    return str(response.saga_id)


def wait_ended(orchestrator: pb_grpc.OrchestratorServiceStub, saga_id: str, within: float = 60.0) -> pb.Saga:
    deadline = time.monotonic() + within
    while True:
        saga = orchestrator.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10).saga
        if saga.status in ENDED or time.monotonic() > deadline:
            return saga
        time.sleep(0.05)


def describe(saga: pb.Saga) -> str:
    lines = [f"{saga.saga_id} {pb.SagaStatus.Name(saga.status)} {saga.last_error}"]
    lines += [f"  {e.type} {e.step} #{e.attempt} {e.code} {e.message}" for e in saga.history]
    return "\n".join(lines)


def award_status(build: LoyaltyBuild, address: str, order_id: str) -> str:
    messages, stubs = import_loyalty(build)
    with grpc.insecure_channel(address) as channel:
        found = stubs.LoyaltyServiceStub(channel).GetAward(messages.GetAwardRequest(order_id=order_id), timeout=10)
    return str(messages.AwardStatus.Name(found.award.status))


def check_both_outcomes(
    orchestrator: pb_grpc.OrchestratorServiceStub, build: LoyaltyBuild, loyalty_address: str
) -> None:
    """A paid order keeps its points; a declined card revokes them and releases the stock."""
    paid, declined = f"loyal-{uuid.uuid4().hex[:8]}", f"loyal-declined-{uuid.uuid4().hex[:8]}"
    completed = wait_ended(orchestrator, start(orchestrator, paid))
    assert completed.status == pb.SAGA_STATUS_COMPLETED, describe(completed)
    assert award_status(build, loyalty_address, paid) == "AWARD_STATUS_AWARDED"
    assert completed.definition_version == 1 and completed.contract_hash
    compensated = wait_ended(orchestrator, start(orchestrator, declined, token="tok_declined"))
    assert compensated.status == pb.SAGA_STATUS_COMPENSATED, describe(compensated)
    states = {step.name: step.state for step in compensated.steps}
    assert states == {"reserve_stock": "compensated", "award_points": "compensated", "charge_payment": "failed"}
    assert award_status(build, loyalty_address, declined) == "AWARD_STATUS_REVOKED"


def test_the_loyalty_saga_runs_with_static_discovery(tmp_path: Path, loyalty_build: LoyaltyBuild) -> None:
    with LoyaltyProcess("loyalty", tmp_path, loyalty_build).start() as loyalty:
        env = {"SAGA_DEFINITIONS_DIR": str(definitions_dir(tmp_path, loyalty_build)), "LOYALTY_ADDR": loyalty.address}
        stack: LocalStack = start_stack(tmp_path / "stack", orchestrator_env=env)
        try:
            with grpc.insecure_channel(stack.address) as channel:
                orchestrator = pb_grpc.OrchestratorServiceStub(channel)
                check_both_outcomes(orchestrator, loyalty_build, loyalty.address)
                listed = orchestrator.ListDefinitions(pb.ListDefinitionsRequest(name="LoyaltyOrder"), timeout=10)
                (info,) = listed.definitions
                assert info.source.endswith("loyalty-order-v1.yaml") and "loyalty" in info.services
        finally:
            stack.stop()


def register_in_consul(agent: ConsulAgent, name: str, port: int) -> str:
    """What a Go or Java team's service does at start: register itself with a gRPC health check."""
    instance_id = f"{name}-127.0.0.1-{port}"
    body = {
        "ID": instance_id,
        "Name": name,
        "Address": "127.0.0.1",
        "Port": port,
        "Check": {"GRPC": f"127.0.0.1:{port}", "Interval": "200ms", "Timeout": "1s"},
    }
    response = requests.put(f"{agent.settings.url}/v1/agent/service/register", data=json.dumps(body), timeout=10)
    response.raise_for_status()
    return instance_id


def test_the_loyalty_saga_runs_with_consul_discovery(tmp_path: Path, loyalty_build: LoyaltyBuild) -> None:
    agent = ConsulAgent(tmp_path / "logs").start()
    processes: list[ManagedProcess] = []
    try:

        def env(label: str, **extra: str) -> dict[str, str]:
            return {**PROCESS_ENV, **agent.env, "DATA_DIR": str(tmp_path / label), **extra}

        services = [ManagedProcess(name, module, env(name), tmp_path / "logs") for name, module in SERVICES.items()]
        with ThreadPoolExecutor(len(services)) as pool:
            list(pool.map(lambda process: process.start(), services))
        processes += services
        with LoyaltyProcess("loyalty", tmp_path, loyalty_build).start() as loyalty:
            assert loyalty.port is not None
            instance = register_in_consul(agent, "loyalty", loyalty.port)
            poll("the loyalty service to pass its check", lambda: instance in agent.passing_ids("loyalty"))
            folder = definitions_dir(tmp_path, loyalty_build)
            orchestrator = ManagedProcess(
                "orchestrator", "orchestrator", env("orchestrator", SAGA_DEFINITIONS_DIR=str(folder)), tmp_path / "logs"
            ).start()
            processes.append(orchestrator)
            with grpc.insecure_channel(orchestrator.address) as channel:
                check_both_outcomes(pb_grpc.OrchestratorServiceStub(channel), loyalty_build, loyalty.address)
    finally:
        with ThreadPoolExecutor(max(1, len(processes))) as pool:
            list(pool.map(lambda process: process.stop(timeout=10), processes))
        agent.kill()

