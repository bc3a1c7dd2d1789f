"""OpenTelemetry tracing of a process, configured by the standard OTEL_* variables and off when none ask for it.

Tracing is on when OTEL_TRACES_EXPORTER names an exporter ("otlp", "console"), or when it is unset and
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set; OTEL_TRACES_EXPORTER=none or
OTEL_SDK_DISABLED=true turn it off. Off means off: no TracerProvider is installed and no gRPC interceptor
is added, so a call pays nothing for tracing. On, spans go through a BatchSpanProcessor (OTEL_BSP_*) to an
OTLP/gRPC exporter (OTEL_EXPORTER_OTLP_*), sampled by OTEL_TRACES_SAMPLER, propagated as W3C tracecontext
(OTEL_PROPAGATORS), with service.name from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES or else the
process's own service name.

Calls that are polled over and over get no span: those of the services in OTEL_PYTHON_GRPC_EXCLUDED_SERVICES
(health checks and reflection), and the methods in QUIET_METHODS (health checks again, and the orchestrator's
read-only queries that `saga up`, the web console and dashboards repeat every second or so). svckit.server logs
those methods' successful calls at DEBUG instead of INFO; their metrics count every call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

__all__ = [
    "DEFAULT_EXCLUDED_SERVICES",
    "DEFAULT_QUIET_METHODS",
    "Tracing",
    "client_interceptors",
    "configure_tracing",
    "current_tracing",
    "quiet_methods",
    "server_interceptors",
    "shutdown_tracing",
    "tracing_requested",
]

log = logging.getLogger("sagasuite.telemetry")

# Health checks (Consul polls them every few seconds) and reflection would only add noise.
DEFAULT_EXCLUDED_SERVICES = (
    "grpc.health.v1.Health,grpc.reflection.v1alpha.ServerReflection,grpc.reflection.v1.ServerReflection"
)
# Polled, read-only calls (full method names): health checks (Consul, Docker, balancers) and the
# orchestrator's queries an operator's tools repeat. A span or an INFO line per call would drown the rest:
# `saga up`'s panel alone made 343 of 650 log lines and 25 of 40 spans with GetSagaStats once a second.
DEFAULT_QUIET_METHODS = (
    "grpc.health.v1.Health/Check,grpc.health.v1.Health/Watch,"
    "sagasuite.orchestrator.v1.OrchestratorService/GetSagaStats,"
    "sagasuite.orchestrator.v1.OrchestratorService/ListSagas,"
    "sagasuite.orchestrator.v1.OrchestratorService/GetSaga,"
    "sagasuite.orchestrator.v1.OrchestratorService/ListDefinitions"
)
_SUPPORTED_EXPORTERS = ("otlp", "console")


def _exporter_names(environ: Mapping[str, str]) -> list[str] | None:
    """The exporters OTEL_TRACES_EXPORTER names ("none" removed), or None when it is unset or empty."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        return None
    return [name for name in (part.strip().lower() for part in raw.split(",")) if name and name != "none"]


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables ask for tracing at all."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = _exporter_names(env)
    if names is not None:
        return bool(names)
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = _exporter_names(environ) or ["otlp"]
    unknown = [name for name in names if name not in _SUPPORTED_EXPORTERS]
    if unknown:
        raise SystemExit(
            f"configuration error:\n  OTEL_TRACES_EXPORTER: unsupported exporter {', '.join(unknown)} "
            f"(supported: {', '.join(_SUPPORTED_EXPORTERS)}, none)"
        )
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            )
            if protocol.strip().lower() != "grpc":
                raise SystemExit(
                    f"configuration error:\n  OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; "
                    "this build exports OTLP over gRPC only (use grpc, port 4317)"
                )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            exporters.append(ConsoleSpanExporter())
    return exporters


