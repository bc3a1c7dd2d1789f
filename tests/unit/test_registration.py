"""What a process registers in Consul, derived from its settings: id, address, tags, meta and check settings."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from svckit.config import ServiceSettings
from svckit.registration import ConsulAnnouncer, advertised_host, announcer_from_settings, instance_id


def _settings(**values: object) -> ServiceSettings:
    return ServiceSettings(**values)  # type: ignore[arg-type]


def test_instance_id_is_unique_per_host_and_port_and_url_safe() -> None:
    assert instance_id("payment", "10.0.3.7", 50052) == "payment-10.0.3.7-50052"
    assert instance_id("payment", "::1", 50052) == "payment--1-50052"
    assert instance_id("payment", "10.0.3.7", 50052) != instance_id("payment", "10.0.3.7", 50062)


def test_advertised_host_prefers_advertise_host_then_host() -> None:
    assert advertised_host(_settings(host="127.0.0.1")) == "127.0.0.1"
    assert advertised_host(_settings(host="0.0.0.0", advertise_host="payment-1.internal")) == "payment-1.internal"
    assert advertised_host(_settings(host="::1")) == "::1"


def test_wildcard_host_advertises_a_concrete_address() -> None:
    host = advertised_host(_settings(host="0.0.0.0"))
    assert host and host not in {"0.0.0.0", "::"}


def test_static_discovery_registers_nothing() -> None:
    assert announcer_from_settings(_settings(discovery="static"), contract="sagasuite.payment.v1") is None


def test_consul_announcer_carries_contract_meta_tags_and_check_settings() -> None:
    settings = _settings(
        service_name="payment",
        discovery="consul",
        host="127.0.0.1",
        consul_check_interval="200ms",
        consul_check_timeout="1s",
        consul_deregister_after="90s",
        consul_tags="blue, canary,grpc",
        tls_cert_file="/certs/payment.pem",
    )
    announcer = announcer_from_settings(
        settings, contract="sagasuite.payment.v1", environ={"CONSUL_HTTP_ADDR": "10.0.0.2:8500"}
    )
    assert announcer is not None
    assert (announcer.name, announcer.address, announcer.agent_url) == ("payment", "127.0.0.1", "http://10.0.0.2:8500")
    assert announcer.tags == ["grpc", "v1", "tls", "blue", "canary"]
    assert announcer.meta["contract"] == "sagasuite.payment.v1"
    assert announcer.meta["contract_version"] == "v1"
    assert announcer.meta["version"]
    assert (announcer.check_interval, announcer.check_timeout, announcer.deregister_after) == ("200ms", "1s", "90s")
    assert announcer.grpc_use_tls is True


def test_bad_consul_variables_fail_at_once() -> None:
    with pytest.raises(ValueError, match="CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"):
        announcer_from_settings(
            _settings(discovery="consul"), contract="sagasuite.payment.v1", environ={"CONSUL_CLIENT_CERT": "/c.pem"}
        )


@pytest.mark.parametrize("field", ["consul_check_interval", "consul_check_timeout", "consul_deregister_after"])
def test_check_durations_must_be_go_durations(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        _settings(**{field: "10 seconds"})


def _tls_announcer(**values: object) -> ConsulAnnouncer:
    settings = _settings(service_name="payment", discovery="consul", host="10.0.3.7", **values)
    announcer = announcer_from_settings(settings, contract="sagasuite.payment.v1", environ={})
    assert announcer is not None
    return announcer


def test_a_tls_check_verifies_the_configured_server_name_else_the_advertised_host() -> None:
    named = _tls_announcer(tls_cert_file="/certs/internal.pem", consul_check_tls_server_name="sagasuite.internal")
    assert named.check_tls_server_name == "sagasuite.internal"
    assert _tls_announcer(tls_cert_file="/certs/internal.pem").check_tls_server_name == "10.0.3.7"
    # Plaintext checks carry no server name at all.
    assert _tls_announcer(consul_check_tls_server_name="sagasuite.internal").check_tls_server_name == ""


def test_the_check_server_name_must_be_a_host_name() -> None:
    with pytest.raises(ValidationError, match="consul_check_tls_server_name"):
        _settings(consul_check_tls_server_name="sagasuite.internal\nX-Injected: 1")


class _RecordingRegistration:
    """Stands in for ConsulRegistration: records what would be sent to the agent."""

    def __init__(self) -> None:
        self.registered = asyncio.Event()
        self.calls: list[dict[str, Any]] = []

    async def register_async(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        self.registered.set()

    async def is_registered_async(self, instance_id: str) -> bool:
        return True

    async def deregister_async(self, instance_id: str) -> bool:
        return True


async def _registered_check(*, grpc_use_tls: bool) -> dict[str, Any]:
    recording = _RecordingRegistration()
    announcer = ConsulAnnouncer(
        recording,  # type: ignore[arg-type]
        name="payment",
        address="10.0.3.7",
        grpc_use_tls=grpc_use_tls,
        check_tls_server_name="sagasuite.internal",
    )
    await announcer.start(50052)
    try:
        await asyncio.wait_for(recording.registered.wait(), 10)
    finally:
        await announcer.stop()
    return recording.calls[0]


async def test_the_registration_sends_the_check_server_name_of_a_tls_check_only() -> None:
    tls_check = await _registered_check(grpc_use_tls=True)
    assert (tls_check["grpc_use_tls"], tls_check["tls_server_name"]) == (True, "sagasuite.internal")
    plaintext_check = await _registered_check(grpc_use_tls=False)
    assert plaintext_check["grpc_use_tls"] is False and "tls_server_name" not in plaintext_check
