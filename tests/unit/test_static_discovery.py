"""Parsing of static discovery variables, Consul settings and the DISCOVERY switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from svckit.discovery import (
    SUITE_SERVICES,
    ConsulResolver,
    ConsulSettings,
    StaticResolver,
    make_resolver,
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
