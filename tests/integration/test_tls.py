"""TLS and mutual TLS on real processes, with certificates generated here: every server and the orchestrator's calls."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from devstack.devcerts import issue, make_ca
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as payment_grpc
from tests.orchestrator_helpers import ledger_kinds, new_order_id, order_request, render, status_name

# The services' certificate names none of their addresses, only this: the orchestrator must check it
# with TLS_SERVER_NAME, as scaled replicas sharing one certificate need.
SERVICES_NAME = "services.sagasuite.test"
SERVICES = ("inventory", "payment", "shipping", "notify")
WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Certs:
    """Paths of the generated files: one CA for the suite, and a stranger CA nobody trusts."""

    ca: Path
    orchestrator: tuple[Path, Path]
    services: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger_ca: Path
    stranger_client: tuple[Path, Path]

    def read(self, path: Path) -> bytes:
        return path.read_bytes()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = make_ca("sagasuite test CA")
    stranger = make_ca("stranger CA")
    return Certs(
        ca=ca.write(directory, "ca")[0],
        orchestrator=issue(ca, "orchestrator", ("localhost", "127.0.0.1")).write(directory, "orchestrator"),
        services=issue(ca, SERVICES_NAME, (SERVICES_NAME,)).write(directory, "services"),
        client=issue(ca, "ops-client").write(directory, "client"),
        stranger_ca=stranger.write(directory, "stranger-ca")[0],
        stranger_client=issue(stranger, "ops-client").write(directory, "stranger-client"),
    )


def orchestrator_client_tls(certs: Certs) -> dict[str, str]:
    return {
        "TLS_CA_FILE": str(certs.ca),
        "TLS_CLIENT_CERT_FILE": str(certs.orchestrator[0]),
        "TLS_CLIENT_KEY_FILE": str(certs.orchestrator[1]),
        "TLS_SERVER_NAME": SERVICES_NAME,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[LocalStack]:
    """Every server requires client certificates from the suite's CA; the orchestrator presents one."""
    service_tls = {
        "TLS_CERT_FILE": str(certs.services[0]),
        "TLS_KEY_FILE": str(certs.services[1]),
        "TLS_CLIENT_CA_FILE": str(certs.ca),
    }
    config = StackConfig(
        tmp_path_factory.mktemp("tls"),
        service_env={name: dict(service_tls) for name in SERVICES},
        orchestrator_env={
            "TLS_CERT_FILE": str(certs.orchestrator[0]),
            "TLS_KEY_FILE": str(certs.orchestrator[1]),
            "TLS_CLIENT_CA_FILE": str(certs.ca),
            **orchestrator_client_tls(certs),
        },
    )
    running = LocalStack(config).start()
    yield running
    running.stop()


def credentials(
    certs: Certs, *, ca: Path | None = None, client: tuple[Path, Path] | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or certs.ca).read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )


@pytest.fixture
async def orchestrator(stack: LocalStack, certs: Certs) -> AsyncIterator[pb_grpc.OrchestratorServiceAsyncStub]:
    assert stack.orchestrator is not None
    async with grpc.aio.secure_channel(stack.address, credentials(certs, client=certs.client)) as channel:
        yield pb_grpc.OrchestratorServiceStub(channel)


async def wait_for_saga(
    orchestrator: pb_grpc.OrchestratorServiceAsyncStub, saga_id: str, statuses: set[str], log: str = ""
) -> pb.Saga:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        saga = (await orchestrator.GetSaga(pb.GetSagaRequest(saga_id=saga_id))).saga
        if status_name(saga.status) in statuses:
            return saga
        if time.monotonic() > deadline:
            pytest.fail(f"saga did not reach {sorted(statuses)} in {WAIT_SECONDS:.0f}s:\n{render(saga)}\n{log}")
        await asyncio.sleep(0.05)


