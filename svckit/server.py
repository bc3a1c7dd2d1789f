"""Server bootstrap shared by every process: the RPC wrapper, health, reflection and graceful stop."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from svckit.config import ServiceSettings
from svckit.errors import DomainError, InvalidArgument, RetryableError, status_from_error
from svckit.faults import FaultInjector, parse_faults
from svckit.metrics import RpcMetrics, serve_metrics
from svckit.telemetry import configure_tracing, server_interceptors, shutdown_tracing

__all__ = ["IDEMPOTENCY_HEADER", "CallContext", "RpcServer", "rpc", "run_server"]

IDEMPOTENCY_HEADER = "idempotency-key"
_MAX_KEY_LENGTH = 200

log = logging.getLogger("sagasuite.rpc")

ServicerT = TypeVar("ServicerT")


@dataclass
class CallContext:
    """What a handler needs from its call besides the request: key and deadline."""

    method: str
    idempotency_key: str
    deadline: float | None
    grpc_context: grpc.aio.ServicerContext
    notes: dict[str, Any] = field(default_factory=dict)


def _metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value
    return None


def _idempotency_key(context: grpc.aio.ServicerContext, required: bool) -> str:
    if _metadata_value(context, IDEMPOTENCY_HEADER + "-bin") is not None:
        raise InvalidArgument.of(IDEMPOTENCY_HEADER, "must be printable ASCII text, not a binary header")
    raw = _metadata_value(context, IDEMPOTENCY_HEADER)
    if raw is None or raw == "":
        if required:
            raise InvalidArgument.of(IDEMPOTENCY_HEADER, "metadata header is required on this mutating call")
        return ""
    key = raw.decode() if isinstance(raw, bytes) else raw
    if len(key) > _MAX_KEY_LENGTH:
        raise InvalidArgument.of(IDEMPOTENCY_HEADER, f"must be at most {_MAX_KEY_LENGTH} characters")
    if not key.isascii() or not key.isprintable():
        raise InvalidArgument.of(IDEMPOTENCY_HEADER, "must be printable ASCII text")
    return key


class RpcServer:
    """Per-process state the RPC wrapper uses: fault injection, call observers, whether calls are traced."""

    faults: FaultInjector = FaultInjector([])
    observers: list[Callable[[str, str, float, bool], None]] = []
    tracing: bool = False


def rpc(*, mutating: bool) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Wrap a servicer method: key check, faults, error conversion and one log line per call.

    The wrapped method is called as method(self, request, call: CallContext) and returns the
    response; it raises DomainError or RetryableError for refusals, never a gRPC status.
    """

    def decorate(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        method = handler.__name__

        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            key = ""
            replayed = False
            failure: grpc.Status | None = None
            try:
                key = _idempotency_key(context, required=mutating)
                if key and RpcServer.tracing:
                    # The server span the tracing interceptor opened around this call.
                    trace.get_current_span().set_attribute("idempotency.key", key)
                order_id = getattr(request, "order_id", "")
                await RpcServer.faults.before(method, key, order_id)
                remaining = context.time_remaining()
                deadline = time.monotonic() + remaining if remaining is not None else None
                call = CallContext(method, key, deadline, context)
                response = await handler(self, request, call)
                replayed = bool(call.notes.get("replayed"))
                if replayed and RpcServer.tracing:
                    trace.get_current_span().set_attribute("idempotency.replayed", True)
                await RpcServer.faults.after(method, key, order_id)
            except (DomainError, RetryableError) as error:
                failure = status_from_error(error)
            except asyncio.CancelledError:
                log.info("method=%s key=%s code=CANCELLED", method, key or "-")
                raise
            except Exception:
                reference = uuid.uuid4().hex[:12]
                log.exception("method=%s key=%s code=INTERNAL ref=%s", method, key or "-", reference)
                failure = status_from_error(
                    RetryableError(f"internal error, reference {reference}", grpc.StatusCode.INTERNAL)
                )
            elapsed_ms = (time.perf_counter() - started) * 1000
            code_name = failure.code.name if failure else "OK"  # type: ignore[attr-defined]
            log.info(
                "method=%s key=%s code=%s ms=%.1f%s",
                method,
                key or "-",
                code_name,
                elapsed_ms,
                " replayed" if replayed else "",
            )
            for observer in RpcServer.observers:
                observer(method, code_name, elapsed_ms, replayed)
            if failure is not None:
                await context.abort(
                    failure.code,  # type: ignore[attr-defined]
                    failure.details,  # type: ignore[attr-defined]
                    trailing_metadata=failure.trailing_metadata,  # type: ignore[attr-defined]
                )
            return response

        return wrapper

    return decorate


async def run_server(
    settings: ServiceSettings,
    add_services: Callable[[grpc.aio.Server], Sequence[str]],
    *,
    on_started: Callable[[int], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
) -> None:
    """Serve until SIGTERM or SIGINT, then stop taking calls, drain in-flight ones and return.

    add_services registers the servicers and returns their full service names for health and
    reflection. on_started receives the bound port (registration in discovery goes there).
    """
    RpcServer.faults = FaultInjector(parse_faults(settings.faults))
    # Off unless OTEL_* variables ask for it; then every call runs inside a server span, so the
    # per-call log line carries its trace and span ids.
    RpcServer.tracing = configure_tracing(settings.service_name) is not None
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options, interceptors=server_interceptors() or None)
    service_names = list(add_services(server))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port = (
            server.add_secure_port(address, _server_credentials(settings))
            if settings.tls_cert_file
            else server.add_insecure_port(address)
        )
    except RuntimeError as error:
        raise SystemExit(f"configuration error: cannot listen on {address} (HOST, PORT): {error}") from None
    await server.start()
    for name in [*service_names, ""]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(job()) for job in background]
    log.info("serving %s on port %d", ",".join(service_names), port)
    metrics_server = None
    if settings.metrics_port >= 0:
        RpcServer.observers.append(RpcMetrics())
        metrics_server = serve_metrics(settings.host, settings.metrics_port)
        # Printed before READY, so whoever waits for READY finds the metrics port too.
        print(f"METRICS port={metrics_server.port}", flush=True)
    # Printed for the processes that start us: they read the bound port from this line.
    print(f"READY port={port}", flush=True)
    if on_started is not None:
        await on_started(port)
    await stop_requested.wait()
    log.info("stopping: draining in-flight calls for up to %.1fs", settings.grace_seconds)
    await health.enter_graceful_shutdown()
    if on_stopping is not None:
        await on_stopping()
    for task in tasks:
        task.cancel()
    await server.stop(settings.grace_seconds)
    if metrics_server is not None:
        metrics_server.close()
    shutdown_tracing()
    log.info("stopped")


def _server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials:
    with open(settings.tls_key_file, "rb") as key_file, open(settings.tls_cert_file, "rb") as cert_file:
        key_and_cert = [(key_file.read(), cert_file.read())]
    if settings.tls_client_ca_file:
        with open(settings.tls_client_ca_file, "rb") as ca_file:
            return grpc.ssl_server_credentials(key_and_cert, ca_file.read(), require_client_auth=True)
    return grpc.ssl_server_credentials(key_and_cert)
