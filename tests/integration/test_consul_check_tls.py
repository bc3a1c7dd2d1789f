"""Consul's gRPC checks over TLS verify the check's TLSServerName, which a TLS service registers from its settings."""

# Since Consul 1.17 the agent verifies a TLS check against the check's TLSServerName only (without one,
# against the host of the check's address): the agent's server_name no longer applies. Real processes
# serve with a certificate that names SERVICE_NAME and none of their addresses, as the replicas of
# compose.tls.yaml share one; the stand-in runs the checks with the agent's own certificate (mutual TLS).
# Stand-in only: a real agent's TLS for checks is its own configuration, not something a test can set.

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.devcerts import issue, make_ca
from devstack.launcher import ManagedProcess
from tests.consul_standin import ConsulStandIn

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("CONSUL_HTTP_ADDR")), reason="configures the agent's TLS for checks: stand-in only"
)

SERVICE_NAME = "payment.sagasuite.test"
WRONG_NAME = "inventory.sagasuite.test"
WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Certs:
    ca: Path
    service: tuple[Path, Path]
    agent: tuple[Path, Path]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = make_ca("consul check test CA")
    return Certs(
        ca=ca.write(directory, "ca")[0],
        service=issue(ca, SERVICE_NAME, (SERVICE_NAME,)).write(directory, "service"),
        agent=issue(ca, "consul", ("consul",)).write(directory, "consul"),
    )


@pytest.fixture
def consul(certs: Certs) -> Iterator[ConsulStandIn]:
    agent = ConsulStandIn(
        0,
        min_check_interval=0.05,
        check_tls_ca_file=str(certs.ca),
        check_tls_cert_file=str(certs.agent[0]),
        check_tls_key_file=str(certs.agent[1]),
    )
    with agent:
        yield agent


def _tls_server(certs: Certs) -> dict[str, str]:
    """A payment server that speaks TLS only and requires client certificates from the CA."""
    return {
        "TLS_CERT_FILE": str(certs.service[0]),
        "TLS_KEY_FILE": str(certs.service[1]),
        "TLS_CLIENT_CA_FILE": str(certs.ca),
    }


def _checks(consul: ConsulStandIn, service_id: str) -> list[dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = requests.get(f"{consul.url}/v1/agent/checks", timeout=5).json()
    return [check for check in checks.values() if check["ServiceID"] == service_id]


def _wait_for_run(consul: ConsulStandIn, service_id: str, status: str) -> dict[str, Any]:
    """The instance's check once it has run (its output is set) and has `status`."""
    deadline = time.monotonic() + WAIT_SECONDS
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = _checks(consul, service_id)
        if seen and seen[0]["Output"] and seen[0]["Status"] == status:
            return seen[0]
        time.sleep(0.05)
    raise AssertionError(f"{service_id}: no {status} check run within {WAIT_SECONDS:g}s; last seen: {seen}")


def _register(consul: ConsulStandIn, service_id: str, port: int, **check: Any) -> None:
    body: dict[str, Any] = {
        "Name": "payment",
        "ID": service_id,
        "Address": "127.0.0.1",
        "Port": port,
        "Check": {"GRPC": f"127.0.0.1:{port}", "GRPCUseTLS": True, "Interval": "200ms", "Timeout": "2s", **check},
    }
    requests.put(f"{consul.url}/v1/agent/service/register", json=body, timeout=5).raise_for_status()


def test_a_tls_check_passes_with_the_certificate_s_name_and_stays_critical_without_it(
    consul: ConsulStandIn, certs: Certs, start_process: Callable[..., ManagedProcess]
) -> None:
    server = start_process("payment_svc", "payment", **_tls_server(certs))
    assert server.port is not None
    _register(consul, "named-right", server.port, TLSServerName=SERVICE_NAME)
    _register(consul, "named-wrong", server.port, TLSServerName=WRONG_NAME)
    # No TLSServerName: the address is verified, and the certificate does not name 127.0.0.1.
    _register(consul, "unnamed", server.port)
    assert _wait_for_run(consul, "named-right", "passing")["Output"].endswith("success")
    for service_id in ("named-wrong", "unnamed"):
        check = _wait_for_run(consul, service_id, "critical")
        assert "failed" in check["Output"], check
    passing = requests.get(f"{consul.url}/v1/health/service/payment?passing=true", timeout=5).json()
    assert [entry["Service"]["ID"] for entry in passing] == ["named-right"]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"CONSUL_CHECK_TLS_SERVER_NAME": SERVICE_NAME}, "passing"),
        ({"CONSUL_CHECK_TLS_SERVER_NAME": WRONG_NAME}, "critical"),
        # Unset: the advertised host, which this certificate does not name.
        ({}, "critical"),
    ],
    ids=["certificate-name", "wrong-name", "advertised-host"],
)
def test_a_tls_service_registers_the_check_s_server_name_from_its_setting(
    consul: ConsulStandIn,
    certs: Certs,
    start_process: Callable[..., ManagedProcess],
    setting: dict[str, str],
    expected: str,
) -> None:
    registering = {
        "DISCOVERY": "consul",
        "CONSUL_HTTP_ADDR": consul.address,
        "CONSUL_HTTP_SSL": "false",
        "CONSUL_CHECK_INTERVAL": "200ms",
        "CONSUL_CHECK_TIMEOUT": "2s",
        "CONSUL_RETRY_MAX_SECONDS": "1",
    }
    server = start_process("payment_svc", "payment", **_tls_server(certs), **registering, **setting)
    check = _wait_for_run(consul, f"payment-127.0.0.1-{server.port}", expected)
    if expected == "critical":
        assert "failed" in check["Output"], check
    name = setting.get("CONSUL_CHECK_TLS_SERVER_NAME", "127.0.0.1")
    assert f"gRPC check over TLS (server name {name})" in server.log_path.read_text()
