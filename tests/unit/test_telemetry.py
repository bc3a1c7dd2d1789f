"""Tracing configuration: off (no provider, no interceptor) without OTEL_* variables, on and named when they ask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.observability import Observability
from svckit.telemetry import tracing_requested

REPO_ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the global tracer provider can be set only once per process.
PROBE = """
import json
from opentelemetry import trace
from svckit import telemetry
from svckit.server import RpcServer
tracing = telemetry.configure_tracing("payment")
provider = trace.get_tracer_provider()
print(json.dumps({
    "configured": tracing is not None,
    "provider": type(provider).__name__,
    "server_interceptors": [type(i).__name__ for i in telemetry.server_interceptors()],
    "client_interceptors": [type(i).__name__ for i in telemetry.client_interceptors()],
    "service_name": provider.resource.attributes.get("service.name") if tracing else None,
}))
telemetry.shutdown_tracing()
"""


def probe(**otel: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(otel)
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_without_otel_configuration_nothing_is_installed() -> None:
    found = probe()
    assert found == {
        "configured": False,
        "provider": "ProxyTracerProvider",
        "server_interceptors": [],
        "client_interceptors": [],
        "service_name": None,
    }


def test_exporter_none_keeps_tracing_off_even_with_an_endpoint() -> None:
    found = probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317", OTEL_TRACES_EXPORTER="none")
    assert found["configured"] is False and found["server_interceptors"] == []


def test_an_endpoint_turns_tracing_on_with_the_process_name() -> None:
    found = probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317")
    assert found["configured"] is True
    assert found["provider"] == "TracerProvider"
    assert found["server_interceptors"] == ["OpenTelemetryAioServerInterceptor"]
    assert found["client_interceptors"] == [
        "UnaryUnaryAioClientInterceptor",
        "UnaryStreamAioClientInterceptor",
        "StreamUnaryAioClientInterceptor",
        "StreamStreamAioClientInterceptor",
    ]
    assert found["service_name"] == "payment"


def test_otel_service_name_overrides_the_process_name() -> None:
    found = probe(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:4317", OTEL_SERVICE_NAME="payments-eu")
    assert found["service_name"] == "payments-eu"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://jaeger:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, False),
        ({"OTEL_TRACES_EXPORTER": "", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, True),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}, False),
    ],
)
def test_when_tracing_is_requested(environ: dict[str, str], expected: bool) -> None:
    assert tracing_requested(environ) is expected


def test_an_unsupported_exporter_fails_fast() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_TRACES_EXPORTER"] = "zipkin"
    result = subprocess.run(
        [sys.executable, "-c", "from svckit.telemetry import configure_tracing; configure_tracing('x')"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "OTEL_TRACES_EXPORTER" in result.stderr and "zipkin" in result.stderr


def test_orchestrator_hooks_are_absent_when_tracing_and_metrics_are_off() -> None:
    observability = Observability(None, metrics=False)
    assert observability.observer() is None
    assert observability.wrap_call() is None
    assert observability.begin_saga("OrderSaga", "order-1") is None
    metrics_only = Observability(None, metrics=True)
    assert metrics_only.observer() is metrics_only
    assert metrics_only.wrap_call() is None