def _resource(service_name: str) -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; otherwise the process's own service name."""
    resource = Resource.create({"process.pid": os.getpid()})
    if str(resource.attributes.get(SERVICE_NAME, "unknown_service")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


def _excluded_services(environ: Mapping[str, str]) -> frozenset[str]:
    raw = environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES")
    names = DEFAULT_EXCLUDED_SERVICES if raw is None else raw
    return frozenset(part.strip() for part in names.split(",") if part.strip())


def quiet_methods(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The full method names ("package.Service/Method") QUIET_METHODS lists, the defaults when it is unset.

    An entry that is not a full method name stops the process with a configuration error: a bare
    "GetSagaStats" would otherwise quietly match nothing.
    """
    env = os.environ if environ is None else environ
    raw = env.get("QUIET_METHODS")
    names = DEFAULT_QUIET_METHODS if raw is None else raw
    found: set[str] = set()
    for part in names.split(","):
        name = part.strip().lstrip("/")
        if not name:
            continue
        service, _, method = name.partition("/")
        if not service or not method or "/" in method:
            raise SystemExit(
                f"configuration error:\n  QUIET_METHODS: {part.strip()!r} is not a full method name "
                "(package.Service/Method, e.g. sagasuite.orchestrator.v1.OrchestratorService/GetSagaStats)"
            )
        found.add(name)
    return frozenset(found)


def _call_filter(excluded_services: frozenset[str], quiet: frozenset[str]) -> Callable[[Any], bool] | None:
    """An instrumentation filter: True (trace it) unless the call's service is excluded or its method is quiet.

    The same as the instrumentation's own `filters.negate(filters.any_of(filters.service_name(...),
    filters.full_method_name(...)))`, with one set lookup each instead of a chain of path splits: it
    runs on every call of every process.
    """
    if not excluded_services and not quiet:
        return None

    def traced(details: Any) -> bool:
        method = details.method
        if isinstance(method, bytes):
            method = method.decode()
        full_name = method.lstrip("/")
        return full_name not in quiet and full_name.split("/", 1)[0] not in excluded_services

    return traced


class Tracing:
    """The process's tracer provider, and the gRPC interceptors that create spans with it."""

    def __init__(self, service_name: str, environ: Mapping[str, str]) -> None:
        self.provider = TracerProvider(resource=_resource(service_name))
        for exporter in _exporters(environ):
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self._filter = _call_filter(_excluded_services(environ), quiet_methods(environ))
        self.service_name = str(self.provider.resource.attributes.get(SERVICE_NAME, service_name))

    def tracer(self, name: str) -> trace.Tracer:
        return self.provider.get_tracer(name)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        # The instrumentation leaves its factories unannotated.
        interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=self._filter
        )
        return [interceptor]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors = aio_client_interceptors(  # type: ignore[no-untyped-call]  # unannotated, as above
            tracer_provider=self.provider, filter_=self._filter
        )
        return list(interceptors)

    def shutdown(self) -> None:
        """Export the spans still queued, then stop the exporters."""
        self.provider.shutdown()


_current: Tracing | None = None


def configure_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Set up tracing for this process from the OTEL_* variables, once; None when tracing is off.

    Calling it again returns the tracing set up the first time, so the entry point and the server
    bootstrap may both call it.
    """
    global _current
    if _current is not None:
        return _current
    env = os.environ if environ is None else environ
    if not tracing_requested(env):
        return None
    tracing = Tracing(service_name, env)
    trace.set_tracer_provider(tracing.provider)
    _current = tracing
    log.info("tracing on: service.name=%s", tracing.service_name)
    return tracing


def current_tracing() -> Tracing | None:
    return _current


def server_interceptors() -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """The tracing server interceptor, or nothing when tracing is off."""
    return _current.server_interceptors() if _current is not None else []


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The tracing client interceptors for a channel, or nothing when tracing is off."""
    return _current.client_interceptors() if _current is not None else []


def shutdown_tracing() -> None:
    """Flush and stop tracing (on graceful shutdown); a no-op when tracing is off."""
    global _current
    if _current is not None:
        tracing, _current = _current, None
        tracing.shutdown()