async def test_an_order_completes_with_mutual_tls_on_every_hop(
    stack: LocalStack, certs: Certs, orchestrator: pb_grpc.OrchestratorServiceAsyncStub
) -> None:
    order_id = new_order_id("tls")
    placed = await orchestrator.PlaceOrder(order_request(order_id))
    saga = await wait_for_saga(orchestrator, placed.saga_id, {"COMPLETED", "COMPENSATED", "NEEDS_ATTENTION"})
    assert status_name(saga.status) == "COMPLETED", render(saga)
    # The payment service's own ledger, read over mutual TLS with the name its certificate carries.
    options = [("grpc.ssl_target_name_override", SERVICES_NAME)]
    payment = stack.services["payment"].address
    async with grpc.aio.secure_channel(payment, credentials(certs, client=certs.client), options=options) as channel:
        listed = await payment_grpc.PaymentServiceStub(channel).ListPayments(
            payment_pb.ListPaymentsRequest(order_id=order_id, page_size=10)
        )
    assert ledger_kinds(listed.entries) == ["CHARGE"]


@pytest.mark.parametrize(
    "client",
    ["plaintext", "no client certificate", "client certificate from another CA", "server not trusted"],
)
async def test_a_client_without_the_right_certificates_is_refused(stack: LocalStack, certs: Certs, client: str) -> None:
    if client == "plaintext":
        channel = grpc.aio.insecure_channel(stack.address)
    elif client == "no client certificate":
        channel = grpc.aio.secure_channel(stack.address, credentials(certs))
    elif client == "client certificate from another CA":
        channel = grpc.aio.secure_channel(stack.address, credentials(certs, client=certs.stranger_client))
    else:
        channel = grpc.aio.secure_channel(stack.address, credentials(certs, ca=certs.stranger_ca, client=certs.client))
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.OrchestratorServiceStub(channel).ListSagas(pb.ListSagasRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()


@pytest.mark.parametrize(
    ("replica", "client_tls"),
    [
        ("trusts-another-ca", {"TLS_CA_FILE": "stranger"}),
        ("checks-the-address", {"TLS_SERVER_NAME": ""}),
    ],
)
async def test_the_orchestrator_calls_only_services_it_can_verify(
    stack: LocalStack,
    certs: Certs,
    orchestrator: pb_grpc.OrchestratorServiceAsyncStub,
    tmp_path: Path,
    replica: str,
    client_tls: dict[str, str],
) -> None:
    """A replica with wrong client TLS settings gets UNAVAILABLE from the handshake and sends nothing."""
    overrides = {key: str(certs.stranger_ca) if value == "stranger" else value for key, value in client_tls.items()}
    # Its own SQLite file: the replica must not share the first one's.
    other = stack.add_orchestrator(replica, {"DATA_DIR": str(tmp_path / replica), **overrides})
    try:
        async with grpc.aio.secure_channel(other.address, credentials(certs, client=certs.client)) as channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            order_id = new_order_id(replica)
            placed = await stub.PlaceOrder(order_request(order_id))
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                saga = (await stub.GetSaga(pb.GetSagaRequest(saga_id=placed.saga_id))).saga
                failures = [e for e in saga.history if e.type == "StepFailed"]
                if failures:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"no failed call recorded in {WAIT_SECONDS:.0f}s:\n{render(saga)}\n{other.log_tail()}")
                await asyncio.sleep(0.05)
            assert (failures[0].step, failures[0].code) == ("reserve_stock", "UNAVAILABLE"), render(saga)
            assert not any(e.type == "StepSucceeded" for e in saga.history), render(saga)
    finally:
        other.stop()


def run_probe(address: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svckit.healthcheck", address],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_container_health_probe_speaks_mutual_tls(stack: LocalStack, certs: Certs) -> None:
    address = stack.services["payment"].address
    server = {"TLS_CERT_FILE": str(certs.services[0]), "TLS_KEY_FILE": str(certs.services[1])}
    probe = run_probe(address, {**server, **orchestrator_client_tls(certs)})
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "SERVING" in probe.stdout
    without_client_certificate = run_probe(
        address, {**server, "TLS_CA_FILE": str(certs.ca), "TLS_SERVER_NAME": SERVICES_NAME}
    )
    assert without_client_certificate.returncode == 1, without_client_certificate.stdout
    assert "UNAVAILABLE" in without_client_certificate.stdout
