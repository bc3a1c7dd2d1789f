"""Static discovery of any service name, Consul settings, the DISCOVERY switch and unresolvable services."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from orchestrator.observability import Observability
from svckit.discovery import (
    SUITE_SERVICES,
    ConsulResolver,
    ConsulSettings,
    StaticResolver,
    make_resolver,
    parse_service_addresses,
    unresolvable,
)

ALL_STATIC = {
    "INVENTORY_ADDR": "127.0.0.1:50051",
    "PAYMENT_ADDR": "127.0.0.1:50052",
    "SHIPPING_ADDR": "127.0.0.1:50053",
    "NOTIFY_ADDR": "127.0.0.1:50054",
}


async def test_from_env_reads_comma_separated_lists() -> None:
    resolver = StaticResolver.from_env(
        ["inventory", "payment"],
        {"INVENTORY_ADDR": " 127.0.0.1:50051 , 127.0.0.1:50061 ", "PAYMENT_ADDR": "[::1]:50052,payment:9000"},
    )
    await resolver.start()
    assert resolver.addresses("inventory") == ["127.0.0.1:50051", "127.0.0.1:50061"]
    assert resolver.addresses("payment") == ["[::1]:50052", "payment:9000"]
    assert await resolver.wait_for("inventory", 0.1) == ["127.0.0.1:50051", "127.0.0.1:50061"]
    await resolver.close()


def test_addresses_returns_a_copy_and_unknown_services_are_empty() -> None:
    resolver = StaticResolver({"inventory": ["127.0.0.1:1"]})
    resolver.addresses("inventory").append("mutated:2")
    assert resolver.addresses("inventory") == ["127.0.0.1:1"]
    assert resolver.addresses("nope") == []


async def test_wait_for_an_unknown_service_names_the_variable() -> None:
    resolver = StaticResolver({})
    with pytest.raises(LookupError, match="SHIPPING_ADDR"):
        await resolver.wait_for("shipping", 5.0)


def test_dashes_in_service_names_become_underscores() -> None:
    resolver = StaticResolver.from_env(["order-api"], {"ORDER_API_ADDR": "127.0.0.1:8080"})
    assert resolver.addresses("order-api") == ["127.0.0.1:8080"]


def test_missing_variable_is_named() -> None:
    with pytest.raises(ValueError, match=r"PAYMENT_ADDR is not set.*DISCOVERY=consul"):
        StaticResolver.from_env(["payment"], {})


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("", "is empty"),
        (" , ", "is empty"),
        ("localhost", "not host:port"),
        (":50051", "not host:port"),
        ("127.0.0.1:", "invalid port"),
        ("127.0.0.1:http", "invalid port"),
        ("127.0.0.1:0", "invalid port"),
        ("127.0.0.1:65536", "invalid port"),
        ("::1:50051", "IPv6 hosts in brackets"),
        ("[::1]50051", "not host:port"),
        ("[not-v6]:50051", "invalid IPv6"),
        ("127.0.0.1:50051,bad", "'bad'"),
    ],
)
def test_malformed_address_names_the_variable(value: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="INVENTORY_ADDR") as caught:
        StaticResolver.from_env(["inventory"], {"INVENTORY_ADDR": value})
    assert complaint in str(caught.value)


def test_make_resolver_defaults_to_static_for_the_suite_services() -> None:
    resolver = make_resolver(ALL_STATIC)
    assert isinstance(resolver, StaticResolver)
    assert [resolver.addresses(s) for s in SUITE_SERVICES] == [[v] for v in ALL_STATIC.values()]
    assert isinstance(make_resolver({**ALL_STATIC, "DISCOVERY": "Static"}), StaticResolver)


def test_make_resolver_static_fails_fast_on_a_missing_service() -> None:
    partial = dict(ALL_STATIC)
    del partial["NOTIFY_ADDR"]
    with pytest.raises(ValueError, match="NOTIFY_ADDR"):
        make_resolver(partial)


def test_consul_http_addr_alone_does_not_switch_to_consul() -> None:
    assert isinstance(make_resolver({**ALL_STATIC, "CONSUL_HTTP_ADDR": "127.0.0.1:8500"}), StaticResolver)


def test_make_resolver_consul_uses_the_standard_variables() -> None:
    resolver = make_resolver(
        {
            "DISCOVERY": "consul",
            "CONSUL_HTTP_ADDR": "https://consul.internal:8501",
            "CONSUL_HTTP_TOKEN": "t0k",
        }
    )
    assert isinstance(resolver, ConsulResolver)
    assert resolver.settings == ConsulSettings(host="consul.internal", port=8501, scheme="https", token="t0k")


def test_make_resolver_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="DISCOVERY='etcd'"):
        make_resolver({"DISCOVERY": "etcd"})


def test_consul_settings_defaults() -> None:
    settings = ConsulSettings.from_env({})
    assert (settings.url, settings.token, settings.verify, settings.client_cert) == (
        "http://127.0.0.1:8500",
        None,
        True,
        None,
    )


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        ({"CONSUL_HTTP_ADDR": "10.0.0.5:8500"}, "http://10.0.0.5:8500"),
        ({"CONSUL_HTTP_ADDR": "http://consul:8500/"}, "http://consul:8500"),
        ({"CONSUL_HTTP_ADDR": "consul"}, "http://consul:8500"),
        ({"CONSUL_HTTP_ADDR": "https://consul"}, "https://consul:8501"),
        ({"CONSUL_HTTP_ADDR": "consul:8501", "CONSUL_HTTP_SSL": "true"}, "https://consul:8501"),
        ({"CONSUL_HTTP_ADDR": "https://consul:8501", "CONSUL_HTTP_SSL": "0"}, "http://consul:8501"),
        ({"CONSUL_HTTP_ADDR": "[::1]:8500"}, "http://[::1]:8500"),
    ],
)
def test_consul_http_addr_forms(environ: dict[str, str], url: str) -> None:
    assert ConsulSettings.from_env(environ).url == url


def test_consul_tls_variables() -> None:
    settings = ConsulSettings.from_env(
        {
            "CONSUL_HTTP_ADDR": "https://consul:8501",
            "CONSUL_CACERT": "/etc/consul/ca.pem",
            "CONSUL_CLIENT_CERT": "/etc/consul/client.pem",
            "CONSUL_CLIENT_KEY": "/etc/consul/client-key.pem",
        }
    )
    assert settings.verify == "/etc/consul/ca.pem"
    assert settings.client_cert == ("/etc/consul/client.pem", "/etc/consul/client-key.pem")
    unverified = ConsulSettings.from_env({"CONSUL_CACERT": "/ca.pem", "CONSUL_HTTP_SSL_VERIFY": "false"})
    assert unverified.verify is False


def test_token_file_is_read_when_no_token_is_given(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert ConsulSettings.from_env({"CONSUL_HTTP_TOKEN_FILE": str(token_file)}).token == "from-file"
    both = {"CONSUL_HTTP_TOKEN_FILE": str(token_file), "CONSUL_HTTP_TOKEN": "direct"}
    assert ConsulSettings.from_env(both).token == "direct"


def test_token_is_not_shown_in_repr() -> None:
    assert "s3cret" not in repr(ConsulSettings(token="s3cret"))


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"CONSUL_HTTP_SSL": "yes please"}, "CONSUL_HTTP_SSL"),
        ({"CONSUL_HTTP_SSL_VERIFY": "maybe"}, "CONSUL_HTTP_SSL_VERIFY"),
        ({"CONSUL_HTTP_ADDR": "consul:notaport"}, "CONSUL_HTTP_ADDR"),
        ({"CONSUL_HTTP_ADDR": "unix:///var/run/consul.sock"}, "CONSUL_HTTP_ADDR"),
        ({"CONSUL_CLIENT_CERT": "/c.pem"}, "CONSUL_CLIENT_KEY"),
        ({"CONSUL_HTTP_TOKEN_FILE": "/nonexistent/token"}, "CONSUL_HTTP_TOKEN_FILE"),
    ],
)
def test_bad_consul_variables_are_named(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        ConsulSettings.from_env(environ)


# --------------------------------------------------------------------------- any service, by name


def test_any_name_is_read_from_its_variable_when_first_asked_for() -> None:
    environ = {"INVENTORY_ADDR": "127.0.0.1:50051"}
    resolver = StaticResolver.from_env(["inventory"], environ)
    # Set after construction: the variable of a name nobody named yet is read at its first lookup.
    environ["LOYALTY_ADDR"] = "127.0.0.1:7001, 127.0.0.1:7002"
    environ["ORDER_API_ADDR"] = "[::1]:8080"
    assert resolver.addresses("loyalty") == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert resolver.addresses("order-api") == ["[::1]:8080"]
    assert resolver.addresses("order.api") == ["[::1]:8080"]
    assert resolver.addresses("inventory") == ["127.0.0.1:50051"]


async def test_make_resolver_static_resolves_names_outside_the_suite() -> None:
    resolver = make_resolver({**ALL_STATIC, "LOYALTY_ADDR": "127.0.0.1:7001"})
    await resolver.start()
    assert await resolver.wait_for("loyalty", 0.1) == ["127.0.0.1:7001"]


def test_the_map_gives_addresses_to_any_name() -> None:
    environ = {
        "SERVICE_ADDRESSES": " loyalty = 127.0.0.1:7001,127.0.0.1:7002 ; order-api=[::1]:8080;\n"
        "fraud=fraud.internal:9000;"
    }
    resolver = StaticResolver.from_env(["loyalty"], environ)
    assert resolver.addresses("loyalty") == ["127.0.0.1:7001", "127.0.0.1:7002"]
    # Names match the map the way they match their <NAME>_ADDR variable.
    assert resolver.addresses("ORDER_API") == ["[::1]:8080"]
    assert resolver.addresses("fraud") == ["fraud.internal:9000"]
    assert resolver.addresses("inventory") == []


def test_name_addr_beats_the_map() -> None:
    environ = {"SERVICE_ADDRESSES": "loyalty=127.0.0.1:7001;fraud=127.0.0.1:9000", "LOYALTY_ADDR": "127.0.0.1:7555"}
    resolver = StaticResolver.from_env(["loyalty"], environ)
    assert resolver.addresses("loyalty") == ["127.0.0.1:7555"]
    assert resolver.addresses("fraud") == ["127.0.0.1:9000"]


def test_an_empty_map_is_no_map() -> None:
    assert parse_service_addresses("") == {}
    assert parse_service_addresses(" ;\n; ") == {}
    assert make_resolver({**ALL_STATIC, "SERVICE_ADDRESSES": ""}).addresses("loyalty") == []


def test_the_map_satisfies_the_required_services() -> None:
    entries = ";".join(f"{name}=127.0.0.1:{50051 + i}" for i, name in enumerate(SUITE_SERVICES))
    resolver = make_resolver({"SERVICE_ADDRESSES": entries})
    assert resolver.addresses("notify") == ["127.0.0.1:50054"]


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("loyalty 127.0.0.1:7001", "has no '='"),
        ("=127.0.0.1:7001", "is not a service name"),
        ("loy alty=127.0.0.1:7001", "is not a service name"),
        ("-loyalty=127.0.0.1:7001", "is not a service name"),
        ("loyalty/../agent=127.0.0.1:7001", "is not a service name"),
        ("x" * 129 + "=127.0.0.1:7001", "is not a service name"),
        ("loyalty=", "entry 'loyalty' is empty"),
        ("loyalty= , ", "entry 'loyalty' is empty"),
        ("loyalty=127.0.0.1", "not host:port"),
        ("loyalty=127.0.0.1:99999", "invalid port"),
        ("loyalty=127.0.0.1:\uff17\uff10\uff10\uff11", "invalid port"),  # fullwidth digits
        ("loyalty=exa mple:7001", "invalid host"),
        ("loyalty=exa/mple:7001", "invalid host"),
        ("loyalty=127.0.0.1:7001,127.0.0.1:7001", "listed twice"),
        ("loyalty=127.0.0.1:7001;loyalty=127.0.0.1:7002", "'loyalty' is given twice"),
        ("order-api=127.0.0.1:1;ORDER_API=127.0.0.1:2", "given twice (also as 'order-api')"),
        ("loyalty=127.0.0.1:7001\x00", "unprintable character"),
        ("loyalty=" + "a" * 400 + ":1", "too long for host:port"),
        ("loyalty=127.0.0.1:7001;" * 4000, "characters long; at most 65536"),
    ],
)
def test_a_malformed_map_names_the_variable_and_stops_the_start(value: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="SERVICE_ADDRESSES") as caught:
        make_resolver({**ALL_STATIC, "SERVICE_ADDRESSES": value})
    assert complaint in str(caught.value)
    # The refusal quotes a short prefix of what it refuses, never a whole hostile value.
    assert len(str(caught.value)) < 400


def test_not_required_leaves_missing_services_to_unresolvable_but_refuses_malformed_ones() -> None:
    resolver = make_resolver({}, ["loyalty", "inventory"], required=False)
    assert resolver.addresses("loyalty") == []
    with pytest.raises(ValueError, match="LOYALTY_ADDR"):
        make_resolver({"LOYALTY_ADDR": "nope"}, ["loyalty"], required=False)
    with pytest.raises(ValueError, match="is not a service name"):
        make_resolver({}, ["bad name"], required=False)


async def test_a_malformed_variable_found_at_run_time_is_logged_once_and_is_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = StaticResolver.from_env([], {"LOYALTY_ADDR": "127.0.0.1:http"})
    with caplog.at_level(logging.ERROR, logger="svckit.discovery"):
        assert resolver.addresses("loyalty") == []
        assert resolver.addresses("loyalty") == []
    assert [r.getMessage() for r in caplog.records if "LOYALTY_ADDR" in r.getMessage()] == [
        "service 'loyalty' has no static address: LOYALTY_ADDR: '127.0.0.1:http' has an invalid port 'http' "
        "(expected 1-65535)"
    ]
    with pytest.raises(LookupError, match=r"LOYALTY_ADDR: '127\.0\.0\.1:http' has an invalid port"):
        await resolver.wait_for("loyalty", 1.0)


async def test_a_name_that_is_no_service_name_is_never_resolved() -> None:
    resolver = StaticResolver.from_env([], {"A_B_ADDR": "127.0.0.1:1"})
    assert resolver.addresses("a/b") == []
    with pytest.raises(LookupError, match="is not a service name"):
        await resolver.wait_for("a/b", 1.0)


async def test_unresolvable_names_each_missing_service_with_its_reason_at_once() -> None:
    resolver = make_resolver(
        {**ALL_STATIC, "LOYALTY_ADDR": "127.0.0.1:7001", "FRAUD_ADDR": ""}, ["inventory"], required=False
    )
    await resolver.start()
    # A generous timeout: static discovery must not spend it, there is nothing to wait for.
    missing = await asyncio.wait_for(
        unresolvable(resolver, ["loyalty", "inventory", "points", "fraud", "points"], timeout=60.0), 5.0
    )
    assert list(missing) == ["fraud", "points"]
    assert missing["points"] == (
        "no static address for 'points': set POINTS_ADDR, add points=host:port to SERVICE_ADDRESSES, "
        "or use DISCOVERY=consul"
    )
    assert missing["fraud"] == "FRAUD_ADDR is empty: expected host:port[,host:port...]"
    assert await unresolvable(resolver, [], timeout=1.0) == {}


async def test_unresolvable_gives_consul_one_timeout_for_all_services() -> None:
    # Nothing listens on port 1: every query fails, so no service can be resolved in time.
    resolver = ConsulResolver(ConsulSettings(port=1), retry_initial=0.05, retry_max=0.1)
    await resolver.start()
    try:
        missing = await asyncio.wait_for(unresolvable(resolver, ["loyalty", "points", "a/b"], timeout=0.5), 10.0)
    finally:
        await resolver.close()
    assert sorted(missing) == ["a/b", "loyalty", "points"]
    assert "no healthy instance of 'loyalty' in Consul at http://127.0.0.1:1 within 0.5s" in missing["loyalty"]
    assert "is not a service name" in missing["a/b"]


def test_consul_refuses_a_service_name_that_would_change_the_query_path() -> None:
    with pytest.raises(ValueError, match="is not a service name"):
        ConsulResolver(ConsulSettings(), ["../agent/self"])


# --------------------------------------------------------------------------- the report of unresolvable services


def _unresolvable_gauge(service: str) -> float | None:
    return REGISTRY.get_sample_value("sagasuite_service_unresolvable", {"service": service})


def test_report_unresolvable_logs_each_name_with_its_callers_and_sets_the_gauge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    observability = Observability(None, metrics=True)
    callers = {"loyalty": ["LoyaltySaga v1", "OrderSaga v3"], "inventory": ["OrderSaga v3"], "rewards": ["Promo v1"]}
    with caplog.at_level(logging.INFO, logger="sagasuite.observability"):
        observability.report_unresolvable({"loyalty": "no static address for 'loyalty': set LOYALTY_ADDR"}, callers)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "service 'loyalty' cannot be resolved (called by LoyaltySaga v1, OrderSaga v3); its steps fail with "
        "UNAVAILABLE until it can: no static address for 'loyalty': set LOYALTY_ADDR"
    ]
    assert (_unresolvable_gauge("loyalty"), _unresolvable_gauge("inventory")) == (1.0, 0.0)
    assert observability.unresolvable_services == {"loyalty": "no static address for 'loyalty': set LOYALTY_ADDR"}

    # The next load: loyalty resolves, rewards is no longer called by anything.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sagasuite.observability"):
        observability.report_unresolvable({}, {"loyalty": ["LoyaltySaga v1"], "inventory": ["OrderSaga v3"]})
    assert [r.getMessage() for r in caplog.records] == ["service 'loyalty' can be resolved now"]
    assert (_unresolvable_gauge("loyalty"), _unresolvable_gauge("rewards")) == (0.0, None)


class _LateResolver:
    """A resolver whose one service gets an instance when the test says so (as Consul's would)."""

    def __init__(self) -> None:
        self.known: list[str] = []

    async def start(self) -> None:
        return None

    def addresses(self, service: str) -> list[str]:
        return list(self.known)

    async def wait_for(self, service: str, timeout: float) -> list[str]:  # noqa: ASYNC109
        if not self.known:
            raise TimeoutError(f"no healthy instance of {service!r} within {timeout:g}s")
        return list(self.known)

    async def close(self) -> None:
        return None


async def test_report_unresolvable_with_the_resolver_reads_the_gauge_at_scrape_time() -> None:
    observability = Observability(None, metrics=True)
    resolver = _LateResolver()
    missing = await unresolvable(resolver, ["late"], timeout=0.0)
    assert missing == {"late": "no healthy instance of 'late' within 0s"}
    observability.report_unresolvable(missing, {"late": ["Late v1"]}, resolver)
    assert _unresolvable_gauge("late") == 1.0
    # An instance appearing after the check is seen at the next scrape.
    resolver.known.append("127.0.0.1:1")
    assert _unresolvable_gauge("late") == 0.0
    # A later report without the resolver sets a plain value again.
    observability.report_unresolvable({}, {"late": ["Late v1"]})
    assert _unresolvable_gauge("late") == 0.0


def test_report_unresolvable_logs_with_metrics_off(caplog: pytest.LogCaptureFixture) -> None:
    observability = Observability(None, metrics=False)
    with caplog.at_level(logging.WARNING, logger="sagasuite.observability"):
        observability.report_unresolvable({"offline": "no static address"}, {"offline": ["Offline v1"]})
    assert any("service 'offline' cannot be resolved (called by Offline v1)" in r.getMessage() for r in caplog.records)
    assert _unresolvable_gauge("offline") is None
